"""Builds the config's models, trains them (or reuses their checkpoints), and exposes each
as the pure functions the attacks need."""

import contextlib
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
from absl import logging

from experiments import store
from vae_attacks import models, train
from vae_attacks.types import LogitsFn, Params


class Trained(NamedTuple):
  """One trained model as the attacks see it."""

  name: str  # "cnn", "mlp_vae", "conv_vae"
  kind: str  # "classifier" | "vae"
  logits_fn: LogitsFn  # the CNN, or the VAE's latent classifier ("VAE as classifier")
  params: Params  # the CNN's variables, or {"vae": ..., "clf": ...}
  vae: Any  # models.VAEFns for a VAE, else None
  metrics: dict  # written to train_metrics.json


def train_all(config, data, workdir) -> dict[str, Trained]:
  """Trains every model of `config.models`, in order; checkpoints under workdir/checkpoints."""
  num_classes = len(data.class_names)
  image_shape = tuple(data.x_train.shape[1:])
  root = jax.random.key(config.seed)
  out = {}
  for index, name in enumerate(config.models):
    key = jax.random.fold_in(root, index)
    ckpt = (workdir / "checkpoints" / name).resolve()
    with checkpoint_space(ckpt):
      out[name] = _train_one(config, data, name, key, ckpt, num_classes, image_shape)
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


def _train_one(config, data, name, key, ckpt, num_classes, image_shape) -> Trained:
  """Trains (or restores) model `name` of the config; see train_all."""
  if name == "cnn":
    cnn = models.CNN(num_classes=num_classes, **config.model.cnn)
    params, metrics = train.train_classifier(
      cnn, data, key=key, checkpoint_dir=str(ckpt), **config.train.cnn
    )
    metrics = _keep(metrics, params, "classifier")
    logging.info("cnn: test accuracy %.4f", metrics["test_accuracy"])
    return Trained(name, "classifier", models.classifier_fns(cnn), params, None, metrics)
  cls = models.MLPVAE if name == "mlp_vae" else models.ConvVAE
  vae = cls(image_shape=image_shape, **config.model[name])
  vae_key, clf_key = jax.random.split(key)
  vae_params, vae_metrics = train.train_vae(
    vae, data, key=vae_key, checkpoint_dir=str(ckpt / "vae"), **config.train.vae
  )
  clf = models.LatentClassifier(num_classes=num_classes, **config.model.latent_classifier)
  params, clf_metrics = train.train_latent_classifier(
    vae,
    vae_params,
    clf,
    data,
    key=clf_key,
    checkpoint_dir=str(ckpt / "latent_classifier"),
    **config.train.latent_classifier,
  )
  metrics = vae_classifier_metrics(
    _keep(vae_metrics, vae_params, "vae"), _keep(clf_metrics, params["clf"], "classifier")
  )
  logging.info(
    "%s: test -ELBO %.2f nats, latent classifier accuracy %.4f",
    name,
    metrics["test_neg_elbo_nats"],
    metrics["test_accuracy"],
  )
  logits_fn = models.latent_classifier_fn(vae, clf)
  return Trained(name, "vae", logits_fn, params, models.vae_fns(vae), metrics)


def vae_classifier_metrics(vae_kept: dict, clf_kept: dict) -> dict:
  """The train_metrics entry of a VAE with its latent classifier (both `_keep`-ed)."""
  return {
    "vae": vae_kept,
    "latent_classifier": clf_kept,
    "test_neg_elbo_nats": vae_kept["test_neg_elbo_nats"],
    "test_accuracy": clf_kept["test_accuracy"],
    "train_seconds": vae_kept["train_seconds"] + clf_kept["train_seconds"],
  }


def _keep(metrics: dict, params, kind: str) -> dict:
  """The JSON-friendly part of train's metrics, plus the parameter count."""
  keep = {k: v for k, v in metrics.items() if k != "history"}
  # train_seconds: the whole training, also when this run resumed it or reused its checkpoint.
  keep["train_seconds_this_run"] = keep.get("train_seconds", 0.0)
  keep["train_seconds"] = keep.get("total_train_seconds", keep["train_seconds_this_run"])
  keep["param_count"] = models.param_count(params)
  keep["kind"] = kind
  if "history" in metrics:
    keep["history"] = metrics["history"]
  return keep
