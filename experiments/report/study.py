"""The study's statistics from the per-pair records: primary endpoints, paired cell tests,
minimal budgets, effectiveness shares (Tables 2 and 3). Pure functions over `StudyData`; the
only I/O is `load` reading each row's record (`rows.read_record`).

Every model of a run is attacked on the same pairs, so a pair's outcomes line up across models
by position (checked: source index and target must agree, else the comparison is skipped).

- `h0_primary`: per dataset and VAE classifier, the paired difference VAE - CNN in the
  per-pair minimal L-inf BIM budget (`bim_min`), Wilcoxon signed-rank with the Hodges-Lehmann
  estimate and its cluster-bootstrap CI, Holm over the (dataset, VAE) family.
- `h1_primary`: per model, the minimal L-inf BIM budget on LFW vs MNIST (Mann-Whitney, the
  two-group Jonckheere-Terpstra test, and its clustered variant), difference of medians with a
  cluster-bootstrap CI, Holm over the models; the CNN's is the primary endpoint.
- `h0_cells`, `h1_cells`: the secondary cell tests (success and high-effectiveness rates under
  each validity definition), Holm per measure over the family.
- `budget_summaries`, `effectiveness_shares`: the minimal budgets and Tables 2 and 3.
"""

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats

from experiments.report.rows import DatasetView, num, read_record, row_key
from experiments.report.verdicts import BASELINE, h1_verdict, reference_eps
from vae_attacks import metrics, stats
from vae_attacks import models as models_lib

PRIMARY_ATTACK = "bim_min"  # L-inf BIM, minimal budget per pair by bisection
BUDGET_ATTACKS = ("bim_min", "bim_l1_min", "lbfgs_c_search")
BUDGET_NORMS = {"bim_min": "L∞", "bim_l1_min": "L1", "lbfgs_c_search": "L2"}
WEAK_FLOOR = 0.9  # a model below this fraction of the best model's clean accuracy is weak
ALPHA = 0.05
H0_ENDPOINT = (
  "H0: per dataset and VAE classifier (mlp_vae, conv_vae), the paired difference VAE − CNN in "
  "the per-pair minimal L-inf BIM budget (`bim_min` rows' budget), by a paired Wilcoxon "
  "signed-rank test with the Hodges–Lehmann estimate and its bootstrap CI (clusters = source "
  "index), Holm-corrected over the family of (dataset, VAE) comparisons; H0 is supported for a "
  "VAE when the VAE needs a significantly LARGER budget, rejected when significantly smaller."
)
H1_ENDPOINT = (
  "H1: the CNN's minimal L-inf BIM budget on LFW vs MNIST (unpaired: Mann–Whitney; effect: "
  "difference of medians LFW − MNIST with a cluster-bootstrap CI), H1 supported when LFW's "
  "budget is significantly SMALLER; also per VAE model, Holm over the H1 family."
)

# Declared on 2026-12-06, before the generative classifiers' study rows existed (issue 19).
GENERATIVE_PRIMARY_NORM = "l2"
GENERATIVE_ENDPOINT = (
  "H0 for the generative classifiers (abs, cvae; abs_long, ABS trained longer, joined on "
  "2026-12-07 before its rows): per dataset and model, the paired difference "
  "model − CNN in the per-pair minimal L2 perturbation over every attack of the model (the "
  "smallest successful perturbation's L2 norm, +inf if no attack reached the target; the "
  "robustness measure of Schott et al. 2019, whose attacks on ABS are L2 ones: HopSkipJump, "
  "latent descent, the c search), by a paired Wilcoxon signed-rank test with the Hodges–Lehmann "
  "estimate and its bootstrap CI (clusters = source index), Holm over the (dataset, model) "
  "family; supported for a model when it needs a significantly LARGER perturbation, rejected "
  "when significantly smaller. The other norms (L-inf, L1, L0) are a sensitivity analysis."
)


@dataclasses.dataclass
class StudyData:
  """One dataset's current rows with their per-pair records and the models' clean accuracy."""

  name: str
  rows: list
  records: dict  # {row_key: {field: array[P]}}
  accuracy: dict  # {model: clean test accuracy}
  pixels: int | None = None
  examples: dict = dataclasses.field(default_factory=dict)  # {(model, attack): npz path}
  # {model: int[N_test]} clean predictions kept with the run's pairs (pairs/*.npz)
  predictions: dict = dataclasses.field(default_factory=dict)
  matched: dict = dataclasses.field(default_factory=dict)  # {control: the model it matches}
  # Results computed once per report (the bootstraps of `minimal_perturbation_summaries`).
  cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def record(self, row: Mapping) -> dict | None:
    return self.records.get(row_key(row))

  def models(self) -> list[str]:
    return list(dict.fromkeys(r.get("model") for r in self.rows if self.record(r) is not None))

  def budget_row(self, model: str, attack: str) -> Mapping | None:
    """The model's row of a budget-search attack with a record (the widest range if several)."""
    mine = [
      r
      for r in self.rows
      if (r.get("model"), r.get("attack")) == (model, attack) and self.record(r) is not None
    ]
    return max(mine, key=lambda r: num(r.get("eps")) or 0.0) if mine else None


def load(view: DatasetView) -> StudyData:
  """Reads every record of a dataset view (records that cannot be read are left out)."""
  recs = {}
  for key, path in view.records.items():
    rec = read_record(path)
    if rec is not None and "success" in rec:
      recs[key] = rec
  acc = {m: num((t or {}).get("test_accuracy")) for m, t in view.train.items()}
  matched = {m: t["matched_to"] for m, t in view.train.items() if (t or {}).get("matched_to")}
  predictions = {}
  for workdir in view.workdirs:
    for path in sorted((pathlib.Path(workdir) / "pairs").glob("*.npz")):
      with np.load(path) as f:
        for k in f.files:
          if k.startswith("prediction_"):
            predictions[k[len("prediction_") :]] = np.asarray(f[k])
  return StudyData(
    view.name, list(view.rows), recs, acc, view.pixels, dict(view.examples), predictions, matched
  )


def weak_models(data: Sequence[StudyData], floor: float = WEAK_FLOOR) -> dict[tuple, float]:
  """{(dataset, model): accuracy} of the models below `floor` x the dataset's best accuracy."""
  out = {}
  for d in data:
    accs = {m: a for m, a in d.accuracy.items() if a is not None}
    best = max(accs.values(), default=None)
    for m, a in accs.items():
      if best is not None and a < floor * best:
        out[(d.name, m)] = a
  return out


def is_vae(model) -> bool:
  """A VAE with its latent classifier: the pre-registered H0 family (README, "The study's
  design"). The generative classifiers (`vae_attacks.models.GENERATIVE_CLASSIFIERS`, whose
  names may end in "vae" too) are compared with the CNN outside it, in
  `minimal_perturbation_summaries`, so that adding them changes no registered test."""
  return str(model).endswith("vae") and str(model) not in models_lib.GENERATIVE_CLASSIFIERS


def same_pairs(a: Mapping, b: Mapping) -> bool:
  """Whether two records are of the same pairs in the same order."""
  return all(k in a and k in b and np.array_equal(a[k], b[k]) for k in ("source_index", "target"))


def high(rec: Mapping, validity: str = "ssim") -> np.ndarray:
  """bool[P]: high effectiveness (valid under `validity` and confident)."""
  valid = rec["valid"] if validity == "ssim" else rec[f"valid_{validity}"]
  return np.asarray(valid, bool) & np.asarray(rec["confident"], bool)


def n_sources(rec: Mapping) -> int:
  return int(np.unique(rec["source_index"]).size)


def budgets_of(rec: Mapping) -> np.ndarray:
  """float[P]: a record's minimal budgets, +inf where never broken (and where NaN)."""
  b = np.asarray(rec["budget"], np.float64)
  return np.where(np.isnan(b), np.inf, b)


# --------------------------------------------------------------------------------------------
# Families: Holm, then the directional verdict of each member.


def weak_test(weak: Mapping, baseline: str = BASELINE):
  """A predicate: the test or cell involves a weak model (its own, or the CNN it is compared
  with, on its dataset; for "lfw vs mnist" on either dataset)."""

  def involves(t: Mapping) -> bool:
    names = ("lfw", "mnist") if t["dataset"] == "lfw vs mnist" else (t["dataset"],)
    models = (t["model"],) if t["dataset"] == "lfw vs mnist" else (t["model"], baseline)
    return any((n, m) in weak for n in names for m in models)

  return involves


def decide_family(tests: list[dict], direction: str, excluded=None) -> list[dict]:
  """Copies of the tests ({effect, lo, hi, p, dataset, model}) with `p_holm` and `verdict`:
  Holm over the tests measured and not `excluded` (a predicate), `stats.family_verdict` in
  `direction`; the others get their `skip` reason or "excluded (weak model)"."""
  out = [dict(t) for t in tests]
  live = [i for i, t in enumerate(out) if not t.get("skip") and not (excluded and excluded(t))]
  adjusted = stats.holm([out[i]["p"] for i in live]) if live else []
  for t in out:
    t["p_holm"], t["verdict"] = math.nan, t.get("skip") or "excluded (weak model)"
  for i, p in zip(live, adjusted, strict=True):
    t = out[i]
    t["p_holm"] = float(p)
    t["verdict"] = stats.family_verdict(
      t["effect"], t["lo"], t["hi"], float(p), direction=direction, alpha=ALPHA
    )
  return out


# --------------------------------------------------------------------------------------------
# Primary endpoints.


def h0_primary(data: Sequence[StudyData], *, baseline: str = BASELINE, pick=None) -> list[dict]:
  """The H0 family's tests: per dataset and VAE, Wilcoxon of budget VAE - CNN (see module).
  `pick(dataset, model)`: the VAEs to test (default every one)."""
  tests = []
  for d in data:
    base = d.budget_row(baseline, PRIMARY_ATTACK)
    for model in d.models():
      if not is_vae(model) or (pick is not None and not pick(d, model)):
        continue
      row = d.budget_row(model, PRIMARY_ATTACK)
      t = dict(dataset=d.name, model=model, p=math.nan, effect=math.nan, lo=math.nan)
      t.update(p_clustered=math.nan)
      t.update(hi=math.nan, n=0, n_sources=0)
      if base is None or row is None:
        t["skip"] = "not measured"
      elif not same_pairs(d.record(base), d.record(row)):
        t["skip"] = "not tested (the CNN and the VAE were attacked on different pairs)"
      else:
        a, b = budgets_of(d.record(base)), budgets_of(d.record(row))
        src = d.record(row)["source_index"]
        w = stats.wilcoxon_paired(a, b, clusters=src)
        t.update(p=w.pvalue, effect=w.hodges_lehmann, lo=w.lo, hi=w.hi, n=a.size)
        t.update(p_clustered=w.pvalue_clustered)
        t.update(n_sources=n_sources(d.record(row)), n_nonzero=w.n_nonzero)
        t.update(median_cnn=float(np.median(a)), median_vae=float(np.median(b)))
      t.update(baseline=baseline, acc_cnn=d.accuracy.get(baseline), acc_vae=d.accuracy.get(model))
      tests.append(t)
  return tests


def h0_matched(data: Sequence[StudyData]) -> list[dict]:
  """H0 at matched clean accuracy: per dataset, each accuracy-matched control (a CNN trained
  until its test accuracy reached a VAE classifier's, `train.<control>.match_to`) against
  that VAE, by `h0_primary`'s test; one Holm family of its own."""
  tests = []
  for d in data:
    for control, model in d.matched.items():
      tests += h0_primary([d], baseline=control, pick=lambda _, m, model=model: m == model)
  return tests


RESOLUTION_PREFIX = "lfw_res"  # the study's resolution parts: lfw_res154, ..., lfw_res28g


def resolution_of(name: str) -> tuple[int, bool] | None:
  """(size, grey) of a resolution part's dataset name ('lfw_res56' -> (56, False)), else None."""
  if not name.startswith(RESOLUTION_PREFIX):
    return None
  rest = name[len(RESOLUTION_PREFIX) :]
  grey = rest.endswith("g")
  digits = rest[:-1] if grey else rest
  return (int(digits), grey) if digits.isdigit() else None


def correct_pairs(d: StudyData, model: str, rec: Mapping) -> np.ndarray:
  """bool[P]: the pairs whose source the model classified correctly (clean), from the
  predictions kept with the run's pairs; all True when the run kept none."""
  pred = d.predictions.get(model)
  if pred is None:
    return np.ones(len(rec["source_index"]), bool)
  return pred[np.asarray(rec["source_index"])] == np.asarray(rec["source_label"])


def h1_resolution(data: Sequence[StudyData], *, baseline: str = BASELINE) -> dict | None:
  """H1 within LFW: a model's (`baseline`: the CNN, the primary; or another model of the
  resolution parts) minimal L-inf budget (`bim_min`) on the same pairs at every colour
  resolution of the sweep, on the pairs every resolution's model classified correctly.

  Primary: Page's L test (`stats.page_trend`) of budgets increasing from the most pixels to
  the fewest (H1: more pixels, smaller budget); effect: Hodges-Lehmann estimate of the paired
  difference largest - smallest resolution with its cluster-bootstrap CI (Wilcoxon p).
  Secondary: 28x28 grey vs 28x28 colour (the same pixel grid with a third of the values),
  paired Wilcoxon. None when fewer than two colour resolutions have records.
  """
  parts = []
  for d in data:
    res = resolution_of(d.name)
    row = d.budget_row(baseline, PRIMARY_ATTACK) if res else None
    if row is not None:
      parts.append((res, d, d.record(row)))
  colour = sorted((p for p in parts if not p[0][1]), key=lambda p: -p[0][0])
  if len(colour) < 2:
    return None
  first = colour[0][2]
  if not all(same_pairs(first, rec) for _, _, rec in parts):
    return {"skip": "the resolutions were attacked on different pairs", "parts": []}
  keep = np.ones(len(first["source_index"]), bool)
  for _, d, rec in parts:
    keep &= correct_pairs(d, baseline, rec)
  budgets = {res: budgets_of(rec)[keep] for res, _, rec in parts}
  src = np.asarray(first["source_index"])[keep]
  matrix = np.stack([budgets[res] for res, _, _ in colour], axis=1)
  page = stats.page_trend(matrix)
  hi_res, lo_res = colour[0][0], colour[-1][0]
  w = stats.wilcoxon_paired(budgets[hi_res], budgets[lo_res], clusters=src)  # lo - hi
  out = dict(
    order=[res for res, _, _ in colour], n=int(keep.sum()), n_all=int(keep.size),
    n_sources=int(np.unique(src).size), page_l=page.statistic, p=page.pvalue,
    effect=w.hodges_lehmann, lo=w.lo, hi=w.hi, p_wilcoxon=w.pvalue,
    medians={res: stats.median_ci(b, src) for res, b in budgets.items()},
    accuracy={res: d.accuracy.get(baseline) for res, d, _ in parts},
  )  # fmt: skip
  grey = [p for p in parts if p[0][1]]
  if grey and (grey[0][0][0], False) in budgets:
    g, c = budgets[grey[0][0]], budgets[(grey[0][0][0], False)]
    wg = stats.wilcoxon_paired(c, g, clusters=src)
    out["grey"] = dict(size=grey[0][0][0], effect=wg.hodges_lehmann, lo=wg.lo, hi=wg.hi,
                       p=wg.pvalue)  # fmt: skip
  return out


def median_difference(a, b, ca, cb, *, n_boot: int = 2000, seed: int = 0, confidence=0.95):
  """median(b) - median(a) of two independent samples (+inf allowed) with a percentile
  bootstrap CI resampling each sample's clusters (ca, cb: source indices) with replacement.
  NaN where the difference is undefined (both medians +inf)."""
  rng = np.random.default_rng(seed)

  def groups(x, c):
    _, inv = np.unique(c, return_inverse=True)
    return [x[inv == k] for k in range(inv.max() + 1)] if x.size else []

  def med_diff(xa, xb):
    with np.errstate(invalid="ignore"):
      return float(np.median(xb) - np.median(xa))

  ga, gb = groups(np.asarray(a, float), ca), groups(np.asarray(b, float), cb)
  if not ga or not gb:
    return math.nan, math.nan, math.nan
  point = med_diff(np.asarray(a, float), np.asarray(b, float))
  boot = np.empty(n_boot)
  for i in range(n_boot):
    xa = np.concatenate([ga[k] for k in rng.integers(0, len(ga), len(ga))])
    xb = np.concatenate([gb[k] for k in rng.integers(0, len(gb), len(gb))])
    boot[i] = med_diff(xa, xb)
  if np.isnan(boot).any() or math.isnan(point):
    return point, math.nan, math.nan
  alpha = 1 - confidence
  lo = float(np.quantile(boot, alpha / 2, method="lower"))
  return point, lo, float(np.quantile(boot, 1 - alpha / 2, method="higher"))


def h1_primary(
  data: Sequence[StudyData], *, high_name="lfw", low_name="mnist", baseline=BASELINE
) -> list[dict]:
  """The H1 family's tests: per model with `bim_min` records on both datasets, LFW vs MNIST
  (Mann-Whitney p; `p_clustered`, the rank-sum test with the pairs of one source as a cluster,
  `stats.clustered_rank_sum`; difference of medians LFW - MNIST); the baseline's test first."""
  by = {d.name: d for d in data}
  if high_name not in by or low_name not in by:
    return []
  hi_d, lo_d = by[high_name], by[low_name]
  models = [m for m in dict.fromkeys([baseline, *lo_d.models(), *hi_d.models()])]
  tests = []
  for model in models:
    if model != baseline and not is_vae(model):
      continue
    rl, rh = lo_d.budget_row(model, PRIMARY_ATTACK), hi_d.budget_row(model, PRIMARY_ATTACK)
    t = dict(dataset="lfw vs mnist", model=model, p=math.nan, effect=math.nan, lo=math.nan)
    t.update(hi=math.nan, n_low=0, n_high=0, primary=model == baseline)
    if rl is None or rh is None:
      t["skip"] = "not measured"
      tests.append(t)
      continue
    a, b = budgets_of(lo_d.record(rl)), budgets_of(hi_d.record(rh))
    src_a, src_b = lo_d.record(rl)["source_index"], hi_d.record(rh)["source_index"]
    trend = stats.trend_test([a, b])
    eff, lo, hi = median_difference(a, b, src_a, src_b)
    t.update(p=trend.pvalue, effect=eff, lo=lo, hi=hi, n_low=a.size, n_high=b.size)
    t["p_clustered"] = stats.clustered_rank_sum(a, b, src_a, src_b).pvalue
    t.update(median_low=float(np.median(a)), median_high=float(np.median(b)))
    t.update(src_low=n_sources(lo_d.record(rl)), src_high=n_sources(hi_d.record(rh)))
    tests.append(t)
  return tests


# --------------------------------------------------------------------------------------------
# Secondary: the cells.


def _paired(a, b, src) -> dict:
  pd = stats.paired_difference(a, b, clusters=src)
  return dict(effect=pd.difference, lo=pd.lo, hi=pd.hi, p=stats.mcnemar_exact(a, b).pvalue)


def h0_cells(data: Sequence[StudyData], *, baseline: str = BASELINE) -> list[dict]:
  """Per (dataset, attack, norm, eps) and VAE with records of the same pairs as the CNN's: the
  difference VAE - CNN in success rate and in each validity's high-effectiveness rate (paired
  CI, exact McNemar p), and Cochran's Q (success) over every model with those pairs."""
  cells = []
  for d in data:
    base = {row_key(r)[2:]: r for r in d.rows if r.get("model") == baseline and d.record(r)}
    for r in d.rows:
      cnn = base.get(row_key(r)[2:])
      if not is_vae(r.get("model")) or cnn is None or d.record(r) is None:
        continue
      a, b = d.record(cnn), d.record(r)
      if not same_pairs(a, b):
        continue
      src = b["source_index"]
      together = [
        d.record(o)
        for o in d.rows
        if row_key(o)[2:] == row_key(r)[2:] and d.record(o) and same_pairs(a, d.record(o))
      ]
      q = stats.cochran_q(np.stack([np.asarray(x["success"], bool) for x in together], 1))
      cell = dict(dataset=d.name, model=r.get("model"), attack=r.get("attack"))
      cell.update(norm=r.get("norm"), eps=r.get("eps"), n=int(src.size), n_sources=n_sources(b))
      cell.update(cochran_p=q.pvalue, cochran_m=len(together))
      cell["success"] = _paired(np.asarray(a["success"], bool), np.asarray(b["success"], bool), src)
      for v in metrics.VALIDITY:
        cell[f"high_{v}"] = _paired(high(a, v), high(b, v), src)
      cells.append(cell)
  return cells


def h1_cells(data: Sequence[StudyData], *, high_name="lfw", low_name="mnist") -> list[dict]:
  """The H1 cells of `verdicts.h1_verdict` (same model and attack, comparable budgets) with
  records on both sides: Newcombe's difference LFW - MNIST and Fisher's exact p per measure."""
  by = {d.name: d for d in data}
  if high_name not in by or low_name not in by:
    return []
  lo_d, hi_d = by[low_name], by[high_name]
  pixels = {d.name: d.pixels for d in data if d.pixels}
  v = h1_verdict(lo_d.rows + hi_d.rows, high=high_name, low=low_name, pixels=pixels)
  cells = []
  for c in v["cells"]:
    find = {
      name: next(
        (
          d.record(r)
          for r in d.rows
          if (r.get("model"), r.get("attack"), r.get("norm"))
          == (c["model"], c["attack"], c["norm"])
          and r.get("eps") == eps
        ),
        None,
      )
      for name, d, eps in (("low", lo_d, c["eps"]), ("high", hi_d, c["eps_high"]))
    }
    if find["low"] is None or find["high"] is None:
      continue
    cell = {k: c[k] for k in ("model", "attack", "norm", "eps", "eps_high")}
    cell.update(dataset="lfw vs mnist", n_low=find["low"]["success"].size)
    cell.update(n_high=find["high"]["success"].size, src_low=n_sources(find["low"]))
    cell["src_high"] = n_sources(find["high"])
    measures = {"success": lambda x: np.asarray(x["success"], bool)}
    measures.update({f"high_{v}": (lambda x, v=v: high(x, v)) for v in metrics.VALIDITY})
    for m, f in measures.items():
      k1, n1 = int(f(find["low"]).sum()), f(find["low"]).size
      k2, n2 = int(f(find["high"]).sum()), f(find["high"]).size
      nd = stats.newcombe_difference(k1, n1, k2, n2)
      p = scipy.stats.fisher_exact([[k2, n2 - k2], [k1, n1 - k1]]).pvalue
      cell[m] = dict(effect=nd.difference, lo=nd.lo, hi=nd.hi, p=float(p))
    cells.append(cell)
  return cells


def decide_cells(cells: list[dict], measure: str, direction: str, excluded=None) -> list[str]:
  """Each cell's verdict on `measure` (Holm over the cells not `excluded`), in order."""
  tests = [dict(c[measure], dataset=c["dataset"], model=c["model"]) for c in cells]
  return [t["verdict"] for t in decide_family(tests, direction, excluded)]


def validity_flips(cells: list[dict], direction: str, excluded=None) -> list[tuple[dict, dict]]:
  """The cells whose high-effectiveness verdict differs between validity definitions:
  [(cell, {validity: verdict})]."""
  verdicts = {v: decide_cells(cells, f"high_{v}", direction, excluded) for v in metrics.VALIDITY}
  out = []
  for i, c in enumerate(cells):
    by = {v: verdicts[v][i] for v in metrics.VALIDITY}
    if len(set(by.values())) > 1:
      out.append((c, by))
  return out


# --------------------------------------------------------------------------------------------
# Minimal budgets and the effectiveness shares.


def budget_summaries(data: Sequence[StudyData]) -> list[dict]:
  """Per dataset x model x budget attack: quartiles of the budget in the attack's norm and of
  L2 / sqrt(D) at the minimal budget (cluster-bootstrap CIs), the fraction never broken."""
  out = []
  for d in data:
    for model in d.models():
      for attack in BUDGET_ATTACKS:
        row = d.budget_row(model, attack)
        if row is None:
          continue
        rec = d.record(row)
        b, src = budgets_of(rec), rec["source_index"]
        l2 = np.where(np.isfinite(b), np.asarray(rec["l2"], float), np.inf)
        l2n = l2 / math.sqrt(d.pixels) if d.pixels else None
        out.append(
          dict(
            dataset=d.name,
            model=model,
            attack=attack,
            eps=row.get("eps"),
            n=int(b.size),
            n_sources=n_sources(rec),
            budget=stats.median_ci(b, clusters=src),
            l2n=None if l2n is None else stats.median_ci(l2n, clusters=src),
            never=float(np.mean(np.isinf(b))),
            budgets=b,
          )
        )
  return out


MIN_NORMS = ("l2", "linf", "l1", "l0")


def _minimum_records(d: StudyData, model: str) -> list[tuple[str, dict]]:
  """(attack, record) of every classifier row of the model with a record on the same pairs
  as its first record: what its minimal perturbation is taken over."""
  recs = [
    (r.get("attack"), d.record(r)) for r in d.rows
    if r.get("model") == model and d.record(r) is not None and not r.get("judge")
  ]  # fmt: skip
  return [(a, rec) for a, rec in recs if same_pairs(recs[0][1], rec)]


def minimal_perturbations(d: StudyData, model: str) -> tuple[dict, np.ndarray] | None:
  """Per pair, the model's smallest successful perturbation over every attack and eps.

  A model's robustness on a pair is the minimum over the attacks (Schott et al. 2019, Table 1:
  each model's minimal adversarial per sample over all attacks), per norm separately: every
  record of `_minimum_records`, each pair's norms where its attack reached the target, +inf
  where no attack did.

  Returns:
    ({norm: float[P]} for `MIN_NORMS`, the pairs' source indices [P]), or None without
    records.
  """
  recs = [rec for _, rec in _minimum_records(d, model)]
  if not recs:
    return None
  best = {n: np.full(len(recs[0]["success"]), np.inf) for n in MIN_NORMS}
  for rec in recs:
    ok = np.asarray(rec["success"], bool)
    for n in MIN_NORMS:
      best[n] = np.minimum(best[n], np.where(ok, np.asarray(rec[n], np.float64), np.inf))
  return best, np.asarray(recs[0]["source_index"])


def minimal_perturbation_attacks(d: StudyData, model: str) -> list[str]:
  """The attacks `minimal_perturbations(d, model)` is taken over, sorted."""
  return sorted({a for a, _ in _minimum_records(d, model)})


def minimal_perturbation_summaries(d: StudyData, *, baseline: str = BASELINE) -> list[dict]:
  """Per model and norm: the median [CI] of `minimal_perturbations` and, for the models
  other than the baseline on the same pairs, Wilcoxon's paired test of model - baseline
  (computed once per StudyData)."""
  if ("minimal", baseline) not in d.cache:
    d.cache["minimal", baseline] = _minimal_perturbation_summaries(d, baseline)
  return d.cache["minimal", baseline]


def _minimal_perturbation_summaries(d: StudyData, baseline: str) -> list[dict]:
  base = minimal_perturbations(d, baseline)
  out = []
  for model in d.models():
    mine = minimal_perturbations(d, model)
    if mine is None:
      continue
    best, src = mine
    for n in MIN_NORMS:
      row = dict(dataset=d.name, model=model, norm=n, n=int(src.size), n_sources=n_sources(
        {"source_index": src}), median=stats.median_ci(best[n], clusters=src),
        never=float(np.mean(np.isinf(best[n]))), test=None,
        attacks=minimal_perturbation_attacks(d, model))  # fmt: skip
      if model != baseline and base is not None and np.array_equal(base[1], src):
        row["test"] = stats.wilcoxon_paired(base[0][n], best[n], clusters=src)
      out.append(row)
  return out


def h0_by_norm(
  data: Sequence[StudyData], *, baseline: str = BASELINE, pick=None, family=is_vae
) -> list[dict]:
  """H0 under other definitions of robustness (a sensitivity analysis of the primary
  endpoint): per dataset, model of the `family` (default the registered VAE classifiers,
  `is_vae`) and norm of `MIN_NORMS`, the paired Wilcoxon test of the per-pair minimal
  perturbation over every attack (`minimal_perturbation_summaries`), model − CNN. Tests in
  `decide_family`'s form (a family of their own, Holm over all of them). `pick(dataset,
  model)`: which models (default all)."""
  tests = []
  for d in data:
    for r in minimal_perturbation_summaries(d, baseline=baseline):
      if not family(r["model"]) or (pick is not None and not pick(d, r["model"])):
        continue
      t = r["test"]
      measured = t is not None and bool(np.isfinite(t.pvalue))
      val = lambda v, measured=measured: float(v) if measured else math.nan
      tests.append(dict(
        dataset=d.name, model=r["model"], norm=r["norm"], n=r["n"], n_sources=r["n_sources"],
        attacks=r["attacks"], p=val(t and t.pvalue), p_clustered=val(t and t.pvalue_clustered),
        effect=val(t and t.hodges_lehmann),
        lo=val(t and t.lo), hi=val(t and t.hi), skip=None if measured else "not measured",
      ))  # fmt: skip
  return tests


def is_generative(model) -> bool:
  """A generative classifier built from VAEs (ABS, the class-conditional VAE's Bayes
  classifier; `vae_attacks.models.GENERATIVE_CLASSIFIERS`): H0's second family."""
  return str(model) in models_lib.GENERATIVE_CLASSIFIERS


def h0_generative(data: Sequence[StudyData], *, baseline: str = BASELINE) -> list[dict]:
  """H0 for the generative classifiers (`GENERATIVE_ENDPOINT`): `h0_by_norm`'s tests of the
  generative family, each marked `primary` when its norm is `GENERATIVE_PRIMARY_NORM`."""
  tests = h0_by_norm(data, baseline=baseline, family=is_generative)
  return [dict(t, primary=t["norm"] == GENERATIVE_PRIMARY_NORM) for t in tests]


def h0_generative_matched(data: Sequence[StudyData]) -> list[dict]:
  """The generative classifiers against an accuracy-matched CNN (a control whose `match_to` is
  a generative classifier): per dataset, control and generative model, the primary endpoint's
  test (`GENERATIVE_PRIMARY_NORM`; paired Wilcoxon of model − control, clusters = source) on
  the pairs whose source the control classifies correctly (a control added to a finished part
  is attacked on its pairs, which it did not choose). One Holm family of its own."""
  norm, tests = GENERATIVE_PRIMARY_NORM, []
  for d in data:
    for control, target in d.matched.items():
      base = minimal_perturbations(d, control)
      if not is_generative(target) or base is None:
        continue
      keep = correct_pairs(d, control, _minimum_records(d, control)[0][1])
      src = base[1][keep]
      a = base[0][norm][keep]
      for model in d.models():
        mine = minimal_perturbations(d, model)
        if not is_generative(model) or mine is None or not np.array_equal(mine[1], base[1]):
          continue
        b = mine[0][norm][keep]
        w = stats.wilcoxon_paired(a, b, clusters=src)
        tests.append(dict(
          dataset=d.name, model=model, control=control, matched_to=target, norm=norm,
          n=int(a.size), n_sources=n_sources({"source_index": src}),
          n_excluded=int((~keep).sum()), median_control=stats.median_ci(a, clusters=src),
          median_model=stats.median_ci(b, clusters=src), p=w.pvalue,
          p_clustered=w.pvalue_clustered, effect=w.hodges_lehmann, lo=w.lo, hi=w.hi, skip=None,
        ))  # fmt: skip
  return tests


def clustered(tests: list[dict]) -> list[dict]:
  """Copies of tests with `p` replaced by `p_clustered` (the signed-rank test with the pairs of
  one source as a cluster, `stats.clustered_signed_rank`), for `decide_family`."""
  return [dict(t, p=t.get("p_clustered", math.nan)) for t in tests]


def effectiveness_shares(d: StudyData) -> tuple[list[str], dict, dict]:
  """Tables 2 and 3 of one dataset at the reference eps (`verdicts.reference_eps`).

  Returns:
    (columns "attack" or "attack (norm)", {column: eps}, {(model, column): (shares[4], n)}),
    shares in metrics.LEVELS order, from the records' levels (primary validity).
  """
  ref = reference_eps(d.rows)
  norms: dict[str, set] = {}
  for r in d.rows:
    norms.setdefault(r.get("attack"), set()).add(r.get("norm"))
  cols, eps_of, cells = [], {}, {}
  for r in d.rows:
    k = row_key(r)
    rec = d.record(r)
    if rec is None or num(r.get("eps")) != ref.get((k[0], k[2], k[3])):
      continue
    col = r.get("attack") if len(norms[r.get("attack")]) == 1 else f"{r.get('attack')} ({k[3]})"
    if col not in eps_of:
      cols.append(col)
      eps_of[col] = r.get("eps")
    levels = np.asarray(rec["level"]).ravel()
    counts = np.bincount(levels.astype(np.int64), minlength=len(metrics.LEVELS))
    cells[(r.get("model"), col)] = (counts / max(levels.size, 1), int(levels.size))
  return cols, eps_of, cells
