"""Adversarial training (Madry et al. 2018) and robust accuracy under restarted attacks.

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018: train on the worst case in the eps-ball, found by PGD
(projected sign-gradient ascent of the cross-entropy from a uniform random start). Each
training batch is replaced by its PGD examples through the `perturb` hook of
`vae_attacks.train.train_classifier`, with the inner maximisation done by `attacks.bim.bim`
(untargeted: it minimises minus the cross-entropy to the true label). One step with a random
start and a step of 1.25 eps is "FGSM-RS" (Wong, Rice & Kolter 2020, "Fast is better than
free"), about as robust on MNIST at a fraction of PGD's cost. An eps ramp (linear from 0 over
the first `ramp_epochs`) helps the first epochs, where a network that cannot yet classify
clean digits is shown eps = 0.3 noise (Gowal et al. 2018 and Wong et al. 2020 ramp eps too).

TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off
between Robustness and Accuracy", ICML 2019; `TradesLoss`, `train_trades`) trains on the clean
cross-entropy plus beta x KL(f(x) || f(x')), x' the point of the eps-ball that maximises that
KL, found by sign-gradient ascent from x + 0.001 N(0, I) (their trades.py, `trades_loss`).

`attack_with_restarts` is the evaluation: an untargeted attack run from several random
starts, an example counted as broken when ANY restart breaks it (Madry et al. report PGD-40
with restarts on MNIST).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_attacks import losses, models, train
from vae_attacks.attacks import base, bim, runner
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey


def pgd_linf(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  label: Array,
  *,
  eps: Array | float,
  steps: int,
  step_size_rel: float,
  key: PRNGKey,
  random_start: bool = True,
  targeted: bool = False,
) -> base.AttackResult:
  """L-inf PGD for one example: `bim.bim` with step = rel * eps, away from `label` (untargeted,
  the default) or towards it (`targeted=True`: `label` is then the target).

  The runner's form (one example, one eps; `key` split per pair by the runner).
  """
  return bim.bim(
    logits_fn,
    params,
    x,
    label,
    eps=eps,
    step_size=step_size_rel * eps,
    steps=steps,
    norm="linf",
    targeted=targeted,
    random_start=random_start,
    key=key,
  )


@dataclasses.dataclass(frozen=True)
class PGDPerturb:
  """The per-batch transform of adversarial training: untargeted L-inf PGD on each example.

  A frozen dataclass: hashable, and its repr (part of a checkpoint's hyper-parameters) says
  exactly which attack trained the model.

  Attributes:
    logits_fn: the model being trained, `(params, x[H, W, C]) -> logits[K]`.
    eps: the L-inf radius (0.3 on MNIST in Madry et al. 2018).
    steps: PGD steps (40 in Madry et al.; 1 with random_start is FGSM-RS).
    step_size_rel: step size / eps (Madry: 0.01 / 0.3 with 40 steps; FGSM-RS: 1.25).
    random_start: start from a uniform point of the eps-ball.
    ramp_steps: eps grows linearly from eps / ramp_steps to eps over this many optimiser
      steps (0: no ramp).
  """

  logits_fn: LogitsFn
  eps: float
  steps: int
  step_size_rel: float
  random_start: bool = True
  ramp_steps: int = 0

  def eps_at(self, step: Array) -> Array:
    """The radius at global step `step` (int)."""
    if self.ramp_steps <= 0:
      return jnp.asarray(self.eps, jnp.float32)
    frac = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / self.ramp_steps)
    return self.eps * frac

  def __call__(self, params: Params, key: PRNGKey, x: Array, y: Array, step: Array) -> Array:
    """PGD examples [B, H, W, C] of the batch x [B, H, W, C] with labels y int[B]."""
    eps = self.eps_at(step)
    keys = jax.random.split(key, x.shape[0])

    def one(xi, yi, ki):
      return pgd_linf(
        self.logits_fn,
        params,
        xi,
        yi,
        eps=eps,
        steps=self.steps,
        step_size_rel=self.step_size_rel,
        key=ki,
        random_start=self.random_start,
      ).x_adv

    return jax.vmap(one)(x, y, keys)


def train_adversarial(
  model: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  settings: train.TrainSettings,
  eps: float,
  steps: int,
  step_size_rel: float,
  random_start: bool = True,
  ramp_epochs: float = 0.0,
  checkpoint_dir: str | None = None,
  init_params: Params | None = None,
) -> tuple[Params, dict]:
  """Adversarial training of a classifier on PGD L-inf examples (Madry et al. 2018).

  Every batch is replaced by its PGD examples against the current parameters (no clean
  examples mixed in, as Madry et al.); the rest is `train.train_classifier` (Adam, schedule,
  checkpoints, resume, progress lines).

  Args:
    model: the classifier module.
    data: x_train, y_train, x_test, y_test.
    key: randomness of the run (init, shuffles, PGD starts).
    settings: the training's `train.TrainSettings`.
    eps, steps, step_size_rel, random_start: the training attack (see `PGDPerturb`).
    ramp_epochs: epochs over which eps ramps up linearly (0: full eps from the start).
    checkpoint_dir, init_params: as in `train.train_classifier`.

  Returns:
    (variables, metrics) as `train.train_classifier`; test_accuracy is the clean accuracy.
  """
  perturb = PGDPerturb(
    models.classifier_fns(model),
    eps=float(eps),
    steps=int(steps),
    step_size_rel=float(step_size_rel),
    random_start=bool(random_start),
    ramp_steps=int(round(ramp_epochs * settings.steps_per_epoch(data.x_train.shape[0]))),
  )
  return train.train_classifier(
    model,
    data,
    key=key,
    settings=settings,
    checkpoint_dir=checkpoint_dir,
    init_params=init_params,
    perturb=perturb,
  )


def _kl(log_p: Array, log_q: Array) -> Array:
  """KL(p || q) over the last axis from log-probabilities (finite where p underflows to 0)."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)


def kl_pgd_linf(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  *,
  eps: Array | float,
  steps: int,
  step_size: Array | float,
  key: PRNGKey,
) -> Array:
  """TRADES' inner maximisation for one example x [H, W, C]: the x' of the L-inf eps-ball and
  the box [0, 1] that maximises KL(softmax f(x) || softmax f(x')), by `steps` signed gradient
  steps of `step_size` from x + 0.001 N(0, I), each projected onto the ball, then the box (as
  Zhang et al.'s trades.py)."""
  log_p = jax.nn.log_softmax(logits_fn(params, x))

  def kl(xa):
    return _kl(log_p, jax.nn.log_softmax(logits_fn(params, xa)))

  def step(xa, _):
    xa = xa + step_size * jnp.sign(jax.grad(kl)(xa))
    return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0), None

  start = x + 0.001 * jax.random.normal(key, x.shape, x.dtype)
  x_adv, _ = jax.lax.scan(step, start, None, length=steps)
  return jnp.clip(x_adv, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class TradesLoss:
  """TRADES' training loss of a batch (Zhang et al. 2019, trades.py `trades_loss`):
  CE(f(x), y) + beta * mean_i KL(softmax f(x_i) || softmax f(x'_i)), x' = `kl_pgd_linf` against
  the current parameters with the model in evaluation mode (no gradient through x'), both
  terms in training mode, the gradient through f(x) in both (as theirs). A frozen dataclass:
  its repr, part of the checkpoint's hyper-parameters, names every setting.

  Attributes:
    model: the classifier module (`model(x[B, H, W, C], train=...) -> logits[B, K]`).
    eps: the L-inf radius (0.3 on MNIST).
    steps: ascent steps of the inner maximisation (40 in their MNIST script).
    step_size_rel: step size / eps (their MNIST script: 0.01 / 0.3).
    beta: the weight of the KL term, 1 / lambda (their MNIST script's default 1.0; their README:
      1 to 10, larger is more robust and less accurate).
  """

  model: nn.Module
  eps: float
  steps: int
  step_size_rel: float
  beta: float

  def __call__(self, params: Params, x: Array, y: Array, key: PRNGKey) -> tuple[Array, dict]:
    adv_key, dropout_key = jax.random.split(key)
    fn = models.classifier_fns(self.model)
    frozen = jax.lax.stop_gradient(params)

    def one(xi, ki):
      return kl_pgd_linf(fn, frozen, xi, eps=self.eps, steps=self.steps,
                         step_size=self.step_size_rel * self.eps, key=ki)  # fmt: skip

    x_adv = jax.lax.stop_gradient(jax.vmap(one)(x, jax.random.split(adv_key, x.shape[0])))
    logits = self.model.apply(
      params, jnp.concatenate([x, x_adv]), train=True, rngs={"dropout": dropout_key}
    )
    natural, adversarial = jnp.split(logits, 2)
    ce = jnp.mean(losses.batch_cross_entropy(natural, y))
    kl = _kl(jax.nn.log_softmax(natural), jax.nn.log_softmax(adversarial))
    return ce + self.beta * jnp.mean(kl), {"cross_entropy": ce, "kl": jnp.mean(kl)}


def train_trades(
  model: nn.Module,
  data: Any,
  *,
  key: PRNGKey,
  settings: train.TrainSettings,
  eps: float,
  steps: int,
  step_size_rel: float,
  beta: float,
  checkpoint_dir: str | None = None,
  init_params: Params | None = None,
) -> tuple[Params, dict]:
  """Trains a classifier with `TradesLoss` (Zhang et al. 2019); the rest is
  `train.train_classifier` (Adam, schedule, checkpoints, resume, progress lines).

  Returns:
    (variables, metrics) as `train.train_classifier`; test_accuracy is the clean accuracy.
  """
  loss = TradesLoss(model, float(eps), int(steps), float(step_size_rel), float(beta))
  return train.train_classifier(
    model, data, key=key, settings=settings, checkpoint_dir=checkpoint_dir,
    init_params=init_params, loss=loss,
  )  # fmt: skip


class Restarted(NamedTuple):
  """The worst case of an untargeted attack over restarts, per example (host numpy)."""

  x_adv: np.ndarray  # [N, H, W, C]: a breaking restart's image, else the highest-loss one
  broken: np.ndarray  # bool[N]: some restart broke the example
  restarts: int
  # bool[R, N]: broken by one of the first r + 1 restarts (row R - 1 is `broken`); how the
  # worst case moves with more restarts (a gradient-masking check, Carlini et al. 2019).
  broken_after: np.ndarray | None = None


def attack_with_restarts(
  attack: Callable[..., base.AttackResult],
  logits_fn: LogitsFn,
  params: Params,
  x: np.ndarray,
  labels: np.ndarray,
  *,
  eps: float,
  restarts: int,
  key: PRNGKey,
  is_broken: Callable[[np.ndarray], np.ndarray] | None = None,
  **runner_kwargs,
) -> Restarted:
  """Runs an untargeted attack `restarts` times (keys fold_in(key, r)) and keeps the worst case.

  Args:
    attack: an untargeted runner attack taking a `key` knob (e.g. `pgd_linf`).
    logits_fn: the model the attack differentiates (may be a surrogate of the deployed one).
    params: its parameters.
    x: examples [N, H, W, C].
    labels: their true labels int[N] (the attack moves away from them).
    eps: the L-inf radius.
    restarts: random starts (>= 1).
    key: randomness of the starts.
    is_broken: host function x_adv [N, ...] -> bool[N] deciding whether the DEPLOYED defence
      is broken (e.g. misclassified and not rejected); default the attack's own success.
    **runner_kwargs: passed to `runner.run_attack` (the attack's knobs, chunk_size, mesh, ...).

  Returns:
    Restarted(x_adv, broken, restarts, broken_after); `broken` is True when any restart broke
    the example, `broken_after[r]` when one of the first r + 1 did.
  """
  if restarts < 1:
    raise ValueError(f"restarts={restarts} must be >= 1")
  runner_kwargs.setdefault("progress", False)
  best_x, broken, best_loss, after = None, None, None, []
  for r in range(restarts):
    res = runner.run_attack(
      attack, logits_fn, params, x, labels, (eps,), key=jax.random.fold_in(key, r), **runner_kwargs
    )
    x_adv = np.asarray(res.x_adv[0])
    ok = np.asarray(res.success[0], bool) if is_broken is None else np.asarray(is_broken(x_adv))
    loss = np.asarray(res.loss_trace[0][:, -1])  # minus the cross-entropy: lower is stronger
    if best_x is None:
      best_x, broken, best_loss = x_adv.copy(), ok.copy(), loss.copy()
    else:
      take = ~broken & (ok | (loss < best_loss))
      best_x[take], best_loss[take] = x_adv[take], loss[take]
      broken |= ok
    after.append(broken.copy())
  return Restarted(best_x, broken, restarts, np.stack(after))
