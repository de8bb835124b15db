"""What every attack shares: the result pytree, distortions, and the target loss.

An attack is written for ONE (source, target) pair and ONE epsilon; the runner batches it
with `jax.vmap`. Attacks never import models: they see `logits_fn(params, x[H, W, C]) ->
logits[K]` (or an encoder/decoder function for the VAE attacks).
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from vae_attacks.types import Array, LogitsFn, Params

NORMS = ("linf", "l2", "l1")


class Distortion(NamedTuple):
  """Size of a perturbation delta = x_adv - x, in the four usual norms."""

  l0: Array  # [] number of changed pixel values (|delta| > 1e-6)
  l1: Array  # []
  l2: Array  # []
  linf: Array  # []


class AttackResult(NamedTuple):
  """Outcome of one attack on one (source, target) pair; batched by vmap.

  `budget` is set only by the minimal-budget searches, and is None (an empty pytree node, so
  vmap, tree maps and the runner carry it through) for every other attack: the smallest norm
  at which the search saw the attack succeed, +inf when no probe succeeded. For the bisection
  over eps (`minimal.bim_min_eps`) it is the smallest successful eps (the radius of the ball
  in the attack's norm); for Szegedy's c search (`lbfgs.lbfgs_c_search`) the L2 norm of the
  smallest successful perturbation. Either way an upper bound on the pair's true minimal
  budget in that norm.
  """

  x_adv: Array  # [H, W, C], inside the box [0, 1] and the attack's ball
  success: Array  # bool[]: argmax == target (targeted) or != label (untargeted)
  target_prob: Array  # [] softmax probability of the target (targeted) / label (untargeted)
  distortion: Distortion
  iterations: Array  # int32[] steps actually taken (early stop, L-BFGS)
  loss_trace: Array  # [steps] the attack's objective after each step
  budget: Array | None = None  # [] minimal budget found by a search (+inf: none); else None


def distortion(x: Array, x_adv: Array) -> Distortion:
  """Distortion of `x_adv` from `x` in L0, L1, L2 and L-inf."""
  d = jnp.ravel(x_adv - x)
  return Distortion(
    l0=jnp.sum(jnp.abs(d) > 1e-6).astype(jnp.float32),
    l1=jnp.sum(jnp.abs(d)),
    l2=jnp.sqrt(jnp.sum(d * d)),
    linf=jnp.max(jnp.abs(d)),
  )


def check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r} is not supported; allowed: {', '.join(NORMS)}")


def attack_loss(logits: Array, target: Array, *, targeted: bool) -> Array:
  """The loss an attack MINIMISES: CE to the target, or minus CE to the true label."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
  return ce if targeted else -ce


def outcome(logits: Array, target: Array, *, targeted: bool) -> tuple[Array, Array]:
  """(success, probability of `target`) from logits[K]."""
  chex.assert_rank(logits, 1)
  pred = jnp.argmax(logits)
  success = (pred == target) if targeted else (pred != target)
  return success, jax.nn.softmax(logits)[target]


def finish(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  x_adv: Array,
  target: Array,
  *,
  targeted: bool,
  iterations: Array,
  loss_trace: Array,
) -> AttackResult:
  """Builds the AttackResult for a final `x_adv` (one extra forward pass)."""
  success, prob = outcome(logits_fn(params, x_adv), target, targeted=targeted)
  return AttackResult(
    x_adv=x_adv,
    success=success,
    target_prob=prob,
    distortion=distortion(x, x_adv),
    iterations=jnp.asarray(iterations, jnp.int32),
    loss_trace=loss_trace,
  )
