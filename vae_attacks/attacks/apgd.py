"""Auto-PGD (APGD): PGD with its own step-size schedule, momentum and checkpoints.

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (the APGD attacks of AutoAttack), Algorithm 1 and Sec. 3.
The constants are those of the paper, checked against the authors' public code
(github.com/fra31/auto-attack, `autoattack/autopgd_base.py`, read, not copied):

- initial step eta = 2 eps (L-inf and L2);
- momentum alpha = 0.75: z = P(x_k + eta * dir(grad)), x_{k+1} = P(x_k + alpha (z - x_k) +
  (1 - alpha)(x_k - x_{k-1})), with alpha = 1 on the first step (a plain gradient step);
- checkpoints w_j = ceil(p_j * N_iter) with p_0 = 0, p_1 = 0.22 and p_{j+1} = p_j +
  max(p_j - p_{j-1} - 0.03, 0.06), in the code's integer form: windows of max(int(0.22 N), 1)
  steps, each the previous minus max(int(0.03 N), 1) but at least max(int(0.06 N), 1);
- at a checkpoint the step size halves, and the iterate goes back to the best point so far
  (with its gradient), when Condition 1 holds (the loss rose on at most rho = 0.75 of the
  window's steps; the paper writes "<", the code "<=", which we follow) or Condition 2 (the
  step was not halved at the previous checkpoint and the best loss has not improved since);
- the best point (highest loss) is tracked throughout;
- random start (always, in the code): L-inf x + eps * u / ||u||_inf with u uniform in
  [-1, 1]^n, L2 x + eps * g / ||g||_2 with g Gaussian, clipped to the [0, 1] box.

Losses (maximised inside the attack; `z` the logits, pi the classes sorted by decreasing logit):

- "ce": cross-entropy CE(z, y) away from the label y; towards a target t, -CE(z, t)
  (the code's "ce-targeted");
- "dlr": the Difference of Logits Ratio, -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3) (Eq. 6,
  needs K >= 3); targeted, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (Sec. 4, needs K >= 4).
  Both are invariant to shifting and scaling the logits.

Targeted and untargeted (one knob, `targeted`, as `bim.bim`'s): the attack of ONE pair sees
the pair's class as `target`, which is
- `targeted=True` (the study's pairs): the class to reach; success is argmax == target. The
  targeted DLR loss needs a true class y: the clean input's predicted class (the true label for
  a correctly classified source, the only sources the study attacks);
- `targeted=False` (robust accuracy, the defences): the TRUE LABEL; success is argmax != label.
  With `target_rank=k >= 1` the loss is the targeted one towards the k-th most likely class
  other than the label at the clean input: AutoAttack's APGD-T, which runs k = 1..9 (its
  `n_target_classes`) and counts an example broken when any of them breaks it
  (`vae_attacks.robustness.worst_case`).

One attack is one run from one random start; restarts are runs with other keys (the runner
folds the key per pair; `defenses.adversarial.attack_with_restarts` folds it per restart).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from vae_attacks.attacks import base
from vae_attacks.attacks.fgsm import check_nonnegative
from vae_attacks.attacks.projections import project_l2, project_linf
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey

NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr")
RHO = 0.75  # Condition 1's fraction of steps on which the loss must have risen
MOMENTUM = 0.75  # alpha
INITIAL_STEP = 2.0  # eta_0 / eps
FIRST_WINDOW, WINDOW_DECAY, MIN_WINDOW = 0.22, 0.03, 0.06  # p_1, and the decay of p_j's steps
TINY = 1e-12  # the code's guard in the DLR denominators and the normalisations


def checkpoint_windows(steps: int) -> np.ndarray:
  """The checkpoint schedule: int[steps], the window length at a step that ends a window, else 0.

  Entry i (0-based) belongs to the update that makes iterate x_{i+1}. The first window is
  max(int(0.22 N), 1) steps long; each next one max(int(0.03 N), 1) steps shorter, but at least
  max(int(0.06 N), 1) (Croce & Hein 2020, Sec. 3.1, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
  0.06), in the integer form of the authors' code).
  """
  window = max(int(FIRST_WINDOW * steps), 1)
  decay = max(int(WINDOW_DECAY * steps), 1)
  shortest = max(int(MIN_WINDOW * steps), 1)
  out = np.zeros(steps, np.int32)
  end = window
  while end <= steps:
    out[end - 1] = window
    window = max(window - decay, shortest)
    end += window
  return out


class ApgdState(NamedTuple):
  """Carry of the APGD loop (one pair)."""

  x_cur: Array  # [H, W, C] the iterate x_k
  x_prev: Array  # [H, W, C] x_{k-1}, for the momentum term
  grad: Array  # [H, W, C] the loss's gradient at x_cur (or at x_best after a restore)
  step: Array  # [] eta
  x_best: Array  # [H, W, C] the iterate of highest loss so far
  grad_best: Array  # [H, W, C] its gradient
  gain_best: Array  # [] its loss
  x_hit: Array  # [H, W, C] the successful iterate of highest loss (x_best until one succeeds)
  gain_hit: Array  # [] its loss (-inf until one succeeds)
  gain_last: Array  # [] the loss of the last iterate made (before any restore)
  rises: Array  # int32[] updates of the current window on which the loss rose
  gain_at_check: Array  # [] the best loss at the previous checkpoint
  halved_at_check: Array  # bool[] the step was halved at the previous checkpoint


def _dlr(logits: Array, label: Array) -> Array:
  """Untargeted DLR loss (maximised): -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)."""
  z = -jnp.sort(-logits)
  other = jnp.where(jnp.argmax(logits) == label, z[1], z[0])
  return -(logits[label] - other) / (z[0] - z[2] + TINY)


def _dlr_targeted(logits: Array, label: Array, target: Array) -> Array:
  """Targeted DLR loss (maximised): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
  z = -jnp.sort(-logits)
  return -(logits[label] - logits[target]) / (z[0] - 0.5 * (z[2] + z[3]) + TINY)


def _ranked_target(clean_logits: Array, label: Array, rank: int) -> Array:
  """The class of the `rank`-th largest clean logit among the classes other than `label`."""
  others = jnp.where(jnp.arange(clean_logits.shape[-1]) == label, -jnp.inf, clean_logits)
  return jnp.argsort(-others)[rank - 1]


def _start(key: PRNGKey, x: Array, eps: Array, norm: str) -> Array:
  """The authors' random start: noise scaled to norm eps around x, clipped to the box."""
  if norm == "linf":
    u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    scale = jnp.max(jnp.abs(u))
  else:
    u = jax.random.normal(key, x.shape, x.dtype)
    scale = jnp.sqrt(jnp.sum(u * u))
  return jnp.clip(x + eps * u / (scale + TINY), 0.0, 1.0)


def apgd(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  eps: Array | float,
  steps: int,
  norm: str = "linf",
  loss: str = "ce",
  targeted: bool = True,
  target_rank: int = 0,
  random_start: bool = True,
  key: PRNGKey | None = None,
  rho: float = RHO,
  momentum: float = MOMENTUM,
  initial_step: float = INITIAL_STEP,
  unroll: bool | int = 1,
) -> base.AttackResult:
  """APGD (Croce & Hein 2020) for one pair and one eps, L-inf or L2, CE or DLR loss.

  `steps` updates from a random start (steps + 1 gradients: one at the start, one per update,
  as in the authors' code; a plain PGD of `steps` updates takes `steps` gradients and a forward
  pass). The loop is a compiled `lax.scan` (rolled unless `unroll`), no Python loop.

  Args:
    logits_fn: (params, x[H, W, C]) -> logits[K].
    params: the classifier's parameters.
    x: clean image [H, W, C] in [0, 1].
    target: int[]: the class to reach (`targeted=True`) or the true label (`targeted=False`).
    eps: radius of the `norm` ball (may be traced; >= 0).
    steps: number of updates N_iter (static, >= 1); the checkpoints scale with it.
    norm: "linf" or "l2" (static).
    loss: "ce" or "dlr" (static; "dlr" needs K >= 3, its targeted form K >= 4).
    targeted: see the module docstring (static).
    target_rank: with `targeted=False`, 0 for the untargeted loss, or k in [1, K - 1] for the
      targeted loss towards the k-th most likely other class at x (APGD-T). A Python int is
      static; a traced int32[] (the runner traces an array knob) means k >= 1, unchecked, and
      one compilation serves every rank.
    random_start: start from the authors' random point (needs `key`); False starts at x.
    key: PRNG key of the random start.
    rho: Condition 1's threshold.
    momentum: alpha.
    initial_step: eta_0 / eps.
    unroll: `lax.scan` unrolling. 1 (default): a rolled loop, quick to compile. True unrolls
      fully, which XLA on CPU runs ~1.7x faster for small convolutions (docs/performance.md;
      `bim` unrolls by default) but compiles several times longer than BIM's unrolled loop
      (README, "Measured": APGD against PGD); worth it for long runs on many examples.

  Returns:
    AttackResult whose x_adv is the successful iterate of highest loss when some iterate
    succeeded, else the iterate of highest loss; `loss_trace[steps]` is minus the best loss
    after each update (non-increasing: the objective the attack minimises, as the other
    attacks' traces); `iterations` = steps.
  """
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r} is not supported by APGD; allowed: {', '.join(NORMS)}")
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r} is not supported; allowed: {', '.join(LOSSES)}")
  if not isinstance(steps, int | np.integer) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f"steps={steps!r} must be an int >= 1")
  steps = int(steps)
  check_nonnegative("eps", eps)
  if random_start and key is None:
    raise ValueError("random_start=True needs a PRNG key: pass key=jax.random.key(seed)")
  num_classes = jax.eval_shape(logits_fn, params, x).shape[-1]
  rank = None if isinstance(target_rank, jax.core.Tracer) else int(target_rank)  # None: traced
  ranked = not targeted and rank != 0
  if targeted and rank != 0:
    raise ValueError(f"target_rank={target_rank} is for targeted=False (the target is given)")
  if ranked and rank is not None and not 1 <= rank < num_classes:
    raise ValueError(f"target_rank={target_rank} must be in [1, {num_classes - 1}] (K - 1)")
  needed = 4 if (targeted or ranked) else 3
  if loss == "dlr" and num_classes < needed:
    raise ValueError(f"the DLR loss in this form needs K >= {needed} classes, got {num_classes}")

  # y: the class to move away from; t: the class to move towards (None: untargeted loss).
  if targeted:
    y, t = (jnp.argmax(logits_fn(params, x)) if loss == "dlr" else None), target
  elif ranked:
    y, t = target, _ranked_target(logits_fn(params, x), target, target_rank)
  else:
    y, t = target, None

  def gain(logits: Array) -> Array:
    if loss == "ce":
      if t is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return -optax.softmax_cross_entropy_with_integer_labels(logits, t)
    return _dlr(logits, y) if t is None else _dlr_targeted(logits, y, t)

  def succeeded(logits: Array) -> Array:
    return base.outcome(logits, target, targeted=targeted)[0]

  def gain_and_logits(xx):
    logits = logits_fn(params, xx)
    return gain(logits), logits

  grad_fn = jax.value_and_grad(gain_and_logits, has_aux=True)
  eps = jnp.asarray(eps, x.dtype)

  def project(z: Array) -> Array:
    d = project_linf(z - x, eps) if norm == "linf" else project_l2(z - x, eps)
    return jnp.clip(x + d, 0.0, 1.0)

  def direction(g: Array) -> Array:
    if norm == "linf":
      return jnp.sign(g)
    return g / (jnp.sqrt(jnp.sum(g * g)) + TINY)

  def body(s: ApgdState, step_in: tuple[Array, Array]) -> tuple[ApgdState, Array]:
    first, window = step_in  # is this the first update; the window it closes (0: none)
    alpha = jnp.where(first, 1.0, momentum).astype(x.dtype)
    z = project(s.x_cur + s.step * direction(s.grad))
    x_new = project(s.x_cur + alpha * (z - s.x_cur) + (1.0 - alpha) * (s.x_cur - s.x_prev))
    (g_new, logits), grad_new = grad_fn(x_new)
    better = g_new > s.gain_best
    x_best = jnp.where(better, x_new, s.x_best)
    grad_best = jnp.where(better, grad_new, s.grad_best)
    gain_best = jnp.maximum(g_new, s.gain_best)
    hit = succeeded(logits) & (g_new > s.gain_hit)
    # The windows partition the updates, so a running count of the rises is the window's count.
    rises = s.rises + (g_new > s.gain_last).astype(jnp.int32)

    # Checkpoint (window > 0): halve eta and restore the best point on Condition 1 (the loss
    # rose on at most rho of the window's updates) or Condition 2.
    cond1 = rises <= rho * window
    cond2 = ~s.halved_at_check & (s.gain_at_check >= gain_best)
    check = window > 0
    halve = check & (cond1 | cond2)
    new = ApgdState(
      x_cur=jnp.where(halve, x_best, x_new),
      x_prev=s.x_cur,
      grad=jnp.where(halve, grad_best, grad_new),
      step=jnp.where(halve, 0.5 * s.step, s.step),
      x_best=x_best,
      grad_best=grad_best,
      gain_best=gain_best,
      x_hit=jnp.where(hit, x_new, s.x_hit),
      gain_hit=jnp.where(hit, g_new, s.gain_hit),
      gain_last=g_new,
      rises=jnp.where(check, 0, rises),
      gain_at_check=jnp.where(check, gain_best, s.gain_at_check),
      halved_at_check=jnp.where(check, halve, s.halved_at_check),
    )
    # As in `bim`: keeps XLA from fusing one step's elementwise work into the next.
    return lax.optimization_barrier(new), -gain_best

  x0 = _start(key, x, eps, norm) if random_start else x
  (g0, logits0), grad0 = grad_fn(x0)
  hit0 = succeeded(logits0)
  init = ApgdState(
    x_cur=x0,
    x_prev=x0,
    grad=grad0,
    step=jnp.asarray(initial_step, x.dtype) * eps,
    x_best=x0,
    grad_best=grad0,
    gain_best=g0,
    x_hit=x0,
    gain_hit=jnp.where(hit0, g0, jnp.asarray(-jnp.inf, g0.dtype)),
    gain_last=g0,
    rises=jnp.zeros((), jnp.int32),
    gain_at_check=g0,
    halved_at_check=jnp.ones((), bool),  # the code's start: Condition 2 waits a checkpoint
  )
  schedule = (jnp.arange(steps) == 0, jnp.asarray(checkpoint_windows(steps)))
  s, trace = lax.scan(body, init, schedule, unroll=unroll)
  x_adv = jnp.where(jnp.isfinite(s.gain_hit), s.x_hit, s.x_best)
  return base.finish(
    logits_fn, params, x, x_adv, target, targeted=targeted, iterations=steps, loss_trace=trace
  )


def gradient_evaluations(steps: int) -> int:
  """Gradients one APGD run of `steps` updates takes: one at the start and one per update."""
  return steps + 1
