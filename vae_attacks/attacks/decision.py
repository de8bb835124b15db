"""A decision-based attack: HopSkipJump (Chen, Jordan and Wainwright 2020), targeted, L2.

It sees only the model's decision (is argmax(logits) the target?), never a gradient, so it
cannot be fooled by gradient masking: the check that a robust-looking model (a generative
classifier whose logits come out of an optimisation) is robust and not just hard to
differentiate (Brendel, Rauber and Bethge 2018 make the same point with the Boundary attack).

One pair; `jax.vmap` batches it (the runner). Each iteration: (1) estimate the boundary's
normal at the current boundary point x_b from the decisions at x_b + delta u_b for
`num_evals` random unit directions u_b (Monte Carlo, with the mean decision as baseline), (2)
step from x_b along it by xi = ||x_b - x|| / sqrt(t), halved until the step lands on the target
side (geometric search), (3) bisect the segment between x and that point back to the boundary.
Deviation from the paper: a fixed number of gradient samples per iteration (the paper grows it
as B0 sqrt(t)), so that every iteration has one shape and vmap runs one compiled loop.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from vae_attacks.attacks import base
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey


def _is_target(logits_fn, params, x, target) -> Array:
  return jnp.argmax(logits_fn(params, x)) == target


def boundary_bisection(
  logits_fn: LogitsFn, params: Params, x: Array, x_adv: Array, target: Array, *, steps: int
) -> tuple[Array, Array]:
  """The point on the segment from x to x_adv nearest x that is still classified as `target`.

  Bisects alpha in [0, 1] over (1 - alpha) x + alpha x_adv, `steps` times (static); x_adv must
  be on the target side (alpha = 1 then stays the answer if nothing nearer is).

  Returns:
    (the point [H, W, C] at the bracket's target end, its alpha []).
  """
  blend = lambda a: (1.0 - a) * x + a * x_adv

  def body(carry, _):
    lo, hi = carry
    mid = 0.5 * (lo + hi)
    ok = _is_target(logits_fn, params, blend(mid), target)
    return (jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)), None

  one = jnp.ones((), x.dtype)
  (_, hi), _ = lax.scan(body, (0.0 * one, one), None, length=int(steps))
  return blend(hi), hi


class _State(NamedTuple):
  x_b: Array  # [H, W, C] current point on the target side of the boundary
  dist: Array  # [] its L2 distance to x


def hop_skip_jump(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  x_init: Array,
  key: PRNGKey,
  iterations: int = 20,
  num_evals: int = 100,
  bisect_steps: int = 16,
  max_halvings: int = 12,
  gamma: float = 1.0,
) -> base.AttackResult:
  """Targeted L2 HopSkipJump (Chen et al. 2020) for ONE pair; decisions only.

  Args:
    logits_fn: (params, x[H, W, C]) -> logits[K]; only its argmax is used.
    params: the model's parameters.
    x: [H, W, C] source image in [0, 1].
    target: [] int target class.
    x_init: [H, W, C] a starting image in [0, 1] classified as `target` (e.g. a test image of
      that class); if it is not, the attack returns it with success False.
    key: randomness of the gradient estimates.
    iterations: T (static).
    num_evals: decisions per gradient estimate (static).
    bisect_steps: bisections per boundary search (static): resolution 2^-bisect_steps of the
      segment.
    max_halvings: the geometric step search's halvings at most (static).
    gamma: the probe radius delta = gamma d^-1 ||x_b - x|| (the paper's theta * sqrt(d) *
      dist with theta = gamma / d^(3/2)).

  Returns:
    `base.AttackResult` with x_adv the final boundary point (target side, in the box),
    loss_trace [iterations] its L2 distance to x after each iteration (non-increasing: an
    iteration that would move away keeps the previous point), iterations = `iterations`.
  """
  d = x.size
  x_init = jnp.clip(x_init, 0.0, 1.0)
  start_ok = _is_target(logits_fn, params, x_init, target)
  x_b, _ = boundary_bisection(logits_fn, params, x, x_init, target, steps=bisect_steps)
  x_b = jnp.where(start_ok, x_b, x_init)
  state = _State(x_b, jnp.linalg.norm((x_b - x).ravel()))

  def iteration(state: _State, t):
    k_dir = jax.random.fold_in(key, t)
    delta = gamma * state.dist / d
    u = jax.random.normal(k_dir, (num_evals, *x.shape), x.dtype)
    u = u / jnp.sqrt(jnp.sum(u.reshape(num_evals, -1) ** 2, -1)).reshape(-1, *([1] * x.ndim))
    probes = jnp.clip(state.x_b[None] + delta * u, 0.0, 1.0)
    u = (probes - state.x_b[None]) / jnp.maximum(delta, 1e-12)  # the directions after clipping
    phi = jax.vmap(lambda p: _is_target(logits_fn, params, p, target))(probes)
    phi = 2.0 * phi.astype(x.dtype) - 1.0
    mean = jnp.mean(phi)
    # All probes on one side: no baseline (the paper's rule), else subtract the mean decision.
    weights = jnp.where(jnp.abs(mean) == 1.0, phi, phi - mean)
    grad = jnp.tensordot(weights, u, axes=1) / num_evals
    v = grad / jnp.maximum(jnp.linalg.norm(grad.ravel()), 1e-12)
    xi0 = state.dist / jnp.sqrt(t.astype(x.dtype) + 1.0)

    def halve(carry):
      xi, i = carry
      return xi / 2.0, i + 1

    def keep_halving(carry):
      xi, i = carry
      cand = jnp.clip(state.x_b + xi * v, 0.0, 1.0)
      return (~_is_target(logits_fn, params, cand, target)) & (i < max_halvings)

    xi, _ = lax.while_loop(keep_halving, halve, (xi0, jnp.int32(0)))
    cand = jnp.clip(state.x_b + xi * v, 0.0, 1.0)
    cand_ok = _is_target(logits_fn, params, cand, target)
    new_b, _ = boundary_bisection(logits_fn, params, x, cand, target, steps=bisect_steps)
    new_dist = jnp.linalg.norm((new_b - x).ravel())
    better = cand_ok & (new_dist < state.dist) & start_ok
    nxt = _State(jnp.where(better, new_b, state.x_b), jnp.where(better, new_dist, state.dist))
    return nxt, nxt.dist

  state, trace = lax.scan(iteration, state, jnp.arange(int(iterations)))
  return base.finish(
    logits_fn, params, x, state.x_b, target, targeted=True,
    iterations=jnp.int32(iterations), loss_trace=trace,
  )  # fmt: skip
