"""Tests for vae_attacks.stats against published worked examples, scipy, closed forms computed
by hand, and exact permutation distributions."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from vae_attacks import metrics, stats


def _paired(table):
  """Paired bool arrays (a, b) from counts {(b, a): count}."""
  a, b = [], []
  for (bi, ai), count in table.items():
    a += [ai] * count
    b += [bi] * count
  return np.array(a, bool), np.array(b, bool)


# --------------------------------------------------------------------------------------------
# McNemar, Cochran's Q, Holm.


def test_mcnemar_exact_is_the_two_sided_binomial_tail_of_the_discordant_pairs():
  a, b = _paired({(1, 1): 30, (1, 0): 16, (0, 1): 6, (0, 0): 50})
  r = stats.mcnemar_exact(a, b)
  assert (r.n01, r.n10) == (16, 6)  # n01: a False and b True
  # Symmetric Binomial(22, 1/2): p = 2 P(X <= 6), by hand.
  assert r.pvalue == pytest.approx(2 * sum(math.comb(22, k) for k in range(7)) / 2**22, rel=1e-12)
  assert stats.mcnemar_exact(b, a).pvalue == pytest.approx(r.pvalue)
  assert stats.mcnemar_exact(a, a) == stats.McNemar(0, 0, 1.0)


def _q_by_hand(x):
  m, n_tot = x.shape[1], x.sum()
  c, r = x.sum(0), x.sum(1)
  return (m - 1) * (m * np.sum(c**2) - n_tot**2) / (m * n_tot - np.sum(r**2))


def test_cochran_q_on_a_table_by_hand_equals_friedman_on_binary_data():
  # 12 subjects x 3 treatments (a textbook-style layout; C = (10, 5, 4), N = 19).
  x = np.array(
    [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0],
     [0, 0, 0], [1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0]],
    bool,
  )  # fmt: skip
  q = stats.cochran_q(x)
  # (M-1)[M sum C^2 - N^2] / (M N - sum R^2) = 2 (3 * 141 - 361) / (3 * 19 - 37) = 124 / 20.
  assert q.statistic == pytest.approx(124 / 20) == pytest.approx(_q_by_hand(x.astype(float)))
  assert q.df == 2
  assert q.pvalue == pytest.approx(math.exp(-q.statistic / 2))  # chi2(2) tail, closed form
  # Friedman's test with its tie correction is Cochran's Q on binary data.
  assert q.statistic == pytest.approx(scipy.stats.friedmanchisquare(*x.T.astype(float)).statistic)
  # Rows of all 0 or all 1 carry no information and change nothing.
  more = np.concatenate([x, np.ones((5, 3), bool), np.zeros((4, 3), bool)])
  assert stats.cochran_q(more).statistic == pytest.approx(q.statistic)
  assert stats.cochran_q(np.ones((5, 3), bool)) == stats.CochranQ(0.0, 2, 1.0)


def test_cochran_q_with_two_models_is_mcnemars_chi_square():
  a, b = _paired({(1, 1): 12, (1, 0): 9, (0, 1): 3, (0, 0): 20})
  q = stats.cochran_q(np.stack([a, b], 1))
  assert q.statistic == pytest.approx((9 - 3) ** 2 / (9 + 3))
  assert q.pvalue == pytest.approx(scipy.stats.chi2.sf(3.0, 1))


def test_holm_on_a_constructed_family():
  adj = stats.holm([0.01, 0.04, 0.03, 0.005])
  np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
  # NaN stays NaN and does not count: a family of 3.
  np.testing.assert_allclose(stats.holm([0.01, np.nan, 0.02, 0.5]), [0.03, np.nan, 0.04, 0.5])
  np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
  with pytest.raises(ValueError, match="p-values"):
    stats.holm([0.1, 1.5])


def test_holm_adjusted_p_is_the_smallest_alpha_at_which_the_step_down_procedure_rejects():
  rng = np.random.default_rng(1)
  for _ in range(20):
    p = rng.uniform(0, 0.2, size=7) ** 2
    adj = stats.holm(p)
    for alpha in np.linspace(0.001, 0.3, 60):
      rejected, m = set(), p.size
      for rank, i in enumerate(np.argsort(p)):  # Holm (1979): stop at the first acceptance
        if p[i] > alpha / (m - rank):
          break
        rejected.add(int(i))
      assert rejected == set(np.flatnonzero(adj <= alpha).tolist())


# --------------------------------------------------------------------------------------------
# Differences of proportions.


def test_newcombe_difference_matches_published_examples():
  # Newcombe (1998a), Table II, example (a): 56/70 - 48/80, method 10.
  r = stats.newcombe_difference(48, 80, 56, 70)
  assert (round(r.difference, 4), round(r.lo, 4), round(r.hi, 4)) == (0.2, 0.0524, 0.3339)
  # Fagerland, Lydersen & Laake (2017), ch. 4: Perondi et al. 7/34 vs 1/34, 0.1765 (0.0189,
  # 0.3404) (R package contingencytables, Newcombe_hybrid_score_CI_2x2).
  r = stats.newcombe_difference(1, 34, 7, 34)
  assert (round(r.difference, 4), round(r.lo, 4), round(r.hi, 4)) == (0.1765, 0.0189, 0.3404)


def test_newcombe_difference_contains_the_estimate_shrinks_with_n_and_is_antisymmetric():
  widths = []
  for scale in (1, 4, 16):
    r = stats.newcombe_difference(3 * scale, 10 * scale, 6 * scale, 10 * scale)
    assert r.lo < r.difference < r.hi and r.difference == pytest.approx(0.3)
    widths.append(r.hi - r.lo)
  assert widths[0] > widths[1] > widths[2]
  assert widths[0] / widths[2] == pytest.approx(4, rel=0.15)  # ~ 1 / sqrt(n)
  r, s = stats.newcombe_difference(2, 9, 7, 11), stats.newcombe_difference(7, 11, 2, 9)
  assert (r.difference, r.lo, r.hi) == pytest.approx((-s.difference, -s.hi, -s.lo))
  r = stats.newcombe_difference(0, 10, 10, 10)
  assert r.difference == 1.0 and r.hi == 1.0 and 0 < r.lo < 1


def test_paired_difference_matches_newcombe_1998b_on_a_published_table():
  # Fagerland, Lydersen & Laake (2017), ch. 8: Cavo et al. (2012), rows (before) x columns
  # (after) = [[59, 6], [16, 80]]; Newcombe square-and-add -0.0621 (-0.1186 to -0.0046)
  # (contingencytables, Newcombe_square_and_add_CI_paired_2x2). b = rows, a = columns.
  a, b = _paired({(1, 1): 59, (1, 0): 6, (0, 1): 16, (0, 0): 80})
  r = stats.paired_difference(a, b)
  assert r.method == "newcombe" and (r.n, r.n_clusters) == (161, 161)
  assert (round(r.difference, 4), round(r.lo, 4), round(r.hi, 4)) == (-0.0621, -0.1186, -0.0046)
  # Distinct clusters are no clusters.
  assert stats.paired_difference(a, b, clusters=np.arange(161)) == r


def test_paired_difference_with_positive_correlation_is_narrower_than_unpaired():
  # Strongly concordant pairs: the paired interval is narrower than the independent one.
  a, b = _paired({(1, 1): 40, (1, 0): 8, (0, 1): 2, (0, 0): 50})
  paired = stats.paired_difference(a, b)
  unpaired = stats.newcombe_difference(int(a.sum()), a.size, int(b.sum()), b.size)
  assert paired.difference == pytest.approx(unpaired.difference) == pytest.approx(0.06)
  assert paired.hi - paired.lo < 0.8 * (unpaired.hi - unpaired.lo)


def test_paired_difference_cluster_bootstrap_accounts_for_a_reused_source():
  rng = np.random.default_rng(0)
  a0, b0 = rng.uniform(size=40) < 0.4, rng.uniform(size=40) < 0.6  # 40 sources
  a, b, src = np.repeat(a0, 5), np.repeat(b0, 5), np.repeat(np.arange(40), 5)  # 5 pairs each
  r = stats.paired_difference(a, b, clusters=src, n_boot=1000, seed=3)
  assert r.method == "cluster bootstrap" and (r.n, r.n_clusters) == (200, 40)
  assert r.difference == pytest.approx(b0.mean() - a0.mean())
  assert r == stats.paired_difference(a, b, clusters=src, n_boot=1000, seed=3)  # deterministic
  once = stats.paired_difference(a0, b0)  # the 40 independent sources
  naive = stats.paired_difference(a, b)  # pretending the 200 pairs are independent
  assert r.hi - r.lo == pytest.approx(once.hi - once.lo, rel=0.25)
  assert r.hi - r.lo > 1.6 * (naive.hi - naive.lo)


# --------------------------------------------------------------------------------------------
# The minimal budget: Wilcoxon, Hodges-Lehmann, medians, survival, trend.


def test_wilcoxon_paired_matches_scipy_and_hodges_lehmann_by_hand():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=20)
  b = a + rng.normal(0.1, 0.2, size=20)
  r = stats.wilcoxon_paired(a, b, n_boot=300)
  ref = scipy.stats.wilcoxon(b - a)
  assert (r.statistic, r.pvalue, r.n_nonzero) == (ref.statistic, pytest.approx(ref.pvalue), 20)
  d = b - a
  walsh = [(d[i] + d[j]) / 2 for i in range(20) for j in range(i, 20)]
  assert r.hodges_lehmann == pytest.approx(np.median(walsh))
  assert r.lo < r.hodges_lehmann < r.hi
  # d = (1, 2, 4): Walsh averages 1, 1.5, 2, 2.5, 3, 4 -> 2.25.
  assert stats.wilcoxon_paired([0, 0, 0], [1, 2, 4]).hodges_lehmann == 2.25


def test_wilcoxon_paired_ranks_never_broken_above_every_budget():
  a = np.array([0.1, 0.2, 0.3, 0.15, 0.25, 0.4, 0.05, 0.35, np.inf, 0.2])
  b = np.array([0.3, np.inf, 0.2, np.inf, 0.5, np.inf, 0.1, np.inf, np.inf, 0.1])
  r = stats.wilcoxon_paired(a, b, n_boot=300)
  # The same ranks as a huge finite stand-in: the test sees ranks only.
  huge = stats.wilcoxon_paired(np.where(np.isinf(a), 1e6, a), np.where(np.isinf(b), 1e6, b))
  assert (r.statistic, r.pvalue) == (huge.statistic, pytest.approx(huge.pvalue))
  assert r.n_nonzero == 9  # the pair unbroken on both sides is a zero difference
  # Signed ranks by hand: |d| of the finite pairs 0.2, 0.1, 0.35, 0.05, 0.1 -> ranks 4, 2.5, 5,
  # 1, 2.5 (signs +, -, +, +, -); the four b-only infs get ranks 6..9, all positive.
  assert r.statistic == pytest.approx(2.5 + 2.5)
  assert r.hodges_lehmann == np.inf  # most Walsh averages involve a VAE never broken
  assert r.hi == np.inf
  # One VAE never broken among four pairs: 4 of the 10 Walsh averages are -inf, the median not.
  small = stats.wilcoxon_paired([0.1, 0.2, 0.3, np.inf], [0.2, 0.4, 0.5, 0.6])
  # Sorted: four -inf, then 0.1, 0.15, 0.15, 0.2, 0.2, 0.2: the median is (0.1 + 0.15) / 2.
  assert small.hodges_lehmann == pytest.approx(0.125)
  with pytest.raises(ValueError, match=r"\+inf"):
    stats.wilcoxon_paired([0.1, np.nan], [0.2, 0.3])


def test_clustered_signed_rank_is_wilcoxons_normal_approximation_for_singletons():
  rng = np.random.default_rng(1)
  d = np.round(rng.normal(0.2, 1.0, 60) * 8) / 8  # ties among |d|, exact in 1 + d
  d[:3] = 0.0  # zeros are dropped, as Wilcoxon's method
  r = stats.clustered_signed_rank(d)
  ref = scipy.stats.wilcoxon(d, method="approx", correction=False)
  assert r.pvalue == pytest.approx(ref.pvalue, rel=1e-9)
  assert r.n_clusters == np.count_nonzero(d)
  # Through wilcoxon_paired (inf ranked above every finite budget, as its own test).
  a = np.where(np.arange(60) == 5, np.inf, 1.0)
  w = stats.wilcoxon_paired(a, a + np.where(np.arange(60) == 5, 0.0, d), n_boot=10)
  assert w.pvalue_clustered == pytest.approx(
    scipy.stats.wilcoxon(np.delete(d, 5), method="approx", correction=False).pvalue, rel=1e-9
  )


def test_clustered_signed_rank_variance_is_the_exact_sign_flip_distributions():
  # Six clusters: enumerate all 2^6 joint sign flips of whole clusters; T's mean and variance
  # over them are 0 and the statistic's variance, and |T| is in the tails it claims.
  rng = np.random.default_rng(2)
  clusters = np.repeat(np.arange(6), [1, 2, 3, 4, 2, 3])
  d = rng.normal(0.5, 1.0, clusters.size)
  r = stats.clustered_signed_rank(d, clusters)
  ranks = scipy.stats.rankdata(np.abs(d)) * np.sign(d)
  flips = np.array(list(itertools.product([-1, 1], repeat=6)))  # [64, 6]
  t = (flips[:, clusters] * ranks).sum(1)
  assert r.statistic == pytest.approx(ranks.sum())
  assert t.mean() == pytest.approx(0.0, abs=1e-12)
  assert r.statistic / r.z == pytest.approx(np.sqrt(np.mean(t**2)))


def test_clustered_signed_rank_holds_its_level_where_wilcoxon_does_not():
  # Under the null with a shared effect per source (40 sources x 5 targets), Wilcoxon's p-value
  # (pairs as independent) rejects far too often; the clustered one near the nominal 5%.
  rng = np.random.default_rng(3)
  clusters = np.repeat(np.arange(40), 5)
  naive, clustered = [], []
  for _ in range(400):
    d = rng.normal(size=40)[clusters] + 0.3 * rng.normal(size=200)
    naive.append(scipy.stats.wilcoxon(d).pvalue < 0.05)
    clustered.append(stats.clustered_signed_rank(d, clusters).pvalue < 0.05)
  assert np.mean(naive) > 0.3
  assert 0.02 <= np.mean(clustered) <= 0.09


def test_median_ci_is_exact_on_tiny_cases_and_handles_inf():
  r = stats.median_ci([3.0, 1.0, 2.0])
  assert (r.median, r.q25, r.q75, r.n) == (2.0, 1.5, 2.5, 3)
  # A resample's median is 1 with probability 7/27 > 2.5%: the interval is the whole range.
  assert (r.median_lo, r.median_hi) == (1.0, 3.0)
  const = stats.median_ci([0.7] * 6)
  assert const[:9] == (0.7,) * 9
  r = stats.median_ci([0.1, 0.2, np.inf, np.inf, np.inf])
  assert (r.median, r.q25, r.q75) == (np.inf, 0.2, np.inf)
  assert r.median_lo <= 0.2 and r.median_hi == np.inf
  r = stats.median_ci([0.1, 0.3, np.inf, np.inf])  # between 0.3 and inf: inf
  assert (r.median, r.q25) == (np.inf, pytest.approx(0.25))
  x = np.random.default_rng(0).exponential(size=25)
  r = stats.median_ci(x)  # finite values: numpy's default (linear) quantiles
  assert (r.median, r.q25, r.q75) == pytest.approx(tuple(np.quantile(x, [0.5, 0.25, 0.75])))
  assert stats.median_ci(x, seed=1) == stats.median_ci(x, seed=1)  # deterministic given seed
  assert stats.median_ci(x, seed=1) != stats.median_ci(x, seed=2)


def test_median_ci_covers_the_true_quartiles_of_a_known_distribution():
  rng = np.random.default_rng(0)
  truth = (math.log(2), math.log(4 / 3), math.log(4))  # Exp(1): median, q25, q75
  hits = np.zeros(3)
  trials = 200
  for t in range(trials):
    r = stats.median_ci(rng.exponential(size=80), n_boot=300, seed=t)
    for j, (lo, hi) in enumerate([r[1:3], r[4:6], r[7:9]]):
      hits[j] += lo <= truth[j] <= hi
  assert np.all(hits / trials >= 0.88) and np.all(hits / trials <= 0.995), hits / trials


def test_median_ci_cluster_bootstrap_widens_for_reused_sources():
  rng = np.random.default_rng(1)
  x0 = rng.exponential(size=30)
  once = stats.median_ci(x0, n_boot=500)
  naive = stats.median_ci(np.repeat(x0, 6), n_boot=500)
  clustered = stats.median_ci(np.repeat(x0, 6), clusters=np.repeat(np.arange(30), 6), n_boot=500)
  width = lambda r: r.median_hi - r.median_lo
  assert width(clustered) == pytest.approx(width(once), rel=0.35)
  assert width(clustered) > 1.5 * width(naive)


def test_survival_counts_pairs_broken_within_each_budget_with_wilson_intervals():
  budgets = np.array([0.1, 0.3, 0.3, np.inf, 0.05, np.inf, 0.2, 1.0])
  r = stats.survival(budgets, [0.0, 0.1, 0.3, 2.0])
  np.testing.assert_array_equal(r.fraction, np.array([0, 2, 5, 6]) / 8)
  lo, hi = metrics.wilson_interval(np.array([0, 2, 5, 6]), np.full(4, 8))
  np.testing.assert_allclose(r.lo, lo)
  np.testing.assert_allclose(r.hi, hi)
  assert r.lo[0] == 0.0 and np.all(r.lo <= r.fraction) and np.all(r.fraction <= r.hi)


def _jt_by_brute_force(values, labels):
  """J for each row of values [R, N] with group labels [N], straight from the definition."""
  j = np.zeros(values.shape[0])
  for u, v in itertools.combinations(range(values.shape[1]), 2):
    lu, lv = labels[u], labels[v]
    if lu == lv:
      continue
    lo, hi = (u, v) if lu < lv else (v, u)
    j += (values[:, hi] > values[:, lo]) + 0.5 * (values[:, hi] == values[:, lo])
  return j


def test_trend_test_z_is_exact_against_the_permutation_distribution_with_ties():
  # Pooled values with ties (an inf tie too), groups of 2, 2, 3: the tie-corrected mean and
  # variance must be those of J over all 7! assignments of the values to positions.
  groups = [[0.1, 0.3], [0.3, np.inf], [0.2, 0.3, np.inf]]
  pooled = np.concatenate(groups)
  labels = np.repeat(np.arange(3), [2, 2, 3])
  perms = np.array(list(itertools.permutations(range(7))))
  dist = _jt_by_brute_force(pooled[perms], labels)
  r = stats.trend_test(groups)
  assert r.statistic == _jt_by_brute_force(pooled[None], labels)[0]
  assert r.z == pytest.approx((r.statistic - dist.mean()) / dist.std(), rel=1e-10)
  assert r.pvalue == pytest.approx(2 * scipy.stats.norm.sf(abs(r.z)))


def test_trend_test_with_two_groups_is_the_mann_whitney_test():
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 6, size=15).astype(float), rng.integers(1, 7, size=12).astype(float)
  r = stats.trend_test([x, y])
  ref = scipy.stats.mannwhitneyu(y, x, method="asymptotic", use_continuity=False)
  assert r.statistic == ref.statistic
  assert r.pvalue == pytest.approx(ref.pvalue, rel=1e-10)


def test_trend_test_finds_a_monotone_trend_and_not_a_permuted_one():
  rng = np.random.default_rng(0)
  means = (0.1, 0.2, 0.3, 0.4)  # e.g. resolutions 28, 56, 112, 154
  groups = [rng.normal(m, 0.1, size=20) for m in means]
  up = stats.trend_test(groups)
  assert up.pvalue < 1e-6 and up.direction == "increasing"
  down = stats.trend_test(groups[::-1])
  assert down.direction == "decreasing" and down.pvalue == pytest.approx(up.pvalue)
  pooled = rng.permutation(np.concatenate(groups))
  flat = stats.trend_test(np.split(pooled, 4))
  assert flat.pvalue > 0.05
  assert stats.trend_test([[1.0, 1.0], [1.0]]) == stats.Trend(1.0, 0.0, 1.0, "none")


def test_family_verdict():
  v = stats.family_verdict
  assert v(-0.2, -0.3, -0.1, 0.01, direction="less") == "supported"
  assert v(0.2, 0.1, 0.3, 0.01, direction="less") == "rejected"
  assert v(0.2, 0.1, 0.3, 0.01, direction="greater") == "supported"
  assert v(-0.2, -0.3, -0.1, 0.06, direction="less") == "not significant"  # p after Holm
  assert v(-0.2, -0.3, 0.01, 0.04, direction="less") == "not significant"  # CI disagrees
  assert v(-np.inf, -np.inf, -0.1, 0.001, direction="less") == "supported"
  assert v(np.nan, np.nan, np.nan, np.nan, direction="less") == "not tested"
  with pytest.raises(ValueError, match="direction"):
    v(0.1, 0.0, 0.2, 0.01, direction="up")


def test_clustered_rank_sum_is_mann_whitneys_normal_approximation_for_singletons():
  rng = np.random.default_rng(4)
  a = np.round(rng.normal(0.0, 1.0, 40) * 4) / 4  # ties, within and across the groups
  b = np.round(rng.normal(0.4, 1.0, 55) * 4) / 4
  b[:3] = np.inf  # never broken: ranked above every finite value
  r = stats.clustered_rank_sum(a, b)
  ref = scipy.stats.mannwhitneyu(b, a, method="asymptotic", use_continuity=False)
  assert r.pvalue == pytest.approx(ref.pvalue, rel=1e-9)
  assert r.z > 0  # b ranks higher
  assert (r.n_clusters_a, r.n_clusters_b) == (40, 55)


def test_clustered_rank_sum_variance_is_the_exact_cluster_assignment_distributions():
  # Eight clusters, three of them in b: enumerate all 56 ways to choose b's clusters; S's
  # mean and variance over them are 0 and the statistic's variance.
  rng = np.random.default_rng(5)
  sizes = np.array([1, 3, 2, 4, 2, 1, 3, 2])
  values = rng.normal(size=sizes.sum())
  owner = np.repeat(np.arange(8), sizes)
  in_b = np.isin(owner, [2, 5, 6])
  r = stats.clustered_rank_sum(values[~in_b], values[in_b], owner[~in_b], owner[in_b])
  centred = scipy.stats.rankdata(values) - (values.size + 1) / 2
  per_cluster = np.bincount(owner, weights=centred)
  s = np.array([per_cluster[list(c)].sum() for c in itertools.combinations(range(8), 3)])
  assert r.statistic == pytest.approx(per_cluster[[2, 5, 6]].sum())
  assert s.mean() == pytest.approx(0.0, abs=1e-12)
  assert r.statistic / r.z == pytest.approx(np.sqrt(np.mean(s**2)))


def test_clustered_rank_sum_holds_its_level_where_mann_whitney_does_not():
  # Under the null with a shared effect per source (2 x 30 sources x 5 targets), Mann-Whitney
  # (pairs as independent) rejects far too often; the clustered test near the nominal 5%.
  # Copying every value of a source k times leaves its p-value as it was.
  rng = np.random.default_rng(6)
  clusters = np.repeat(np.arange(30), 5)
  naive, clustered = [], []
  for _ in range(400):
    a = rng.normal(size=30)[clusters] + 0.3 * rng.normal(size=150)
    b = rng.normal(size=30)[clusters] + 0.3 * rng.normal(size=150)
    naive.append(scipy.stats.mannwhitneyu(a, b).pvalue < 0.05)
    clustered.append(stats.clustered_rank_sum(a, b, clusters, clusters).pvalue < 0.05)
  assert np.mean(naive) > 0.3
  assert 0.02 <= np.mean(clustered) <= 0.09
  a, b = rng.normal(size=20), rng.normal(0.8, 1.0, size=25)
  once = stats.clustered_rank_sum(a, b)
  thrice = stats.clustered_rank_sum(
    np.repeat(a, 3), np.repeat(b, 3), np.repeat(np.arange(20), 3), np.repeat(np.arange(25), 3)
  )
  assert thrice.pvalue == pytest.approx(once.pvalue, rel=1e-9)
  assert scipy.stats.mannwhitneyu(np.repeat(a, 3), np.repeat(b, 3)).pvalue < once.pvalue
