"""Basic Iterative Method / PGD in L-inf and L2, and SLIDE sparse L1 descent.

Kurakin, Goodfellow and Bengio, "Adversarial Examples in the Physical World" (2016): BIM;
Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018):
the same with a random start (PGD); Tramer and Boneh, "Adversarial Training and Robustness
for Multiple Perturbations" (NeurIPS 2019): SLIDE, the L1 version.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vae_attacks.attacks import base
from vae_attacks.attacks.fgsm import check_nonnegative, movable
from vae_attacks.attacks.projections import project_l1_box, project_l2, project_linf
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey

# Bisection steps for SLIDE's percentile threshold: the bracket [0, max|g|] halves each
# step, reaching float32 resolution well before 64.
KTH_LARGEST_BISECTION_STEPS = 64


class BimState(NamedTuple):
  """Carry of the BIM loop."""

  x_adv: Array  # [H, W, C] current iterate
  done: Array  # bool[] frozen after its first success (early_stop only)
  iterations: Array  # int32[] updates applied so far


def random_start_point(key: PRNGKey, x: Array, eps: Array, norm: str) -> Array:
  """A uniform random point of the `norm` eps-ball around `x`, clipped to the [0, 1] box.

  Clipping only shrinks each coordinate of the perturbation, so the point stays in the ball.
  """
  n = x.size
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
  elif norm == "l2":
    k_dir, k_rad = jax.random.split(key)
    d = jax.random.normal(k_dir, x.shape, x.dtype)
    radius = eps * jax.random.uniform(k_rad, (), x.dtype) ** (1.0 / n)
    delta = radius * d / jnp.sqrt(jnp.sum(d * d))
  else:  # l1: n+1 exponentials normalised by their sum are uniform in the simplex interior
    k_mag, k_sign = jax.random.split(key)
    e = jax.random.exponential(k_mag, (n + 1,), x.dtype)
    signs = jax.random.rademacher(k_sign, (n,), x.dtype)
    delta = (eps * signs * e[:n] / jnp.sum(e)).reshape(x.shape)
  return jnp.clip(x + delta, 0.0, 1.0)


def _kth_largest(a: Array, k: int) -> Array:
  """The k-th largest entry of a non-negative vector, by bisection on a count.

  Returns the largest t (to float resolution) with #{a >= t} >= k, which is that entry. On
  CPU this is ~4x faster than `lax.top_k` for an LFW-sized image (71148 values, k = 712).
  """

  def bisect(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    enough = jnp.sum(a >= mid) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  zero = jnp.zeros((), a.dtype)
  return lax.fori_loop(0, KTH_LARGEST_BISECTION_STEPS, bisect, (zero, jnp.max(a)))[0]


def _slide_direction(x_adv: Array, g: Array, k: int) -> Array:
  """SLIDE step direction with unit L1 norm: -sign(g) on the k largest movable |g|."""
  a = jnp.where(movable(x_adv, -g), jnp.abs(g), 0.0).ravel()
  e = jnp.where((a >= _kth_largest(a, k)) & (a > 0), -jnp.sign(g.ravel()), 0.0)
  return (e / jnp.maximum(jnp.sum(jnp.abs(e)), 1.0)).reshape(x_adv.shape)


def bim(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  eps: Array | float,
  step_size: Array | float,
  steps: int,
  norm: str = "linf",
  targeted: bool = True,
  random_start: bool = False,
  key: PRNGKey | None = None,
  early_stop: bool = False,
  unroll: bool | int = True,
  sparsity: float = 0.99,
) -> base.AttackResult:
  """Basic Iterative Method / PGD (L-inf, L2) and SLIDE (L1), for one pair and one eps.

  Each of the `steps` steps takes the gradient g of the loss the attack minimises
  (`base.attack_loss`: cross-entropy to `target`, or minus cross-entropy to the true label
  when untargeted) and moves the iterate by `step_size` (absolute, in the units of `norm`;
  a runner wanting eps-relative steps passes e.g. `step_size=eps / 4`):
    linf (Kurakin et al. 2016): x_t - step_size * sign(g), clipped to the eps-box around x;
    l2 (Madry et al. 2018):     x_t - step_size * g / ||g||_2, projected onto the eps-ball;
    l1 (SLIDE, Tramer & Boneh 2019): x_t + step_size * e / ||e||_1, e = -sign(g) on the
      coordinates whose |g| is in the top (1 - sparsity) fraction (among those the [0, 1]
      box lets move that way, cleverhans' `clip_grad`), then the exact projection onto
      the L1 eps-ball intersected with the box (`project_l1_box`).
  linf and l2 iterates are then clipped to [0, 1] (which keeps them in the ball).

  The returned image is the LAST iterate, as in standard BIM; with `early_stop`, a pair is
  frozen at its first successful iterate (the update is masked, the loop still runs `steps`
  times: no data-dependent control flow, so vmapping over pairs stays efficient).

  Args:
    logits_fn: (params, x[H, W, C]) -> logits[K].
    params: the classifier's parameters.
    x: clean image [H, W, C] in [0, 1].
    target: int[] target class (targeted) or true label (untargeted).
    eps: radius of the `norm` ball (may be traced; >= 0).
    step_size: absolute step length in `norm` (may be traced; >= 0).
    steps: number of steps (static, >= 1).
    norm: "linf", "l2" or "l1" (static).
    targeted: move towards `target` (True) or away from it (False).
    random_start: start from a uniform random point of the eps-ball, clipped to the box
      (PGD; needs `key`). Otherwise start at x.
    key: PRNG key for the random start.
    early_stop: freeze a pair once the attack succeeds.
    unroll: `lax.scan` unrolling; True (default) unrolls fully, which XLA on CPU runs
      ~1.7x faster than a rolled loop of small convolutions (docs/performance.md); pass 1 for
      a rolled loop when compile time matters more (many steps, big models).
    sparsity: SLIDE's percentile q in [0, 1) (l1 only): the top 1 - q fraction of the
      coordinates (at least one) move each step; 0.99 moves the top 1%.

  Returns:
    AttackResult with `iterations` = updates applied (= `steps` without early stop; with
    it, the index of the first successful iterate, or `steps` if none succeeded) and
    `loss_trace[steps]`, the attack loss after each step (held constant once frozen).
  """
  base.check_norm(norm)
  if not isinstance(steps, int | np.integer) or steps < 1:
    raise ValueError(f"steps={steps!r} must be an int >= 1")
  steps = int(steps)
  check_nonnegative("eps", eps)
  check_nonnegative("step_size", step_size)
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
  if random_start and key is None:
    raise ValueError("random_start=True needs a PRNG key: pass key=jax.random.key(seed)")
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  k_top = min(x.size, max(1, math.ceil(round((1.0 - sparsity) * x.size, 6))))

  def loss_and_logits(xx):
    logits = logits_fn(params, xx)
    return base.attack_loss(logits, target, targeted=targeted), logits

  grad_fn = jax.value_and_grad(loss_and_logits, has_aux=True)

  def update(x_t: Array, g: Array) -> Array:
    if norm == "linf":
      x_new = x + project_linf(x_t - step_size * jnp.sign(g) - x, eps)
    elif norm == "l2":
      g_norm = jnp.sqrt(jnp.sum(g * g))
      x_new = x + project_l2(x_t - step_size * g / jnp.where(g_norm > 0, g_norm, 1.0) - x, eps)
    else:
      x_new = x + project_l1_box(x, x_t + step_size * _slide_direction(x_t, g, k_top) - x, eps)
    return jnp.clip(x_new, 0.0, 1.0)

  def body(state: BimState, _) -> tuple[BimState, Array]:
    (loss, logits), g = grad_fn(state.x_adv)
    done = state.done
    if early_stop:
      done = done | base.outcome(logits, target, targeted=targeted)[0]
    x_next = jnp.where(done, state.x_adv, update(state.x_adv, g))
    iterations = state.iterations + (~done).astype(jnp.int32)
    # The barrier stops XLA from fusing (and so duplicating) one step's elementwise update
    # into the next: without it an unrolled loop's compiled size grows quadratically in
    # `steps` (an L1 attack on a small CNN took minutes to compile at 20 steps).
    return lax.optimization_barrier(BimState(x_next, done, iterations)), loss

  x0 = random_start_point(key, x, eps, norm) if random_start else x
  init = BimState(x0, jnp.zeros((), bool), jnp.zeros((), jnp.int32))
  state, losses_before = lax.scan(body, init, length=steps, unroll=unroll)

  # losses_before[t] is the loss at iterate t; the loss after the last step comes from the
  # forward pass that scores the result, so the trace costs no extra evaluation.
  logits = logits_fn(params, state.x_adv)
  final_loss = base.attack_loss(logits, target, targeted=targeted)
  success, prob = base.outcome(logits, target, targeted=targeted)
  return base.AttackResult(
    x_adv=state.x_adv,
    success=success,
    target_prob=prob,
    distortion=base.distortion(x, state.x_adv),
    iterations=state.iterations,
    loss_trace=jnp.concatenate([losses_before[1:], final_loss[None]]),
  )


pgd = functools.partial(bim, random_start=True)
pgd.__doc__ = "Projected Gradient Descent (Madry et al. 2018): `bim` with random_start=True."
