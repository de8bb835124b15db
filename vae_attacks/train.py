"""Training of the study's models: the CNN, the VAEs and the classifier on the VAE's code.

Adam (Kingma & Ba 2015) through optax, one jitted step per minibatch, an evaluation on the test
split after every epoch, and optional orbax checkpoints. Every run is a pure function of its
key and hyper-parameters: epoch e's shuffle is `permutation(fold_in(k_shuffle, e))` and step
i's randomness `fold_in(fold_in(k_step, e), i)`, so a run resumed from a checkpoint after a kill
ends with exactly the parameters of an uninterrupted run.

Every trainer takes a `TrainSettings` (a config's `train.<model>` section) and runs the one
loop, `fit`; the test-set evaluations are `runner.batched_map`s (`classifier_evaluation`),
or, for a model that samples, `sum_over_batches`.

The data argument is anything with `x_train [N, H, W, C]`, `y_train [N]`, `x_test`, `y_test`
(e.g. `vae_attacks.data.Dataset`). The library writes nothing unless given a
`checkpoint_dir`, and reports progress through `absl.logging` (INFO).
"""

import dataclasses
import functools
import os
import re
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from vae_attacks import genclf, losses, models
from vae_attacks import progress as progress_lib
from vae_attacks.attacks import runner
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey

LR_SCHEDULES = ("constant", "cosine")

# (params, x[B, ...], y[B], key) -> (scalar loss, aux metrics)
BatchLoss = Callable[[Params, Array, Array, PRNGKey], tuple[Array, dict]]
# (params, key, x[B, ...], y[B], step) -> x'[B, ...]: a per-batch input transform applied before
# the loss, e.g. adversarial examples for adversarial training (vae_attacks.defenses.adversarial).
# `step` is the int32 global step (epoch * steps_per_epoch + i), for schedules such as an eps
# ramp. Its repr must describe it (it is part of the checkpoint's hyper-parameters).
Perturb = Callable[[Params, PRNGKey, Array, Array, Array], Array]


def make_optimizer(
  *,
  learning_rate: float,
  total_steps: int,
  weight_decay: float = 0.0,
  lr_schedule: str = "constant",
) -> optax.GradientTransformation:
  """Adam (AdamW when `weight_decay` > 0) with a constant or cosine-decayed learning rate.

  Args:
    learning_rate: the (peak) step size.
    total_steps: number of optimiser steps of the whole run (the cosine's length).
    weight_decay: decoupled weight decay (Loshchilov & Hutter 2019); 0 gives plain Adam.
    lr_schedule: "constant" or "cosine" (decays to 0 at `total_steps`).

  Returns:
    An optax gradient transformation.
  """
  if lr_schedule == "constant":
    lr = learning_rate
  elif lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
  else:
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
  if weight_decay:
    return optax.adamw(lr, weight_decay=weight_decay)
  return optax.adam(lr)


def augment_image(key: PRNGKey, x: Array, *, flip: bool, max_shift: int) -> Array:
  """Random horizontal flip and random translation of ONE image (edge-padded crop).

  Args:
    key: randomness for this image.
    x: [H, W, C] image.
    flip: mirror left-right with probability 1/2.
    max_shift: translate by up to this many pixels along each axis.

  Returns:
    [H, W, C] augmented image.
  """
  flip_key, shift_key = jax.random.split(key)
  if flip:
    x = jnp.where(jax.random.bernoulli(flip_key), x[:, ::-1, :], x)
  if max_shift:
    h, w, c = x.shape
    padded = jnp.pad(x, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    offset = jax.random.randint(shift_key, (2,), 0, 2 * max_shift + 1)
    x = jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (h, w, c))
  return x


def augment_batch(augment: Callable[[PRNGKey, Array], Array], key: PRNGKey, x: Array) -> Array:
  """`augment` applied to every image of `x` [..., H, W, C], each with its own key.

  The keys are `split(key, n)` over the n images in row-major order of the leading axes, so a
  batch [B, H, W, C] is augmented as `vmap(augment)(split(key, B), x)`, and ABS's per-class rows
  [B, K, H, W, C] (`train_abs`) image by image, each class's image independently.
  """
  flat = x.reshape((-1, *x.shape[-3:]))
  return jax.vmap(augment)(jax.random.split(key, flat.shape[0]), flat).reshape(x.shape)


class CheckpointError(ValueError):
  """A checkpoint directory this run cannot resume: another model's, or unreadable."""


def _restore_meta(manager, step, name, checkpoint_dir) -> dict:
  """The JSON metadata of checkpoint `step`, or CheckpointError naming the directory."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # noqa: BLE001  (orbax raises many types for a foreign folder)
    raise CheckpointError(
      f"{name}: checkpoint {checkpoint_dir} (step {step}) cannot be read "
      f"({type(e).__name__}); delete it or use another --workdir"
    ) from None
  if not isinstance(meta, dict) or not {"hparams", "epoch", "history"} <= set(meta):
    raise CheckpointError(
      f"{name}: checkpoint {checkpoint_dir} (step {step}) was not written by vae_attacks "
      "training; delete it or use another --workdir"
    )
  return meta


def _restore_state(manager, step, abstract, name, checkpoint_dir):
  """The training state of checkpoint `step`, checked against the structure and shapes of
  `abstract`, or CheckpointError naming the directory."""
  try:
    state = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_on_host(abstract)))
    ).state
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(
      f"{name}: the parameters saved in {checkpoint_dir} (step {step}) do not fit this model "
      f"({type(e).__name__}); delete it or use another --workdir"
    ) from None
  got, want = _signature(state), _signature(abstract)
  if got != want:
    raise CheckpointError(
      f"{name}: the parameters saved in {checkpoint_dir} (step {step}) have other shapes than "
      "this model's; delete it or use another --workdir"
    )
  return state


def _on_host(tree):
  """In a multi-process run, the training state as host numpy arrays (shapes alone: zeros):
  orbax refuses to save one process's device arrays there, and restores numpy as numpy."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda a: np.asarray(a) if hasattr(a, "__array__") else
                      np.zeros(a.shape, a.dtype), tree)  # fmt: skip


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return str(treedef), tuple((tuple(np.shape(a)), str(a.dtype)) for a in leaves)


class NonFiniteError(FloatingPointError):
  """Training produced NaN or inf; the epoch was not checkpointed."""


def _check_finite(name, epoch, epochs, record, params, checkpoint_dir, manager) -> None:
  """Raises NonFiniteError naming the model, epoch and quantity when the epoch's losses,
  metrics or parameters hold NaN or inf (before the state could be checkpointed)."""
  bad = [k for k, v in record.items() if isinstance(v, float) and not np.isfinite(v)]
  if not all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params)):
    bad.append("parameters")
  if not bad:
    return
  last = manager.latest_step() if manager is not None else None
  kept = (
    f"; the checkpoint keeps epoch {last}, the last finite one"
    if last is not None
    else "; nothing was checkpointed"
  )
  where = f"{name} ({checkpoint_dir})" if checkpoint_dir else name
  raise NonFiniteError(
    f"{where}: non-finite {', '.join(bad)} at epoch {epoch}/{epochs}{kept} (a learning rate too "
    "high, or NaN in the data?)"
  )


def _short(value, limit: int = 120) -> str:
  """repr(value), cut to `limit` characters (for one-line error messages)."""
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _difference(key: str, there: Any, here: Any) -> str:
  """One hyper-parameter's difference for an error line: for two module reprs (several lines
  each) only the lines that differ, else both values cut short."""
  if isinstance(there, str) and isinstance(here, str) and "\n" in there and "\n" in here:
    a, b = there.split("\n"), here.split("\n")
    only = lambda xs, ys: " | ".join(x.strip() for x in xs if x not in ys) or "-"
    return f"{key}: {_short(only(a, b))} there, {_short(only(b, a))} here"
  return f"{key}: {_short(there)} there, {_short(here)} here"


def _format_seconds(s: float) -> str:
  m, s = divmod(int(round(s)), 60)
  return f"{m}m{s:02d}s"


def _checkpoint_manager(directory: str) -> ocp.CheckpointManager:
  """The manager of one training's checkpoints, used by the calling process alone: in a
  multi-process run the processes train independently (replicated), so orbax must neither wait
  for the others at its barriers nor leave the writing to another process."""
  me = jax.process_index()
  os.makedirs(directory, exist_ok=True)  # orbax creates it only for all processes together
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    item_names=("state", "meta"),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=2,
      create=False,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,  # a save torn by a kill leaves a temporary folder
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}
      ),
    ),
  )


def examples_per_epoch(n_train: int, epoch_examples: int = 0) -> int:
  """The examples one epoch trains on: `epoch_examples` of the `n_train` when set (> 0)."""
  return min(n_train, epoch_examples or n_train)


class TrainSettings(NamedTuple):
  """How a model is trained: the fields of a config's `train.<model>` section.

  Every trainer of the library takes one (`train_classifier`, `train_vae`,
  `train_latent_classifier`, `gmvae.train_gmvae`, `siamese.train_siamese`,
  `adversarial.train_adversarial`, `distillation.train_distilled`) and hands it to `fit`.

  Attributes:
    epochs: passes over the training set (the last partial batch of each is dropped).
    batch_size: examples per optimiser step.
    learning_rate: Adam's (peak) step size.
    weight_decay: decoupled weight decay (AdamW) when > 0.
    lr_schedule: "constant" or "cosine" (`make_optimizer`).
    augment_flip: random horizontal flips of the training images (faces, not digits).
    augment_shift: random translations up to this many pixels.
    eval_batch_size: examples per jitted call of the per-epoch test evaluation.
    stop_at_accuracy: when > 0, training ends after the first epoch whose test accuracy
      reaches this value (the accuracy-matched control of the study: a CNN stopped where its
      clean accuracy meets a weaker model's; the learning-rate schedule still spans `epochs`).
    epoch_examples: when > 0, an epoch is that many examples (the first of the epoch's
      shuffle) instead of the whole training set: the test accuracy is then evaluated, and
      `stop_at_accuracy` checked, that often (a control matched to an accuracy the whole
      first epoch already passes, as on MNIST).
  """

  epochs: int
  batch_size: int = 128
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  lr_schedule: str = "constant"
  augment_flip: bool = False
  augment_shift: int = 0
  eval_batch_size: int = 1000
  stop_at_accuracy: float = 0.0
  epoch_examples: int = 0

  @classmethod
  def from_config(cls, section: Mapping, *, extra: Sequence[str] = ()) -> "TrainSettings":
    """The settings of a config's train section (a dict or ConfigDict).

    Args:
      section: e.g. `config.train.cnn`; fields not given keep their defaults.
      extra: keys of the section that belong to the caller (a trainer's own knobs, such as
        the siamese net's `margin`), skipped here.

    Raises:
      ValueError: a key that is neither a field nor in `extra` (a misspelt field).
    """
    unknown = sorted(set(section) - set(cls._fields) - set(extra))
    if unknown:
      raise ValueError(f"train settings have no field {unknown}; fields: {cls._fields}")
    return cls(**{k: section[k] for k in cls._fields if k in section})

  def steps_per_epoch(self, n_train: int) -> int:
    """Optimiser steps of one epoch over `n_train` examples (`epoch_examples` of them)."""
    return examples_per_epoch(n_train, self.epoch_examples) // self.batch_size

  def optimizer(self, n_train: int) -> optax.GradientTransformation:
    """`make_optimizer` for the whole run over `n_train` examples."""
    return make_optimizer(
      learning_rate=self.learning_rate,
      total_steps=self.steps_per_epoch(n_train) * self.epochs,
      weight_decay=self.weight_decay,
      lr_schedule=self.lr_schedule,
    )

  def augment(self) -> Callable[[PRNGKey, Array], Array] | None:
    """The per-image augmentation `(key, x[H, W, C]) -> x'`, or None when there is none."""
    if not (self.augment_flip or self.augment_shift):
      return None
    return functools.partial(augment_image, flip=self.augment_flip, max_shift=self.augment_shift)

  def hparams(self) -> dict:
    """The fields a checkpoint must match to be resumed (the length of the run only when the
    learning-rate schedule depends on it; the evaluation's batch size never)."""
    out = {
      "batch_size": self.batch_size,
      "learning_rate": self.learning_rate,
      "weight_decay": self.weight_decay,
      "lr_schedule": self.lr_schedule,
      "schedule_epochs": None if self.lr_schedule == "constant" else self.epochs,
      "augment_flip": self.augment_flip,
      "augment_shift": self.augment_shift,
    }
    if self.stop_at_accuracy:  # only when set: older checkpoints resume as before
      out["stop_at_accuracy"] = self.stop_at_accuracy
    if self.epoch_examples:
      out["epoch_examples"] = self.epoch_examples
    return out

  def stops_after(self, record: Mapping) -> bool:
    """Whether an epoch's evaluation `record` ends the training (`stop_at_accuracy`)."""
    return bool(self.stop_at_accuracy) and record.get("test_accuracy", 0.0) >= self.stop_at_accuracy


# Hyper-parameters some checkpoints were written without (the VAEs had no weight decay or
# augmentation): at these values they compare equal to their absence, so those checkpoints resume.
_HPARAM_DEFAULTS = {"weight_decay": 0.0, "augment_flip": False, "augment_shift": 0}


# Module fields added after some checkpoints were written, at the value those checkpoints were
# trained with (genclf.ABSVAE gained `batch_norm` after the face part's ABS was trained): a line
# `name = value` of a model's repr at that value compares equal to its absence.
_MODULE_FIELD_DEFAULTS = {"batch_norm": "False"}
_REPR_FIELD = re.compile(r"\s+(\w+) = (.*)")


def _without_added_fields(value: Any) -> Any:
  """A module repr (flax: one `name = value` line per field) without the lines of
  `_MODULE_FIELD_DEFAULTS` at their value; anything else unchanged."""
  if not isinstance(value, str) or "\n" not in value:
    return value
  added = lambda m: m is not None and _MODULE_FIELD_DEFAULTS.get(m[1]) == m[2]
  return "\n".join(x for x in value.split("\n") if not added(_REPR_FIELD.fullmatch(x)))


def _comparable(hparams: dict) -> dict:
  """hparams without the entries at their `_HPARAM_DEFAULTS` value, and the models' reprs
  without the fields of `_MODULE_FIELD_DEFAULTS` at theirs."""
  return {
    k: _without_added_fields(v)
    for k, v in hparams.items()
    if k not in _HPARAM_DEFAULTS or v != _HPARAM_DEFAULTS[k]
  }


def _jsonable(hparams: dict) -> dict:
  """Tuples as lists: what a checkpoint's JSON metadata gives back."""
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in hparams.items()}


def initialiser(init_params: Params | None, init_fn: Callable, *args) -> Callable[[], Params]:
  """A thunk giving the starting variables: `init_params`, or `init_fn(*args)` (run lazily).

  Args:
    init_params: given starting variables, or None.
    init_fn: e.g. `model.init`, called as `init_fn(*args)` under `jax.jit`.
    *args: its arguments (keys, an example batch).

  Returns:
    A function of no arguments returning the variables (`fit`'s `init`).
  """
  if init_params is not None:
    return lambda: init_params
  args = tuple(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
  return lambda: jax.jit(init_fn)(*args)


def fit(
  batch_loss: BatchLoss,
  x_train: Array,
  y_train: Array,
  *,
  name: str,
  init: Callable[[], Params],
  evaluate: Callable[[Params], dict],
  key: PRNGKey,
  settings: TrainSettings,
  hparams: dict,
  checkpoint_dir: str | None = None,
  perturb: Perturb | None = None,
) -> tuple[Params, dict]:
  """The training loop every trainer of the library runs: Adam over shuffled minibatches.

  Epoch e's shuffle is `permutation(fold_in(k_shuffle, e))`, step i's randomness
  `fold_in(fold_in(k_step, e), i)`; one jitted step per minibatch (augmentation, then
  `perturb`, then a gradient step on `batch_loss`), `evaluate` after every epoch, an orbax
  checkpoint per epoch (the last 2 kept), a progress line per epoch (absl INFO). A finished
  run in `checkpoint_dir` is reused without training, a partial one resumed with the numbers
  of an uninterrupted run.

  Args:
    batch_loss: `(params, x[B, ...], y[B], key) -> (scalar loss, aux)`.
    x_train: [N, ...] training inputs.
    y_train: [N] or [N, K] labels (anything; zeros for an unsupervised model).
    name: the model's name in progress lines and errors.
    init: the starting variables (`initialiser`); run only when no checkpoint is resumed.
    evaluate: params -> {metric: float} on the test split, after every epoch.
    key: randomness of the shuffles and steps (split here).
    settings: epochs, batch size, optimiser, schedule and augmentation.
    hparams: what else a checkpoint must match (the model's repr, a trainer's own knobs);
      `fit` adds the settings' `hparams()` and the training-set size.
    checkpoint_dir: where to keep the checkpoints; None writes nothing.
    perturb: a per-batch input transform `(params, key, x, y, step) -> x'` applied after the
      augmentation, with no gradient through it (adversarial training, Madry et al. 2018).

  Returns:
    (variables, metrics): the last epoch's evaluation and train_loss, epochs, train_seconds
    (this call's epochs, evaluation excluded), compile_seconds, examples_per_second,
    total_train_seconds (with earlier runs resumed from), resumed_from_epoch,
    reused_checkpoint and the per-epoch history.

  Raises:
    CheckpointError: the checkpoint is another model's or training's, or unreadable.
    NonFiniteError: NaN or inf in an epoch's losses, metrics or parameters.
  """
  epochs, batch_size = settings.epochs, settings.batch_size
  n = x_train.shape[0]
  steps = settings.steps_per_epoch(n)
  if steps < 1:
    raise ValueError(f"batch_size {batch_size} is larger than the training set ({n})")
  optimizer = settings.optimizer(n)
  augment = settings.augment()
  hparams = _jsonable({"n_train": int(n), **settings.hparams(), **hparams})
  shuffle_key, step_key = jax.random.split(key)
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  make_state = lambda params: {"params": params, "opt_state": optimizer.init(params)}
  state = None

  history: list[dict] = []
  start_epoch, previous_seconds, reused = 0, 0.0, False
  manager = _checkpoint_manager(checkpoint_dir) if checkpoint_dir is not None else None
  if manager is not None and manager.latest_step() is not None:
    latest = manager.latest_step()
    meta = _restore_meta(manager, latest, name, checkpoint_dir)
    old = _comparable(meta.get("hparams") or {})
    new = _comparable(hparams)
    if old != new:
      differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      shown = "; ".join(_difference(k, old.get(k), new.get(k)) for k in differ)
      raise CheckpointError(
        f"{name}: checkpoint {checkpoint_dir} was made for another model or training "
        f"(differs in: {', '.join(differ)}; {shown}); delete it or use another --workdir"
      )
    if meta["epoch"] > epochs:
      raise CheckpointError(
        f"{name}: checkpoint {checkpoint_dir} is at epoch {meta['epoch']} > {epochs}"
      )
    # Restore into the structure of fresh state, known from shapes alone (no init runs).
    abstract = jax.eval_shape(lambda: make_state(init()))
    restored = _restore_state(manager, latest, abstract, name, checkpoint_dir)
    state, history = restored, list(meta["history"])
    start_epoch, previous_seconds = meta["epoch"], meta["train_seconds"]
    reused = start_epoch == epochs or bool(history and settings.stops_after(history[-1]))
    logging.info("%s: restored epoch %d/%d from %s", name, start_epoch, epochs, checkpoint_dir)
  if state is None:
    state = make_state(init())
  # A copy: the jitted step donates its input state, which must not delete the caller's arrays.
  state = jax.tree.map(jnp.array, state)

  # The data are arguments, not closed-over constants: XLA would fold them into the program.
  def train_step(state, x_all, y_all, perm, epoch_key, i, epoch):
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
    xb, yb = x_all[idx], y_all[idx]
    aug_key, loss_key = jax.random.split(jax.random.fold_in(epoch_key, i))
    if augment is not None:
      xb = augment_batch(augment, aug_key, xb)
    if perturb is not None:  # after augmentation: the attack sees the images trained on
      step = epoch * steps + i
      xb = jax.lax.stop_gradient(
        perturb(state["params"], jax.random.fold_in(aug_key, 1), xb, yb, step)
      )
    (loss, _), grads = jax.value_and_grad(batch_loss, has_aux=True)(
      state["params"], xb, yb, loss_key
    )
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

  seconds, compile_seconds = 0.0, 0.0
  if start_epoch < epochs and not reused:  # compile ahead, so that epoch times and rates exclude it
    t0 = time.perf_counter()
    train_step = (
      jax.jit(train_step, donate_argnums=0)
      .lower(
        state,
        x_train,
        y_train,
        jax.ShapeDtypeStruct((n,), jnp.int32),
        step_key,
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
      )
      .compile()
    )
    compile_seconds = time.perf_counter() - t0

  loop_start = time.perf_counter()
  for epoch in range(start_epoch, start_epoch if reused else epochs):
    t0 = time.perf_counter()
    perm = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n).astype(jnp.int32)
    epoch_key = jax.random.fold_in(step_key, epoch)
    step_losses = []
    # Progress inside the epoch; the bar follows the step before the last dispatched one.
    bar = progress_lib.bar(steps, desc=f"{name} epoch {epoch + 1}/{epochs}", unit="step",
                           leave=False, disable=jax.process_index() != 0)  # fmt: skip
    for i in range(steps):
      state, loss = train_step(
        state, x_train, y_train, perm, epoch_key, np.int32(i), np.int32(epoch)
      )
      step_losses.append(loss)
      if i:
        step_losses[-2].block_until_ready()
        bar.update(1)
    bar.close()
    train_loss = float(jnp.mean(jnp.stack(step_losses)))
    epoch_seconds = time.perf_counter() - t0
    seconds += epoch_seconds
    record = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": epoch_seconds}
    record.update(evaluate(state["params"]))
    _check_finite(name, epoch + 1, epochs, record, state["params"], checkpoint_dir, manager)
    history.append(record)
    done = epoch + 1 - start_epoch
    eta = (time.perf_counter() - loop_start) / done * (epochs - epoch - 1)
    shown = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds"))
    logging.info(
      "%s epoch %d/%d: %s | %.0f ex/s | %.1f s | ETA %s",
      name,
      epoch + 1,
      epochs,
      shown,
      steps * batch_size / epoch_seconds,
      epoch_seconds,
      _format_seconds(eta),
    )
    if manager is not None:
      meta = {
        "epoch": epoch + 1,
        "epochs": epochs,
        "hparams": hparams,
        "history": history,
        "train_seconds": previous_seconds + seconds,
      }
      manager.save(
        epoch + 1,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(_on_host(state)), meta=ocp.args.JsonSave(meta)
        ),
      )
    if settings.stops_after(record):
      logging.info("%s: test accuracy %.4f reached %.4f: stopped after epoch %d",
                   name, record["test_accuracy"], settings.stop_at_accuracy, epoch + 1)  # fmt: skip
      break
  if manager is not None:
    manager.wait_until_finished()
    manager.close()

  metrics: dict[str, Any] = evaluate(state["params"]) if reused or not history else {}
  if history and not reused:
    metrics.update({k: v for k, v in history[-1].items() if k not in ("epoch", "seconds")})
  elif history:
    metrics["train_loss"] = history[-1]["train_loss"]
  metrics.update(
    epochs=epochs,
    epochs_trained=len(history),  # < epochs when `settings.stop_at_accuracy` ended it
    train_seconds=seconds,
    compile_seconds=compile_seconds,
    examples_per_second=(
      steps * batch_size * (len(history) - start_epoch) / seconds if seconds else 0.0
    ),
    total_train_seconds=previous_seconds + seconds,
    resumed_from_epoch=start_epoch,
    reused_checkpoint=reused,
    history=history,
  )
  return state["params"], metrics


# --------------------------------------------------------------------------------------------
# Test-set evaluations run after every epoch.


@dataclasses.dataclass(frozen=True)
class _Graded:
  """(correct, cross-entropy) of ONE example under `logits_fn` (hashable: one compilation)."""

  logits_fn: LogitsFn

  def __call__(self, params: Params, x: Array, y: Array) -> tuple[Array, Array]:
    logits = self.logits_fn(params, x)
    return jnp.argmax(logits) == y, losses.cross_entropy(logits, y)


def classifier_evaluation(
  logits_fn: LogitsFn, x_test: Array, y_test: Array, *, batch_size: int = 1000
) -> Callable[[Params], dict]:
  """The evaluation of a classifier: params -> {test_accuracy, test_loss} (mean nats).

  Args:
    logits_fn: `(params, x) -> logits[K]` for one example (`models.classifier_fns`).
    x_test: [N, ...] test inputs.
    y_test: int[N] their labels.
    batch_size: examples per jitted call (`runner.batched_map`).

  Returns:
    `fit`'s `evaluate`.
  """
  graded = _Graded(logits_fn)
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)

  def evaluate(params):
    correct, loss = runner.batched_map(graded, params, x_test, y_test, batch_size=batch_size)
    n = len(correct)
    return {
      "test_accuracy": float(np.sum(correct)) / n,
      "test_loss": float(np.sum(loss, dtype=np.float64)) / n,
    }

  return evaluate


def sum_over_batches(
  batch_sums: Callable, params: Params, *arrays: Array, key: PRNGKey, batch_size: int
) -> np.ndarray:
  """Sums of a sampling model's statistics over consecutive batches of `arrays`.

  Batch j (examples j * batch_size onwards) draws its randomness from `fold_in(key, j)`, so
  the batching fixes the samples; the evaluation of the VAEs' ELBO (one latent sample per
  test image) uses it. Deterministic functions of one example use `runner.batched_map`.

  Args:
    batch_sums: jitted `(params, *batch_arrays, key) -> tuple of scalar sums`.
    params: its first argument.
    *arrays: [N, ...] arrays cut along their leading axis.
    key: randomness of the whole evaluation.
    batch_size: examples per call.

  Returns:
    float64 [S]: each statistic summed over all N examples.
  """
  n = arrays[0].shape[0]
  sums = 0.0
  for j, i in enumerate(range(0, n, batch_size)):
    out = batch_sums(params, *(a[i : i + batch_size] for a in arrays), jax.random.fold_in(key, j))
    sums = sums + np.array([float(c) for c in out])
  return np.asarray(sums)


# --------------------------------------------------------------------------------------------
# The study's trainers.


def train_classifier(
  model: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  settings: TrainSettings,
  checkpoint_dir: str | None = None,
  init_params: Params | None = None,
  temperature: float = 1.0,
  perturb: Perturb | None = None,
  loss: Callable | None = None,
) -> tuple[Params, dict]:
  """Trains a classifier (e.g. `CNN`) with softmax cross-entropy and Adam (`fit`).

  Labels `data.y_train` are class ids int[N], or probabilities float[N, K] (soft targets, as
  a distilled student's; Hinton et al. 2015). The test split always has class ids.

  Args:
    model: a module called as `model(x[B, H, W, C], train=...) -> logits[B, K]`.
    data: has x_train [N, H, W, C] in [0, 1], y_train int [N], x_test, y_test.
    key: randomness of the whole run (init, shuffles, dropout, augmentation).
    settings: epochs, batch size, learning rate, schedule, weight decay, augmentation.
    checkpoint_dir: where to keep the last 2 epoch checkpoints; a finished run there is reused
      without training, a partial one resumed; None writes nothing.
    init_params: starting variables; None initialises them from `key`.
    temperature: the training loss is the cross-entropy of softmax(logits / temperature)
      (defensive distillation, Papernot et al. 2016); evaluation uses the logits as they are.
    perturb: a per-batch input transform `(params, key, x, y, step) -> x'` applied before the
      loss, with no gradient through it (adversarial training, Madry et al. 2018).
    loss: `(params, x[B, ...], y int[B], key) -> (scalar, aux)` in place of the cross-entropy
      (e.g. `defenses.adversarial.TradesLoss`); its repr joins the checkpoint's
      hyper-parameters, so give it one that says what it computes.

  Returns:
    (variables {"params": ...}, metrics) with metrics test_accuracy, test_loss, train_loss and
    the rest of `fit`'s.
  """
  init_key, run_key = jax.random.split(key)

  def cross_entropy(params, x, y, key):
    logits = model.apply(params, x, train=True, rngs={"dropout": key}) / temperature
    if y.ndim == 2:  # soft targets
      return jnp.mean(optax.softmax_cross_entropy(logits, y)), {}
    return jnp.mean(losses.batch_cross_entropy(logits, y)), {}

  hparams: dict[str, Any] = {"model": repr(model)}
  # Only when set, so that checkpoints made before these options existed still resume.
  if temperature != 1.0:
    hparams["temperature"] = temperature
  if perturb is not None:
    hparams["perturb"] = repr(perturb)
  if loss is not None:
    hparams["loss"] = repr(loss)
  if np.ndim(data.y_train) == 2:
    hparams["soft_targets"] = True
  return fit(
    cross_entropy if loss is None else loss,
    data.x_train,
    data.y_train,
    name="classifier",
    init=initialiser(init_params, model.init, init_key, data.x_train[:1]),
    evaluate=classifier_evaluation(
      models.classifier_fns(model), data.x_test, data.y_test, batch_size=settings.eval_batch_size
    ),
    key=run_key,
    settings=settings,
    hparams=hparams,
    checkpoint_dir=checkpoint_dir,
    perturb=perturb,
  )


def train_vae(
  vae: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  settings: TrainSettings,
  checkpoint_dir: str | None = None,
  init_params: Params | None = None,
) -> tuple[Params, dict]:
  """Trains a VAE (`MLPVAE`, `ConvVAE`) by minimising the negative ELBO (Kingma & Welling 2014).

  One reparameterised sample of z per example and step; the test negative ELBO uses one sample
  per test image from a fixed key (`sum_over_batches`), so it is reproducible.

  Args:
    vae: a module called as `vae(x[B, H, W, C], key) -> (pixel_logits, mean, logvar)`.
    data: has x_train [N, H, W, C] in [0, 1] and x_test (labels are ignored).
    key: randomness of the whole run (init, shuffles, latent samples, evaluation).
    settings: as in `train_classifier`.
    checkpoint_dir: as in `train_classifier`.
    init_params: starting variables; None initialises them from `key`.

  Returns:
    (variables {"params": ...}, metrics) with test_neg_elbo_nats, test_recon_nats,
    test_kl_nats, train_loss (negative ELBO, nats) and the rest of `fit`'s.
  """
  init_key, sample_key, eval_key, run_key = jax.random.split(key, 4)

  def batch_loss(params, x, y, key):
    del y
    pixel_logits, mean, logvar = vae.apply(params, x, key)
    return jnp.mean(losses.batch_negative_elbo(pixel_logits, x, mean, logvar)), {}

  @jax.jit
  def batch_sums(params, x, key):
    pixel_logits, mean, logvar = vae.apply(params, x, key)
    recon = jax.vmap(losses.bernoulli_nll)(pixel_logits, x)
    kl = jax.vmap(losses.gaussian_kl)(mean, logvar)
    return jnp.sum(recon), jnp.sum(kl)

  x_test = jnp.asarray(data.x_test)

  def evaluate(params):
    sums = sum_over_batches(
      batch_sums, params, x_test, key=eval_key, batch_size=settings.eval_batch_size
    )
    recon, kl = sums / x_test.shape[0]
    return {"test_neg_elbo_nats": recon + kl, "test_recon_nats": recon, "test_kl_nats": kl}

  return fit(
    batch_loss,
    data.x_train,
    jnp.zeros(data.x_train.shape[0], jnp.int32),
    name="vae",
    init=initialiser(init_params, vae.init, init_key, data.x_train[:1], sample_key),
    evaluate=evaluate,
    key=run_key,
    settings=settings,
    hparams={"model": repr(vae)},
    checkpoint_dir=checkpoint_dir,
  )


def latent_means(vae: nn.Module, vae_params: Params, x: Array, *, batch_size: int = 256) -> Array:
  """The encoder means [N, D] of images x [N, H, W, C] (`runner.batched_map`).

  Args:
    vae: the VAE.
    vae_params: its variables.
    x: images [N, H, W, C].
    batch_size: examples per jitted call.

  Returns:
    [N, D] latent means (host numpy).
  """
  return runner.batched_map(models.vae_fns(vae).encode, vae_params, x, batch_size=batch_size)[0]


def train_latent_classifier(
  vae: nn.Module,
  vae_params: Params,
  clf: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  settings: TrainSettings,
  checkpoint_dir: str | None = None,
  init_params: Params | None = None,
) -> tuple[Params, dict]:
  """Trains a `LatentClassifier` on a frozen VAE's latent means (Gondim-Ribeiro et al. 2018).

  The encoder is frozen, so the means of the training and test images are computed once and
  the classifier is trained on them (`train_classifier`).

  Args:
    vae: the trained VAE.
    vae_params: its variables (not changed).
    clf: the `LatentClassifier`.
    data: has x_train, y_train, x_test, y_test.
    key: randomness of the run (init, shuffles).
    settings, checkpoint_dir: as in `train_classifier`.
    init_params: starting variables of `clf`; None initialises them from `key`.

  Returns:
    (params {"vae": vae_params, "clf": clf variables}, metrics) -- the params that
    `models.latent_classifier_fn(vae, clf)` takes -- with test_accuracy, test_loss,
    train_loss and the rest of `fit`'s.
  """
  b = settings.eval_batch_size
  codes = types.SimpleNamespace(
    x_train=latent_means(vae, vae_params, data.x_train, batch_size=b),
    y_train=data.y_train,
    x_test=latent_means(vae, vae_params, data.x_test, batch_size=b),
    y_test=data.y_test,
  )
  clf_params, metrics = train_classifier(
    clf,
    codes,
    key=key,
    settings=settings,
    checkpoint_dir=checkpoint_dir,
    init_params=init_params,
  )
  return {"vae": vae_params, "clf": clf_params}, metrics


def train_joint_vae(
  vae: nn.Module,
  clf: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  settings: TrainSettings,
  ce_weight: float,
  checkpoint_dir: str | None = None,
) -> tuple[Params, dict]:
  """Trains a VAE and a classifier on its latent mean together: -ELBO + ce_weight * CE.

  The supervised VAE objective of Kingma, Rezende, Mohamed & Welling (2014), "Semi-Supervised
  Learning with Deep Generative Models", eq. 9 (their alpha is `ce_weight`): the ELBO of the
  labelled examples plus a weighted classification loss, here with the classifier reading the
  encoder's mean (the study's "VAE as classifier", `models.latent_classifier_fn`) instead of
  their separate q(y | x) network, so that the attacked classifier is the VAE's encoder plus a
  small head whose features are shaped by both terms. Unlike `train_latent_classifier` (an
  unsupervised VAE, then a probe on its frozen code), the encoder learns features the labels
  need; the ELBO keeps it a VAE (reported as test -ELBO beside the unsupervised ones).

  Args:
    vae: `MLPVAE` or `ConvVAE`.
    clf: `LatentClassifier` on the latent mean.
    data: has x_train [N, H, W, C] in [0, 1], y_train int [N], x_test, y_test.
    key: randomness of the whole run (init, shuffles, latent samples, dropout, evaluation).
    settings: as in `train_classifier` (augmentation applies to the images both terms see).
    ce_weight: alpha, nats of -ELBO per nat of cross-entropy (-ELBO is summed over pixels).
    checkpoint_dir: as in `train_classifier`.

  Returns:
    (params {"vae": ..., "clf": ...}, metrics) with test_accuracy, test_loss (cross-entropy),
    test_neg_elbo_nats, test_recon_nats, test_kl_nats, train_loss and the rest of `fit`'s.
  """
  vae_key, clf_key, sample_key, eval_key, run_key = jax.random.split(key, 5)

  def init():
    vae_params = jax.jit(vae.init)(vae_key, jnp.asarray(data.x_train[:1]), sample_key)
    mean, _ = vae.apply(vae_params, jnp.asarray(data.x_train[:1]), method="encode")
    return {"vae": vae_params, "clf": jax.jit(clf.init)(clf_key, mean)}

  def batch_loss(params, x, y, key):
    sample_key, dropout_key = jax.random.split(key)
    pixel_logits, mean, logvar = vae.apply(params["vae"], x, sample_key)
    neg_elbo = losses.batch_negative_elbo(pixel_logits, x, mean, logvar)
    logits = clf.apply(params["clf"], mean, train=True, rngs={"dropout": dropout_key})
    return jnp.mean(neg_elbo + ce_weight * losses.batch_cross_entropy(logits, y)), {}

  @jax.jit
  def batch_sums(params, x, key):
    pixel_logits, mean, logvar = vae.apply(params["vae"], x, key)
    recon = jax.vmap(losses.bernoulli_nll)(pixel_logits, x)
    kl = jax.vmap(losses.gaussian_kl)(mean, logvar)
    return jnp.sum(recon), jnp.sum(kl)

  x_test = jnp.asarray(data.x_test)
  graded = classifier_evaluation(
    models.latent_classifier_fn(vae, clf), data.x_test, data.y_test,
    batch_size=settings.eval_batch_size,
  )  # fmt: skip

  def evaluate(params):
    sums = sum_over_batches(
      batch_sums, params, x_test, key=eval_key, batch_size=settings.eval_batch_size
    )
    recon, kl = sums / x_test.shape[0]
    return {
      **graded(params),
      "test_neg_elbo_nats": recon + kl,
      "test_recon_nats": recon,
      "test_kl_nats": kl,
    }

  return fit(
    batch_loss,
    data.x_train,
    data.y_train,
    name="joint_vae",
    init=init,
    evaluate=evaluate,
    key=run_key,
    settings=settings,
    hparams={"model": repr(vae), "clf": repr(clf), "ce_weight": ce_weight},
    checkpoint_dir=checkpoint_dir,
  )


# --------------------------------------------------------------------------------------------
# Generative classifiers (vae_attacks.genclf).


def train_abs(
  vae: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  settings: TrainSettings,
  checkpoint_dir: str | None = None,
  eval_examples: int = 500,
  eval_bank: int = 1000,
  stats_examples: int = 1000,
) -> tuple[Params, dict]:
  """Trains the K class VAEs of the ABS model together (Schott et al. 2019).

  Each class's VAE minimises its own squared-error ELBO (`genclf.abs_training_loss`) on the
  images of its class only; the K VAEs take one step each per minibatch of `per_class_rows`
  (row i: the i-th image of every class), vmapped over a leading class axis of their variables.

  Args:
    vae: the `genclf.ABSVAE` shared by the classes.
    data: has x_train [N, H, W, C] in [0, 1], y_train int[N], x_test, y_test, class_names.
    key: randomness of the run.
    settings: as in `train_classifier` (batch_size counts rows: K images each).
    checkpoint_dir: as in `train_classifier`.
    eval_examples: test images of the per-epoch accuracy.
    eval_bank: bank size of that accuracy (the bank's best sample, no Adam steps: a cheap
      lower bound on the full inference's accuracy, which `experiments.models` measures).
    stats_examples: training images per class whose averaged batch statistics become a
      BatchNorm VAE's population statistics (`genclf.population_statistics`; each evaluation
      and the returned variables).

  Returns:
    (variables with a leading class axis K, metrics with test_accuracy_bank_only, test_loss
    (the mean training objective of the test images under their class's VAE) and `fit`'s).
  """
  k = len(data.class_names)
  init_key, sample_key, bank_key, run_key = jax.random.split(key, 4)
  stats_key = jax.random.fold_in(bank_key, 1)  # a new stream: the older ones stay as they were
  rows = genclf.per_class_rows(data.x_train, data.y_train, k)
  test_rows = jnp.asarray(genclf.per_class_rows(data.x_test, data.y_test, k))

  def loss_of(params, xb, key, train=True):
    keys = jax.random.split(key, k)
    loss = lambda p, x, kk: genclf.abs_training_loss(vae, p, x, kk, train)
    per = genclf.per_class(vae, loss, params, jnp.swapaxes(xb, 0, 1), keys)
    return jnp.sum(per)

  def batch_loss(params, xb, y, key):
    del y
    return loss_of(params, xb, key), {}

  def init_fn(key):
    return jax.vmap(lambda kk: vae.init(kk, rows[:1, 0], sample_key))(jax.random.split(key, k))

  scorer = jax.jit(jax.vmap(genclf.abs_logits_fn(vae, steps=0), in_axes=(None, 0)))
  test_loss = jax.jit(functools.partial(loss_of, train=False))
  x_eval, y_eval = jnp.asarray(data.x_test[:eval_examples]), np.asarray(data.y_test[:eval_examples])

  stats_rows = rows[:stats_examples]

  def evaluate(params):
    params = genclf.class_population_statistics(vae, params, stats_rows, stats_key)
    bank = genclf.abs_params(vae, params, bank_key, n_samples=eval_bank)
    pred = np.argmax(np.asarray(scorer(bank, x_eval)), -1)
    loss = float(test_loss(params, test_rows, jax.random.key(0))) / k
    return {"test_accuracy_bank_only": float(np.mean(pred == y_eval)), "test_loss": loss}

  params, metrics = fit(
    batch_loss,
    rows,
    jnp.zeros(rows.shape[0], jnp.int32),
    name="abs",
    init=initialiser(None, init_fn, init_key),
    evaluate=evaluate,
    key=run_key,
    settings=settings,
    hparams={"model": repr(vae), "num_classes": k},
    checkpoint_dir=checkpoint_dir,
  )
  return genclf.class_population_statistics(vae, params, stats_rows, stats_key), metrics


def train_cvae(
  vae: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  settings: TrainSettings,
  checkpoint_dir: str | None = None,
  eval_examples: int = 500,
  num_samples: int = 10,
) -> tuple[Params, dict]:
  """Trains a class-conditional VAE on log p(x, y) (Li, Bradshaw and Sharma 2019, GFY).

  Args:
    vae: a `genclf.ConditionalVAE`.
    data: has x_train, y_train, x_test, y_test.
    key: randomness of the run.
    settings, checkpoint_dir: as in `train_classifier`.
    eval_examples: test images of the per-epoch accuracy (the Bayes classifier with
      `num_samples` importance samples per class, `genclf.cvae_logits_fn`).
    num_samples: S of that evaluation.

  Returns:
    (variables, metrics with test_accuracy (on the first `eval_examples`), test_loss and `fit`'s).
  """
  init_key, sample_key, noise_key, run_key = jax.random.split(key, 4)

  def batch_loss(params, x, y, key):
    return genclf.cvae_training_loss(vae, params, x, y, key), {}

  k = vae.num_classes
  onehot = jnp.zeros((1, k), jnp.float32)
  logits_fn = genclf.cvae_logits_fn(vae)
  graded = classifier_evaluation(
    logits_fn, data.x_test[:eval_examples], data.y_test[:eval_examples], batch_size=250
  )

  def evaluate(params):
    out = graded(genclf.cvae_params(params, noise_key, num_samples=num_samples,
                                    latent_dim=vae.latent_dim))  # fmt: skip
    return {"test_accuracy": out["test_accuracy"], "test_loss": out["test_loss"]}

  return fit(
    batch_loss,
    data.x_train,
    data.y_train,
    name="cvae",
    init=initialiser(None, vae.init, init_key, data.x_train[:1], onehot, sample_key),
    evaluate=evaluate,
    key=run_key,
    settings=settings,
    hparams={"model": repr(vae)},
    checkpoint_dir=checkpoint_dir,
  )
