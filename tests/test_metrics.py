"""Tests for vae_attacks.metrics: SSIM against tf.image.ssim, validity, effectiveness, Wilson and
t intervals, and the AUDDC of Gondim-Ribeiro et al. (2018) on curves with known areas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import scipy.stats

from vae_attacks import metrics
from vae_attacks.attacks import base


def _structured(h, w, c, seed):
  """A smooth image with edges: a gradient, a bright disk and a dark bar, in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img = 0.2 + 0.3 * xx / w
  cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, 0.25 * min(h, w)
  img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r**2, 0.9, img)
  img = np.where(np.abs(yy - 0.2 * h) < 0.05 * h, 0.05, img)
  tint = rng.uniform(0.7, 1.0, size=c).astype(np.float32)
  return np.clip(img[:, :, None] * tint[None, None, :], 0.0, 1.0).astype(np.float32)


def _pairs():
  """(name, x, y) image pairs, random and structured, MNIST- and face-sized."""
  rng = np.random.default_rng(0)
  out = []
  for shape in [(28, 28, 1), (64, 64, 3)]:
    x = rng.uniform(size=shape).astype(np.float32)
    y = rng.uniform(size=shape).astype(np.float32)
    out.append((f"random-random{shape}", x, y))
    noisy = np.clip(x + 0.1 * rng.normal(size=shape), 0, 1).astype(np.float32)
    out.append((f"random-noisy{shape}", x, noisy))
    s = _structured(*shape, seed=1)
    out.append((f"structured-noisy{shape}", s, np.clip(s + 0.05 * rng.normal(size=shape), 0, 1)))
    out.append((f"structured-shifted{shape}", s, np.roll(s, 2, axis=1)))
    out.append((f"structured-darker{shape}", s, 0.7 * s))
    out.append((f"structured-other{shape}", s, _structured(*shape, seed=2)))
  return [(name, np.asarray(x, np.float32), np.asarray(y, np.float32)) for name, x, y in out]


# ------------------------------------------------------------------------------------------
# Confidence.


def test_target_confidence_is_softmax_probability():
  logits = jnp.array([2.0, -1.0, 0.5, 3.0])
  probs = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum()
  got = np.array([metrics.target_confidence(logits, t) for t in range(4)])
  np.testing.assert_allclose(got, probs, rtol=1e-6)
  # Stable for huge logits, where a naive exp overflows.
  assert float(metrics.target_confidence(jnp.array([1000.0, 0.0]), 0)) == pytest.approx(1.0)
  assert bool(metrics.confident(0.5, confidence_min=0.5))
  assert not bool(metrics.confident(0.49, confidence_min=0.5))


# ------------------------------------------------------------------------------------------
# SSIM.


def test_ssim_matches_tensorflow():
  tf = pytest.importorskip("tensorflow")
  for name, x, y in _pairs():
    want = float(tf.image.ssim(tf.constant(x), tf.constant(y), max_val=1.0))
    got = float(metrics.ssim(x, y))
    assert abs(got - want) < 1e-4, (name, got, want)


def test_ssim_matches_tensorflow_with_other_parameters():
  tf = pytest.importorskip("tensorflow")
  _, x, y = _pairs()[1]
  kw = dict(max_val=2.0, filter_size=7, filter_sigma=1.0, k1=0.02, k2=0.05)
  want = float(tf.image.ssim(tf.constant(2 * x), tf.constant(2 * y), **kw))
  assert float(metrics.ssim(2 * x, 2 * y, **kw)) == pytest.approx(want, abs=1e-4)


def _ssim_float64(x, y, size=11, sigma=1.5, c1=1e-4, c2=9e-4):
  """Textbook SSIM in float64 with scipy's 2-D 'valid' correlation, channel by channel."""
  coords = np.arange(size) - (size - 1) / 2
  g = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
  g /= g.sum()
  out = []
  for c in range(x.shape[-1]):
    a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
    f = lambda img: scipy.signal.correlate2d(img, g, mode="valid")
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    out.append(
      ((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean()
    )
  return float(np.mean(out))


def test_ssim_matches_float64_reference_closely():
  # Flat regions (the structured images) are where float32 cancellation would show.
  for name, x, y in _pairs():
    got = float(metrics.ssim(x, y))
    assert got == pytest.approx(_ssim_float64(x, y), abs=2e-6), name


def test_ssim_of_image_with_itself_is_one_and_symmetric():
  for _, x, y in _pairs():
    assert float(metrics.ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics.ssim(x, y)) == pytest.approx(float(metrics.ssim(y, x)), abs=1e-6)
    assert float(metrics.ssim(x, y)) < 1.0 - 1e-3


def test_ssim_decreases_with_noise():
  x = _structured(28, 28, 1, seed=3)
  noise = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
  values = [float(metrics.ssim(x, np.clip(x + s * noise, 0, 1))) for s in (0.0, 0.02, 0.05, 0.1)]
  assert values[0] == pytest.approx(1.0, abs=1e-6)
  assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


def test_ssim_on_image_smaller_than_window_uses_image_sized_window():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(5)
  x = rng.uniform(size=(8, 9, 2)).astype(np.float32)
  y = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1).astype(np.float32)
  got = float(metrics.ssim(x, y))  # filter_size 11 > 8
  assert got == pytest.approx(float(metrics.ssim(x, y, filter_size=8)), abs=1e-7)
  assert got == pytest.approx(float(tf.image.ssim(x, y, 1.0, filter_size=8)), abs=1e-4)


def test_ssim_vmap_and_jit_match_loop():
  pairs = [(x, y) for _, x, y in _pairs() if x.shape == (28, 28, 1)]
  xs = jnp.stack([p[0] for p in pairs])
  ys = jnp.stack([p[1] for p in pairs])
  batched = jax.jit(jax.vmap(metrics.ssim))(xs, ys)
  loop = np.array([float(metrics.ssim(x, y)) for x, y in pairs])
  np.testing.assert_allclose(np.asarray(batched), loop, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Validity.


def test_validity_each_bound_on_and_off():
  x = _structured(28, 28, 1, seed=6)
  d = np.zeros_like(x)
  d[10:14, 10:14, 0] = 0.1  # L-inf 0.1, L2 sqrt(16) * 0.1 = 0.4
  x_adv = np.clip(x + d, 0, 1)
  linf = float(np.abs(x_adv - x).max())
  l2 = float(np.sqrt(((x_adv - x) ** 2).sum()))
  s = float(metrics.ssim(x, x_adv))
  assert 0.0 < linf <= 0.1 + 1e-6 and 0.0 < l2 <= 0.4 + 1e-6 and s < 1.0

  def valid(**kw):
    bounds = dict(ssim_min=None, linf_max=None, l2_max=None)
    bounds.update(kw)
    return bool(metrics.validity(x, x_adv, **bounds))

  assert valid()  # no bound: everything is valid
  assert valid(linf_max=np.inf, l2_max=np.inf, ssim_min=-np.inf)
  assert valid(linf_max=linf) and not valid(linf_max=0.5 * linf)
  assert valid(l2_max=l2) and not valid(l2_max=0.5 * l2)
  assert valid(ssim_min=s - 1e-4) and not valid(ssim_min=s + 1e-4)
  # All bounds must hold together.
  assert valid(linf_max=linf, l2_max=l2, ssim_min=s - 1e-4)
  assert not valid(linf_max=linf, l2_max=0.5 * l2, ssim_min=s - 1e-4)
  # The original itself passes any bound that admits zero distortion.
  assert bool(metrics.validity(x, x, ssim_min=0.999, linf_max=0.0, l2_max=0.0))


def test_validity_vmaps_over_pairs():
  rng = np.random.default_rng(7)
  x = rng.uniform(size=(4, 28, 28, 1)).astype(np.float32)
  scale = np.array([0.0, 0.01, 0.05, 0.2], np.float32)[:, None, None, None]
  x_adv = np.clip(x + scale * np.sign(rng.normal(size=x.shape)), 0, 1).astype(np.float32)
  fn = jax.vmap(lambda a, b: metrics.validity(a, b, ssim_min=None, linf_max=0.05, l2_max=None))
  np.testing.assert_array_equal(np.asarray(fn(x, x_adv)), [True, True, True, False])


# ------------------------------------------------------------------------------------------
# Effectiveness.


def test_effectiveness_levels_cover_all_four_cases():
  valid = jnp.array([True, False, True, False, True])
  conf = jnp.array([True, True, False, False, True])
  levels = metrics.effectiveness(valid, conf)
  names = [metrics.LEVELS[int(i)] for i in levels]
  assert names == ["high", "moderate", "low", "ineffective", "high"]
  assert metrics.effectiveness_counts(levels) == {
    "high": 2,
    "moderate": 1,
    "low": 1,
    "ineffective": 1,
  }
  assert metrics.modal_level(levels) == "high"


def test_effectiveness_from_probabilities_and_summary():
  probs = np.array([0.95, 0.2, 0.6, 0.1, 0.3, 0.05])
  valid = np.array([False, False, True, True, False, False])
  conf = metrics.confident(probs, confidence_min=0.5)
  levels = np.asarray(metrics.effectiveness(valid, conf))
  np.testing.assert_array_equal(levels, [1, 3, 0, 2, 3, 3])
  counts = metrics.effectiveness_counts(levels)
  assert sum(counts.values()) == len(probs)
  assert metrics.modal_level(levels) == "ineffective"
  # Ties go to the more effective level; an empty set has no mode; out-of-range fails.
  assert metrics.modal_level([2, 3, 3, 2]) == "low"
  assert metrics.modal_level([]) is None
  assert metrics.effectiveness_counts([]) == dict.fromkeys(metrics.LEVELS, 0)
  with pytest.raises(ValueError):
    metrics.effectiveness_counts([0, 4])


# ------------------------------------------------------------------------------------------
# Intervals.


def _wilson_by_quadratic(k, n, z):
  """Wilson bounds as the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n (score test inversion)."""
  ph = k / n
  a = 1 + z**2 / n
  b = -(2 * ph + z**2 / n)
  c = ph**2
  disc = np.sqrt(b * b - 4 * a * c)
  return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize("k", [0, 5, 10])
def test_wilson_interval_matches_score_test_inversion(k):
  lo, hi = metrics.wilson_interval(k, 10)
  want_lo, want_hi = _wilson_by_quadratic(k, 10, 1.96)
  assert lo == pytest.approx(want_lo, abs=1e-12)
  assert hi == pytest.approx(want_hi, abs=1e-12)
  assert lo <= k / 10 <= hi
  if k == 0:
    assert lo == 0.0 and hi > 0.0
  if k == 10:
    assert hi == 1.0 and lo < 1.0
  if k == 5:
    assert (lo + hi) / 2 == pytest.approx(0.5)


def test_wilson_interval_from_scipy_equals_the_closed_form_on_a_grid():
  """metrics.wilson_interval is scipy's Wilson interval; it equals the score-test roots."""
  for n in (1, 7, 50, 500):
    ks = np.arange(n + 1)
    lo, hi = metrics.wilson_interval(ks, n)
    want_lo, want_hi = _wilson_by_quadratic(ks, n, 1.96)
    np.testing.assert_allclose(lo, np.where(ks == 0, 0.0, want_lo), atol=1e-12)
    np.testing.assert_allclose(hi, np.where(ks == n, 1.0, want_hi), atol=1e-12)


def test_wilson_interval_properties():
  for n in (1, 3, 17, 100, 1000):
    ks = np.arange(n + 1)
    lo, hi = metrics.wilson_interval(ks, n)
    assert np.all(lo <= ks / n) and np.all(ks / n <= hi)
    assert np.all((0 <= lo) & (hi <= 1))
  # Narrower with more data at the same proportion; wider at higher confidence.
  w = [np.subtract(*metrics.wilson_interval(n // 4, n)[::-1]) for n in (8, 80, 800)]
  assert w[0] > w[1] > w[2]
  lo90, hi90 = metrics.wilson_interval(3, 10, z=1.645)
  lo95, hi95 = metrics.wilson_interval(3, 10)
  assert lo95 < lo90 and hi90 < hi95
  assert all(np.isnan(metrics.wilson_interval(0, 0)))
  with pytest.raises(ValueError):
    metrics.wilson_interval(11, 10)


def test_wilson_interval_coverage_is_near_nominal():
  rng = np.random.default_rng(8)
  p, n = 0.3, 50
  k = rng.binomial(n, p, size=4000)
  lo, hi = metrics.wilson_interval(k, n)
  coverage = np.mean((lo <= p) & (p <= hi))
  assert 0.93 <= coverage <= 0.97, coverage


def test_success_rate():
  rate, lo, hi = metrics.success_rate(np.array([True, False, True, True]))
  assert rate == 0.75
  assert (lo, hi) == pytest.approx(metrics.wilson_interval(3, 4))
  assert all(np.isnan(metrics.success_rate(np.zeros((0,), bool))))


def test_mean_interval_matches_scipy_t_interval():
  rng = np.random.default_rng(9)
  v = rng.normal(2.0, 3.0, size=12)
  mean, lo, hi = metrics.mean_interval(v)
  want = scipy.stats.t.interval(0.95, df=11, loc=v.mean(), scale=scipy.stats.sem(v))
  assert mean == pytest.approx(v.mean())
  assert (lo, hi) == pytest.approx(want, rel=1e-10)
  # Large n: close to the normal interval.
  v = rng.normal(size=5000)
  mean, lo, hi = metrics.mean_interval(v)
  assert (hi - lo) / 2 == pytest.approx(1.96 * v.std(ddof=1) / np.sqrt(v.size), rel=1e-3)
  # Degenerate sizes.
  assert all(np.isnan(metrics.mean_interval([])))
  m, lo, hi = metrics.mean_interval([4.0])
  assert m == 4.0 and np.isnan(lo) and np.isnan(hi)


def test_distortion_summary_with_mask():
  d = base.Distortion(
    l0=np.array([1.0, 2.0, 3.0]),
    l1=np.array([1.0, 1.0, 4.0]),
    l2=np.array([0.5, 0.5, 0.5]),
    linf=np.array([0.1, 0.2, 0.3]),
  )
  out = metrics.distortion_summary(d, mask=np.array([True, True, False]))
  assert out["l0"][0] == pytest.approx(1.5)
  assert out["linf"][0] == pytest.approx(0.15)
  assert out["l2"] == pytest.approx((0.5, 0.5, 0.5))  # zero spread, zero-width interval
  assert metrics.distortion_summary(d)["l1"][0] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------
# AUDDC.


def _area(xs, ys):
  return float(metrics.auddc(jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)))


def test_auddc_constant_useless_attack_is_one():
  grid = np.linspace(0, 1, 11)
  assert _area(grid, np.ones(11)) == pytest.approx(1.0, abs=1e-6)
  # Also when the grid covers only part of [0, 1].
  assert _area([0.2, 0.45, 0.7], [1.0, 1.0, 1.0]) == pytest.approx(1.0, abs=1e-6)
  # Worse than no attack is clipped to 1.
  assert _area([0.2, 0.45, 0.7], [1.3, 2.0, 1.1]) == pytest.approx(1.0, abs=1e-6)


def test_auddc_linear_curve_is_half():
  grid = np.linspace(0, 1, 21)
  assert _area(grid, 1 - grid) == pytest.approx(0.5, abs=1e-6)


def test_auddc_step_curves():
  # y = 1 up to x = 0.4, then 0 from x = 0.5: 0.4 + trapezoid(0.4 -> 0.5, 1 -> 0) = 0.45.
  xs = [0.1, 0.2, 0.4, 0.5, 0.6, 0.9]
  ys = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
  assert _area(xs, ys) == pytest.approx(0.45, abs=1e-6)
  # A vertical step at a tied x = 0.3: area 0.3 whatever the order of the tied points.
  assert _area([0.3, 0.3, 0.8], [0.0, 1.0, 0.0]) == pytest.approx(0.3, abs=1e-6)
  assert _area([0.3, 0.3, 0.8], [1.0, 0.0, 0.0]) == pytest.approx(0.3, abs=1e-6)
  # One point: (0, 1) -> (0.5, 0.2) trapezoid 0.3, then flat 0.2 on [0.5, 1]: 0.1.
  assert _area([0.5], [0.2]) == pytest.approx(0.4, abs=1e-6)
  # A perfect attack: y = 0 from the smallest distortion 0.01 on gives 0.01 / 2.
  assert _area([0.01, 0.1, 1.0], [0.0, 0.0, -0.2]) == pytest.approx(0.005, abs=1e-6)


def test_auddc_ignores_input_order():
  rng = np.random.default_rng(10)
  xs = np.sort(rng.uniform(size=9))
  ys = np.sort(rng.uniform(size=9))[::-1]
  perm = rng.permutation(9)
  assert _area(xs[perm], ys[perm]) == pytest.approx(_area(xs, ys), abs=1e-6)
  # A curve computed by hand, points given out of order: (0, 1) -> (0.2, 0.5) -> (0.6, 0.25),
  # then flat to x = 1: 0.2 * 0.75 + 0.4 * 0.375 + 0.4 * 0.25 = 0.15 + 0.15 + 0.10 = 0.40.
  assert _area([0.6, 0.2], [0.25, 0.5]) == pytest.approx(0.40, abs=1e-6)


def test_auddc_nan_point_gives_nan_and_vmap_matches_loop():
  assert np.isnan(_area([0.1, np.nan], [0.5, 0.5]))
  rng = np.random.default_rng(11)
  xs = rng.uniform(size=(5, 7)).astype(np.float32)
  ys = rng.uniform(size=(5, 7)).astype(np.float32)
  batched = np.asarray(jax.jit(jax.vmap(metrics.auddc))(xs, ys))
  np.testing.assert_allclose(batched, [_area(a, b) for a, b in zip(xs, ys, strict=True)], atol=1e-6)


def test_auddc_summary():
  areas = np.array([0.2, 0.4, np.nan, 0.9])
  mean, std, lo, hi = metrics.auddc_summary(areas)
  finite = areas[np.isfinite(areas)]
  assert mean == pytest.approx(finite.mean())
  assert std == pytest.approx(finite.std(ddof=1))
  assert (lo, hi) == pytest.approx(metrics.mean_interval(finite)[1:])
  assert all(np.isnan(metrics.auddc_summary([np.nan])))


def test_quality_curve_point_anchors():
  rng = np.random.default_rng(12)
  shape = (6, 5, 1)
  x_orig, x_target = rng.uniform(size=(2, *shape)).astype(np.float32)
  rec_orig = np.clip(x_orig + 0.05 * rng.normal(size=shape), 0, 1).astype(np.float32)
  rec_target = np.clip(x_target + 0.05 * rng.normal(size=shape), 0, 1).astype(np.float32)
  zero = np.zeros(shape, np.float32)
  pt = metrics.quality_curve_point
  # No attack: zero distortion and the original's reconstruction.
  x, y = pt(x_orig, x_target, zero, rec_orig, rec_orig, rec_target)
  assert float(x) == 0.0 and float(y) == pytest.approx(1.0, abs=1e-6)
  # Replacing the original by the target: full distortion, the target's reconstruction.
  x, y = pt(x_orig, x_target, x_target - x_orig, rec_target, rec_orig, rec_target)
  assert float(x) == pytest.approx(1.0, abs=1e-6) and float(y) == pytest.approx(0.0, abs=1e-6)
  # Distortion beyond that is clipped to 1; half of it gives 0.5.
  x, _ = pt(x_orig, x_target, 3 * (x_target - x_orig), rec_target, rec_orig, rec_target)
  assert float(x) == 1.0
  x, _ = pt(x_orig, x_target, 0.5 * (x_target - x_orig), rec_target, rec_orig, rec_target)
  assert float(x) == pytest.approx(0.5, abs=1e-6)
  # y is linear in the adversarial reconstruction's distance to the target.
  floor = np.linalg.norm(rec_target - x_target)
  top = np.linalg.norm(rec_orig - x_target)
  rec_adv = x_target + (rec_orig - x_target) * (floor + 0.25 * (top - floor)) / top
  _, y = pt(x_orig, x_target, zero, rec_adv.astype(np.float32), rec_orig, rec_target)
  assert float(y) == pytest.approx(0.25, abs=1e-5)
  # Degenerate pair (original == target): nan, not inf.
  x, y = pt(x_orig, x_orig, zero, rec_orig, rec_orig, rec_orig)
  assert np.isnan(float(x)) and np.isnan(float(y))


def test_quality_curve_point_vmaps_over_pairs_and_feeds_auddc():
  rng = np.random.default_rng(13)
  n, grid, shape = 3, 4, (4, 4, 1)
  x_orig, x_target = rng.uniform(size=(2, n, *shape)).astype(np.float32)
  # Reconstructions near their inputs, so the y denominators are positive.
  rec_orig, rec_target = (v + 0.02 * rng.normal(size=v.shape) for v in (x_orig, x_target))
  # Over the C grid, the attack moves the reconstruction from rec_orig to rec_target.
  t = np.linspace(0.25, 1.0, grid, dtype=np.float32)[None, :, None, None, None]
  d = t * (x_target - x_orig)[:, None]
  rec_adv = (1 - t) * rec_orig[:, None] + t * rec_target[:, None]
  over_grid = jax.vmap(metrics.quality_curve_point, in_axes=(None, None, 0, 0, None, None))
  xs, ys = jax.vmap(over_grid)(x_orig, x_target, d, rec_adv, rec_orig, rec_target)
  assert xs.shape == ys.shape == (n, grid)
  np.testing.assert_allclose(np.asarray(xs), np.broadcast_to(t.ravel(), (n, grid)), atol=1e-5)
  for i in range(n):
    for j in range(grid):
      want = metrics.quality_curve_point(
        x_orig[i], x_target[i], d[i, j], rec_adv[i, j], rec_orig[i], rec_target[i]
      )
      np.testing.assert_allclose([xs[i, j], ys[i, j]], np.asarray(want), atol=1e-6)
  areas = jax.vmap(metrics.auddc)(xs, ys)
  assert np.all((np.asarray(areas) >= 0) & (np.asarray(areas) <= 1))
