"""Robust accuracy as the worst case over an ensemble of attacks, and gradient-masking checks.

Worst case (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020): an example is robust at a budget when it is
classified correctly and NO attack of the ensemble breaks it. `autoattack_apgd` runs the APGD
part of their standard ensemble through the runner (APGD-CE, then the targeted DLR loss towards
each of the 9 most likely other classes, APGD-T); a caller adds its defence-aware attacks'
flags and takes `worst_case` of them all. (AutoAttack's other two attacks, FAB-T and Square,
are not implemented here.)

Gradient-masking checks (Carlini, Athalye, Papernot, Brendel, Rauber, Tsipras, Goodfellow, Madry
and Kurakin, "On Evaluating Adversarial Robustness", arXiv:1902.06705, 2019, the sanity checks of
its Sec. 4-5 and its checklist): pure functions of measured robust accuracies, each returning a
`Check` (passed, with the numbers it looked at):

- `check_falls_with_eps`: accuracy does not rise with the budget ("verify that increasing the
  perturbation budget strictly increases attack success"), and a budget that can erase the
  image (L-inf 0.5 on [0, 1] images: every pixel can go to mid-grey) drives it to about 0
  ("unbounded attacks should reach 100% success");
- `check_more_effort_changes_little`: more steps or restarts change the accuracy little (the
  attack has converged: "run more iterations", "apply random restarts");
- `check_weaker`: an attack that should be weaker is (transfer from a surrogate weaker than
  white-box, "verify white-box attacks perform better than black-box attacks"; single-step
  weaker than iterative). When a transfer or a one-step attack does better than the white-box
  iterative one, the gradients the latter follows are masked.

Accuracies are fractions in [0, 1]; the `slack` of each check absorbs sampling noise (on the
SAME examples, worst-case accuracies differ by far less than two independent estimates would).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from vae_attacks.attacks import registry
from vae_attacks.defenses import adversarial
from vae_attacks.types import LogitsFn, Params, PRNGKey

AUTOATTACK_TARGET_RANKS = 9  # AutoAttack's n_target_classes for APGD-T
AUTOATTACK_STEPS = 100  # its n_iter
UNBOUNDED_LINF = 0.5  # an L-inf budget at which an image in [0, 1] can be turned mid-grey


# ------------------------------------------------------------------------------------------
# The worst case over an ensemble.


class Ensemble(NamedTuple):
  """Robust accuracy under the worst case of several attacks (host numpy / Python numbers)."""

  robust: np.ndarray  # bool[N]: correct and broken by no attack
  robust_accuracy: float  # mean of `robust`
  accuracy_under: dict[str, float]  # per attack alone: correct and not broken by it
  only_broken_by: dict[str, int]  # per attack: examples no other attack broke (its share)
  n: int


def worst_case(correct: np.ndarray, broken: Mapping[str, np.ndarray]) -> Ensemble:
  """Robust accuracy per example = correct and broken by none of the attacks.

  Args:
    correct: bool[N], the (defended) model is right on the clean example (for a rejecting
      defence: right and accepted).
    broken: attack name -> bool[N], the attack broke the example (e.g. `Restarted.broken`, or
      `AttackResult.success` of an untargeted attack); at least one attack.

  Returns:
    Ensemble(robust, robust_accuracy, accuracy_under, only_broken_by, n).

  Raises:
    ValueError: no examples, no attacks, or flags of another length than `correct`.
  """
  correct = np.asarray(correct, bool).reshape(-1)
  if len(correct) == 0:
    raise ValueError("correct is empty: no examples")
  if not broken:
    raise ValueError("broken is empty: give the flags of at least one attack")
  flags = {name: np.asarray(b, bool).reshape(-1) for name, b in broken.items()}
  for name, b in flags.items():
    if len(b) != len(correct):
      raise ValueError(f"attack {name!r} has {len(b)} flags for {len(correct)} examples")
  stacked = np.stack(list(flags.values()))  # [A, N]
  any_broken = stacked.any(axis=0)
  robust = correct & ~any_broken
  n = len(correct)
  others = {
    name: np.delete(stacked, i, axis=0).any(axis=0) if len(flags) > 1 else np.zeros(n, bool)
    for i, name in enumerate(flags)
  }
  return Ensemble(
    robust=robust,
    robust_accuracy=float(robust.mean()),
    accuracy_under={k: float((correct & ~b).mean()) for k, b in flags.items()},
    only_broken_by={k: int(np.sum(correct & b & ~others[k])) for k, b in flags.items()},
    n=n,
  )


def autoattack_apgd(
  logits_fn: LogitsFn,
  params: Params,
  x: np.ndarray,
  labels: np.ndarray,
  *,
  eps: float,
  key: PRNGKey,
  steps: int = AUTOATTACK_STEPS,
  norm: str = "linf",
  target_ranks: int = AUTOATTACK_TARGET_RANKS,
  restarts: int = 1,
  losses: Sequence[str] = ("apgd_ce", "apgd_t"),
  is_broken: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
  skip_broken: bool = True,
  **runner_kwargs: Any,
) -> dict[str, np.ndarray]:
  """The APGD attacks of AutoAttack on every example, as broken flags per attack.

  Runs `registry.UNTARGETED` attacks through the runner, in AutoAttack's order: "apgd_ce",
  then "apgd_t" once per target rank k = 1..min(target_ranks, K - 1) (flags named "apgd_t1",
  ...), and "apgd_dlr" if `losses` names it. Each with `restarts` random starts
  (`adversarial.attack_with_restarts`, keys folded per attack and restart).

  Args:
    logits_fn: the model the attacks differentiate, `(params, x[H, W, C]) -> logits[K]`.
    params: its parameters.
    x: examples [N, H, W, C] in [0, 1].
    labels: true labels int[N].
    eps: the budget in `norm`.
    key: randomness of the starts.
    steps: APGD updates per run (AutoAttack: 100).
    norm: "linf" or "l2".
    target_ranks: how many other classes APGD-T aims at (AutoAttack: 9).
    restarts: random starts per attack (AutoAttack's standard version: 1 for APGD-CE and
      APGD-T).
    losses: which of "apgd_ce", "apgd_t", "apgd_dlr" to run.
    is_broken: (x_adv [M, H, W, C], index int[M]) -> bool[M], whether the DEPLOYED model is
      broken on examples x[index] (their labels are labels[index]; with `skip_broken` a run
      sees only the examples no earlier run broke) (a defence
      with a rejection rule, a surrogate's examples judged on the defended model); default
      the attack's own success (misclassification by `logits_fn`).
    skip_broken: attack only the examples no earlier attack broke (AutoAttack does; the flags
      of an example are then False for every attack after the first that broke it, so
      `worst_case` is unchanged but its `only_broken_by` counts first breakers). The runner
      draws a pair's start from its position among the examples attacked, so the starts then
      depend on which examples earlier attacks broke (still the same numbers for a seed).
    **runner_kwargs: passed to the runner (chunk_size, mesh, progress, ...).

  Returns:
    attack name -> bool[N] broken flags, in the order run.
  """
  x = np.asarray(x)
  labels = np.asarray(labels, np.int32).reshape(-1)
  unknown = set(losses) - set(registry.UNTARGETED)
  if unknown:
    raise ValueError(f"losses names {sorted(unknown)}; allowed: {tuple(registry.UNTARGETED)}")
  num_classes = jax.eval_shape(logits_fn, params, x[:1][0]).shape[-1]
  runs = []
  for name in losses:
    if name == "apgd_t":
      # An array knob is traced by the runner: one compilation serves every rank.
      ranks = range(1, min(target_ranks, num_classes - 1) + 1)
      runs += [(f"apgd_t{k}", name, {"target_rank": np.asarray(k, np.int32)}) for k in ranks]
    else:
      runs.append((name, name, {}))
  flags, broken_so_far = {}, np.zeros(len(x), bool)
  for i, (flag_name, name, extra) in enumerate(runs):
    todo = np.flatnonzero(~broken_so_far) if skip_broken else np.arange(len(x))
    out = np.zeros(len(x), bool)
    if len(todo):
      idx = _bucketed(todo, len(x))
      res = adversarial.attack_with_restarts(
        registry.UNTARGETED[name].run, logits_fn, params, x[idx], labels[idx], eps=eps,
        restarts=restarts, key=jax.random.fold_in(key, i), norm=norm,
        is_broken=None if is_broken is None else (lambda xa, idx=idx: is_broken(xa, idx)),
        steps=steps, **extra, **runner_kwargs,
      )  # fmt: skip
      out[todo] = res.broken[: len(todo)]
    flags[flag_name] = out
    broken_so_far |= out
  return flags


def _bucketed(todo: np.ndarray, n: int) -> np.ndarray:
  """`todo` padded (repeating its last index) to the next power of two, at most `n`: the runner
  compiles once per shape, so the shrinking sets of unbroken examples take few shapes."""
  size = min(1 << (len(todo) - 1).bit_length(), n)
  return np.concatenate([todo, np.full(size - len(todo), todo[-1], todo.dtype)])


# ------------------------------------------------------------------------------------------
# Gradient-masking checks (Carlini et al. 2019).


class Check(NamedTuple):
  """The outcome of one gradient-masking check."""

  name: str
  passed: bool | None  # None: the inputs cannot decide it (e.g. no budget large enough)
  numbers: dict  # what it looked at, for the report
  note: str  # one line: why it passed or failed


def _curve(xs: Sequence[float], accs: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
  """(xs, accs) as float arrays sorted by xs; both non-empty, equal length, accs in [0, 1]."""
  xs, accs = np.asarray(xs, np.float64).reshape(-1), np.asarray(accs, np.float64).reshape(-1)
  if len(xs) == 0 or len(xs) != len(accs):
    raise ValueError(f"{what}: {len(xs)} values against {len(accs)} accuracies (need >= 1 each)")
  if np.any(~np.isfinite(accs)) or np.any((accs < 0) | (accs > 1)):
    raise ValueError(f"accuracies must lie in [0, 1], got {accs.tolist()}")
  order = np.argsort(xs, kind="stable")
  return xs[order], accs[order]


def check_falls_with_eps(
  eps: Sequence[float],
  robust_accuracy: Sequence[float],
  *,
  zero_eps: float = UNBOUNDED_LINF,
  zero_tol: float = 0.02,
  slack: float = 0.01,
) -> Check:
  """Robust accuracy falls as the budget grows and reaches ~0 at a large enough one.

  Passes when no step up the eps grid raises the accuracy by more than `slack`, and the
  accuracy at the largest eps >= `zero_eps` is at most `zero_tol`. Fails on a rise, or on an
  accuracy above `zero_tol` there (Carlini et al. 2019: a defence still "robust" at a budget
  that can erase the image is masking gradients, or the attack is broken). `passed` is None
  when the curve never rises but the grid stops short of `zero_eps`.

  Args:
    eps: the budgets, any order.
    robust_accuracy: the accuracy at each.
    zero_eps: a budget at which any defence should fall to ~0 (L-inf 0.5 on [0, 1] images).
    zero_tol: the accuracy that counts as ~0.
    slack: the rise between neighbouring budgets put down to noise.
  """
  e, a = _curve(eps, robust_accuracy, "eps")
  rises = np.diff(a)
  worst_rise = float(rises.max()) if len(rises) else 0.0
  monotone = worst_rise <= slack
  big = e >= zero_eps
  numbers = dict(eps=e.tolist(), robust_accuracy=a.tolist(), worst_rise=worst_rise)
  if big.any():
    at = float(a[big][-1])
    numbers.update(accuracy_at_large_eps=at, large_eps=float(e[big][-1]))
    reaches = at <= zero_tol
  else:
    reaches = None
  if not monotone:
    passed, note = False, f"accuracy rises by {worst_rise:.3f} with a larger eps (> {slack})"
  elif reaches is None:
    passed, note = None, f"falls with eps, but the grid stops at {e[-1]:g} < {zero_eps:g}"
  elif not reaches:
    passed = False
    note = f"accuracy {numbers['accuracy_at_large_eps']:.3f} > {zero_tol} at eps {e[big][-1]:g}"
  else:
    passed, note = True, f"falls with eps, to {numbers['accuracy_at_large_eps']:.3f}"
  return Check("falls_with_eps", passed, numbers, note)


def check_more_effort_changes_little(
  effort: Sequence[float],
  robust_accuracy: Sequence[float],
  *,
  what: str = "steps",
  tol: float = 0.01,
  slack: float = 0.01,
) -> Check:
  """More steps (or restarts) change the robust accuracy little: the attack has converged.

  Passes when the last increase of effort (the two largest values) lowers the accuracy by at
  most `tol`, and no increase raises it by more than `slack` (more effort cannot make a
  worst case weaker beyond noise). A large drop with more effort says the evaluation has not
  converged (Carlini et al. 2019), so its accuracy is an overestimate.

  Args:
    effort: the steps (or restarts) of each evaluation, at least two values.
    robust_accuracy: the accuracy under each.
    what: "steps" or "restarts", the check's name suffix.
    tol: the largest drop of the last increase that counts as "little".
    slack: the largest rise put down to noise.
  """
  x, a = _curve(effort, robust_accuracy, what)
  if len(x) < 2:
    raise ValueError(f"{what}: needs at least two efforts, got {x.tolist()}")
  last_drop = float(a[-2] - a[-1])
  worst_rise = float(np.diff(a).max())
  numbers = dict(
    effort=x.tolist(), robust_accuracy=a.tolist(), last_drop=last_drop,
    total_drop=float(a[0] - a[-1]), worst_rise=worst_rise,
  )  # fmt: skip
  if worst_rise > slack:
    passed, note = False, f"accuracy rises by {worst_rise:.3f} with more {what} (> {slack})"
  elif last_drop > tol:
    passed = False
    note = f"{x[-2]:g} -> {x[-1]:g} {what} still lowers accuracy by {last_drop:.3f} (> {tol})"
  else:
    passed, note = True, f"{x[-2]:g} -> {x[-1]:g} {what} changes accuracy by {-last_drop:+.3f}"
  return Check(f"more_{what}_changes_little", passed, numbers, note)


def check_weaker(
  strong: Sequence[float],
  weak: Sequence[float],
  *,
  name: str,
  eps: Sequence[float] | None = None,
  slack: float = 0.01,
) -> Check:
  """An attack that should be weaker leaves at least the robust accuracy the stronger one does.

  Transfer (from a surrogate) should be weaker than white-box, single-step weaker than
  iterative; where the weak attack's accuracy is lower than the strong one's by more than
  `slack` at some budget, the white-box gradients are masked (Carlini et al. 2019).

  Args:
    strong: robust accuracy under the attack that should be stronger (e.g. white-box PGD),
      one per budget.
    weak: under the one that should be weaker (e.g. transfer), at the same budgets.
    name: the check's name ("transfer_weaker", "single_step_weaker").
    eps: the budgets, for the numbers.
    slack: the margin put down to noise.
  """
  s, w = np.asarray(strong, np.float64).reshape(-1), np.asarray(weak, np.float64).reshape(-1)
  if len(s) == 0 or len(s) != len(w):
    raise ValueError(f"{name}: {len(s)} strong against {len(w)} weak accuracies (need >= 1)")
  gap = w - s  # >= 0 when the weak attack is weaker
  worst = int(np.argmin(gap))
  numbers = dict(strong=s.tolist(), weak=w.tolist(), worst_gap=float(gap[worst]))
  if eps is not None:
    numbers["eps"] = [float(e) for e in eps]
  where = f" at eps {numbers['eps'][worst]:g}" if eps is not None else ""
  if gap[worst] < -slack:
    note = f"the weaker attack leaves {-gap[worst]:.3f} less accuracy{where} (> {slack})"
    return Check(name, False, numbers, note)
  return Check(name, True, numbers, f"the weaker attack is weaker (smallest gap {gap[worst]:+.3f})")


def flagged(checks: Sequence[Check]) -> list[str]:
  """The names of the checks that failed (a defence with any is flagged in the report)."""
  return [c.name for c in checks if c.passed is False]
