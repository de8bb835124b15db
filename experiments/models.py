"""Builds the config's models, trains them (or reuses their checkpoints), and exposes each
as the pure functions the attacks need.

`MODELS` is the table of the study's models (name -> `ModelSpec`: its kind, how to build its
Flax module from `config.model[name]`, how to train it); its names and kinds are
`vae_attacks.models.MODEL_KINDS`, which configs and validation read. The defences
(experiments/defenses.py) train their CNNs, the MLP VAE and its latent classifier with the
same functions (`train_cnn`, `train_vae`, `train_latent_classifier`).
"""

import contextlib
import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from experiments import store
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


def _train_classifier(name, config, data, key, checkpoint_dir: pathlib.Path) -> Trained:
  cnn, params, metrics = train_cnn(
    name, config.model[name], config.train[name], data, key=key, checkpoint_dir=str(checkpoint_dir)
  )
  return Trained(name, "classifier", models.classifier_fns(cnn), params, None, metrics)


def _train_vae_classifier(name, config, data, key, checkpoint_dir: pathlib.Path) -> Trained:
  """A VAE and the latent classifier on its code: the "VAE as classifier"."""
  vae_key, clf_key = jax.random.split(key)
  vae, vae_params, vae_kept = train_vae(
    name, config, data, key=vae_key, checkpoint_dir=str(checkpoint_dir / "vae")
  )
  clf, params, clf_kept = train_latent_classifier(
    config,
    data,
    vae,
    vae_params,
    key=clf_key,
    checkpoint_dir=str(checkpoint_dir / "latent_classifier"),
  )
  metrics = vae_classifier_metrics(vae_kept, clf_kept)
  logging.info(
    "%s: test -ELBO %.2f nats, latent classifier accuracy %.4f",
    name,
    metrics["test_neg_elbo_nats"],
    metrics["test_accuracy"],
  )
  logits_fn = models.latent_classifier_fn(vae, clf)
  return Trained(name, "vae", logits_fn, params, models.vae_fns(vae), metrics)


def _train_abs(name, config, data, key, checkpoint_dir: pathlib.Path) -> Trained:
  """ABS (Schott et al. 2019): the K class VAEs, then the inference's bank and settings."""
  section = dict(config.model[name])
  inference = {k: section.pop(k) for k in ABS_INFERENCE}
  vae = genclf.ABSVAE(image_shape=_image_shape(data), **section)
  train_key, bank_key = jax.random.split(key)
  class_params, m = train.train_abs(
    vae, data, key=train_key, settings=train.TrainSettings.from_config(config.train[name]),
    checkpoint_dir=str(checkpoint_dir),
  )  # fmt: skip
  n_samples = inference.pop("n_samples")
  params = genclf.abs_params(vae, class_params, bank_key, n_samples=n_samples)
  logits_fn = genclf.abs_logits_fn(vae, **inference)
  return _generative(name, logits_fn, params, class_params, data, m)


def _train_cvae(name, config, data, key, checkpoint_dir: pathlib.Path) -> Trained:
  """The class-conditional VAE Bayes classifier (Li et al. 2019, GFY)."""
  section = dict(config.model[name])
  num_samples = section.pop("num_samples")
  vae = genclf.ConditionalVAE(
    image_shape=_image_shape(data), num_classes=_num_classes(data), **section
  )
  train_key, noise_key = jax.random.split(key)
  vae_params, m = train.train_cvae(
    vae, data, key=train_key, settings=train.TrainSettings.from_config(config.train[name]),
    checkpoint_dir=str(checkpoint_dir), num_samples=num_samples,
  )  # fmt: skip
  params = genclf.cvae_params(
    vae_params, noise_key, num_samples=num_samples, latent_dim=vae.latent_dim
  )
  return _generative(name, genclf.cvae_logits_fn(vae), params, vae_params, data, m)


def _generative(name, logits_fn, params, trained_params, data, m) -> Trained:
  """A generative classifier as the attacks see it, with its test accuracy under the full
  inference (the per-epoch one of training may be cheaper) on `GENERATIVE_EVAL_EXAMPLES`."""
  n = min(GENERATIVE_EVAL_EXAMPLES, len(data.y_test))
  logits = runner.batched_logits(logits_fn, params, data.x_test[:n])
  metrics = kept_metrics(m, trained_params, "classifier")
  metrics["test_accuracy"] = float(np.mean(np.argmax(logits, -1) == data.y_test[:n]))
  metrics["test_accuracy_examples"] = n
  logging.info("%s: test accuracy %.4f (first %d test images)", name, metrics["test_accuracy"], n)
  return Trained(name, "classifier", logits_fn, params, None, metrics)


# The ABS config keys that set its inference, not its VAEs (vae_attacks.genclf.abs_logits_fn).
ABS_INFERENCE = ("n_samples", "steps", "lr", "radius", "logit_scale", "gradient")
# Test images of a generative classifier's reported accuracy: its inference costs ~0.1 s per
# image on this shared 2-core CPU (ABS, 50 steps): the first half of the test set.
GENERATIVE_EVAL_EXAMPLES = 5_000


class ModelSpec(NamedTuple):
  """One of the study's models."""

  kind: str  # models.MODEL_KINDS[name]: "classifier" | "vae"
  build: Callable[[Any, Any], nn.Module]  # (config.model[name], data) -> the Flax module
  # (name, config, data, key, checkpoint folder) -> Trained; checkpoints under the folder
  train: Callable[..., Trained]


MODELS: dict[str, ModelSpec] = {
  "cnn": ModelSpec(
    "classifier",
    lambda section, data: models.CNN(num_classes=_num_classes(data), **section),
    _train_classifier,
  ),
  "mlp_vae": ModelSpec(
    "vae",
    lambda section, data: models.MLPVAE(image_shape=_image_shape(data), **section),
    _train_vae_classifier,
  ),
  "conv_vae": ModelSpec(
    "vae",
    lambda section, data: models.ConvVAE(image_shape=_image_shape(data), **section),
    _train_vae_classifier,
  ),
  "abs": ModelSpec(
    "classifier",
    lambda section, data: genclf.ABSVAE(
      image_shape=_image_shape(data),
      **{k: v for k, v in section.items() if k not in ABS_INFERENCE},
    ),
    _train_abs,
  ),
  "cvae": ModelSpec(
    "classifier",
    lambda section, data: genclf.ConditionalVAE(
      image_shape=_image_shape(data),
      num_classes=_num_classes(data),
      **{k: v for k, v in section.items() if k != "num_samples"},
    ),
    _train_cvae,
  ),
}


def train_all(config, data, workdir, job=None) -> dict[str, Trained]:
  """Trains every model of `config.models`, in order; checkpoints under workdir/checkpoints.
  `job` (experiments.progress.Job) shows each training as a stage of the whole job."""
  root = jax.random.key(config.seed)
  out = {}
  for index, name in enumerate(config.models):
    key = jax.random.fold_in(root, index)
    ckpt = (pathlib.Path(workdir) / "checkpoints" / name).resolve()
    if job is not None:
      job.start("train", name)
    with checkpoint_space(ckpt):
      out[name] = MODELS[name].train(name, config, data, key, ckpt)
    if job is not None:
      job.finish(skipped=out[name].metrics.get("train_seconds_this_run", 1.0) == 0.0)
  return out


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
