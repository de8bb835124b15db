"""The statistics behind the study's verdicts: paired and unpaired tests and intervals.

Host numpy + scipy.stats only (no JAX, no I/O); every function takes host arrays and returns a
small NamedTuple. Outcomes are per (source, target) pair, e.g. "the CNN was broken" and "the VAE
was broken" on the same pairs (paired: H0), or rates on two datasets (unpaired: H1).

- Binary endpoints: `mcnemar_exact` (exact McNemar), `cochran_q` (Cochran 1950, M models),
  `paired_difference` (Newcombe 1998b, or a cluster bootstrap when a source is reused),
  `newcombe_difference` (Newcombe 1998a, unpaired), `holm` (Holm 1979).
- The minimal adversarial budget per pair (+inf = never broken within the search range):
  `wilcoxon_paired` (signed-rank test, Hodges-Lehmann estimate), `clustered_signed_rank` (its
  p-value when several pairs share a source), `clustered_rank_sum` (the unpaired rank-sum
  test with the same care), `median_ci` (quartiles with
  bootstrap intervals), `survival` (fraction broken by budget), `trend_test`
  (Jonckheere-Terpstra across ordered groups, e.g. resolutions).
- `family_verdict`: one directional hypothesis' verdict from an effect, its CI and its p.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats


class McNemar(NamedTuple):
  n01: int  # pairs with a False, b True
  n10: int  # pairs with a True, b False
  pvalue: float


class CochranQ(NamedTuple):
  statistic: float
  df: int
  pvalue: float


class Difference(NamedTuple):
  difference: float
  lo: float
  hi: float


class PairedDifference(NamedTuple):
  difference: float  # mean(b) - mean(a)
  lo: float
  hi: float
  method: str  # "newcombe" or "cluster bootstrap"
  n: int  # pairs
  n_clusters: int


class Wilcoxon(NamedTuple):
  statistic: float  # scipy's signed-rank statistic (the smaller rank sum, two-sided)
  pvalue: float
  n_nonzero: int  # pairs with b != a (the ones the test ranks)
  hodges_lehmann: float  # median of the Walsh averages of b - a; may be +-inf
  lo: float  # percentile-bootstrap interval of the Hodges-Lehmann estimate
  hi: float
  pvalue_clustered: float = float("nan")  # `clustered_signed_rank`'s, sources as clusters


class ClusteredSignedRank(NamedTuple):
  statistic: float  # T = sum over nonzero differences of sign * rank (0 under the null)
  z: float  # T / sqrt(sum over clusters of their signed-rank sums squared)
  pvalue: float  # two-sided, normal approximation
  n_clusters: int  # clusters with a nonzero difference


class ClusteredRankSum(NamedTuple):
  statistic: float  # S = sum over b's clusters of (rank sum - size x mean rank); 0 expected
  z: float  # S / its standard deviation under random assignment of whole clusters
  pvalue: float  # two-sided, normal approximation
  n_clusters_a: int
  n_clusters_b: int


class MedianSummary(NamedTuple):
  median: float
  median_lo: float
  median_hi: float
  q25: float
  q25_lo: float
  q25_hi: float
  q75: float
  q75_lo: float
  q75_hi: float
  n: int


class Survival(NamedTuple):
  grid: np.ndarray  # [G]
  fraction: np.ndarray  # [G] fraction of pairs with budget <= grid[g]
  lo: np.ndarray  # [G] 95% Wilson interval
  hi: np.ndarray  # [G]


class Trend(NamedTuple):
  statistic: float  # Jonckheere-Terpstra J
  z: float
  pvalue: float  # two-sided
  direction: str  # "increasing", "decreasing" or "none" (z == 0)


# --------------------------------------------------------------------------------------------
# Helpers.


def _pair(a, b, dtype=bool) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, dtype).ravel(), np.asarray(b, dtype).ravel()
  if a.shape != b.shape:
    raise ValueError(f"a and b must pair up; got {a.shape} and {b.shape}")
  return a, b


def _wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
  """Wilson (1927) score interval, as `metrics.wilson_interval` computes it, at any level."""
  if n <= 0:
    return float("nan"), float("nan")
  ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(confidence, method="wilson")
  return (0.0 if k == 0 else float(ci.low)), (1.0 if k == n else float(ci.high))


def _quantiles(x: np.ndarray, qs: Sequence[float]) -> np.ndarray:
  """numpy's default (linear) quantiles along the last axis, exact with +inf.

  np.quantile turns inf into nan where it interpolates (inf - inf); here a value between a
  finite order statistic and +inf at a positive weight is +inf, as in the extended reals.
  """
  x = np.sort(np.asarray(x, np.float64), axis=-1)  # [..., n]
  n = x.shape[-1]
  out = []
  for q in qs:
    h = (n - 1) * q
    lo, hi = int(np.floor(h)), int(np.ceil(h))
    g = h - lo
    a, b = x[..., lo], x[..., hi]
    with np.errstate(invalid="ignore"):
      v = a + g * (b - a)
    out.append(np.where((g == 0) | (a == b), a, np.where(np.isinf(b), b, v)))
  return np.stack(out, axis=-1)  # [..., len(qs)]


def _boot_indices(
  clusters: np.ndarray | None, n: int, n_boot: int, seed: int, block: int
) -> Iterator[np.ndarray]:
  """Bootstrap resamples of n items as index blocks [B, L]: items with replacement, or (when
  clusters repeat) whole clusters with replacement, each resample of K clusters for K present."""
  rng = np.random.default_rng(seed)
  if clusters is None or np.unique(clusters).size == n:
    for start in range(0, n_boot, block):
      yield rng.integers(0, n, (min(block, n_boot - start), n))
    return
  order = np.argsort(clusters, kind="stable")
  _, starts, sizes = np.unique(clusters[order], return_index=True, return_counts=True)
  k = sizes.size
  for _ in range(n_boot):
    pick = rng.integers(0, k, k)
    size = sizes[pick]  # [K]
    offset = np.repeat(starts[pick] - np.cumsum(size) + size, size)
    yield order[offset + np.arange(size.sum())][None]


def _percentile(stats: np.ndarray, confidence: float) -> tuple[float, float]:
  alpha = 1.0 - confidence
  lo, hi = _quantiles(stats, (alpha / 2, 1 - alpha / 2))
  return float(lo), float(hi)


def _clusters(clusters, n: int) -> np.ndarray | None:
  if clusters is None:
    return None
  c = np.asarray(clusters).ravel()
  if c.size != n:
    raise ValueError(f"clusters has {c.size} entries for {n} pairs")
  return c


# --------------------------------------------------------------------------------------------
# Binary endpoints.


def mcnemar_exact(a, b) -> McNemar:
  """Exact McNemar test (McNemar 1947) of paired binary outcomes a, b (bool[P]).

  Under H0 the discordant pairs split 1:1, so n10 ~ Binomial(n01 + n10, 1/2); the p-value is
  scipy's two-sided exact binomial test. p = 1 when no pair is discordant.
  """
  a, b = _pair(a, b)
  n01, n10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
  if n01 + n10 == 0:
    return McNemar(n01, n10, 1.0)
  return McNemar(n01, n10, float(scipy.stats.binomtest(n10, n01 + n10, 0.5).pvalue))


def cochran_q(outcomes) -> CochranQ:
  """Cochran's (1950) Q test that M paired binary outcomes (bool[P, M]) have equal rates.

  Q = (M - 1) [M sum_j C_j^2 - N^2] / (M N - sum_i R_i^2), C_j the column totals, R_i the row
  totals, N the grand total; p from chi-square with M - 1 df. With M = 2 it is McNemar's
  chi-square (n01 - n10)^2 / (n01 + n10). Q = 0, p = 1 when every row is constant.
  """
  x = np.asarray(outcomes, bool)
  if x.ndim != 2 or x.shape[1] < 2:
    raise ValueError(f"outcomes must be [pairs, models >= 2]; got shape {x.shape}")
  m = x.shape[1]
  c, r = x.sum(0).astype(np.float64), x.sum(1).astype(np.float64)  # [M], [P]
  total = r.sum()
  den = m * total - np.sum(r**2)
  if den == 0:
    return CochranQ(0.0, m - 1, 1.0)
  q = (m - 1) * (m * np.sum(c**2) - total**2) / den
  return CochranQ(float(q), m - 1, float(scipy.stats.chi2.sf(q, m - 1)))


def holm(pvalues) -> np.ndarray:
  """Holm's (1979) step-down adjusted p-values, in the input's order (float[F]).

  Sorted p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
  Reject where adjusted < alpha: the family-wise error rate is at most alpha under any
  dependence. NaN stays NaN and is not counted in m.
  """
  p = np.asarray(pvalues, np.float64)
  flat = p.ravel()
  ok = ~np.isnan(flat)
  if np.any((flat[ok] < 0) | (flat[ok] > 1)):
    raise ValueError(f"p-values must lie in [0, 1]; got {p}")
  m = int(ok.sum())
  out = np.full(flat.shape, np.nan)
  order = np.argsort(flat[ok], kind="stable")
  adjusted = np.minimum(1.0, np.maximum.accumulate(flat[ok][order] * (m - np.arange(m))))
  out[np.flatnonzero(ok)[order]] = adjusted
  return out.reshape(p.shape)


def _newcombe(p1, l1, u1, p2, l2, u2, phi=0.0) -> Difference:
  """Newcombe's hybrid score interval for p1 - p2 from each proportion's Wilson limits."""
  d = p1 - p2
  dl = np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
  du = np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
  return Difference(float(d), float(max(d - dl, -1.0)), float(min(d + du, 1.0)))


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> Difference:
  """p2 - p1 = k2/n2 - k1/n1 of two independent proportions, Newcombe's (1998a) method 10.

  The hybrid score ("square-and-add") interval from the Wilson intervals (l_i, u_i) of each:
    lo = d - sqrt((p2 - l2)^2 + (u1 - p1)^2),  hi = d + sqrt((u2 - p2)^2 + (p1 - l1)^2).
  Newcombe, Statist. Med. 17:873-890 (1998); example (a) 56/70 - 48/80: 0.2000 (0.0524, 0.3339).
  """
  if n1 <= 0 or n2 <= 0:
    return Difference(float("nan"), float("nan"), float("nan"))
  p1, p2 = k1 / n1, k2 / n2
  (l1, u1), (l2, u2) = _wilson(k1, n1, confidence), _wilson(k2, n2, confidence)
  return _newcombe(p2, l2, u2, p1, l1, u1)


def paired_difference(
  a, b, clusters=None, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> PairedDifference:
  """mean(b) - mean(a) of paired binary outcomes (bool[P]) with a confidence interval.

  - Every pair its own cluster (clusters None or all distinct): Newcombe's (1998b) method 10,
    the hybrid score interval for paired proportions from the Wilson intervals of the two
    margins and their correlation phi, whose numerator A D - B C is replaced by
    max(A D - B C - P/2, 0) when positive (Newcombe, Statist. Med. 17:2635-2650, 1998; the
    "Newcombe square-and-add" interval of Fagerland, Lydersen & Laake 2014/2017).
  - Clusters (int[P], e.g. the source image of each pair) that repeat: pairs sharing a source
    are not independent, so the interval is a cluster-bootstrap percentile interval
    (resampling whole clusters with replacement; Davison & Hinkley 1997, sec. 3.8),
    deterministic given seed.
  """
  a, b = _pair(a, b)
  n = a.size
  c = _clusters(clusters, n)
  k = n if c is None else int(np.unique(c).size)
  if n == 0:
    return PairedDifference(float("nan"), float("nan"), float("nan"), "newcombe", 0, 0)
  d = float(b.mean() - a.mean())
  if k < n:
    diff = b.astype(np.float64) - a  # [P]
    stats = np.concatenate([diff[i].mean(-1) for i in _boot_indices(c, n, n_boot, seed, 1)])
    lo, hi = _percentile(stats, confidence)
    return PairedDifference(d, lo, hi, "cluster bootstrap", n, k)
  # The 2x2 table of (b, a): A both, B b only, C a only, D neither.
  cnt_a, cnt_b = float(np.sum(a & b)), float(np.sum(b & ~a))
  cnt_c, cnt_d = float(np.sum(a & ~b)), float(np.sum(~a & ~b))
  margins = (cnt_a + cnt_b) * (cnt_c + cnt_d) * (cnt_a + cnt_c) * (cnt_b + cnt_d)
  num = cnt_a * cnt_d - cnt_b * cnt_c
  num = max(num - n / 2, 0.0) if num > 0 else num
  phi = num / np.sqrt(margins) if margins > 0 else 0.0
  kb, ka = int(b.sum()), int(a.sum())
  (lb, ub), (la, ua) = _wilson(kb, n, confidence), _wilson(ka, n, confidence)
  r = _newcombe(kb / n, lb, ub, ka / n, la, ua, phi)
  return PairedDifference(r.difference, r.lo, r.hi, "newcombe", n, k)


# --------------------------------------------------------------------------------------------
# The minimal adversarial budget (+inf = never broken).


def _finite_budgets(*xs: np.ndarray) -> tuple[float, float]:
  for x in xs:
    if np.any(np.isnan(x) | (x == -np.inf)):
      raise ValueError("budgets must be finite or +inf (never broken)")
  fin = np.concatenate([x[np.isfinite(x)] for x in xs])
  return (float(fin.max()), float(fin.min())) if fin.size else (0.0, 0.0)


def _hodges_lehmann(d: np.ndarray) -> np.ndarray:
  """Median of the Walsh averages (d_i + d_j) / 2, i <= j, along the last axis ([..., P])."""
  i, j = np.triu_indices(d.shape[-1])
  return np.median((d[..., i] + d[..., j]) / 2, axis=-1)


def wilcoxon_paired(
  a, b, clusters=None, *, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> Wilcoxon:
  """Wilcoxon's (1945) signed-rank test of b - a (float[P] each, +inf = never broken).

  The p-value is scipy.stats.wilcoxon's two-sided one (zeros dropped, Wilcoxon's method; exact
  null distribution for small P without ties, else normal). +inf is handled by ranks: each inf
  is replaced by BIG = 4 M - 3 m + 1 (M, m the largest and smallest finite budget) before
  differencing, so a pair broken on one side only has a difference larger in magnitude than
  every finite one, signed by who held out, and ranked among such pairs by the finite side; a
  pair unbroken on both sides is a zero difference (dropped). The test depends only on these
  ranks, not on BIG. The Hodges-Lehmann estimate (Hodges & Lehmann 1963) is the median of the
  Walsh averages of the same differences, reported as +-inf when it involves a one-sided inf
  (BIG makes those exceed every other average in magnitude); its interval is a percentile
  bootstrap over pairs, or over clusters when `clusters` repeat. `pvalue` treats pairs as
  independent; `pvalue_clustered` is `clustered_signed_rank`'s on the same differences, which
  holds when several pairs share a source (with one pair per cluster it is Wilcoxon's normal
  approximation with the tie correction).
  """
  a, b = _pair(a, b, np.float64)
  hi_fin, lo_fin = _finite_budgets(a, b)
  big = 4 * hi_fin - 3 * lo_fin + 1
  d = np.where(np.isinf(b), big, b) - np.where(np.isinf(a), big, a)  # [P]
  bound = hi_fin - lo_fin  # |Walsh average| of finite differences (or cancelled infs)

  def to_inf(v):
    return np.where(np.abs(v) > bound, np.copysign(np.inf, v), v)

  n_nonzero = int(np.count_nonzero(d))
  if n_nonzero == 0:
    stat, p = float("nan"), 1.0
  else:
    res = scipy.stats.wilcoxon(d, alternative="two-sided")
    stat, p = float(res.statistic), float(res.pvalue)
  if d.size == 0:
    return Wilcoxon(stat, p, 0, float("nan"), float("nan"), float("nan"))
  c = _clusters(clusters, d.size)
  p_clustered = clustered_signed_rank(d, c).pvalue
  hl = float(to_inf(_hodges_lehmann(d)))
  block = max(1, 2**22 // (d.size * (d.size + 1) // 2))
  stats = np.concatenate(
    [_hodges_lehmann(d[i]) for i in _boot_indices(c, d.size, n_boot, seed, block)]
  )
  lo, hi = _percentile(to_inf(stats), confidence)
  return Wilcoxon(stat, p, n_nonzero, hl, lo, hi, p_clustered)


def clustered_signed_rank(d, clusters=None) -> ClusteredSignedRank:
  """The signed-rank test of paired differences d (float[P]) that share clusters (int[P], e.g.
  the source image of each (source, target) pair; None = one pair per cluster).

  Wilcoxon's statistic T = sum_i sign(d_i) r_i (r: midranks of |d| over the nonzero d, zeros
  dropped as Wilcoxon's method) referred to its distribution under sign flips of whole
  clusters: under the null that the two models are exchangeable on every source, swapping
  them negates all of a source's differences at once. Given the data, that distribution has
  mean 0 and variance sum_c W_c^2 (W_c: the cluster's sum of sign * rank); the p-value is the
  normal approximation's, which needs many clusters. Pairs of one source are correlated (the
  same image is attacked towards several targets), so Wilcoxon's own p-value, whose variance
  counts every pair as independent, is too small when they are; with one pair per cluster
  this is Wilcoxon's normal approximation with the tie correction (scipy's `method="approx"`
  without continuity correction). Infinite d must be replaced before (as `wilcoxon_paired`).
  """
  d = np.asarray(d, np.float64).ravel()
  c = np.arange(d.size) if clusters is None else _clusters(clusters, d.size)
  nz = d != 0
  if not nz.any():
    return ClusteredSignedRank(0.0, 0.0, 1.0, 0)
  signed = np.sign(d[nz]) * scipy.stats.rankdata(np.abs(d[nz]))
  _, codes = np.unique(c[nz], return_inverse=True)
  w = np.bincount(codes.ravel(), weights=signed)  # [K]
  t, var = float(signed.sum()), float(np.sum(w**2))
  z = t / np.sqrt(var) if var > 0 else 0.0
  return ClusteredSignedRank(t, z, float(2 * scipy.stats.norm.sf(abs(z))), int(w.size))


def clustered_rank_sum(a, b, clusters_a=None, clusters_b=None) -> ClusteredRankSum:
  """The rank-sum (Mann-Whitney) test of two independent groups a, b (float[n_a], float[n_b];
  +inf allowed: ranks only) whose values come in clusters (int ids per group, e.g. the source
  image of each pair; a cluster lies in one group; None = one value per cluster).

  Midranks r over a and b together, mean rank rbar = (N + 1) / 2; per cluster c of either
  group, A_c = sum of its ranks - n_c rbar (so sum_c A_c = 0). The statistic S = sum of A_c
  over b's clusters is referred to its distribution when which K_b of the K clusters form b is
  random (the null: the groups' labels are exchangeable between whole clusters): mean 0 and,
  sampling without replacement, variance K_a K_b / (K (K - 1)) sum_c A_c^2; the p-value is the
  normal approximation's (it needs many clusters). With one value per cluster this is
  Mann-Whitney's normal approximation with its tie correction and no continuity correction
  (scipy's `mannwhitneyu(method="asymptotic", use_continuity=False)`). Pairs of one source are
  correlated, so Mann-Whitney's variance, which counts every pair as independent, is too small
  when they are. z > 0: b ranks higher.
  """
  a, b = (np.asarray(x, np.float64).ravel() for x in (a, b))
  if np.isnan(a).any() or np.isnan(b).any():
    raise ValueError("clustered_rank_sum: NaN values (use +inf for never broken)")
  ca = np.arange(a.size) if clusters_a is None else _clusters(clusters_a, a.size)
  cb = np.arange(b.size) if clusters_b is None else _clusters(clusters_b, b.size)
  _, ia = np.unique(ca, return_inverse=True)
  _, ib = np.unique(cb, return_inverse=True)
  ka, kb = int(ia.max(initial=-1)) + 1, int(ib.max(initial=-1)) + 1
  if ka == 0 or kb == 0 or ka + kb < 3:
    return ClusteredRankSum(0.0, 0.0, 1.0, ka, kb)
  n = a.size + b.size
  ranks = scipy.stats.rankdata(np.concatenate([a, b])) - (n + 1) / 2
  codes = np.concatenate([ia.ravel(), ka + ib.ravel()])
  big_a = np.bincount(codes, weights=ranks, minlength=ka + kb)  # [K]
  k = ka + kb
  s = float(big_a[ka:].sum())
  var = ka * kb / (k * (k - 1)) * float(np.sum(big_a**2))
  z = s / np.sqrt(var) if var > 0 else 0.0
  return ClusteredRankSum(s, z, float(2 * scipy.stats.norm.sf(abs(z))), ka, kb)


def median_ci(
  values, clusters=None, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> MedianSummary:
  """Median and quartiles of `values` (float[P], +inf allowed) with percentile-bootstrap CIs.

  Quantiles are numpy's default (linear interpolation, Hyndman & Fan type 7), with a value
  between a finite one and +inf being +inf, so the median is inf when over half the pairs were
  never broken. Intervals: Efron's percentile bootstrap, resampling pairs, or whole clusters
  when `clusters` (int[P]) repeat; deterministic given seed.
  """
  x = np.asarray(values, np.float64).ravel()
  _finite_budgets(x)
  n = x.size
  if n == 0:
    return MedianSummary(*([float("nan")] * 9), 0)
  qs = (0.5, 0.25, 0.75)
  point = _quantiles(x, qs)  # [3]
  c = _clusters(clusters, n)
  block = max(1, 2**22 // n)
  boot = np.concatenate([_quantiles(x[i], qs) for i in _boot_indices(c, n, n_boot, seed, block)])
  out = []
  for j in range(3):
    out += [float(point[j]), *_percentile(boot[:, j], confidence)]
  return MedianSummary(*out, n)


def survival(budgets, grid) -> Survival:
  """The fraction of pairs broken within each budget: mean(budget <= g) for g in grid, with
  95% Wilson intervals (`metrics.wilson_interval`). budgets float[P] (+inf = never broken)."""
  from vae_attacks import metrics  # imports JAX; only this function needs it

  x = np.asarray(budgets, np.float64).ravel()
  _finite_budgets(x)
  g = np.asarray(grid, np.float64).ravel()  # [G]
  k = np.sum(x[None, :] <= g[:, None], axis=1)  # [G]
  n = np.full(g.shape, x.size)
  lo, hi = metrics.wilson_interval(k, n)
  frac = k / x.size if x.size else np.full(g.shape, np.nan)
  return Survival(g, frac, np.asarray(lo, np.float64), np.asarray(hi, np.float64))


def trend_test(groups_values: Sequence) -> Trend:
  """Jonckheere-Terpstra test for a monotone trend across ordered groups (float[n_i] each, in
  the order of the groups, e.g. resolutions 28, 56, 112, 154; +inf allowed, ranks only).

  J = sum_{i < j} #{(x in g_i, y in g_j): y > x} + #{y == x} / 2; E J = (N^2 - sum n_i^2) / 4;
  Var J with the tie correction of Hollander, Wolfe & Chicken (2014, sec. 6.2):
    [N(N-1)(2N+5) - sum n(n-1)(2n+5) - sum t(t-1)(2t+5)] / 72
    + sum n(n-1)(n-2) sum t(t-1)(t-2) / (36 N(N-1)(N-2)) + sum n(n-1) sum t(t-1) / (8 N(N-1)),
  t the sizes of groups of tied values; two-sided p from the normal approximation.
  """
  groups = [np.asarray(g, np.float64).ravel() for g in groups_values]
  _finite_budgets(*groups)
  groups = [g for g in groups if g.size]
  if len(groups) < 2:
    return Trend(0.0, 0.0, 1.0, "none")
  j = 0.0
  for i, gi in enumerate(groups):
    s = np.sort(gi)
    for gj in groups[i + 1 :]:
      below = np.searchsorted(s, gj, "left")
      j += np.sum(below) + 0.5 * np.sum(np.searchsorted(s, gj, "right") - below)
  ns = np.array([g.size for g in groups], np.float64)
  total = ns.sum()
  t = np.unique(np.concatenate(groups), return_counts=True)[1].astype(np.float64)
  mean = (total**2 - np.sum(ns**2)) / 4
  var = (
    total * (total - 1) * (2 * total + 5)
    - np.sum(ns * (ns - 1) * (2 * ns + 5))
    - np.sum(t * (t - 1) * (2 * t + 5))
  ) / 72
  if total > 2:
    var += (
      np.sum(ns * (ns - 1) * (ns - 2))
      * np.sum(t * (t - 1) * (t - 2))
      / (36 * total * (total - 1) * (total - 2))
    )
  var += np.sum(ns * (ns - 1)) * np.sum(t * (t - 1)) / (8 * total * (total - 1))
  if var <= 0:
    return Trend(float(j), 0.0, 1.0, "none")
  z = (j - mean) / np.sqrt(var)
  direction = "increasing" if z > 0 else ("decreasing" if z < 0 else "none")
  return Trend(float(j), float(z), float(2 * scipy.stats.norm.sf(abs(z))), direction)


def family_verdict(
  effect: float, lo: float, hi: float, p_adjusted: float, *, direction: str, alpha: float = 0.05
) -> str:
  """The verdict on one directional hypothesis from its primary endpoint.

  direction "greater" (the hypothesis says effect > 0) or "less". "supported" when the
  family-adjusted p (e.g. `holm`) is below alpha and the interval [lo, hi] lies entirely on the
  hypothesis' side of 0; "rejected" when p < alpha and it lies entirely on the other side; else
  "not significant" (the test and the interval must agree). "not tested" when any input is NaN.
  """
  if direction not in ("greater", "less"):
    raise ValueError(f"direction must be 'greater' or 'less'; got {direction!r}")
  if any(np.isnan(v) for v in (effect, lo, hi, p_adjusted)):
    return "not tested"
  if p_adjusted >= alpha:
    return "not significant"
  sign = 1.0 if direction == "greater" else -1.0
  if sign * effect > 0 and min(sign * lo, sign * hi) > 0:
    return "supported"
  if sign * effect < 0 and max(sign * lo, sign * hi) < 0:
    return "rejected"
  return "not significant"


class PageTrend(NamedTuple):
  statistic: float  # Page's L
  pvalue: float  # one-sided, for a trend increasing along the columns' order
  n: int  # rows (blocks: pairs)
  k: int  # columns (ordered conditions)


def page_trend(matrix) -> PageTrend:
  """Page's (1963) L test for a monotone trend across k ordered conditions measured on the same
  units: the paired counterpart of `trend_test` (e.g. one pair's minimal budget at resolutions
  154, 112, 56, 28, ordered so that the hypothesis predicts increasing values).

  Each row (float[k], +inf allowed: ranks only) is ranked within itself, ties given their mean
  rank; L = sum_j j * R_j with R_j the rank sum of column j; the one-sided p-value is
  scipy.stats.page_trend_test's (exact for small n and k, else Page's normal approximation).
  With k = 2 (or a single row) L reduces to the sign test, whose exact one-sided binomial p
  is given.
  """
  m = np.asarray(matrix, np.float64)
  if m.ndim != 2 or m.shape[1] < 2:
    raise ValueError(f"matrix must be [n, k >= 2]; got shape {m.shape}")
  _finite_budgets(m.ravel())
  if m.shape[0] == 0:
    return PageTrend(0.0, 1.0, 0, m.shape[1])
  ranks = scipy.stats.rankdata(m, axis=1)
  stat = float(np.sum(np.arange(1, m.shape[1] + 1) * ranks.sum(0)))
  if m.shape[1] == 2 or m.shape[0] == 1:
    ups = int(np.sum(m[:, -1] > m[:, 0]))
    moved = int(np.sum(m[:, -1] != m[:, 0]))
    p = scipy.stats.binomtest(ups, moved, 0.5, alternative="greater").pvalue if moved else 1.0
    return PageTrend(stat, float(p), m.shape[0], m.shape[1])
  result = scipy.stats.page_trend_test(ranks, ranked=True)
  return PageTrend(float(result.statistic), float(result.pvalue), m.shape[0], m.shape[1])
