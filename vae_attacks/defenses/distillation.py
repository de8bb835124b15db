"""Defensive distillation (Papernot, McDaniel, Wu, Jha & Swami 2016).

"Distillation as a Defense to Adversarial Perturbations against Deep Neural Networks", IEEE
S&P 2016: a teacher is trained with its softmax at temperature T (cross-entropy of
softmax(logits / T)); its softened probabilities softmax(teacher_logits / T) on the training
set become the soft targets of a student of the same architecture, again trained at T; the
student is deployed at T = 1 (its raw logits). Its logits are then about T times larger than a
normal network's, the softmax saturates, and the cross-entropy gradient an attack follows
underflows to zero in float32: a gradient-masking effect, not robustness. Carlini & Wagner
(2016), "Defensive Distillation is Not Robust to Adversarial Examples", attack the logits
instead; `TemperatureScaled(logits_fn, T)` gives the attack logits / T, whose softmax is not
saturated, as the adaptive attack's model.
"""

import dataclasses
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_attacks import models, train
from vae_attacks.attacks import runner
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey


def softened_targets(logits: Array, temperature: float) -> Array:
  """The teacher's soft labels softmax(logits / T) (Hinton et al. 2015; Papernot et al. 2016).

  Args:
    logits: [..., K] teacher logits.
    temperature: T > 0; larger T gives flatter distributions (T -> inf: uniform).

  Returns:
    [..., K] probabilities summing to 1 over the last axis.
  """
  if temperature <= 0:
    raise ValueError(f"temperature={temperature!r} must be > 0")
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)


@dataclasses.dataclass(frozen=True)
class TemperatureScaled:
  """`logits_fn(params, x) / temperature`: the model an adaptive attack on a distilled network
  differentiates (hashable, so the runner's compile cache hits).

  The deployed network's prediction is unchanged by the scaling (argmax is scale-free); only
  the attack's cross-entropy is taken at the training temperature, where it is not saturated.
  """

  logits_fn: LogitsFn
  temperature: float

  def __call__(self, params: Params, x: Array) -> Array:
    return self.logits_fn(params, x) / self.temperature


def teacher_targets(
  model: nn.Module, params: Params, x: Array, *, temperature: float, batch_size: int = 1000
) -> np.ndarray:
  """softened_targets of the teacher `model` on every example of x [N, H, W, C] -> [N, K]."""
  logits = runner.batched_logits(models.classifier_fns(model), params, x, batch_size=batch_size)
  return np.asarray(softened_targets(logits, temperature), np.float32)


def train_distilled(
  teacher: nn.Module,
  student: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  temperature: float,
  settings: train.TrainSettings,
  checkpoint_dir: str | None = None,
  init_params: Params | None = None,
) -> tuple[Params, Params, dict]:
  """Trains a teacher at temperature T, then a student on its soft labels at T.

  Args:
    teacher: the teacher classifier module.
    student: the student module (Papernot et al. use the teacher's architecture).
    data: x_train, y_train (class ids), x_test, y_test.
    key: randomness of both trainings.
    temperature: T of both trainings (Papernot et al. use T = 20 to 100 on MNIST).
    settings: the `train.TrainSettings` of both trainings.
    checkpoint_dir: teacher/ and student/ checkpoints under it; None writes nothing.
    init_params: starting variables of both (as in `train.train_classifier`); None
      initialises each from its key.

  Returns:
    (teacher params, student params, {"teacher": metrics, "student": metrics}); the student is
    deployed with its raw logits (T = 1).
  """
  keys = dict(zip(("teacher", "student"), jax.random.split(key), strict=True))
  trained = {}
  for name, model in (("teacher", teacher), ("student", student)):
    if name == "student":  # the teacher's softened probabilities are the labels
      soft = teacher_targets(teacher, trained["teacher"][0], data.x_train, temperature=temperature)
      data = types.SimpleNamespace(
        x_train=data.x_train, y_train=soft, x_test=data.x_test, y_test=data.y_test
      )
    trained[name] = train.train_classifier(
      model,
      data,
      key=keys[name],
      settings=settings,
      temperature=temperature,
      checkpoint_dir=None if checkpoint_dir is None else f"{checkpoint_dir}/{name}",
      init_params=init_params,
    )
  metrics = {name: m for name, (_, m) in trained.items()}
  return trained["teacher"][0], trained["student"][0], metrics
