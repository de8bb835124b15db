"""Builds the config's models, trains them (or reuses their checkpoints), and exposes each
as the pure functions the attacks need.

`MODELS` is the table of the study's models (name -> `ModelSpec`: its kind, how to build its
Flax module from `config.model[name]`, how to train it); its names and kinds are
`vae_attacks.models.MODEL_KINDS`, which configs and validation read. The defences
(experiments/defenses.py) train their CNNs, the MLP VAE and its latent classifier with the
same functions (`train_cnn`, `train_vae`, `train_latent_classifier`).
"""

import contextlib
import hashlib
import json
import math
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax import serialization

from experiments import cluster, store
from vae_attacks import genclf, models, train
from vae_attacks.attacks import runner
from vae_attacks.types import LogitsFn, Params


class Trained(NamedTuple):
  """One trained model as the attacks see it."""

  name: str  # "cnn", "mlp_vae", "conv_vae"
  kind: str  # "classifier" | "vae"
  logits_fn: LogitsFn  # the CNN, or the VAE's latent classifier ("VAE as classifier")
  params: Params  # the CNN's variables, or {"vae": ..., "clf": ...}
  vae: Any  # models.VAEFns for a VAE, else None
  metrics: dict  # written to train_metrics.json


def kept_metrics(metrics: dict, params, kind: str) -> dict:
  """The train_metrics.json entry of one training: train's metrics, JSON-friendly, with the
  parameter count and the kind ("classifier", "vae", "gmvae")."""
  keep = {k: v for k, v in metrics.items() if k != "history"}
  # train_seconds: the whole training, also when this run resumed it or reused its checkpoint.
  keep["train_seconds_this_run"] = keep.get("train_seconds", 0.0)
  keep["train_seconds"] = keep.get("total_train_seconds", keep["train_seconds_this_run"])
  keep["param_count"] = models.param_count(params)
  keep["kind"] = kind
  if "history" in metrics:
    keep["history"] = metrics["history"]
  return keep


def vae_classifier_metrics(vae_kept: dict, clf_kept: dict) -> dict:
  """The train_metrics entry of a VAE with its latent classifier (both `kept_metrics`)."""
  return {
    "vae": vae_kept,
    "latent_classifier": clf_kept,
    "test_neg_elbo_nats": vae_kept["test_neg_elbo_nats"],
    "test_accuracy": clf_kept["test_accuracy"],
    "train_seconds": vae_kept["train_seconds"] + clf_kept["train_seconds"],
    # 0 when both were restored from their checkpoints (the progress display's "done earlier")
    "train_seconds_this_run": sum(
      m.get("train_seconds_this_run", m["train_seconds"]) for m in (vae_kept, clf_kept)
    ),
  }


def _num_classes(data) -> int:
  return len(data.class_names)


def _image_shape(data) -> tuple:
  return tuple(data.x_train.shape[1:])


def train_cnn(
  name: str, model_cfg, train_cfg, data, *, key, checkpoint_dir: str
) -> tuple[nn.Module, Params, dict]:
  """A `models.CNN` built from `model_cfg`, trained with `train_cfg` (a config train section):
  (module, variables, kept metrics); `name` labels the progress lines."""
  cnn = MODELS["cnn"].build(model_cfg, data)
  params, m = train.train_classifier(
    cnn,
    data,
    key=key,
    settings=train.TrainSettings.from_config(train_cfg),
    checkpoint_dir=checkpoint_dir,
  )
  logging.info("%s: test accuracy %.4f", name, m["test_accuracy"])
  return cnn, params, kept_metrics(m, params, "classifier")


def train_vae(
  name: str, config, data, *, key, checkpoint_dir: str
) -> tuple[nn.Module, Params, dict]:
  """The VAE `name` ("mlp_vae", "conv_vae") built from `config.model[name]`, trained with
  `config.train.vae`: (module, variables, kept metrics)."""
  vae = MODELS[name].build(config.model[name], data)
  params, m = train.train_vae(
    vae,
    data,
    key=key,
    settings=train.TrainSettings.from_config(config.train.vae),
    checkpoint_dir=checkpoint_dir,
  )
  return vae, params, kept_metrics(m, params, "vae")


def train_latent_classifier(
  config, data, vae: nn.Module, vae_params: Params, *, key, checkpoint_dir: str
) -> tuple[nn.Module, Params, dict]:
  """The `LatentClassifier` of `config.model.latent_classifier` on the frozen VAE's latent
  means, trained with `config.train.latent_classifier`: (module, {"vae", "clf"} params, kept
  metrics of the classifier alone)."""
  clf = models.LatentClassifier(num_classes=_num_classes(data), **config.model.latent_classifier)
  params, m = train.train_latent_classifier(
    vae,
    vae_params,
    clf,
    data,
    key=key,
    settings=train.TrainSettings.from_config(config.train.latent_classifier),
    checkpoint_dir=checkpoint_dir,
  )
  return clf, params, kept_metrics(m, params["clf"], "classifier")


def _sub(checkpoint_dir: pathlib.Path | None, name: str = "") -> str | None:
  """The checkpoint folder (or its subfolder `name`) as train takes it; None writes none."""
  return None if checkpoint_dir is None else str(checkpoint_dir / name)


def _fit_classifier(name, config, data, key, checkpoint_dir: pathlib.Path | None, trained) -> tuple:
  """A CNN of `config.model[name]` trained with `config.train[name]`: (params, kept metrics).

  A train section with `match_to: <model>` is the study's accuracy-matched control: the same
  training, stopped after the first epoch whose test accuracy reaches that (earlier) model's
  (`TrainSettings.stop_at_accuracy`)."""
  section = dict(config.train[name])
  match_to = section.pop("match_to", "")
  if match_to:
    section["stop_at_accuracy"] = float(trained[match_to].metrics["test_accuracy"])
    logging.info(
      "%s: trained until its test accuracy reaches %s's %.4f",
      name, match_to, section["stop_at_accuracy"],
    )  # fmt: skip
  _, params, kept = train_cnn(
    name, config.model[name], section, data, key=key, checkpoint_dir=_sub(checkpoint_dir)
  )
  if match_to:
    kept["matched_to"] = match_to
  return params, kept


def _wrap_classifier(name, config, data, params, metrics) -> Trained:
  cnn = MODELS[name].build(config.model[name], data)
  return Trained(name, "classifier", models.classifier_fns(cnn), params, None, metrics)


def _fit_vae_classifier(
  name, config, data, key, checkpoint_dir: pathlib.Path | None, trained
) -> tuple:
  """A VAE and the latent classifier on its code (the "VAE as classifier"): (params, metrics)."""
  del trained
  vae_key, clf_key = jax.random.split(key)
  vae, vae_params, vae_kept = train_vae(
    name, config, data, key=vae_key, checkpoint_dir=_sub(checkpoint_dir, "vae")
  )
  vae_params = cluster.same_as_writer(vae_params)  # the latent classifier trains on process 0's
  _, params, clf_kept = train_latent_classifier(
    config,
    data,
    vae,
    vae_params,
    key=clf_key,
    checkpoint_dir=_sub(checkpoint_dir, "latent_classifier"),
  )
  metrics = vae_classifier_metrics(vae_kept, clf_kept)
  logging.info(
    "%s: test -ELBO %.2f nats, latent classifier accuracy %.4f",
    name,
    metrics["test_neg_elbo_nats"],
    metrics["test_accuracy"],
  )
  return params, metrics


def _fit_joint_vae(name, config, data, key, checkpoint_dir: pathlib.Path | None, trained) -> tuple:
  """A VAE trained jointly with its latent classifier (`train.train_joint_vae`): alpha of
  -ELBO + alpha * CE is the train section's `ce_weight_per_pixel` times the pixels H * W * C."""
  del trained
  section = dict(config.train[name])
  ce_weight = float(section.pop("ce_weight_per_pixel")) * math.prod(_image_shape(data))
  vae = MODELS[name].build(config.model[name], data)
  clf = _latent_classifier(config, data)
  params, m = train.train_joint_vae(
    vae, clf, data, key=key, settings=train.TrainSettings.from_config(section),
    ce_weight=ce_weight, checkpoint_dir=_sub(checkpoint_dir),
  )  # fmt: skip
  kept = kept_metrics(m, params, "vae")
  kept["ce_weight"] = ce_weight
  logging.info(
    "%s: test -ELBO %.2f nats, accuracy %.4f", name, kept["test_neg_elbo_nats"],
    kept["test_accuracy"],
  )  # fmt: skip
  return params, kept


def _latent_classifier(config, data) -> nn.Module:
  return models.LatentClassifier(num_classes=_num_classes(data), **config.model.latent_classifier)


def _wrap_vae(name, config, data, params, metrics) -> Trained:
  vae = MODELS[name].build(config.model[name], data)
  logits_fn = models.latent_classifier_fn(vae, _latent_classifier(config, data))
  return Trained(name, "vae", logits_fn, params, models.vae_fns(vae), metrics)


def abs_module(section, data) -> tuple:
  """ABS's class VAE module and its inference settings from a `config.model` section."""
  section = dict(section)
  inference = {k: section.pop(k) for k in ABS_INFERENCE}
  return genclf.ABSVAE(image_shape=_image_shape(data), **section), inference


def _abs_parts(name, config, data) -> tuple:
  return abs_module(config.model[name], data)


def _fit_abs(name, config, data, key, checkpoint_dir: pathlib.Path | None, trained) -> tuple:
  """ABS (Schott et al. 2019): the K class VAEs, then the inference's bank and settings."""
  del trained
  vae, inference = _abs_parts(name, config, data)
  train_key, bank_key = jax.random.split(key)
  class_params, m = train.train_abs(
    vae, data, key=train_key, settings=train.TrainSettings.from_config(config.train[name]),
    checkpoint_dir=_sub(checkpoint_dir),
  )  # fmt: skip
  params = genclf.abs_params(vae, class_params, bank_key, n_samples=inference["n_samples"])
  model = _wrap_abs(name, config, data, params, {})
  return params, _generative_metrics(name, model.logits_fn, params, class_params, data, m)


def _wrap_abs(name, config, data, params, metrics) -> Trained:
  vae, inference = _abs_parts(name, config, data)
  inference.pop("n_samples")
  logits_fn = genclf.abs_logits_fn(vae, **inference)
  return Trained(name, "classifier", logits_fn, params, None, metrics)


def cvae_module(section, data) -> tuple:
  """The class-conditional VAE module and its importance samples from a `config.model` section."""
  section = dict(section)
  num_samples = section.pop("num_samples")
  vae = genclf.ConditionalVAE(
    image_shape=_image_shape(data), num_classes=_num_classes(data), **section
  )
  return vae, num_samples


def _cvae_parts(name, config, data) -> tuple:
  return cvae_module(config.model[name], data)


def _fit_cvae(name, config, data, key, checkpoint_dir: pathlib.Path | None, trained) -> tuple:
  """The class-conditional VAE Bayes classifier (Li et al. 2019, GFY)."""
  del trained
  vae, num_samples = _cvae_parts(name, config, data)
  train_key, noise_key = jax.random.split(key)
  vae_params, m = train.train_cvae(
    vae, data, key=train_key, settings=train.TrainSettings.from_config(config.train[name]),
    checkpoint_dir=_sub(checkpoint_dir), num_samples=num_samples,
  )  # fmt: skip
  params = genclf.cvae_params(
    vae_params, noise_key, num_samples=num_samples, latent_dim=vae.latent_dim
  )
  logits_fn = genclf.cvae_logits_fn(vae)
  return params, _generative_metrics(name, logits_fn, params, vae_params, data, m)


def _wrap_cvae(name, config, data, params, metrics) -> Trained:
  vae, _ = _cvae_parts(name, config, data)
  return Trained(name, "classifier", genclf.cvae_logits_fn(vae), params, None, metrics)


def _generative_metrics(name, logits_fn, params, trained_params, data, m) -> dict:
  """A generative classifier's kept metrics, with its test accuracy under the full inference
  (the per-epoch one of training may be cheaper) on `GENERATIVE_EVAL_EXAMPLES`."""
  n = min(GENERATIVE_EVAL_EXAMPLES, len(data.y_test))
  logits = runner.batched_logits(logits_fn, params, data.x_test[:n])
  metrics = kept_metrics(m, trained_params, "classifier")
  metrics["test_accuracy"] = float(np.mean(np.argmax(logits, -1) == data.y_test[:n]))
  metrics["test_accuracy_examples"] = n
  logging.info("%s: test accuracy %.4f (first %d test images)", name, metrics["test_accuracy"], n)
  return metrics


# The ABS config keys that set its inference, not its VAEs (vae_attacks.genclf.abs_logits_fn).
ABS_INFERENCE = ("n_samples", "steps", "lr", "radius", "logit_scale", "gradient")
# Test images of a generative classifier's reported accuracy: its inference costs ~0.1 s per
# image on this shared 2-core CPU (ABS, 50 steps): the first half of the test set.
GENERATIVE_EVAL_EXAMPLES = 5_000


class ModelSpec(NamedTuple):
  """One of the study's models."""

  kind: str  # models.MODEL_KINDS[name]: "classifier" | "vae"
  build: Callable[[Any, Any], nn.Module]  # (config.model[name], data) -> the Flax module
  # (name, config, data, key, checkpoint folder or None, models trained before it) -> (params,
  # kept metrics); checkpoints under the folder
  fit: Callable[..., tuple[Params, dict]]
  # (name, config, data, params, metrics) -> Trained: the pure functions the attacks see
  wrap: Callable[..., Trained]


def _cnn(section, data) -> nn.Module:
  return models.CNN(num_classes=_num_classes(data), **section)


def _conv_vae(section, data) -> nn.Module:
  return models.ConvVAE(image_shape=_image_shape(data), **section)


MODELS: dict[str, ModelSpec] = {
  "cnn": ModelSpec("classifier", _cnn, _fit_classifier, _wrap_classifier),
  "mlp_vae": ModelSpec(
    "vae",
    lambda section, data: models.MLPVAE(image_shape=_image_shape(data), **section),
    _fit_vae_classifier,
    _wrap_vae,
  ),
  "conv_vae": ModelSpec("vae", _conv_vae, _fit_vae_classifier, _wrap_vae),
  # Kingma et al. (2014)'s supervised VAE objective; the conv VAE's architecture.
  "joint_vae": ModelSpec("vae", _conv_vae, _fit_joint_vae, _wrap_vae),
  # The accuracy-matched control: a CNN stopped at a weaker model's clean accuracy.
  "cnn_matched": ModelSpec("classifier", _cnn, _fit_classifier, _wrap_classifier),
  # The generative classifiers (vae_attacks.genclf), attacked through their logits.
  "abs": ModelSpec("classifier", lambda s, d: abs_module(s, d)[0], _fit_abs, _wrap_abs),
  "cvae": ModelSpec("classifier", lambda s, d: cvae_module(s, d)[0], _fit_cvae, _wrap_cvae),
}
MODELS.update({v: MODELS[b] for v, b in models.MODEL_VARIANTS.items()})

PARAMS_DIR = "params"  # <workdir>/params/<model>.msgpack: exported trained parameters


def train_all(config, data, workdir, job=None, on_model=None) -> dict[str, Trained]:
  """Trains every model of `config.models`, in order; checkpoints under workdir/checkpoints.

  A model with no checkpoint is imported instead of trained when a committed record holds its
  parameters: workdir/params/<name>.msgpack (written by `output.export_params`), or the same
  under the folder `import_params` names (relative to workdir: another part of a study);
  its test accuracy is checked against that record's train_metrics.json (`import_model`).
  With `output.export_params`, each model trained here has its parameters written to
  workdir/params. `job` (experiments.progress.Job) shows each training as a stage;
  `on_model(models so far)` is called after each model (experiments/run.py writes
  train_metrics.json there, so that exported parameters always have their record).
  """
  workdir = pathlib.Path(workdir)
  root = jax.random.key(config.seed)
  sources = [workdir]
  if config.get("import_params", ""):
    sources.append(import_folder(workdir, config.import_params))
  # Each record's train_metrics.json as it was when the run began: `on_model` rewrites the
  # workdir's own after each model, and a later import must still find its entry there.
  records = {d: _read_record(d / "train_metrics.json") for d in sources}
  out = {}
  for index, name in enumerate(config.models):
    key = jax.random.fold_in(root, index)
    ckpt = (workdir / "checkpoints" / name).resolve()
    if job is not None:
      job.start("train", name)
    found = [d for d in sources if (d / PARAMS_DIR / f"{name}.msgpack").exists()]
    if not ckpt.exists() and found:
      path = found[0] / PARAMS_DIR / f"{name}.msgpack"
      metrics_path = found[0] / "train_metrics.json"
      out[name] = import_model(name, config, data, path, metrics_path, records[found[0]])
      skipped = True
    else:
      with checkpoint_space(ckpt):
        params, metrics = MODELS[name].fit(
          name, config, data, key, ckpt if cluster.writes() else None, out
        )
      params = cluster.same_as_writer(params)
      out[name] = MODELS[name].wrap(name, config, data, params, metrics)
      skipped = metrics.get("train_seconds_this_run", 1.0) == 0.0
      if config.output.get("export_params", False) and cluster.writes():
        store.write_bytes_atomic(
          workdir / PARAMS_DIR / f"{name}.msgpack", serialization.to_bytes(params)
        )
    if on_model is not None:
      on_model(out)
    if job is not None:
      job.finish(skipped=skipped)
  return out


def import_folder(workdir, import_params: str) -> pathlib.Path:
  """The record folder `import_params` names: relative to `workdir` (another part of a study,
  e.g. "../lfw_vae") or absolute."""
  # normpath: "<workdir>/../other" must resolve while <workdir> does not exist yet
  return pathlib.Path(os.path.normpath(pathlib.Path(workdir) / import_params))


def import_committed(name, config, data, folder: pathlib.Path) -> Trained:
  """The model `name` from the record in `folder` (params/<name>.msgpack and its
  train_metrics.json), checked as `import_model` checks it; a `UserError` when the record
  holds no parameters for it (nothing is trained in its place)."""
  from experiments.errors import UserError  # noqa: PLC0415

  path = folder / PARAMS_DIR / f"{name}.msgpack"
  if not path.exists():
    raise UserError(
      f"{name}: no committed parameters at {path} (import_params); point import_params at "
      "the record of the run that trained it (e.g. results/study/lfw_vae)"
    )
  return import_model(name, config, data, path, folder / "train_metrics.json")


# Largest difference between the test accuracy of imported parameters evaluated here and the
# one recorded where they were trained: a few borderline examples may flip between machines.
IMPORT_ACCURACY_TOLERANCE = 0.005


def _read_record(metrics_path: pathlib.Path) -> dict | None:
  """A record's train_metrics.json, or None where there is none."""
  return json.loads(metrics_path.read_text()) if metrics_path.exists() else None


def import_model(
  name, config, data, path: pathlib.Path, metrics_path: pathlib.Path, record: dict | None = None
) -> Trained:
  """The model `name` with parameters read from `path` (flax msgpack), checked.

  The parameters must have the shapes of `config.model[name]`'s module, and their test
  accuracy on `data` must equal the record's (`metrics_path`, train_metrics.json) within
  `IMPORT_ACCURACY_TOLERANCE`; otherwise a `UserError` names the model and the difference.
  The metrics are the record's, with `imported_from` and `test_accuracy_here` added.
  `record`: that file's contents read earlier (None: read it now).
  """
  from experiments.errors import UserError  # noqa: PLC0415

  if record is None:
    record = _read_record(metrics_path) or {}
  if name not in record:
    raise UserError(
      f"{name}: parameters in {path} but no entry for it in {metrics_path}; the record is "
      "incomplete (delete the parameters to train the model here)"
    )
  recorded = record[name]
  raw = path.read_bytes()
  params = serialization.msgpack_restore(raw)
  template = _template(name, config, data)
  got = jax.tree.map(lambda a: tuple(a.shape), params)
  want = jax.tree.map(lambda a: tuple(a.shape), template)
  if got != want:
    raise UserError(
      f"{name}: the parameters in {path} do not fit config.model.{name} (another "
      "architecture); use the config they were trained with"
    )
  params = jax.tree.map(lambda a, t: np.asarray(a, t.dtype), params, template)
  model = MODELS[name].wrap(name, config, data, params, dict(recorded))
  here = train.classifier_evaluation(model.logits_fn, data.x_test, data.y_test)(params)
  there = float(recorded["test_accuracy"])
  if abs(here["test_accuracy"] - there) > IMPORT_ACCURACY_TOLERANCE:
    raise UserError(
      f"{name}: imported parameters ({path}) classify the test set at "
      f"{here['test_accuracy']:.4f} here, {there:.4f} where they were trained (allowed "
      f"difference {IMPORT_ACCURACY_TOLERANCE}); the data or the model differ"
    )
  logging.info(
    "%s: imported from %s, test accuracy %.4f (recorded %.4f)",
    name, path, here["test_accuracy"], there,
  )  # fmt: skip
  metrics = dict(
    recorded,
    imported_from=_portable(path),
    imported_sha256=hashlib.sha256(raw).hexdigest(),
    test_accuracy_here=here["test_accuracy"],
  )
  return model._replace(metrics=metrics)


def _portable(path: pathlib.Path) -> str:
  """`path` relative to the working directory (the repository root, where the runs start)
  when it lies below it, else absolute: a committed record then names no machine's folders.
  The file itself is identified by `imported_sha256`."""
  path = pathlib.Path(path).resolve()
  try:
    return path.relative_to(pathlib.Path.cwd().resolve()).as_posix()
  except ValueError:
    return str(path)


def _template(name, config, data) -> Params:
  """Shapes and dtypes of `name`'s parameters (nothing is computed: `jax.eval_shape`)."""
  x = jax.ShapeDtypeStruct((1, *_image_shape(data)), np.float32)
  key = jax.random.key(0)
  module = MODELS[name].build(config.model[name], data)
  if MODELS[name].kind == "classifier":
    return jax.eval_shape(module.init, key, x)
  clf = _latent_classifier(config, data)
  vae = jax.eval_shape(module.init, key, x, key)
  z = jax.ShapeDtypeStruct((1, module.latent_dim), np.float32)
  return {"vae": vae, "clf": jax.eval_shape(clf.init, key, z)}


@contextlib.contextmanager
def checkpoint_space(ckpt: pathlib.Path) -> Iterator[None]:
  """Turns a full disk while training into store.OutOfSpace naming the checkpoint folder.

  orbax writes in its own threads and re-raises a full disk as a ValueError (tensorstore's
  RESOURCE_EXHAUSTED) on the caller's thread; the half-written save it leaves
  (`<step>.orbax-checkpoint-tmp*`) is never restored, and is removed here to free its space.
  """
  try:
    yield
  except store.OutOfSpace:
    raise
  except Exception as e:
    if not store.is_out_of_space(e):
      raise
    for tmp in sorted(ckpt.rglob("*.orbax-checkpoint-tmp*"), reverse=True):
      shutil.rmtree(tmp, ignore_errors=True)
    raise store.OutOfSpace(ckpt, "saving a checkpoint") from None
