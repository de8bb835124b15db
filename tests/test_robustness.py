"""The worst case over an attack ensemble, AutoAttack's APGD runs, and the gradient-masking
checks (Carlini et al. 2019) on constructed inputs where each must pass and where it must fail."""

import jax
import numpy as np
import pytest

from vae_attacks import robustness
from vae_attacks.attacks import registry, runner

K, SHAPE = 4, (4, 4, 1)


# ----------------------------------------------------------------------------------------------
# Worst case.


def test_worst_case_is_correct_and_unbroken_by_every_attack():
  correct = np.array([1, 1, 1, 1, 1, 0], bool)
  broken = {
    "apgd_ce": np.array([1, 0, 0, 0, 0, 1], bool),
    "apgd_t1": np.array([1, 1, 0, 0, 0, 0], bool),
    "aware": np.array([0, 0, 1, 0, 0, 0], bool),
  }
  e = robustness.worst_case(correct, broken)
  np.testing.assert_array_equal(e.robust, [0, 0, 0, 1, 1, 0])
  assert e.robust_accuracy == pytest.approx(2 / 6) and e.n == 6
  assert e.accuracy_under == pytest.approx({"apgd_ce": 4 / 6, "apgd_t1": 3 / 6, "aware": 4 / 6})
  # Example 0 is broken by two attacks, so by neither alone; the wrong example 5 counts for none.
  assert e.only_broken_by == {"apgd_ce": 0, "apgd_t1": 1, "aware": 1}
  assert robustness.worst_case(correct, {"one": broken["aware"]}).only_broken_by == {"one": 1}


def test_worst_case_refuses_bad_input():
  with pytest.raises(ValueError, match="at least one attack"):
    robustness.worst_case(np.ones(3, bool), {})
  with pytest.raises(ValueError, match="'a' has 2 flags for 3 examples"):
    robustness.worst_case(np.ones(3, bool), {"a": np.ones(2, bool)})
  with pytest.raises(ValueError, match="no examples"):
    robustness.worst_case(np.ones(0, bool), {"a": np.ones(0, bool)})


# ----------------------------------------------------------------------------------------------
# AutoAttack's APGD runs on a linear model.


def linear_logits(params, x):
  return params["w"] @ x.ravel() + params["b"]


@pytest.fixture(scope="module")
def linear():
  rng = np.random.default_rng(0)
  params = {
    "w": rng.normal(size=(K, 16)).astype(np.float32),
    "b": rng.normal(size=K).astype(np.float32),
  }
  x = rng.uniform(size=(12, *SHAPE)).astype(np.float32)
  y = np.argmax(x.reshape(12, -1) @ params["w"].T + params["b"], 1).astype(np.int32)
  return params, x, y


def test_autoattack_apgd_runs_ce_then_every_target_rank_and_matches_the_runner(linear, key):
  params, x, y = linear
  kw = dict(eps=0.15, key=key, steps=10, progress=False)
  flags = robustness.autoattack_apgd(linear_logits, params, x, y, skip_broken=False, **kw)
  assert list(flags) == ["apgd_ce", "apgd_t1", "apgd_t2", "apgd_t3"]  # 9 ranks capped at K - 1
  # Each flag is the runner's success of that entry, with the key of its place and restart 0.
  for i, (name, rank) in enumerate([("apgd_ce", None), ("apgd_t", 1), ("apgd_t", 2)]):
    extra = {} if rank is None else {"target_rank": rank}
    res = runner.run_attack(
      registry.UNTARGETED[name].run, linear_logits, params, x, y, (0.15,), progress=False,
      norm="linf", steps=10, key=jax.random.fold_in(jax.random.fold_in(key, i), 0), **extra,
    )  # fmt: skip
    np.testing.assert_array_equal(list(flags.values())[i], res.success[0])
  some = np.logical_or.reduce(list(flags.values()))
  assert 0 < some.sum() < len(x)  # the budget breaks some examples, not all
  # Skipping the broken ones (AutoAttack's way) gives the same worst case, each example broken
  # by its first breaker only. (Here the starts do not matter: on a linear model the first
  # L-inf step of 2 eps lands on the same corner of the ball from any start.)
  skipped = robustness.autoattack_apgd(linear_logits, params, x, y, **kw)
  np.testing.assert_array_equal(np.logical_or.reduce(list(skipped.values())), some)
  assert np.stack(list(skipped.values())).sum(0).max() == 1
  # A deployed model the attacks never break (e.g. everything rejected) keeps every example.
  never = robustness.autoattack_apgd(
    linear_logits, params, x, y, is_broken=lambda xa, idx: np.zeros(len(xa), bool), **kw
  )
  assert not np.logical_or.reduce(list(never.values())).any()
  with pytest.raises(ValueError, match="allowed: "):
    robustness.autoattack_apgd(linear_logits, params, x, y, losses=("fab",), **kw)


# ----------------------------------------------------------------------------------------------
# Gradient-masking checks.


def test_falls_with_eps_passes_a_falling_curve_that_reaches_zero():
  c = robustness.check_falls_with_eps([0.1, 0.3, 0.5, 0.2], [0.9, 0.4, 0.0, 0.7])
  assert c.passed is True and c.numbers["eps"] == [0.1, 0.2, 0.3, 0.5]
  assert c.numbers["accuracy_at_large_eps"] == 0.0
  # A rise within the slack is noise.
  assert robustness.check_falls_with_eps([0.1, 0.2, 0.5], [0.5, 0.505, 0.0]).passed is True


def test_falls_with_eps_fails_a_rise_or_a_plateau_at_a_large_budget():
  rise = robustness.check_falls_with_eps([0.1, 0.2, 0.5], [0.5, 0.6, 0.0])
  assert rise.passed is False and rise.numbers["worst_rise"] == pytest.approx(0.1)
  plateau = robustness.check_falls_with_eps([0.1, 0.3, 0.5], [0.9, 0.85, 0.8])
  assert plateau.passed is False and "0.800" in plateau.note
  short = robustness.check_falls_with_eps([0.1, 0.3], [0.9, 0.5])
  assert short.passed is None and "stops at 0.3" in short.note
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    robustness.check_falls_with_eps([0.1], [1.5])


def test_more_effort_passes_a_converged_attack_and_fails_one_still_falling():
  ok = robustness.check_more_effort_changes_little([10, 100, 40], [0.62, 0.60, 0.605])
  assert ok.passed is True and ok.name == "more_steps_changes_little"
  assert ok.numbers["total_drop"] == pytest.approx(0.02)
  falling = robustness.check_more_effort_changes_little(
    [1, 5, 10], [0.9, 0.7, 0.5], what="restarts"
  )
  assert falling.passed is False and falling.name == "more_restarts_changes_little"
  assert falling.numbers["last_drop"] == pytest.approx(0.2)
  rising = robustness.check_more_effort_changes_little([10, 100], [0.5, 0.6])
  assert rising.passed is False and "rises" in rising.note
  with pytest.raises(ValueError, match="at least two"):
    robustness.check_more_effort_changes_little([10], [0.5])


def test_weaker_passes_when_transfer_is_weaker_and_fails_when_it_is_stronger():
  ok = robustness.check_weaker([0.3, 0.1], [0.8, 0.5], name="transfer_weaker", eps=[0.1, 0.3])
  assert ok.passed is True and ok.numbers["worst_gap"] == pytest.approx(0.4)
  masked = robustness.check_weaker([0.9, 0.85], [0.5, 0.86], name="transfer_weaker", eps=[0.1, 0.3])
  assert masked.passed is False and "at eps 0.1" in masked.note
  assert masked.numbers["worst_gap"] == pytest.approx(-0.4)
  assert robustness.flagged([ok, masked, robustness.check_falls_with_eps([0.1], [0.5])]) == [
    "transfer_weaker"
  ]
  with pytest.raises(ValueError, match="2 strong against 1 weak"):
    robustness.check_weaker([0.1, 0.2], [0.3], name="x")
