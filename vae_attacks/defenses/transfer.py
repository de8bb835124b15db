"""Black-box transfer: adversarial examples crafted on one model, evaluated on every other.

The study's "hide the gradient" threat model (Papernot et al. 2017, "Practical Black-Box
Attacks against Machine Learning"; Tramer et al. 2018, "Ensemble Adversarial Training"): an
attacker without the defended model's gradients crafts adversarial examples on a model it has
(a substitute, or another architecture) and submits them. `transfer_matrix` evaluates every
source's examples on every target: entry [s, t] is target t's accuracy on the examples
crafted against source s. The diagonal is the white-box result (each model on the examples
crafted against itself), the off-diagonal entries the black-box ones.
"""

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from vae_attacks.attacks import runner
from vae_attacks.types import LogitsFn, Params


class Classifier(NamedTuple):
  """A model as the transfer matrix sees it."""

  logits_fn: LogitsFn  # (params, x[H, W, C]) -> logits[K]
  params: Params


class TransferMatrix(NamedTuple):
  """Target accuracies on each source's adversarial examples (host numpy)."""

  sources: tuple[str, ...]
  targets: tuple[str, ...]
  correct: np.ndarray  # bool[S, T, N]: target t classifies source s's example n correctly
  accuracy: np.ndarray  # [S, T] robust accuracy = mean of `correct` over examples

  @property
  def success(self) -> np.ndarray:
    """[S, T] untargeted success rate: the fraction of examples target t misclassifies."""
    return 1.0 - self.accuracy


def transfer_matrix(
  models: Mapping[str, Classifier],
  x_adv: Mapping[str, np.ndarray],
  labels: np.ndarray,
  *,
  batch_size: int = 256,
) -> TransferMatrix:
  """Accuracy of every model on the adversarial examples crafted against every source.

  Args:
    models: name -> Classifier, the targets (every source must be one of them too).
    x_adv: source name -> its adversarial examples [N, H, W, C] of the same N clean examples.
    labels: the true labels int[N] of those examples.
    batch_size: examples per jitted forward pass.

  Returns:
    TransferMatrix with sources in the order of `x_adv` and targets in the order of `models`.

  Raises:
    ValueError: a source that is not a model, or examples of a different count.
  """
  labels = np.asarray(labels).reshape(-1)
  sources, targets = tuple(x_adv), tuple(models)
  for s in sources:
    if s not in models:
      raise ValueError(f"source {s!r} is not one of the models {targets}")
    if len(x_adv[s]) != len(labels):
      raise ValueError(f"source {s!r} has {len(x_adv[s])} examples for {len(labels)} labels")
  correct = np.zeros((len(sources), len(targets), len(labels)), bool)
  for i, s in enumerate(sources):
    for j, t in enumerate(targets):
      m = models[t]
      logits = runner.batched_logits(m.logits_fn, m.params, x_adv[s], batch_size=batch_size)
      correct[i, j] = np.argmax(logits, axis=-1) == labels
  return TransferMatrix(sources, targets, correct, correct.mean(axis=-1))
