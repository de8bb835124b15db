"""Box-constrained L-BFGS built for batches, and the L-BFGS attack of Szegedy et al. (2014).

Szegedy et al., "Intriguing properties of neural networks" (ICLR 2014), find a small
adversarial perturbation by minimising `c * ||delta||_2^2 + loss(x + delta, target)` with
`x + delta` in the box [0, 1], using box-constrained L-BFGS and a line search over `c`.

The solver is written for ONE problem and batched with `jax.vmap`. A textbook line search
(a zoom / More-Thuente search) has a data-dependent number of evaluations, so a vmapped one
makes every problem wait for the slowest and evaluates every branch. Here every step of the
loop costs the same for every problem:

* `num_trials=1` (default): one `value_and_grad` per step. The trial point is accepted when it
  satisfies the Armijo condition along the projected path, or Hager and Zhang's approximate
  Wolfe conditions (progress that float32 values cannot resolve); otherwise the next step
  tries a shorter step (quadratic interpolation), so a rejected trial costs one step, not a
  stall of the batch.
* `num_trials=T>1`: the T candidate steps `alpha * 2**-k` are evaluated together (value only,
  `jax.vmap` over candidates), the largest that satisfies Armijo is taken, then one
  `value_and_grad` at that point.

The direction is the L-BFGS two-loop recursion (Nocedal and Wright, Algorithm 7.4, with
`optax.scale_by_lbfgs`'s initial scaling), evaluated on the Gram matrices of the stored
pairs so that the [2 memory x pixels] array is read three times per step; the box is handled
as in projected / two-metric L-BFGS (Bertsekas 1982; Kim, Sra and Dhillon 2010): variables
within `eps_k` of a bound whose gradient pushes outward are moved straight to that bound, the
others (the free variables) follow the L-BFGS direction computed from the curvature pairs
restricted to them (the secant pairs of the reduced Hessian, as in the subspace step of
L-BFGS-B, Byrd et al. 1995; `direction="subspace"`, the default) or from the free block of the
whole inverse approximation (`direction="restricted"`, a two-metric projection step whose
Gram matrix is updated per stored pair, so a step reads the memory twice instead of forming a
[2m, 2m] product: cheaper per step at 154x154x3, more iterations on MNIST;
docs/performance.md), and every trial point is projected onto the box. Pairs with
`s.y <= 0` are not stored, and a line search that fails `max_backtracks` times in a row
restarts from steepest descent (and the problem stops if that fails too).

Loops: `minimise_box` is fully compiled (`lax.while_loop`; under `vmap` it runs until every
problem is done, finished problems masked). On CPU, convolutions inside an XLA loop run about
1.7x slower than straight-line code, so `minimise_box_batched` (and the attack `lbfgs_batch`)
run the same steps as a host loop over jitted steps, which also drops finished problems from
the batch once few are left.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vae_attacks.attacks import base
from vae_attacks.types import Array, LogitsFn, Params

Objective = Callable[[Array], Array]  # x (any shape) -> scalar

_ARMIJO_C1 = 1e-4
# Hager and Zhang's approximate Wolfe conditions (2005), for steps whose decrease float32
# cannot resolve: sigma * phi'(0) <= phi'(a) <= (2 delta - 1) * phi'(0) with phi(a) <= phi(0).
_WOLFE_SIGMA = 0.9
_WOLFE_DELTA = 0.1
_CURVATURE_EPS = 1e-6  # a pair is kept only if s.y > eps * |s| |y|
_ACTIVE_EPS = 1e-3  # Bertsekas' eps-active set: eps_k = min(_ACTIVE_EPS, |projected grad|)


class LbfgsSolution(NamedTuple):
  """Result of `minimise_box` for one problem (leading batch axis when batched)."""

  x: Array  # the minimiser found, inside the box
  value: Array  # [] objective at x
  grad_norm: Array  # [] max-norm of the projected gradient x - clip(x - grad) at x
  iterations: Array  # int32[] accepted L-BFGS iterations
  converged: Array  # bool[] grad_norm <= tol, or a relative decrease <= ftol
  value_trace: Array  # [max_iters] objective after each iteration, padded with the final value
  steps: Array  # int32[] loop steps taken (each one value_and_grad, accepted or not)


class LbfgsState(NamedTuple):
  """Loop state of the solver for one problem (a pytree; vmap and shard it freely)."""

  x: Array  # current iterate, inside the box
  value: Array  # [] f(x)
  grad: Array  # grad f(x)
  direction: Array  # search direction from x (moves active variables onto their bound)
  alpha: Array  # [] next trial step along `direction`
  # [2m, n] ring buffer of the curvature pairs (flattened): rows 0..m-1 the whole differences
  # s = x_{k+1} - x_k, rows m..2m-1 the matching gradient differences y (one array, so that
  # one product gives every Gram entry the direction needs).
  pairs: Array
  # [2m, 2m] inner products of the whole stored pairs (pairs @ pairs.T), kept up to date one
  # row and column per stored pair; read by the "restricted" direction only.
  gram: Array
  stored: Array  # int32[] pairs stored since the last restart; the next goes to slot stored % m
  iterations: Array  # int32[] accepted iterations
  steps: Array  # int32[] loop steps taken (each costs the same for every problem)
  failures: Array  # int32[] rejected trials since the last accepted iteration
  restarted: Array  # bool[] the current direction is steepest descent after a failure
  done: Array  # bool[]
  converged: Array  # bool[]
  trace: Array  # [max_iters] f after each accepted iteration (f(x0) where not yet written)
  start_value: Array  # [] f(x0)


class _Config(NamedTuple):
  lower: Any
  upper: Any
  max_iters: int
  max_steps: int
  memory: int
  num_trials: int
  tol: float
  ftol: float
  ftol_iters: int
  max_backtracks: int
  direction: str


DIRECTIONS = ("subspace", "restricted")


def _vdot(a: Array, b: Array) -> Array:
  return jnp.sum(a * b)


def _bounds(cfg: _Config, x: Array) -> tuple[Array, Array]:
  lo = jnp.broadcast_to(jnp.asarray(cfg.lower, x.dtype), x.shape)
  hi = jnp.broadcast_to(jnp.asarray(cfg.upper, x.dtype), x.shape)
  return lo, hi


def _projected_grad_norm(x: Array, g: Array, lo: Array, hi: Array) -> Array:
  """Max-norm of x - clip(x - g): zero exactly at a KKT point of the box problem."""
  return jnp.max(jnp.abs(x - jnp.clip(x - g, lo, hi)))


class _FreeSet(NamedTuple):
  active: Array  # bool, variables held at (or moved onto) a bound
  bound: Array  # the bound of each active variable
  grad: Array  # the gradient with the active variables zeroed

  def direction(self, x: Array, free_direction: Array) -> Array:
    return jnp.where(self.active, self.bound - x, free_direction)

  def steepest(self, x: Array) -> Array:
    """Steepest descent, capped to length 1 as optax's first L-BFGS step."""
    scale = jnp.minimum(1.0, 1.0 / jnp.sqrt(_vdot(self.grad, self.grad)))
    return self.direction(x, -scale * self.grad)


def _free_set(x: Array, g: Array, lo: Array, hi: Array) -> _FreeSet:
  """Bertsekas' eps-active set: within eps_k of a bound that the gradient pushes outward."""
  pg = x - jnp.clip(x - g, lo, hi)
  eps = jnp.minimum(_ACTIVE_EPS, jnp.sqrt(_vdot(pg, pg)))
  at_lo = (x - lo <= eps) & (g > 0)
  at_hi = (hi - x <= eps) & (g < 0)
  active = at_lo | at_hi
  return _FreeSet(active, jnp.where(at_lo, lo, hi), jnp.where(active, 0.0, g))


def _pair_ok(sy: Array, ss: Array, yy: Array) -> Array:
  """The curvature condition s.y > 0 (relative to |s| |y|), which keeps H positive definite."""
  return (sy > _CURVATURE_EPS * jnp.sqrt(ss * yy)) & jnp.isfinite(sy)


def _two_loop_coefficients(
  sy: Array, yy: Array, ss: Array, sg: Array, yg: Array, usable: Array, g_norm: Array
) -> tuple[Array, Array, Array]:
  """The L-BFGS two-loop recursion (Nocedal and Wright, Algorithm 7.4) on inner products.

  With H_0 = gamma I, the recursion's result is r = gamma g + sum_a (c_s[a] s_a + c_y[a] y_a):
  every dot product it takes is an entry of the Gram matrices of the pairs and g, so the
  recursion runs on m x m numbers and the pairs are read once more, to form r (Byrd, Nocedal
  and Schnabel 1994 make the same observation for their compact form). Pairs are indexed by
  age (0 = newest); pairs that are not `usable` get weight 0, as in the vector recursion.

  Args:
    sy: [m, m] s_a . y_b;  yy: [m, m] y_a . y_b;  ss: [m] s_a . s_a;  sg, yg: [m] s_a . g,
      y_a . g (all restricted to the free variables).
    usable: bool[m] pairs that take part.
    g_norm: [] |g|, for the capped first step when no pair is usable.

  Returns:
    (gamma, c_s[m], c_y[m]).
  """
  m = sy.shape[0]
  d_sy, d_yy = jnp.diagonal(sy), jnp.diagonal(yy)
  rho = jnp.where(usable, 1.0 / jnp.where(usable, d_sy, 1.0), 0.0)
  alpha = jnp.zeros_like(sg)
  for a in range(m):  # newest to oldest: alpha_a = rho_a s_a . (g - sum_{b newer} alpha_b y_b)
    alpha = alpha.at[a].set(rho[a] * (sg[a] - jnp.dot(sy[a, :a], alpha[:a])))
  newest = jnp.argmax(usable)
  # optax's scale_by_lbfgs: gamma from the newest pair; with none, min(1, 1/|g|).
  gamma = jnp.where(
    jnp.any(usable),
    jnp.where(d_yy[newest] > 0, d_sy[newest] / jnp.where(d_yy[newest] > 0, d_yy[newest], 1.0), 1.0),
    jnp.minimum(1.0, 1.0 / g_norm),
  )
  yq = yg - yy @ alpha  # y_a . q, q = g - sum_b alpha_b y_b
  coef = jnp.zeros_like(sg)  # alpha_b - beta_b of the older pairs done so far
  for a in reversed(range(m)):  # oldest to newest: beta_a = rho_a y_a . r
    beta = rho[a] * (gamma * yq[a] + jnp.dot(sy[a + 1 :, a], coef[a + 1 :]))
    coef = coef.at[a].set(alpha[a] - beta)
  return gamma, coef, -gamma * alpha


def _lbfgs_direction(
  pairs: Array,
  gram: Array,
  stored: Array,
  x: Array,
  free: _FreeSet,
  s: Array,
  y: Array,
  kind: str = "subspace",
) -> tuple[Array, Array, Array, Array]:
  """Stores the pair (s, y) (if s.y > 0) and returns the L-BFGS direction on the free set.

  `kind="subspace"`: the direction uses the pairs restricted to the free variables (s_F,
  y_F), the secant pairs of the reduced Hessian B_FF, as the subspace step of L-BFGS-B does.
  Pairs with s_F.y_F <= 0 are left out (weight 0). The Gram matrix of the restricted pairs
  changes with the free set, so every step forms it anew: one [2m, n] x [n, 2m] product (not
  two [m, n] x [n, m] ones and a masked sum of squares: batched under vmap, XLA CPU runs the
  one product faster, docs/performance.md).

  `kind="restricted"`: the direction is -[H]_FF g_F, the free block of the whole L-BFGS
  inverse approximation H: a two-metric projection step (Bertsekas 1982: any scaling that is
  positive definite on the free variables and diagonal on the active ones keeps the method
  a descent method), since a principal block of the positive definite H is positive definite.
  H's Gram matrix does not depend on the free set, so it is kept up to date one row and
  column per stored pair, and the step reads the memory twice: one thin product
  pairs @ [s, y, g_F] and the combination.

  Both: H_0 = gamma I takes gamma from the newest usable pair (as `optax.scale_by_lbfgs`
  does; its capped steepest-descent step when none is usable); the memory (s and y stacked,
  [2m, n]) is written only in the slot of the new pair, so that a donated memory is updated
  in place.

  Returns:
    (direction shaped like x, pairs, gram, stored).
  """
  m = pairs.shape[0] // 2
  s, y = s.reshape(-1), y.reshape(-1)
  good = _pair_ok(_vdot(s, y), _vdot(s, s), _vdot(y, y))
  slot = stored % m
  keep = lambda mem, row, v: mem.at[row].set(jnp.where(good, v, mem[row]))
  pairs = keep(keep(pairs, slot, s), m + slot, y)
  stored = stored + good.astype(stored.dtype)

  f = (~free.active).reshape(-1).astype(s.dtype)
  g = free.grad.reshape(-1)
  if kind == "subspace":
    # Every inner product of the restricted pairs at once: sub[a, b] = p_a . f p_b.
    sub = (pairs * f[None]) @ pairs.T  # [2m, 2m]
    pg = pairs @ g  # [2m]
  else:
    # One pass over the memory: the new pair against every stored one, and g_F.
    prod = pairs @ jnp.stack([s, y, g], axis=1)  # [2m, 3]
    new = lambda gr, row, v: gr.at[row].set(v).at[:, row].set(v)
    gram = jnp.where(good, new(new(gram, slot, prod[:, 0]), m + slot, prod[:, 1]), gram)
    sub, pg = gram, prod[:, 2]
  # Pairs in age order (0 = newest): slot (stored - 1 - a) % m; only the small Gram
  # matrices are permuted.
  order = (stored - 1 - jnp.arange(m)) % m
  sy = sub[:m, m:][order][:, order]
  yy = sub[m:, m:][order][:, order]
  ss = jnp.diagonal(sub[:m, :m])[order]
  sg, yg = pg[:m][order], pg[m:][order]
  usable = _pair_ok(jnp.diagonal(sy), ss, jnp.diagonal(yy)) & (jnp.arange(m) < stored)
  gamma, c_s, c_y = _two_loop_coefficients(sy, yy, ss, sg, yg, usable, jnp.sqrt(_vdot(g, g)))
  by_slot = lambda c: jnp.zeros_like(c).at[order].set(c)
  r = gamma * g + f * (jnp.concatenate([by_slot(c_s), by_slot(c_y)]) @ pairs)
  return free.direction(x, -r.reshape(x.shape)), pairs, gram, stored


def _trial_point(x: Array, d: Array, alpha: Array, lo: Array, hi: Array) -> Array:
  return jnp.clip(x + alpha * d, lo, hi)


def _select(pred: Array, on_true: Any, on_false: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def lbfgs_init(objective: Objective, x0: Array, cfg: _Config) -> LbfgsState:
  """Solver state at x0: one value_and_grad and the first (steepest-descent) direction."""
  lo, hi = _bounds(cfg, x0)
  x = jnp.clip(x0, lo, hi)
  value, grad = jax.value_and_grad(objective)(x)
  converged = _projected_grad_norm(x, grad, lo, hi) <= cfg.tol
  empty = lambda: jnp.zeros((2 * cfg.memory, x.size), x.dtype)
  return LbfgsState(
    x=x,
    value=value,
    grad=grad,
    direction=_free_set(x, grad, lo, hi).steepest(x),
    alpha=jnp.ones((), x.dtype),
    pairs=empty(),
    gram=jnp.zeros((2 * cfg.memory, 2 * cfg.memory), x.dtype),
    stored=jnp.zeros((), jnp.int32),
    iterations=jnp.zeros((), jnp.int32),
    steps=jnp.zeros((), jnp.int32),
    failures=jnp.zeros((), jnp.int32),
    restarted=jnp.zeros((), bool),
    done=converged | ~jnp.isfinite(value) | (cfg.max_iters <= 0),
    converged=converged,
    trace=jnp.full((cfg.max_iters,), value),
    start_value=value,
  )


def _armijo(value: Array, grad: Array, x: Array, f_try: Array, x_try: Array) -> Array:
  slope = _vdot(grad, x_try - x)
  # f_try < value as well: in float32 `value + c1 * slope` can round to `value` itself.
  return (slope < 0) & (f_try <= value + _ARMIJO_C1 * slope) & (f_try < value)


def lbfgs_step(objective: Objective, state: LbfgsState, cfg: _Config) -> LbfgsState:
  """One loop step: a trial (or a batch of trials), then accept / backtrack / restart.

  Costs the same for every problem (one value_and_grad, plus `num_trials` values when
  num_trials > 1); problems that are done keep their state.
  """
  lo, hi = _bounds(cfg, state.x)
  x, value, grad, d, alpha = state.x, state.value, state.grad, state.direction, state.alpha
  value_and_grad = jax.value_and_grad(objective)
  if cfg.num_trials == 1:
    x_try = _trial_point(x, d, alpha, lo, hi)
    f_try, g_try = value_and_grad(x_try)
    ok = _armijo(value, grad, x, f_try, x_try)
    # Quadratic interpolation of phi(a) = f(x + a d) from phi(0), phi'(0) and phi(alpha).
    slope0 = _vdot(grad, d)
    curv = f_try - value - slope0 * alpha
    a_new = -slope0 * alpha * alpha / (2.0 * curv)
    a_new = jnp.where(jnp.isfinite(a_new) & (curv > 0), a_new, 0.1 * alpha)
    next_alpha = jnp.clip(a_new, 0.1 * alpha, 0.5 * alpha)
    tried = 1
  else:
    factors = 0.5 ** jnp.arange(cfg.num_trials, dtype=x.dtype)
    xs = jax.vmap(lambda a: _trial_point(x, d, a, lo, hi))(alpha * factors)
    fs = jax.vmap(objective)(xs)
    oks = jax.vmap(lambda f, xt: _armijo(value, grad, x, f, xt))(fs, xs)
    # The largest step satisfying Armijo, else the lowest value if it still decreases f.
    best = jnp.argmin(jnp.where(jnp.isfinite(fs), fs, jnp.inf))
    x_try = xs[jnp.where(jnp.any(oks), jnp.argmax(oks), best)]
    f_try, g_try = value_and_grad(x_try)
    ok = jnp.isfinite(f_try) & (jnp.any(oks) | (f_try < value))
    next_alpha = alpha * 0.5**cfg.num_trials
    tried = cfg.num_trials
  # Or Hager and Zhang's approximate Wolfe conditions, from the gradient at the trial point:
  # they still make progress where float32 cannot resolve the decrease of f.
  slope_start, slope_end = _vdot(grad, x_try - x), _vdot(g_try, x_try - x)
  approx_wolfe = (
    (slope_start < 0)
    & (f_try <= value)
    & (slope_end >= _WOLFE_SIGMA * slope_start)
    & (slope_end <= (2 * _WOLFE_DELTA - 1) * slope_start)
  )
  ok = (ok | approx_wolfe) & ~state.done

  # Rejected: backtrack; after max_backtracks restart from steepest descent; stop if that
  # fails too.
  failures = jnp.where(ok, 0, state.failures + tried)
  give_up = ~ok & (failures >= cfg.max_backtracks)
  restart = give_up & ~state.restarted

  # The new point (x itself if rejected), its free set, and the next direction.
  x_new = jnp.where(ok, x_try, x)
  f_new = jnp.where(ok, f_try, value)
  g_new = jnp.where(ok, g_try, grad)
  free = _free_set(x_new, g_new, lo, hi)
  d_lbfgs, pairs, gram, stored = _lbfgs_direction(
    state.pairs, state.gram, state.stored, x_new, free, x_new - x, g_new - grad, cfg.direction
  )
  steepest = (ok & ~(_vdot(g_new, d_lbfgs) < 0)) | restart  # not a descent direction
  direction = jnp.where(steepest, free.steepest(x_new), jnp.where(ok, d_lbfgs, d))
  # A restart forgets the pairs by their count; a rejected trial stored nothing (s = y = 0).
  stored = jnp.where(steepest, 0, stored)

  pg = _projected_grad_norm(x_new, g_new, lo, hi)
  # Relative decrease over the last ftol_iters iterations (this one included).
  back = state.iterations + 1 - cfg.ftol_iters
  f_back = jnp.where(back > 0, state.trace[jnp.maximum(back - 1, 0)], state.start_value)
  scale = jnp.maximum(jnp.maximum(jnp.abs(f_back), jnp.abs(f_new)), 1.0)
  tiny = (f_back - f_new) <= cfg.ftol * scale
  converged = ok & ((pg <= cfg.tol) | tiny)
  iterations = state.iterations + ok.astype(jnp.int32)
  steps = state.steps + 1
  new = LbfgsState(
    x=x_new,
    value=f_new,
    grad=g_new,
    direction=direction,
    alpha=jnp.where(ok | restart, jnp.ones_like(alpha), next_alpha),
    pairs=pairs,
    gram=gram,
    stored=stored,
    iterations=iterations,
    steps=steps,
    failures=jnp.where(restart, 0, failures),
    restarted=jnp.where(ok, False, state.restarted | restart),
    done=converged
    | (iterations >= cfg.max_iters)
    | (give_up & state.restarted)
    | (steps >= cfg.max_steps),
    converged=converged,
    trace=jnp.where(ok, state.trace.at[state.iterations].set(f_try, mode="drop"), state.trace),
    start_value=state.start_value,
  )
  # Finished problems keep their state. The memory is left out of the select: their trial was
  # not accepted, so nothing was stored, and a select would rewrite the whole memory.
  without_memory = lambda st: st._replace(pairs=None)
  kept = _select(state.done, without_memory(state), without_memory(new))
  return kept._replace(pairs=pairs)


def lbfgs_solution(state: LbfgsState, cfg: _Config) -> LbfgsSolution:
  """The solution pytree from a loop state (trace padded with the final value)."""
  lo, hi = _bounds(cfg, state.x)
  filled = jnp.arange(cfg.max_iters) < state.iterations
  return LbfgsSolution(
    x=state.x,
    value=state.value,
    grad_norm=_projected_grad_norm(state.x, state.grad, lo, hi),
    iterations=state.iterations,
    converged=state.converged,
    value_trace=jnp.where(filled, state.trace, state.value),
    steps=state.steps,
  )


def make_config(
  *,
  lower=0.0,
  upper=1.0,
  max_iters: int = 50,
  max_steps: int | None = None,
  memory: int = 10,
  num_trials: int = 1,
  tol: float = 1e-5,
  ftol: float = 5e-7,
  ftol_iters: int = 3,
  max_backtracks: int = 4,
  direction: str = "subspace",
) -> _Config:
  """Checks the knobs of `minimise_box` and bundles them (static, hashable)."""
  if max_iters < 0 or memory < 1 or num_trials < 1 or max_backtracks < 1 or ftol_iters < 1:
    raise ValueError(
      f"need max_iters >= 0, memory, num_trials, max_backtracks, ftol_iters >= 1; got "
      f"{max_iters=}, {memory=}, {num_trials=}, {max_backtracks=}, {ftol_iters=}"
    )
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  if max_steps is None:
    max_steps = 2 * max_iters + max_backtracks
  hashable = lambda b: float(b) if jnp.ndim(b) == 0 and not isinstance(b, jax.Array) else b
  return _Config(
    lower=hashable(lower),
    upper=hashable(upper),
    max_iters=int(max_iters),
    max_steps=int(max_steps),
    memory=int(memory),
    num_trials=int(num_trials),
    tol=float(tol),
    ftol=float(ftol),
    ftol_iters=int(ftol_iters),
    max_backtracks=int(max_backtracks),
    direction=direction,
  )


def minimise_box(
  objective: Objective,
  x0: Array,
  *,
  lower=0.0,
  upper=1.0,
  max_iters: int = 50,
  memory: int = 10,
  num_trials: int = 1,
  tol: float = 1e-5,
  ftol: float = 5e-7,
  ftol_iters: int = 3,
  max_steps: int | None = None,
  max_backtracks: int = 4,
  direction: str = "subspace",
) -> LbfgsSolution:
  """Minimises `objective(x)` subject to `lower <= x <= upper` with projected L-BFGS.

  For ONE problem; pure and jittable, with no data-dependent Python control flow, so
  `jax.vmap` over problems runs them in lock step (the loop ends when every problem is done).
  Each loop step costs one `value_and_grad` (plus `num_trials` values if num_trials > 1).
  The L-BFGS-B reference is Byrd, Lu, Nocedal and Zhu (1995); the direction comes from
  two-loop recursion (Nocedal and Wright, Algorithm 7.4; `_two_loop_coefficients`).

  Args:
    objective: x -> scalar; pure and differentiable. x has the shape of `x0`.
    x0: starting point (any shape); projected onto the box first.
    lower: lower bound, a scalar or an array broadcastable to x0.
    upper: upper bound, likewise.
    max_iters: most accepted iterations (the length of `value_trace`).
    memory: number of curvature pairs kept by L-BFGS.
    num_trials: 1 for one trial per step, accepted on the Armijo condition or on Hager and
      Zhang's approximate Wolfe conditions (which still make progress where float32 cannot
      resolve the decrease of f), else the next step backtracks (quadratic interpolation);
      T > 1 to evaluate T candidate steps (alpha * 2**-k) together (values only) and take the
      largest satisfying Armijo.
    tol: stop when the max-norm of the projected gradient is <= tol.
    ftol: stop when the last `ftol_iters` iterations together lowered f by at most
      ftol * max(|f|, 1).
    ftol_iters: see ftol.
    max_steps: most loop steps (evaluations); default 2 * max_iters + max_backtracks.
    max_backtracks: rejected trials in a row before restarting from steepest descent (and
      stopping if that fails too).
    direction: "subspace" (the L-BFGS pairs restricted to the free variables, as L-BFGS-B's
      subspace step) or "restricted" (the free block of the whole inverse approximation, a
      two-metric projection step; cheaper per step); see `_lbfgs_direction`.

  Returns:
    LbfgsSolution(x, value, grad_norm, iterations, converged, value_trace, steps).
  """
  cfg = make_config(
    lower=lower,
    upper=upper,
    max_iters=max_iters,
    max_steps=max_steps,
    memory=memory,
    num_trials=num_trials,
    tol=tol,
    ftol=ftol,
    ftol_iters=ftol_iters,
    max_backtracks=max_backtracks,
    direction=direction,
  )
  state = lbfgs_init(objective, x0, cfg)
  state = jax.lax.while_loop(lambda s: ~s.done, lambda s: lbfgs_step(objective, s, cfg), state)
  return lbfgs_solution(state, cfg)


BatchedObjective = Callable[[Array, Any, Any], Array]  # (x, shared, per_problem) -> scalar


@functools.partial(jax.jit, static_argnums=(0, 4))
def _batched_init(objective, x0, shared, per_problem, cfg):
  return jax.vmap(lambda x, pp: lbfgs_init(lambda z: objective(z, shared, pp), x, cfg))(
    x0, per_problem
  )


@functools.partial(jax.jit, static_argnums=(0, 4, 5), donate_argnums=(1,))
def _batched_block(objective, state, shared, per_problem, cfg, block_steps):
  def one(s, pp):
    f = lambda z: objective(z, shared, pp)
    for _ in range(block_steps):  # straight-line code: XLA CPU runs it faster than a loop
      s = lbfgs_step(f, s, cfg)
    return s

  state = jax.vmap(one)(state, per_problem)
  return state, jnp.sum(~state.done)


@functools.partial(jax.jit, static_argnums=(1,))
def _batched_solution(state, cfg):
  return jax.vmap(lambda s: lbfgs_solution(s, cfg))(state)


def _like_batch(tree: Any, reference: Array) -> Any:
  """Puts a gathered batch on the sharding of `reference` (a 1-D mesh over the batch axis)."""
  sharding = getattr(reference, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return tree
  batch_axis = sharding.spec[0] if len(sharding.spec) else None
  put = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(batch_axis))
  return jax.device_put(tree, put)


def _batch_multiple(reference: Array) -> int:
  """How many devices the batch axis of `reference` is split over."""
  sharding = getattr(reference, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding) or not len(sharding.spec):
    return 1
  axes = sharding.spec[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def minimise_box_batched(
  objective: BatchedObjective,
  x0: Array,
  shared: Any = None,
  per_problem: Any = None,
  *,
  block_steps: int = 1,
  compact_below: float | None = 0.25,
  **knobs,
) -> LbfgsSolution:
  """Solves a batch of box problems with a host loop over jitted blocks of steps.

  The same algorithm and result as `jax.vmap(minimise_box)`, but the steps run as
  straight-line code in blocks of `block_steps` (convolutions inside an XLA loop run ~1.7x
  slower on CPU), with the "how many still running?" check on the host between blocks (one
  block behind, so the host never waits for the device). Once at most `compact_below` of the
  problems are still running, those are gathered into a smaller batch (a second compiled
  block), so that the slowest problems no longer pay for the whole batch. Not jittable itself.
  Sharding follows the inputs: put `x0` and `per_problem` on a 1-D mesh over the batch axis
  (and `shared` replicated) to spread the problems over devices.

  Args:
    objective: (x, shared, per_problem) -> scalar for ONE problem; pass the same function
      object on every call (it is a static argument of the compiled blocks).
    x0: [B, ...] starting points.
    shared: pytree shared by all problems (e.g. model parameters).
    per_problem: pytree with a leading batch axis B (e.g. images, targets, c).
    block_steps: loop steps per compiled block (unrolled).
    compact_below: fraction of running problems at which the batch is compacted (None: never).
    **knobs: the keyword arguments of `minimise_box` (lower, upper, max_iters, ...); the
      bounds must be Python scalars here.

  Returns:
    LbfgsSolution with a leading batch axis.
  """
  cfg = make_config(**knobs)
  n = x0.shape[0]
  state = _batched_init(objective, x0, shared, per_problem, cfg)
  full, index, pp = None, None, per_problem
  running_prev = None
  compact_size = None
  if compact_below is not None:
    multiple = _batch_multiple(x0)
    compact_size = -(-max(1, math.ceil(compact_below * n)) // multiple) * multiple
  for _ in range(-(-cfg.max_steps // block_steps)):
    state, running = _batched_block(objective, state, shared, pp, cfg, block_steps)
    if running_prev is not None:  # the previous block's count: ready without waiting
      left = int(running_prev)
      if left == 0:
        break
      if full is None and compact_size is not None and left <= compact_size < n:
        # Gather the running problems (padded with a finished one, which stays unchanged).
        done = np.asarray(state.done)
        index = np.flatnonzero(~done)
        pad = np.flatnonzero(done)[:1] if done.any() else index[:1]
        index = np.concatenate([index, np.repeat(pad, compact_size - len(index))])
        full = state
        take = lambda a, index=index: a[index]
        state = _like_batch(jax.tree.map(take, state), x0)
        pp = _like_batch(jax.tree.map(take, per_problem), x0)
        running = jnp.sum(~state.done)
    running_prev = running
  if full is not None:
    state = jax.tree.map(lambda a, b: a.at[index].set(b), full, state)
  return _batched_solution(state, cfg)


def szegedy_objective(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  c: Array,
  x_adv: Array,
  *,
  targeted: bool = True,
) -> Array:
  """c * ||x_adv - x||_2^2 + CE(logits(x_adv), target) (minus CE to the label if untargeted)."""
  delta = x_adv - x
  return c * _vdot(delta, delta) + base.attack_loss(
    logits_fn(params, x_adv), target, targeted=targeted
  )


def lbfgs(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  eps: Array,
  targeted: bool = True,
  **solver,
) -> base.AttackResult:
  """The L-BFGS attack of Szegedy et al. (2014) for ONE pair and ONE penalty c = `eps`.

  Minimises `c * ||x_adv - x||_2^2 + CE(logits_fn(params, x_adv), target)` over x_adv in
  [0, 1]^(H, W, C) with `minimise_box` from x_adv = x. A smaller c allows a larger
  perturbation. `eps` may be traced (vmap over a c grid); `lbfgs_c_search` searches c.

  Args:
    logits_fn: (params, x[H, W, C]) -> logits[K].
    params: model parameters.
    x: [H, W, C] source image in [0, 1].
    target: [] int target class (the true label when `targeted=False`).
    eps: [] the penalty weight c >= 0 on the squared L2 perturbation.
    targeted: minimise CE to `target` (True) or maximise CE to the label (False).
    **solver: `minimise_box` knobs (defaults of `make_config`): max_iters (L-BFGS iterations,
      the length of `loss_trace`; 50), memory (10), num_trials, tol (projected-gradient
      tolerance), ftol (relative-decrease tolerance, 5e-7).

  Returns:
    AttackResult; `iterations` are accepted L-BFGS iterations, `loss_trace` the objective
    after each iteration (padded after convergence).
  """
  objective = functools.partial(
    szegedy_objective, logits_fn, params, x, target, eps, targeted=targeted
  )
  sol = minimise_box(objective, x, **solver)
  return base.finish(
    logits_fn,
    params,
    x,
    sol.x,
    target,
    targeted=targeted,
    iterations=sol.iterations,
    loss_trace=sol.value_trace,
  )


@functools.lru_cache(maxsize=64)
def _batched_szegedy(logits_fn: LogitsFn, targeted: bool) -> BatchedObjective:
  """One function object per (model, targeted), so the compiled blocks are reused."""

  def objective(x_adv, params, per_pair):
    x, target, c = per_pair
    return szegedy_objective(logits_fn, params, x, target, c, x_adv, targeted=targeted)

  return objective


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("targeted",))
def _finish_batch(logits_fn, params, x, x_adv, target, iterations, trace, *, targeted):
  finish = lambda *a: base.finish(
    logits_fn, params, *a[:3], targeted=targeted, iterations=a[3], loss_trace=a[4]
  )
  return jax.vmap(finish)(x, x_adv, target, iterations, trace)


def lbfgs_batch(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  eps: Array,
  max_iters: int = 50,
  targeted: bool = True,
  block_steps: int = 1,
  compact_below: float | None = 0.25,
  **knobs,
) -> base.AttackResult:
  """`lbfgs` over a batch of pairs with `minimise_box_batched` (not jittable; faster on CPU).

  The same attack and results as `jax.vmap(lbfgs)`, run as a host loop over compiled steps
  (see `minimise_box_batched`): about 2x faster on a 2-core CPU than the fully compiled while
  loop, and able to shard the pairs over the devices of a mesh (put `x`, `target`, `eps` on a
  1-D mesh over the pairs axis).

  Args:
    logits_fn: (params, x[H, W, C]) -> logits[K]; hashable (build it once).
    params: model parameters.
    x: [B, H, W, C] source images in [0, 1].
    target: [B] int target classes (true labels when `targeted=False`).
    eps: [B] or [] penalty weights c.
    max_iters: L-BFGS iterations (the length of `loss_trace`).
    targeted: see `lbfgs`.
    block_steps: see `minimise_box_batched`.
    compact_below: see `minimise_box_batched`.
    **knobs: further `minimise_box` knobs (memory, num_trials, tol, ftol, ...).

  Returns:
    AttackResult with a leading batch axis B.
  """
  eps = jnp.broadcast_to(jnp.asarray(eps, x.dtype), target.shape)
  sol = minimise_box_batched(
    _batched_szegedy(logits_fn, targeted),
    x,
    params,
    (x, target, eps),
    block_steps=block_steps,
    compact_below=compact_below,
    max_iters=max_iters,
    **knobs,
  )
  return _finish_batch(
    logits_fn, params, x, sol.x, target, sol.iterations, sol.value_trace, targeted=targeted
  )


class _SearchState(NamedTuple):
  c: Array  # [] penalty to try next
  c_success: Array  # [] largest c that succeeded so far (0 if none)
  c_fail: Array  # [] smallest c that failed so far (inf if none)
  best: base.AttackResult  # smallest successful perturbation so far (else the last try)
  found: Array  # bool[]


def lbfgs_c_search(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  c_init: float = 1.0,
  search_steps: int = 10,
  targeted: bool = True,
  factor: float = 10.0,
  **solver,
) -> base.AttackResult:
  """Szegedy et al. (2014): the largest penalty c whose L-BFGS solution still succeeds.

  A larger c weighs the perturbation more, so the largest successful c gives (about) the
  smallest successful perturbation. Per pair: start at `c_init`; while nothing succeeded,
  divide c by `factor`; while nothing failed, multiply it by `factor`; once both a success
  and a failure are known, bisect geometrically between the largest success and the smallest
  failure. A fixed number of search steps, so `jax.vmap` over pairs runs one compiled solve.

  Args:
    logits_fn: (params, x[H, W, C]) -> logits[K].
    params: model parameters.
    x: [H, W, C] source image in [0, 1].
    target: [] int target class (the true label when `targeted=False`).
    c_init: first penalty tried.
    search_steps: L-BFGS solves per pair.
    targeted: see `lbfgs`.
    factor: growth / shrink factor of c before the bracket is found.
    **solver: the knobs of each solve, as in `lbfgs` (max_iters: iterations per solve, ...).

  Returns:
    AttackResult of the successful solve with the smallest L2 perturbation (or of the last
    solve, with success=False, if none succeeded); `iterations` counts iterations over all
    solves; `budget` is that smallest successful perturbation's L2 norm (+inf when no solve
    succeeded): an upper bound on the pair's minimal L2 budget, comparable with the
    bisection's `minimal.bim_min_eps` in L2 units, where the largest successful c is not.
  """
  if search_steps < 1:
    raise ValueError(f"search_steps must be >= 1, got {search_steps}")
  attack = functools.partial(lbfgs, logits_fn, params, x, target, targeted=targeted, **solver)
  c0 = jnp.asarray(c_init, x.dtype)
  first = attack(eps=c0)

  def update(state: _SearchState, result: base.AttackResult) -> _SearchState:
    ok = result.success
    better = ok & (~state.found | (result.distortion.l2 < state.best.distortion.l2))
    best = jax.tree.map(lambda a, b: jnp.where(better | ~state.found, a, b), result, state.best)
    best = best._replace(iterations=state.best.iterations + result.iterations)
    c_success = jnp.where(ok, jnp.maximum(state.c_success, state.c), state.c_success)
    c_fail = jnp.where(ok, state.c_fail, jnp.minimum(state.c_fail, state.c))
    bracket = (c_success > 0) & jnp.isfinite(c_fail)
    c_next = jnp.where(
      bracket,
      jnp.sqrt(c_success * c_fail),
      jnp.where(c_success > 0, c_success * factor, c_fail / factor),
    )
    return _SearchState(c_next, c_success, c_fail, best, state.found | ok)

  init = _SearchState(
    c=c0,
    c_success=jnp.zeros_like(c0),
    c_fail=jnp.full_like(c0, jnp.inf),
    best=first._replace(iterations=jnp.zeros_like(first.iterations)),
    found=jnp.zeros((), bool),
  )
  state = update(init, first)

  def body(state: _SearchState, _) -> tuple[_SearchState, None]:
    return update(state, attack(eps=state.c)), None

  state, _ = jax.lax.scan(body, state, None, length=search_steps - 1)
  chex.assert_rank(state.best.x_adv, x.ndim)
  budget = jnp.where(state.found, state.best.distortion.l2, jnp.inf)
  return state.best._replace(budget=budget.astype(x.dtype))
