"""Tests of the pairs/eps runner on a linear softmax model, where gradients are exact.

Run as a script (`python tests/test_runner.py --sharded OUT.npz`) it computes the reference
sweep on a pairs mesh over every device; the test `test_sharded_equals_unsharded` does that in a
subprocess with XLA_FLAGS (2 and 8 host devices) set before jax is imported.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_attacks import metrics
from vae_attacks.attacks import base, bim, fgsm, lbfgs, runner

NUM_CLASSES = 5
SHAPE = (4, 4, 1)
EPS_GRID = (0.05, 0.1, 0.3)
# The attack sweeps share one key (and so one compiled sweep). Threefry, the default: "rbg" keys
# compile faster but give other random bits under vmap than in a per-pair loop.
KEY = jax.random.key(0)


def linear_logits(params, x):
  """A linear softmax classifier on one example: logits = W^T vec(x) + b."""
  return jnp.ravel(x) @ params["w"] + params["b"]


def linear_model(seed: int = 0):
  rng = np.random.default_rng(seed)
  d = int(np.prod(SHAPE))
  return {
    "w": jnp.asarray(rng.normal(size=(d, NUM_CLASSES)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(NUM_CLASSES,)) * 0.1, jnp.float32),
  }


def tiny_attack(logits_fn, params, x, target, *, eps, step_scale=1.0, targeted=True, key=None):
  """One signed-gradient step (targeted FGSM), from a random start when `key` is given."""

  def loss(xa):
    return base.attack_loss(logits_fn(params, xa), target, targeted=targeted)

  start = x
  if key is not None:
    start = jnp.clip(x + 0.5 * eps * jax.random.uniform(key, x.shape, minval=-1.0), 0.0, 1.0)
  x_adv = start - step_scale * eps * jnp.sign(jax.grad(loss)(start))
  x_adv = jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
  return base.finish(
    logits_fn, params, x, x_adv, target, targeted=targeted, iterations=1,
    loss_trace=loss(x_adv)[None],
  )  # fmt: skip


def data(n: int = 10, seed: int = 1):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n, *SHAPE)).astype(np.float32)
  target = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  return x, target


def assert_results_close(a, b, **tol):
  for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(la, np.float64), np.asarray(lb, np.float64), **tol)


def labelled_split(n: int = 60, seed: int = 2):
  """Examples with labels = the model's prediction, except every 4th (misclassified)."""
  params = linear_model()
  x = np.random.default_rng(seed).uniform(size=(n, *SHAPE)).astype(np.float32)
  logits = np.asarray(jax.vmap(linear_logits, in_axes=(None, 0))(params, x))
  y = np.argmax(logits, -1).astype(np.int32)
  wrong = np.arange(n) % 4 == 0
  y[wrong] = (y[wrong] + 1) % NUM_CLASSES
  return params, x, y, logits, wrong


# ---------------------------------------------------------------------------------------------
# make_pairs


def test_random_targets_differ_from_label_and_are_deterministic(key):
  params, x, y, _, _ = labelled_split()
  a = runner.make_pairs(
    linear_logits, params, x, y, strategy="random", num_pairs=30, key=key,
    num_classes=NUM_CLASSES,
  )  # fmt: skip
  b = runner.make_pairs(
    linear_logits, params, x, y, strategy="random", num_pairs=30, key=key,
    num_classes=NUM_CLASSES,
  )  # fmt: skip
  c = runner.make_pairs(
    linear_logits, params, x, y, strategy="random", num_pairs=30, key=jax.random.key(7),
    num_classes=NUM_CLASSES,
  )  # fmt: skip
  assert len(a.index) == 30 and len(np.unique(a.index)) == 30
  np.testing.assert_array_equal(a.source_label, y[a.index])
  assert np.all(a.target != a.source_label)
  assert np.all((0 <= a.target) & (a.target < NUM_CLASSES))
  for field_a, field_b in zip(a, b, strict=True):
    np.testing.assert_array_equal(field_a, field_b)
  assert not np.array_equal(a.index, c.index)
  fewer = runner.make_pairs(
    linear_logits, params, x, y, strategy="random", num_pairs=10, key=key,
    num_classes=NUM_CLASSES,
  )  # fmt: skip
  for field_a, field_fewer in zip(a, fewer, strict=True):
    np.testing.assert_array_equal(field_a[:10], field_fewer)
  # Every other class is used (30 draws over 4 classes).
  assert len(np.unique((a.target - a.source_label) % NUM_CLASSES)) == NUM_CLASSES - 1


def test_only_correct_filters_misclassified(key):
  params, x, y, _, wrong = labelled_split()
  pairs = runner.make_pairs(
    linear_logits, params, x, y, strategy="next", num_pairs=None, key=key,
    num_classes=NUM_CLASSES,
  )  # fmt: skip
  np.testing.assert_array_equal(np.sort(pairs.index), np.flatnonzero(~wrong))
  np.testing.assert_array_equal(pairs.target, (y[pairs.index] + 1) % NUM_CLASSES)
  every = runner.make_pairs(
    linear_logits, params, x, y, strategy="next", num_pairs=None, key=key,
    num_classes=NUM_CLASSES, only_correct=False, batch_size=7,
  )  # fmt: skip
  np.testing.assert_array_equal(np.sort(every.index), np.arange(len(y)))


def test_least_likely_is_argmin_of_logits(key):
  params, x, y, logits, _ = labelled_split()
  pairs = runner.make_pairs(
    linear_logits, params, x, y, strategy="least_likely", num_pairs=20, key=key,
    num_classes=NUM_CLASSES, batch_size=16,
  )  # fmt: skip
  np.testing.assert_array_equal(pairs.target, np.argmin(logits[pairs.index], -1))


def test_all_gives_every_other_class_per_source(key):
  params, x, y, _, _ = labelled_split()
  k = NUM_CLASSES - 1
  pairs = runner.make_pairs(
    linear_logits, params, x, y, strategy="all", num_pairs=5 * k, key=key,
    num_classes=NUM_CLASSES,
  )  # fmt: skip
  assert len(pairs.index) == 5 * k
  sources = pairs.index.reshape(5, k)
  assert np.all(sources == sources[:, :1]) and len(np.unique(sources[:, 0])) == 5
  for src, tgt in zip(sources[:, 0], pairs.target.reshape(5, k), strict=True):
    assert sorted(tgt.tolist()) == [c for c in range(NUM_CLASSES) if c != y[src]]


def test_an_eligible_mask_replaces_the_models_predictions(key):
  """Sources come only from the caller's mask (e.g. correct for every model of a study), each
  once while the mask allows, and the model is not even evaluated for random targets."""
  params, x, y, _, _ = labelled_split()
  mask = np.zeros(len(y), bool)
  mask[::3] = True

  def never(params, x):
    raise AssertionError("the model was evaluated")

  pairs = runner.make_pairs(
    never, params, x, y, strategy="random", num_pairs=int(mask.sum()), key=key,
    num_classes=NUM_CLASSES, eligible=mask,
  )  # fmt: skip
  assert mask[pairs.index].all()
  assert len(np.unique(pairs.index)) == mask.sum()
  assert (pairs.target != y[pairs.index]).all()
  with pytest.raises(ValueError, match="not enough eligible sources"):
    runner.make_pairs(
      never, params, x, y, strategy="random", num_pairs=len(y) * NUM_CLASSES, key=key,
      num_classes=NUM_CLASSES, eligible=mask,
    )  # fmt: skip


def test_fixed_targets(key):
  params, x, y, _, _ = labelled_split()
  pairs = runner.make_pairs(
    linear_logits, params, x, y, strategy="fixed", targets=(0, 3), num_pairs=None, key=key,
    num_classes=NUM_CLASSES,
  )  # fmt: skip
  assert set(pairs.target.tolist()) <= {0, 3}
  assert np.all(pairs.target != pairs.source_label)
  # Each correct source contributes one pair per listed target other than its label.
  correct = np.flatnonzero(~np.isin(np.arange(len(y)), np.flatnonzero(np.arange(len(y)) % 4 == 0)))
  expected = sum(2 - int(y[i] in (0, 3)) for i in correct)
  assert len(pairs.index) == expected


def test_bad_strategy_and_too_few_sources(key):
  params, x, y, _, wrong = labelled_split()
  try:
    runner.make_pairs(
      linear_logits, params, x, y, strategy="nearest", num_pairs=3, key=key,
      num_classes=NUM_CLASSES,
    )  # fmt: skip
  except ValueError as err:
    assert "strategy" in str(err) and "least_likely" in str(err)
  else:
    raise AssertionError("an unknown strategy was accepted")
  n_correct = int((~wrong).sum())
  for strategy, too_many in (
    ("next", n_correct + 1),
    ("random", n_correct * (NUM_CLASSES - 1) + 1),
  ):
    try:
      runner.make_pairs(
        linear_logits, params, x, y, strategy=strategy, num_pairs=too_many, key=key,
        num_classes=NUM_CLASSES,
      )  # fmt: skip
    except ValueError as err:
      assert "not enough eligible sources" in str(err) and str(n_correct) in str(err)
    else:
      raise AssertionError(f"{strategy}: more pairs than can be made were returned")


def test_random_targets_in_rounds_when_pairs_exceed_sources(key):
  params, x, y, _, wrong = labelled_split()
  n_correct = int((~wrong).sum())
  kw = dict(strategy="random", key=key, num_classes=NUM_CLASSES)
  one_round = runner.make_pairs(linear_logits, params, x, y, num_pairs=n_correct, **kw)
  many = n_correct * (NUM_CLASSES - 1) - 1
  pairs = runner.make_pairs(linear_logits, params, x, y, num_pairs=many, **kw)
  assert len(pairs.index) == many
  # The first round is the one-target-per-source draw; later rounds reuse its sources.
  np.testing.assert_array_equal(pairs.index[:n_correct], one_round.index)
  np.testing.assert_array_equal(pairs.target[:n_correct], one_round.target)
  assert set(pairs.index.tolist()) == set(one_round.index.tolist())
  # Every pair is a distinct (source, other class) and no source has a target twice.
  assert np.all(pairs.target != pairs.source_label)
  assert len(set(zip(pairs.index.tolist(), pairs.target.tolist(), strict=True))) == many
  # A smaller request is a prefix.
  fewer = runner.make_pairs(linear_logits, params, x, y, num_pairs=n_correct + 3, **kw)
  np.testing.assert_array_equal(fewer.target, pairs.target[: n_correct + 3])


# ---------------------------------------------------------------------------------------------
# run_attack


def test_grid_equals_loop_over_single_calls():
  params = linear_model()
  x, target = data(10)
  result = runner.run_attack(
    tiny_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, progress=False,
    key=KEY,
  )  # fmt: skip
  assert result.x_adv.shape == (len(EPS_GRID), 10, *SHAPE)
  assert result.success.shape == (len(EPS_GRID), 10)
  assert isinstance(result.x_adv, np.ndarray)
  single = jax.jit(tiny_attack, static_argnums=0)
  for e, eps in enumerate(EPS_GRID):
    for p in range(10):
      one = single(linear_logits, params, x[p], target[p], eps=eps, key=jax.random.fold_in(KEY, p))
      got = jax.tree.map(lambda a, e=e, p=p: a[e, p], result)
      assert_results_close(got, one, rtol=1e-5, atol=1e-6)
  # The sweep really differs across eps (the grid axis is not broadcast by mistake).
  np.testing.assert_allclose(result.distortion.linf.max(1), EPS_GRID, rtol=1e-5)


def test_results_do_not_depend_on_chunking():
  params = linear_model()
  x, target = data(10)
  runs = [
    runner.run_attack(
      tiny_attack,
      linear_logits,
      params,
      x,
      target,
      EPS_GRID,
      chunk_size=c,
      progress=False,
      key=KEY,
    )  # fmt: skip
    for c in (3, None)
  ]
  for other in runs[1:]:
    assert_results_close(runs[0], other, rtol=0, atol=1e-6)
  # The memory budget path: a budget too small for 2 pairs gives one pair per chunk.
  chunks = list(
    runner.iter_attack_chunks(
      tiny_attack,
      linear_logits,
      params,
      x,
      target,
      EPS_GRID,
      memory_budget_bytes=1,
      progress=False,
      key=KEY,
    )  # fmt: skip
  )
  assert [s for s, _ in chunks] == [slice(i, i + 1) for i in range(10)]
  # eps belongs to the grid; the mistake is reported at the call, before any iteration.
  try:
    runner.iter_attack_chunks(tiny_attack, linear_logits, params, x, target, EPS_GRID, eps=0.1)
  except ValueError as err:
    assert "eps_grid" in str(err)
  else:
    raise AssertionError("an eps= knob was accepted")
  joined = jax.tree.map(lambda *a: np.concatenate(a, 1), *[r for _, r in chunks])
  assert_results_close(runs[0], joined, rtol=0, atol=1e-6)


def test_a_sweep_started_at_a_pair_gives_the_whole_sweeps_results_from_that_pair():
  """start=k (a stopped sweep resumed) runs pairs k.. only, and each of them, random start
  included (the key is folded in by the pair's index in x), as the whole sweep did; a start
  outside the pairs is an error at the call."""
  params = linear_model()
  x, target = data(10)
  kw = dict(chunk_size=3, progress=False, key=KEY)
  whole = runner.run_attack(tiny_attack, linear_logits, params, x, target, EPS_GRID, **kw)
  for start in (3, 4, 9):
    chunks = list(
      runner.iter_attack_chunks(
        tiny_attack, linear_logits, params, x, target, EPS_GRID, start=start, **kw
      )
    )
    assert chunks[0][0].start == start and chunks[-1][0].stop == 10
    tail = jax.tree.map(lambda *a: np.concatenate(a, 1), *[r for _, r in chunks])
    assert_results_close(jax.tree.map(lambda a, s=start: a[:, s:], whole), tail, rtol=0, atol=0)
  for bad in (-1, 10):
    with pytest.raises(ValueError, match="start"):
      runner.iter_attack_chunks(
        tiny_attack, linear_logits, params, x, target, EPS_GRID, start=bad, **kw
      )


def test_batched_map_equals_a_loop_for_any_batch_size_and_pytrees():
  """One example at a time, or in padded batches of 1, 3, 4 or 64: the same values; pytree
  inputs and outputs keep their structure; an empty input is an error, not a crash."""
  params = linear_model()
  x, _ = data(10)
  want = np.stack([np.asarray(linear_logits(params, xi)) for xi in x])
  for batch in (1, 3, 4, 64):
    got = runner.batched_map(linear_logits, params, x, batch_size=batch)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  two = lambda _, pair: {"sum": pair[0] + pair[1], "first": pair[0]}
  out = runner.batched_map(two, None, (x, 2 * x), batch_size=3)
  np.testing.assert_allclose(out["sum"], 3 * x, rtol=1e-6)
  np.testing.assert_array_equal(out["first"], x)
  with pytest.raises(ValueError, match="no examples"):
    runner.batched_map(linear_logits, params, x[:0])


def test_host_loop_strategy_equals_the_compiled_sweep():
  """L-BFGS run as one host loop over the chunk's pairs x eps problems (`batched=`) gives the
  compiled vmap's results (same solver, other XLA programs: to float tolerance), in [E, P]
  order, at any chunk size."""
  params = linear_model()
  x, target = data(6)
  cs = (0.01, 0.1)
  compiled = runner.run_attack(
    lbfgs.lbfgs, linear_logits, params, x, target, cs, progress=False, max_iters=15
  )
  for chunk in (None, 4):
    host = runner.run_attack(
      lbfgs.lbfgs, linear_logits, params, x, target, cs, progress=False, max_iters=15,
      chunk_size=chunk, batched=lbfgs.lbfgs_batch,
    )  # fmt: skip
    assert host.x_adv.shape == compiled.x_adv.shape == (2, 6, *SHAPE)
    np.testing.assert_array_equal(host.success, compiled.success)
    np.testing.assert_allclose(host.x_adv, compiled.x_adv, atol=2e-4)
    np.testing.assert_allclose(host.target_prob, compiled.target_prob, atol=2e-4)
  with pytest.raises(ValueError, match="static knobs"):
    runner.iter_attack_chunks(
      lbfgs.lbfgs, linear_logits, params, x, target, cs, batched=lbfgs.lbfgs_batch, key=KEY
    )


def test_a_chunk_reaches_the_caller_before_the_next_chunk_runs():
  """The caller measures and saves chunk k before chunk k+1 is solved, so that a run stopped
  during chunk k+1 keeps chunk k (the host loop's solves are Python calls, so they can be
  counted)."""
  params = linear_model()
  x, target = data(6)
  solved = []

  def counting_batch(*args, **knobs):
    solved.append(len(args[2]))
    return lbfgs.lbfgs_batch(*args, **knobs)

  chunks = runner.iter_attack_chunks(
    lbfgs.lbfgs, linear_logits, params, x, target, (0.1,), progress=False, max_iters=5,
    chunk_size=2, batched=counting_batch,
  )  # fmt: skip
  seen = 0
  for seen, (sl, res) in enumerate(chunks, start=1):
    assert solved == [2] * seen  # chunk `seen` solved, the next one not yet
    assert (sl.start, sl.stop) == (2 * seen - 2, 2 * seen) and res.x_adv.shape[:2] == (1, 2)
  assert seen == 3


def test_measured_sweep_gives_the_library_measures_of_each_pair():
  """iter_measured_chunks' measures equal metrics.pair_measures applied pair by pair to the
  sweep's results, whatever the chunking."""
  params = linear_model()
  x, target = data(10)
  settings = metrics.EvalSettings(confidence_min=0.3, ssim_min=0.5, linf_max=0.2)
  measure = lambda p, xi, res: metrics.pair_measures(xi, res, settings, linear_logits(p, res.x_adv))
  for chunk in (3, None):
    parts = list(
      runner.iter_measured_chunks(
        tiny_attack, linear_logits, params, x, target, EPS_GRID, measure=measure,
        measure_params=params, chunk_size=chunk, progress=False, key=KEY,
      )
    )  # fmt: skip
    result = jax.tree.map(lambda *a: np.concatenate(a, 1), *[r for _, r, _ in parts])
    got = jax.tree.map(lambda *a: np.concatenate(a, 1), *[m for _, _, m in parts])
    for e in range(len(EPS_GRID)):
      for p in range(10):
        res = jax.tree.map(lambda a, e=e, p=p: a[e, p], result)
        one = metrics.pair_measures(x[p], res, settings, linear_logits(params, res.x_adv))
        for name, value in one._asdict().items():
          np.testing.assert_allclose(getattr(got, name)[e, p], value, rtol=1e-5, atol=1e-6)
  # The prediction is the model's class for x_adv: the target exactly where the attack succeeded.
  np.testing.assert_array_equal(got.prediction == target[None], got.success)
  # eps 0.3 > linf_max 0.2: nothing valid there; eps 0.05 within it.
  assert not got.valid[2].any() and got.valid[0].any()


def test_bim_and_fgsm_sweeps_equal_per_pair_calls():
  """Also checks EpsScaled: the swept step_size=EpsScaled(0.25) is 0.25 * eps at each eps."""
  params = linear_model()
  x, target = data(6)
  knobs = dict(steps=3, norm="linf", random_start=True, early_stop=True)
  swept = runner.run_attack(
    bim.bim, linear_logits, params, x, target, EPS_GRID, chunk_size=4, progress=False,
    step_size=runner.EpsScaled(0.25), key=KEY, **knobs,
  )  # fmt: skip
  one_bim = jax.jit(bim.bim, static_argnums=0, static_argnames=tuple(knobs))
  swept_fgsm = runner.run_attack(
    fgsm.fgsm, linear_logits, params, x, target, EPS_GRID, chunk_size=4, progress=False, norm="l2"
  )
  one_fgsm = jax.jit(fgsm.fgsm, static_argnums=0, static_argnames="norm")
  for e, eps in enumerate(EPS_GRID):
    for p in range(6):
      at = lambda a, e=e, p=p: a[e, p]
      ref = one_bim(
        linear_logits, params, x[p], target[p], eps=eps, step_size=0.25 * eps,
        key=jax.random.fold_in(KEY, p), **knobs,
      )  # fmt: skip
      assert_results_close(jax.tree.map(at, swept), ref, rtol=1e-5, atol=1e-6)
      ref = one_fgsm(linear_logits, params, x[p], target[p], eps=eps, norm="l2")
      assert_results_close(jax.tree.map(at, swept_fgsm), ref, rtol=1e-5, atol=1e-6)
  assert np.all(swept.distortion.linf <= np.array(EPS_GRID)[:, None] * (1 + 1e-6))
  np.testing.assert_allclose(swept_fgsm.distortion.l2.max(1), EPS_GRID, rtol=1e-5)


def test_one_trace_per_sweep_and_none_on_second_call():
  traces = []

  def counted_attack(logits_fn, params, x, target, *, eps, step_scale=1.0):
    traces.append(None)  # runs only while tracing
    return tiny_attack(logits_fn, params, x, target, eps=eps, step_scale=step_scale)

  params = linear_model()
  x, target = data(10)
  first = runner.run_attack(
    counted_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, progress=False
  )
  assert len(traces) == 1  # 4 chunks, one trace
  second = runner.run_attack(
    counted_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, progress=False
  )
  assert len(traces) == 1
  assert_results_close(first, second, rtol=0, atol=0)
  # An array knob is traced: a new value reuses the compiled function.
  runner.run_attack(
    counted_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, progress=False,
    step_scale=jnp.asarray(0.5),
  )  # fmt: skip
  runner.run_attack(
    counted_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, progress=False,
    step_scale=jnp.asarray(0.25),
  )  # fmt: skip
  assert len(traces) == 2


def test_progress_line(capsys):
  params = linear_model()
  x, target = data(10)
  runner.run_attack(
    tiny_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, progress=False, key=KEY
  )
  assert capsys.readouterr().err == ""
  runner.run_attack(
    tiny_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, progress=True, key=KEY
  )
  assert capsys.readouterr().err == ""  # stderr is no terminal: a sweep under 30 s leaves no line


def test_progress_lines_in_a_log_carry_the_label(capsys, monkeypatch):
  """With stderr not a terminal, the bar is plain lines (no carriage returns), with `desc`."""
  from vae_attacks import progress  # noqa: PLC0415

  monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
  params = linear_model()
  x, target = data(10)
  runner.run_attack(
    tiny_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, key=KEY,
    desc="cnn bim linf x 2 eps",
  )  # fmt: skip
  err = capsys.readouterr().err
  assert "\r" not in err and err.endswith("\n")
  last = err.strip().splitlines()[-1]
  assert last.startswith("cnn bim linf x 2 eps: 100%") and "10/10" in last and "pair/s" in last


def test_summarise():
  params = linear_model()
  x, target = data(10)
  result = runner.run_attack(
    tiny_attack, linear_logits, params, x, target, EPS_GRID, chunk_size=3, progress=False, key=KEY
  )
  rows = runner.summarise(result, eps_grid=EPS_GRID)
  assert [r["eps"] for r in rows] == list(np.float64(EPS_GRID))
  for e, row in enumerate(rows):
    ok = result.success[e]
    assert row["n_pairs"] == 10
    np.testing.assert_allclose(row["success_rate"], ok.mean())
    np.testing.assert_allclose(row["mean_linf"], result.distortion.linf[e].mean(), rtol=1e-6)
    np.testing.assert_allclose(row["mean_l2"], result.distortion.l2[e].mean(), rtol=1e-6)
    if ok.any():
      np.testing.assert_allclose(row["mean_l2_success"], result.distortion.l2[e][ok].mean())
    else:
      assert np.isnan(row["mean_l2_success"])
  # A larger eps never lowers the target probability of a one-step attack on a linear model.
  assert rows[-1]["mean_target_prob"] >= rows[0]["mean_target_prob"]


def test_cpu_memory_budget_is_shared_by_the_host_devices():
  """8 host devices of one CPU share its memory: each gets an eighth of the budget, so sharding
  does not multiply the memory a sweep may take."""
  cpu = jax.devices("cpu")[0]
  assert runner._per_device_budget(800, [cpu]) == 800
  assert runner._per_device_budget(800, [cpu] * 8) == 100


def _sharded_sweep(out: str) -> None:
  """The multi-device reference run, executed in a subprocess (see the module docstring)."""
  mesh = runner.pairs_mesh()
  x, target = data(10)
  result = runner.run_attack(
    tiny_attack, linear_logits, linear_model(), x, target, EPS_GRID, chunk_size=3, mesh=mesh,
    progress=False, key=KEY,
  )  # fmt: skip
  leaves = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(result))}
  np.savez(out, n_devices=mesh.devices.size, **leaves)


@pytest.mark.parametrize("n_devices", [2, 8])
def test_sharded_equals_unsharded(n_devices, tmp_path):
  """The same sweep on 1 device and on a mesh of n_devices: identical results.

  With 8 devices a chunk of 3 pairs is rounded up to 8 (one per device), so the 10 pairs run as
  2 chunks, the last one padded with 6 copies of pair 9: padding and per-pair keys are checked.
  """
  out = tmp_path / "sharded.npz"
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
    JAX_PLATFORMS="cpu",
  )
  repo = pathlib.Path(__file__).resolve().parents[1]
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
  subprocess.run(
    [sys.executable, __file__, "--sharded", str(out)], env=env, check=True, timeout=120
  )
  x, target = data(10)
  local = runner.run_attack(
    tiny_attack, linear_logits, linear_model(), x, target, EPS_GRID, chunk_size=3,
    progress=False, key=KEY,
  )  # fmt: skip
  saved = np.load(out)
  assert int(saved["n_devices"]) == n_devices
  leaves = jax.tree.leaves(local)
  assert len(saved.files) == len(leaves) + 1
  for i, leaf in enumerate(leaves):
    np.testing.assert_allclose(saved[str(i)], leaf, rtol=0, atol=1e-6)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--sharded":
    _sharded_sweep(sys.argv[2])
  else:
    sys.exit(f"usage: {sys.argv[0]} --sharded OUT.npz")
