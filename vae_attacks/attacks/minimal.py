"""The minimal adversarial budget of one pair: a bisection over eps of a full attack.

A success rate at a grid of eps depends on the grid; the smallest eps at which an attack breaks
a pair does not. For a budget attack (BIM L-inf, Kurakin et al. 2016; the L1 attack SLIDE,
Tramer and Boneh 2019) the minimal budget is searched per pair by bisection, each probe a full
attack at that eps; for Szegedy et al. (2014)'s L-BFGS attack the analogue is its search over c
(`lbfgs.lbfgs_c_search`). Both report the budget in `base.AttackResult.budget`.

Linear, not geometric, bisection: the search range is [0, eps_max], whose lower end 0 has no
geometric midpoint (a geometric search would need an arbitrary positive floor as one more
knob), and a linear bisection has one absolute resolution, eps_max / 2^bisect_steps, for every
pair, model and dataset, so budgets are compared at the same precision (the study compares
per-pixel L-inf budgets across models; a relative precision would differ between a fragile
and a robust pair).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from vae_attacks.attacks import base, bim
from vae_attacks.types import Array, LogitsFn, Params


class _Bisection(NamedTuple):
  """Carry of the bisection: the bracket and the result at its successful end."""

  lo: Array  # [] largest eps known to fail (0 at the start)
  hi: Array  # [] smallest eps known to succeed
  best: base.AttackResult  # the attack's result at `hi`
  iterations: Array  # int32[] attack steps over all probes


def bim_min_eps(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  eps: Array | float,
  steps: int,
  step_size_rel: float,
  norm: str = "linf",
  bisect_steps: int = 8,
  **bim_knobs,
) -> base.AttackResult:
  """The smallest eps in [0, `eps`] at which `bim.bim` breaks one pair, by bisection.

  Probe `eps` first: if the attack fails there the pair is not broken within the range, and
  the result is that probe's, with budget +inf. Otherwise bisect the bracket [lo, hi] =
  [0, eps] linearly `bisect_steps` times, each probe a full BIM (`steps` steps of size
  `step_size_rel` * probe eps, as the registry's BIM entries take them) at the bracket's
  midpoint: a success moves hi down, a failure moves lo up. A fixed number of probes, so
  `jax.vmap` over pairs runs one compiled loop (Kurakin et al. 2016; SLIDE, Tramer and Boneh
  2019, for norm="l1").

  The budget is the smallest successful probe, hi: an upper bound on the pair's true minimal
  budget (a success at eps is a point of the eps-ball), within eps / 2^bisect_steps of the
  attack's own threshold when its success is monotone in eps. BIM's success need not be
  monotone, so a probe below hi may succeed while one between them failed; the bisection then
  reports the success it found, never a failure.

  Args:
    logits_fn: (params, x[H, W, C]) -> logits[K].
    params: the classifier's parameters.
    x: [H, W, C] source image in [0, 1].
    target: [] int target class (the true label when `targeted=False` is passed).
    eps: [] the search range's upper end (may be traced), in `norm` units.
    steps: BIM steps per probe (static).
    step_size_rel: step size as a fraction of each probe's eps.
    norm: "linf", "l2" or "l1" (static), as in `bim.bim`.
    bisect_steps: probes after the first (static, >= 0); resolution eps / 2^bisect_steps.
    **bim_knobs: the other knobs of `bim.bim` (sparsity, random_start and key, targeted, ...);
      a random start draws the same key at every probe.

  Returns:
    `base.AttackResult` of the probe at the budget (or of the probe at `eps` when it failed),
    with `budget` [] the smallest successful eps (+inf: not broken within the range) and
    `iterations` the BIM steps of all probes.
  """
  if int(bisect_steps) != bisect_steps or bisect_steps < 0:
    raise ValueError(f"bisect_steps={bisect_steps!r} must be an int >= 0")
  eps = jnp.asarray(eps, x.dtype)

  def probe(e: Array) -> base.AttackResult:
    return bim.bim(
      logits_fn, params, x, target, eps=e, step_size=step_size_rel * e, steps=steps, norm=norm,
      **bim_knobs,
    )  # fmt: skip

  first = probe(eps)

  def body(state: _Bisection, _) -> tuple[_Bisection, None]:
    mid = 0.5 * (state.lo + state.hi)
    r = probe(mid)
    ok = r.success
    best = jax.tree.map(lambda a, b: jnp.where(ok, a, b), r, state.best)
    new = _Bisection(
      lo=jnp.where(ok, state.lo, mid),
      hi=jnp.where(ok, mid, state.hi),
      best=best,
      iterations=state.iterations + r.iterations,
    )
    return new, None

  init = _Bisection(jnp.zeros_like(eps), eps, first, first.iterations)
  # A pair that fails at eps has nothing to bisect; under vmap its probes still run (masked
  # by `first.success` below), the price of one compiled loop for every pair.
  state, _ = lax.scan(body, init, None, length=int(bisect_steps))
  broken = first.success
  best = jax.tree.map(lambda a, b: jnp.where(broken, a, b), state.best, first)
  budget = jnp.where(broken, state.hi, jnp.inf).astype(x.dtype)
  return best._replace(iterations=state.iterations, budget=budget)
