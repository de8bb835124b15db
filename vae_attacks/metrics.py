"""How attacks are measured: confidence, validity, effectiveness, rates with intervals, AUDDC.

Two kinds of function live here:

- Per-example measures in JAX (`target_confidence`, `ssim`, `validity`, `effectiveness`,
  `quality_curve_point`, `auddc`), written for ONE example (or one pair's curve) and batched
  with `jax.vmap`; all are jittable.
- Summary statistics for the report (`effectiveness_counts`, `modal_level`, `wilson_interval`,
  `success_rate`, `mean_interval`, `distortion_summary`, `auddc_summary`), which run on host
  numpy arrays and return Python floats / numpy arrays.

Effectiveness grades an attack on one pair by two yes/no questions: is the adversarial input
*valid* (not visibly distorted: an objective proxy of SSIM and norm bounds) and is the judging
classifier *confident* in the target (target probability >= `confidence_min`)?

  high        valid and confident
  moderate    confident, not valid
  low         valid, not confident
  ineffective neither
"""

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from vae_attacks.types import Array

LEVELS = ("high", "moderate", "low", "ineffective")
HIGH, MODERATE, LOW, INEFFECTIVE = range(4)

# Norm bounds are compared with this slack: x + eps clipped to [0, 1] and subtracted from x
# is eps only up to float32 rounding (~1 ulp of 1.0).
_NORM_TOL = 1e-5


# --------------------------------------------------------------------------------------------
# Confidence.


def target_confidence(logits: Array, target: Array) -> Array:
  """Softmax probability of `target`.

  For a classifier attack `logits` are the attacked classifier's on x_adv; for a VAE attack,
  the judging classifier's on the reconstruction of x_adv.

  Args:
    logits: [K] unnormalised class scores for one example.
    target: [] int class index.

  Returns:
    [] float, in [0, 1].
  """
  chex.assert_rank(logits, 1)
  return jnp.exp(jax.nn.log_softmax(logits)[target])


def confident(target_prob: Array, *, confidence_min: float) -> Array:
  """bool: the target probability reaches `confidence_min` (the config's threshold)."""
  return jnp.asarray(target_prob) >= confidence_min


# --------------------------------------------------------------------------------------------
# Validity: SSIM and norm bounds.


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian; its outer product is MATLAB's fspecial('gaussian')."""
  coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * coords**2 / sigma**2)
  return g / g.sum()


def _valid_filter_matrix(length: int, window: np.ndarray) -> np.ndarray:
  """[length - size + 1, length] matrix applying `window` as a 'valid' correlation."""
  size = window.shape[0]
  out = length - size + 1
  m = np.zeros((out, length), np.float64)
  for i in range(out):
    m[i, i : i + size] = window
  return m


@functools.partial(jax.jit, static_argnames=("filter_size", "filter_sigma"))
def ssim(
  x: Array,
  y: Array,
  *,
  max_val: float = 1.0,
  filter_size: int = 11,
  filter_sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> Array:
  """Structural similarity of two images (Wang, Bovik, Sheikh & Simoncelli 2004).

  The Gaussian-window SSIM as in the paper's reference code and `tf.image.ssim`: local means,
  variances and covariance from an isotropic Gaussian window (size `filter_size`, std
  `filter_sigma`) applied as a 'valid' convolution (no padding), the SSIM map
  l(x, y) * cs(x, y) averaged over the map, then over channels. The window is separable, so
  it is applied as two small matrix products per image. Symmetric in x and y;
  ssim(x, x) == 1. Within ~1e-6 of a float64 evaluation (see the comment in the code).

  Images smaller than the window (H or W < filter_size), which `tf.image.ssim` rejects, use a
  window of size min(filter_size, H, W) with the same sigma.

  Args:
    x: [H, W, C] image with values in [0, max_val].
    y: [H, W, C] image, same shape.
    max_val: dynamic range of the pixel values (1.0 for images in [0, 1]).
    filter_size: side of the Gaussian window (static).
    filter_sigma: standard deviation of the Gaussian window (static).
    k1: luminance stabiliser, c1 = (k1 * max_val)^2.
    k2: contrast stabiliser, c2 = (k2 * max_val)^2.

  Returns:
    [] float32 SSIM, in [-1, 1]; 1 for equal images.
  """
  chex.assert_rank(x, 3)
  chex.assert_equal_shape((x, y))
  h, w, _ = x.shape
  size = min(int(filter_size), h, w)
  window = _gaussian_window(size, float(filter_sigma))
  dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
  fh = jnp.asarray(_valid_filter_matrix(h, window), dtype)  # [H', H]
  fw = jnp.asarray(_valid_filter_matrix(w, window), dtype)  # [W', W]
  x = jnp.asarray(x, dtype)
  y = jnp.asarray(y, dtype)

  def blur(img):  # [..., H, W, C] -> [..., H', W', C]
    return jnp.einsum("ih,...hwc,jw->...ijc", fh, img, fw, precision=jax.lax.Precision.HIGHEST)

  c1 = (k1 * max_val) ** 2
  c2 = (k2 * max_val) ** 2
  # cs = (2 cov + c2) / (var_x + var_y + c2) is evaluated as 1 - var_{x-y} / (var_x + var_y + c2)
  # (2 cov = var_x + var_y - var_{x-y}): the same number, but var_{x-y} comes from the small
  # difference image, so float32 cancellation in flat regions no longer costs ~1e-5 of SSIM
  # (as it does in tf.image.ssim), and ssim(x, x) == 1 exactly. var_x + var_y is computed on
  # images centred by a per-channel constant (variances do not change) for the same reason.
  centre = 0.5 * (jnp.mean(x, axis=(0, 1)) + jnp.mean(y, axis=(0, 1)))  # [C]
  xc, yc = x - centre[None, None, :], y - centre[None, None, :]
  diff = x - y
  mu_x, mu_y, mu_xc, mu_yc, mu_diff, sq_c, sq_diff = blur(
    jnp.stack([x, y, xc, yc, diff, xc * xc + yc * yc, diff * diff])
  )
  luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
  var_sum = sq_c - (mu_xc * mu_xc + mu_yc * mu_yc)
  var_diff = sq_diff - mu_diff * mu_diff
  contrast_structure = 1.0 - var_diff / (var_sum + c2)
  return jnp.mean(luminance * contrast_structure)


def _off(bound, no_bound: float) -> bool:
  """A bound is off when None or the value that bounds nothing (inf, or -inf for SSIM)."""
  return bound is None or (isinstance(bound, (int, float)) and bound == no_bound)


def validity(
  x: Array,
  x_adv: Array,
  *,
  ssim_min: float | None,
  linf_max: float | None,
  l2_max: float | None,
  ssim_kwargs: dict | None = None,
) -> Array:
  """Whether an adversarial input is 'not distorted to the naked eye', by an objective proxy.

  Valid iff SSIM(x, x_adv) >= ssim_min, ||x_adv - x||_inf <= linf_max and
  ||x_adv - x||_2 <= l2_max. A bound of None is not checked (nor a norm bound of inf,
  nor ssim_min = -inf); with every bound off every input is valid. Norm bounds allow 1e-5 of
  float32 rounding.

  Args:
    x: [H, W, C] original image.
    x_adv: [H, W, C] adversarial image.
    ssim_min: least SSIM, or None.
    linf_max: largest L-inf distortion, or None.
    l2_max: largest L2 distortion, or None.
    ssim_kwargs: keyword arguments passed on to `ssim` (max_val, filter_size, ...).

  Returns:
    bool[].
  """
  chex.assert_equal_shape((x, x_adv))
  d = jnp.ravel(x_adv - x)
  return valid_from(
    ssim(x, x_adv, **(ssim_kwargs or {})) if not _off(ssim_min, -np.inf) else None,
    jnp.max(jnp.abs(d)),
    jnp.sqrt(jnp.sum(d * d)),
    ssim_min=ssim_min,
    linf_max=linf_max,
    l2_max=l2_max,
  )


def valid_from(
  ssim_value: Array | None,
  linf: Array,
  l2: Array,
  *,
  ssim_min: float | None,
  linf_max: float | None,
  l2_max: float | None,
) -> Array:
  """`validity` from an example's SSIM and distortion norms, already computed (the one place
  the bounds and their float32 slack are applied)."""
  ok = jnp.asarray(True)
  if not _off(linf_max, np.inf):
    ok = ok & (linf <= linf_max + _NORM_TOL)
  if not _off(l2_max, np.inf):
    ok = ok & (l2 <= l2_max + _NORM_TOL)
  if not _off(ssim_min, -np.inf):
    ok = ok & (ssim_value >= ssim_min)
  return ok


class EvalSettings(NamedTuple):
  """How an adversarial example is graded: the study's confidence and validity thresholds.

  A bound of None is not checked (see `validity`). Validity has three definitions (VALIDITY):
  - "ssim": SSIM(x, x_adv) >= ssim_min at the images' own resolution, plus the norm bounds;
  - "psnr": PSNR(x, x_adv) >= psnr_min, plus the norm bounds. PSNR is a function of the
    per-pixel mean squared error, so the same per-pixel perturbation gets the same PSNR at any
    number of pixels;
  - "ssim_common": SSIM >= ssim_min of the two images' luminance resized to
    common_size x common_size (antialiased), plus the norm bounds: SSIM at one common scale,
    as Wang et al. (2004) advise SSIM be taken at the scale the viewer sees (their reference
    code downsamples large images first).
  """

  confidence_min: float = 0.5
  ssim_min: float | None = 0.8
  linf_max: float | None = None
  l2_max: float | None = None
  psnr_min: float | None = 30.0
  common_size: int = 28

  @classmethod
  def from_config(cls, ecfg) -> "EvalSettings":
    """From a config's `eval` section, where a norm bound of 0 means no bound."""
    return cls(
      confidence_min=float(ecfg["confidence_min"]),
      ssim_min=float(ecfg["ssim_min"]),
      linf_max=float(ecfg["linf_max"]) or None,
      l2_max=float(ecfg["l2_max"]) or None,
      psnr_min=float(ecfg.get("psnr_min", cls._field_defaults["psnr_min"])),
      common_size=int(ecfg.get("common_size", cls._field_defaults["common_size"])),
    )


# The validity definitions of `EvalSettings`; "ssim" is the study's primary one.
VALIDITY = ("ssim", "psnr", "ssim_common")


def psnr(x: Array, y: Array, *, max_val: float = 1.0) -> Array:
  """Peak signal-to-noise ratio 10 log10(max_val^2 / MSE) in dB (inf for identical images)."""
  mse = jnp.mean(jnp.square(jnp.asarray(x, jnp.float32) - y))
  return 10.0 * jnp.log10(max_val**2 / mse)


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601


def luminance_at(x: Array, size: int) -> Array:
  """The image's luminance (BT.601 weights for RGB) resized to [size, size, 1], antialiased."""
  if x.shape[-1] == 3:
    x = jnp.tensordot(x, _LUMA, axes=([-1], [0]))[..., None]
  if x.shape[:2] == (size, size):
    return x
  return jax.image.resize(x, (size, size, 1), method="linear", antialias=True)


class PairMeasures(NamedTuple):
  """What the study measures of one attacked pair at one eps (batched: leading axes)."""

  success: Array  # bool[]: the attack reached its target
  target_prob: Array  # []: the (judging) classifier's probability of the target
  prediction: Array  # int32[]: the (judging) classifier's class for x_adv (-1: not given)
  ssim: Array  # []: SSIM(x, x_adv)
  valid: Array  # bool[]: `validity` under the settings (definition "ssim", the primary)
  confident: Array  # bool[]: target_prob >= confidence_min
  level: Array  # int32[]: effectiveness level (index into LEVELS) under the primary validity
  l0: Array  # []: distortion norms of x_adv - x
  l1: Array
  l2: Array
  linf: Array
  psnr: Array  # []: PSNR(x, x_adv) in dB
  ssim_common: Array  # []: SSIM of the luminances at common_size
  valid_psnr: Array  # bool[]: validity, definition "psnr"
  valid_ssim_common: Array  # bool[]: validity, definition "ssim_common"
  # []: the minimal budget a search found (`AttackResult.budget`: +inf when the pair was not
  # broken); NaN for an attack that searches none
  budget: Array


def pair_measures(
  x: Array, result: Any, settings: EvalSettings, logits: Array | None = None
) -> PairMeasures:
  """The per-pair measures of ONE attack result (an `attacks.base.AttackResult` for one pair
  and one eps) on source `x`; vmap for a batch. Used by the runner's measured sweep.

  `logits`: the (judging) classifier's logits[K] on x_adv (on its reconstruction, for a VAE
  attack), for the predicted class; without them the prediction is -1.
  """
  d = result.distortion
  s = ssim(x, result.x_adv)
  bounds = dict(linf_max=settings.linf_max, l2_max=settings.l2_max)
  valid = valid_from(s, d.linf, d.l2, ssim_min=settings.ssim_min, **bounds)
  p = psnr(x, result.x_adv)
  by_psnr = valid_from(None, d.linf, d.l2, ssim_min=None, **bounds)
  if settings.psnr_min is not None:
    by_psnr = by_psnr & (p >= settings.psnr_min)
  size = settings.common_size
  s_common = ssim(luminance_at(x, size), luminance_at(result.x_adv, size))
  by_common = valid_from(s_common, d.linf, d.l2, ssim_min=settings.ssim_min, **bounds)
  conf = confident(result.target_prob, confidence_min=settings.confidence_min)
  return PairMeasures(
    success=jnp.asarray(result.success, bool),
    target_prob=result.target_prob,
    prediction=jnp.asarray(-1 if logits is None else jnp.argmax(logits), jnp.int32),
    ssim=s,
    valid=valid,
    confident=conf,
    level=effectiveness(valid, conf),
    l0=d.l0,
    l1=d.l1,
    l2=d.l2,
    linf=d.linf,
    psnr=p,
    ssim_common=s_common,
    valid_psnr=by_psnr,
    valid_ssim_common=by_common,
    budget=jnp.asarray(jnp.nan if result.budget is None else result.budget, jnp.float32),
  )


def row_stats(m: PairMeasures) -> dict:
  """The statistics of one (model, attack, eps) point from its pairs' measures (host arrays
  [P]), with 95% intervals: the fields of a result row. NaN (an interval of one pair) is None.
  """
  levels = np.asarray(m.level)
  rate, rate_lo, rate_hi = success_rate(m.success)
  vrate, vlo, vhi = success_rate(m.valid)
  pmean, plo, phi = mean_interval(m.target_prob)
  row = dict(
    n_pairs=int(np.asarray(m.success).size),
    success_rate=rate,
    success_rate_ci=[rate_lo, rate_hi],
    mean_target_prob=pmean,
    mean_target_prob_ci=[plo, phi],
    validity_rate=vrate,
    validity_rate_ci=[vlo, vhi],
    mean_ssim=float(np.mean(m.ssim)),
    effectiveness=dict(effectiveness_counts(levels), modal=modal_level(levels)),
  )
  # The other validity definitions (EvalSettings): rates and effectiveness under each.
  for name in VALIDITY[1:]:
    valid = np.asarray(getattr(m, f"valid_{name}"), bool)
    rate, lo, hi = success_rate(valid)
    row[f"validity_rate_{name}"] = rate
    row[f"validity_rate_{name}_ci"] = [lo, hi]
    alt = np.asarray(effectiveness(valid, np.asarray(m.confident, bool)))
    row[f"effectiveness_{name}"] = dict(effectiveness_counts(alt), modal=modal_level(alt))
  row["median_psnr"] = float(np.median(np.asarray(m.psnr, np.float64)))  # inf (no change): null
  row["mean_ssim_common"] = float(np.mean(m.ssim_common))
  for norm in ("l0", "l1", "l2", "linf"):
    mean, lo, hi = mean_interval(np.asarray(getattr(m, norm), np.float64))
    row[f"mean_{norm}"] = mean
    row[f"mean_{norm}_ci"] = [lo, hi]
  row.update(budget_stats(m.budget))
  return {k: finite(v) for k, v in row.items()}


def budget_stats(budget: Array) -> dict:
  """A row's fields for the pairs' minimal budgets [P] (`PairMeasures.budget`), or {} when
  the attack searched none (all NaN), so the rows of other attacks are unchanged.

  median_budget: the median over every pair, an unbroken pair (+inf) counting as above every
  budget (None when half the pairs or more were not broken); mean_budget_broken: the mean over
  the broken pairs (None when none); unbroken_rate: the fraction not broken within the range.
  """
  b = np.asarray(budget, np.float64).reshape(-1)
  if b.size == 0 or np.isnan(b).all():
    return {}
  broken = np.isfinite(b)
  return dict(
    median_budget=float(np.median(b)),
    mean_budget_broken=float(b[broken].mean()) if broken.any() else np.nan,
    unbroken_rate=float(1.0 - broken.mean()),
  )


def finite(v):
  """NaN (an interval of one sample) as None, never as a fake number; lists element-wise."""
  if isinstance(v, float):
    return v if np.isfinite(v) else None
  if isinstance(v, list):
    return [finite(a) for a in v]
  return v


# --------------------------------------------------------------------------------------------
# Effectiveness.


def effectiveness(valid: Array, confident: Array) -> Array:
  """Effectiveness level of each attacked example (indices into LEVELS).

  high (0): valid and confident; moderate (1): confident but not valid; low (2): valid but
  not confident; ineffective (3): neither.

  Args:
    valid: bool[...] from `validity`.
    confident: bool[...] from `confident` (target probability >= confidence_min).

  Returns:
    int32[...] levels, same shape.
  """
  valid = jnp.asarray(valid, bool)
  confident = jnp.asarray(confident, bool)
  chex.assert_equal_shape((valid, confident))
  return jnp.where(
    confident,
    jnp.where(valid, HIGH, MODERATE),
    jnp.where(valid, LOW, INEFFECTIVE),
  ).astype(jnp.int32)


def effectiveness_counts(levels) -> dict[str, int]:
  """How many examples fall in each level: {name: count} over all four LEVELS (host numpy)."""
  levels = np.asarray(levels).ravel()
  if levels.size and (levels.min() < 0 or levels.max() >= len(LEVELS)):
    raise ValueError(f"levels must lie in [0, {len(LEVELS)}); got {levels.min()}..{levels.max()}")
  counts = np.bincount(levels.astype(np.int64), minlength=len(LEVELS))
  return {name: int(c) for name, c in zip(LEVELS, counts, strict=True)}


def modal_level(levels) -> str | None:
  """The most frequent level's name; ties go to the more effective level; None if empty."""
  counts = effectiveness_counts(levels)
  if sum(counts.values()) == 0:
    return None
  return max(LEVELS, key=lambda name: (counts[name], -LEVELS.index(name)))


# --------------------------------------------------------------------------------------------
# Rates and means with 95% confidence intervals (host numpy, for the report).


def wilson_interval(successes, n, z: float = 1.96):
  """Wilson score interval for a binomial proportion (Wilson 1927).

  With p = successes / n:
    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
  Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at p = 0 or
  p = 1. Broadcasts over arrays.

  Args:
    successes: number of successes (int or array).
    n: number of trials (int or array); n = 0 gives (nan, nan).
    z: normal quantile; 1.96 for a 95% interval.

  Returns:
    (lo, hi) floats (or float arrays).
  """
  s = np.asarray(successes, np.float64)
  n = np.asarray(n, np.float64)
  if np.any(s < 0) or np.any(s > n):
    raise ValueError(f"need 0 <= successes <= n; got successes={successes}, n={n}")
  # scipy's Wilson interval at the coverage of +-z (0.95000420... for z = 1.96).
  confidence = 2.0 * float(scipy.stats.norm.cdf(z)) - 1.0
  lo, hi = np.vectorize(functools.partial(_wilson_one, confidence=confidence))(s, n)
  if lo.ndim == 0:
    return float(lo), float(hi)
  return lo, hi


def _wilson_one(s: float, n: float, *, confidence: float) -> tuple[float, float]:
  if n <= 0:
    return float("nan"), float("nan")
  ci = scipy.stats.binomtest(int(s), int(n)).proportion_ci(confidence, method="wilson")
  # At p = 0 (p = 1) the bound is exactly 0 (1), so rounding cannot exclude p.
  return (0.0 if s == 0 else ci.low), (1.0 if s == n else ci.high)


def success_rate(success, z: float = 1.96) -> tuple[float, float, float]:
  """(rate, lo, hi): the fraction of True in `success` with its Wilson interval (nan if empty)."""
  success = np.asarray(success, bool).ravel()
  n = success.size
  k = int(success.sum())
  lo, hi = wilson_interval(k, n, z)
  return (k / n if n else float("nan")), lo, hi


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
  """Sample mean with its Student-t confidence interval.

  mean +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n), s the sample standard deviation
  (ddof = 1). The t quantile tends to the normal one for large n.

  Args:
    values: array of numbers (flattened); NaNs propagate.
    confidence: coverage of the interval.

  Returns:
    (mean, lo, hi); all nan for no values, (value, nan, nan) for one value.
  """
  v = np.asarray(values, np.float64).ravel()
  n = v.size
  if n == 0:
    return float("nan"), float("nan"), float("nan")
  mean = float(v.mean())
  if n == 1:
    return mean, float("nan"), float("nan")
  sem = float(v.std(ddof=1)) / np.sqrt(n)
  if sem == 0.0:  # no spread: a zero-width interval (scipy gives nan for scale 0)
    return mean, mean, mean
  lo, hi = scipy.stats.t.interval(confidence, df=n - 1, loc=mean, scale=sem)
  return mean, float(lo), float(hi)


def distortion_summary(
  dist: Any, mask=None, confidence: float = 0.95
) -> dict[str, tuple[float, float, float]]:
  """Mean distortion in each norm, with its t interval: {"l0"|"l1"|"l2"|"linf": (m, lo, hi)}.

  Args:
    dist: a batched `attacks.base.Distortion` (each field [N]), e.g. `AttackResult.distortion`.
    mask: optional bool[N] selecting the examples to average (e.g. the successful ones).
    confidence: coverage of the intervals.
  """
  out = {}
  for name, values in dist._asdict().items():
    values = np.asarray(values).ravel()
    if mask is not None:
      values = values[np.asarray(mask, bool).ravel()]
    out[name] = mean_interval(values, confidence)
  return out


# --------------------------------------------------------------------------------------------
# AUDDC: area under the distortion-distance curve (Gondim-Ribeiro, Tabacof & Valle 2018).


def _norm(v: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(v)))


@jax.jit
def quality_curve_point(
  x_orig: Array,
  x_target: Array,
  d: Array,
  rec_adv: Array,
  rec_orig: Array,
  rec_target: Array,
) -> tuple[Array, Array]:
  """One point of the distortion-distance curve of a VAE attack (Gondim-Ribeiro et al. 2018).

  x = ||d|| / ||x_orig - x_target||, clipped to [0, 1]: the input distortion relative to the
      distortion of simply replacing the original by the target.
  y = (||rec_adv - x_target|| - ||rec_target - x_target||)
      / (||rec_orig - x_target|| - ||rec_target - x_target||):
      1 when the adversarial reconstruction is as far from the target as the original's
      reconstruction (no effect), 0 when it is as close as the target's own reconstruction.
  y is NOT clipped here (values < 0 or > 1 are real outcomes; `auddc` clips). All norms are
  L2 over every pixel. A degenerate pair (x_orig == x_target, or a denominator <= 0, i.e. the
  VAE reconstructs the target no closer to it than it reconstructs the original) gives nan.

  Args:
    x_orig: [H, W, C] original input.
    x_target: [H, W, C] target input.
    d: [H, W, C] adversarial perturbation, x_adv - x_orig.
    rec_adv: [H, W, C] reconstruction of x_orig + d.
    rec_orig: [H, W, C] reconstruction of x_orig.
    rec_target: [H, W, C] reconstruction of x_target.

  Returns:
    (x, y), two float scalars.
  """
  chex.assert_equal_shape((x_orig, x_target, d, rec_adv, rec_orig, rec_target))
  span = _norm(x_orig - x_target)
  x = jnp.where(span > 0, jnp.clip(_norm(d) / jnp.where(span > 0, span, 1.0), 0.0, 1.0), jnp.nan)
  floor = _norm(rec_target - x_target)
  den = _norm(rec_orig - x_target) - floor
  y = jnp.where(
    den > 0, (_norm(rec_adv - x_target) - floor) / jnp.where(den > 0, den, 1.0), jnp.nan
  )
  return x, y


@jax.jit
def auddc(xs: Array, ys: Array) -> Array:
  """Area under the distortion-distance curve of one pair (Gondim-Ribeiro et al. 2018).

  The points (xs[i], ys[i]) come from `quality_curve_point` over a grid of attack strengths
  (C values), in any order. Lower is better for the attacker: the adversarial reconstruction
  approaches the target with little input distortion.

  Construction, so that the area lies in [0, 1]:
  1. ys are clipped to [0, 1]: doing better than the target's own reconstruction counts as 0,
     doing worse than no attack as 1; xs are clipped to [0, 1].
  2. Points are sorted by x (ties: larger y first, so the curve steps down at a tied x).
  3. The curve is closed on [0, 1]: (0, 1) is prepended -- zero distortion is no attack, where
     rec_adv = rec_orig and y = 1 by definition -- and (1, y at the largest x) is appended,
     i.e. the attack's last result extended flat (we do not credit the attack with the point
     (1, 0) of the trivial 'replace by the target' attack).
  4. The trapezoid rule over the closed curve.
  So y = 1 everywhere (useless) gives 1; y = 1 - x on a grid covering [0, 1] gives 0.5; a
  perfect attack (y = 0 for every x > 0) gives x_min / 2, which tends to 0 as the smallest
  distortion tends to 0. Any nan point gives nan.

  Args:
    xs: [G] normalised distortions.
    ys: [G] normalised adversarial-target distances.

  Returns:
    [] float area in [0, 1] (or nan).
  """
  chex.assert_rank(xs, 1)
  chex.assert_equal_shape((xs, ys))
  xs = jnp.clip(jnp.asarray(xs, jnp.float32), 0.0, 1.0)
  ys = jnp.clip(jnp.asarray(ys, jnp.float32), 0.0, 1.0)
  order = jnp.lexsort((-ys, xs))  # primary key: x; ties: y descending
  xs, ys = xs[order], ys[order]
  one = jnp.ones((1,), xs.dtype)
  xc = jnp.concatenate([jnp.zeros_like(one), xs, one])
  yc = jnp.concatenate([one, ys, ys[-1:]])
  area = jnp.sum(0.5 * (xc[1:] - xc[:-1]) * (yc[1:] + yc[:-1]))
  bad = jnp.any(jnp.isnan(xs) | jnp.isnan(ys))
  return jnp.where(bad, jnp.nan, area)


def auddc_summary(areas, confidence: float = 0.95) -> tuple[float, float, float, float]:
  """(mean, std, lo, hi) of per-pair AUDDC areas; nan areas (degenerate pairs) are dropped.

  std is the sample standard deviation (ddof = 1); (lo, hi) the t interval of the mean
  (see `mean_interval`). All nan when no finite area is left.
  """
  a = np.asarray(areas, np.float64).ravel()
  a = a[np.isfinite(a)]
  mean, lo, hi = mean_interval(a, confidence)
  std = float(a.std(ddof=1)) if a.size > 1 else float("nan")
  return mean, std, lo, hi
