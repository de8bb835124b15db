"""The markdown of the study section (top of summary.md when the rows have per-pair records):
the primary endpoints and their verdicts, the secondary cell tests under every validity
definition, the minimal budgets, and Tables 2 and 3 (`experiments.report.study`)."""

import math
import pathlib
from collections.abc import Mapping, Sequence

from experiments.report import study
from experiments.report.study import BUDGET_NORMS, H0_ENDPOINT, H1_ENDPOINT, StudyData
from experiments.report.tables import DASH, details, rel, table
from vae_attacks import metrics, stats

WEAK_MARK = "†"
MEASURES = ("success", *(f"high_{v}" for v in metrics.VALIDITY))
MEASURE_NAMES = {
  "success": "success",
  **{f"high_{v}": f"high-eff. ({v})" for v in metrics.VALIDITY},
}


def fmt(v, digits: int = 3) -> str:
  """A number with `digits` significant digits, ∞ / −∞, or a dash (None, NaN)."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return DASH
  if math.isinf(v):
    return "∞" if v > 0 else "−∞"
  return f"{v:.{digits}g}"


def fmt_eci(effect, lo, hi) -> str:
  return f"{fmt(effect)} [{fmt(lo)}, {fmt(hi)}]"


def _model(name: str, dataset: str, weak: Mapping) -> str:
  pair = dataset.split(" vs ") if " vs " in dataset else [dataset]
  return f"{name}{WEAK_MARK}" if any((d, name) in weak for d in pair) else str(name)


def _tally(verdicts: Sequence[str]) -> str:
  n = len([v for v in verdicts if v in ("supported", "rejected", "not significant")])
  s, r = verdicts.count("supported"), verdicts.count("rejected")
  return f"{s} supported, {r} rejected, {n - s - r} not significant of {n}"


def _family_lines(tests, direction, weak_pred, key_cells, extra_cells, header) -> tuple:
  """A family's table (with and without weak models) and its two verdict lists."""
  every = study.decide_family(tests, direction)
  strong = study.decide_family(tests, direction, weak_pred)
  lines = []
  for t, s in zip(every, strong, strict=True):
    lines.append(
      [*key_cells(t), *extra_cells(t), fmt_eci(t["effect"], t["lo"], t["hi"])]
      + [fmt(t["p"]), fmt(t["p_holm"]), f"**{t['verdict']}**", s["verdict"]]
    )
  head = [*header, "p", "Holm p", "verdict", "verdict without weak models"]
  return table(head, lines), [t["verdict"] for t in every], [t["verdict"] for t in strong]


def _all_models(data) -> set:
  return {m for d in data for m in d.models()}


def _registered(d, _model) -> bool:
  """The registered H0 family: the datasets' parts (MNIST, LFW); the resolution parts' VAE
  classifiers are a secondary family of their own (`_h0_resolution`)."""
  return study.resolution_of(d.name) is None


def _h0_primary(data, weak) -> list[str]:
  tests = study.h0_primary(data, pick=_registered)
  parts = ["### H0: primary endpoint", ""]
  if not tests:
    return parts + ["**H0** (primary): **not measured** — no VAE classifier has rows.", ""]
  return parts + _h0_family(tests, weak, "primary", "(dataset, VAE) comparisons")


def _h0_resolution(data, weak) -> list[str]:
  """H0 in the resolution sweep (secondary): each part's VAE classifier vs its CNN."""
  tests = study.h0_primary(data, pick=lambda d, _: study.resolution_of(d.name) is not None)
  if not tests:
    return []
  return [
    "### H0 in the resolution sweep (secondary)",
    "",
    "The primary endpoint's test for the VAE classifier trained at each resolution of the "
    "sweep (the same faces; every test face a source) against that resolution's CNN; not part "
    "of the registered H0 family.",
    "",
    *_h0_family(tests, weak, "secondary", "resolutions"),
  ]


def _h0_family(tests, weak, kind: str, what: str) -> list[str]:
  pred = study.weak_test(weak)
  text, every, strong = _family_lines(
    tests,
    "greater",
    pred,
    lambda t: [t["dataset"], _model(t["model"], t["dataset"], weak)],
    lambda t: [
      f"{t['n']} ({t['n_sources']})",
      fmt(t.get("median_cnn")),
      fmt(t.get("median_vae")),
    ],
    ("dataset", "VAE", "pairs (sources)", "CNN median", "VAE median", "HL VAE − CNN [95% CI]"),
  )
  return [
    f"**H0** ({kind}, Holm over {len(every)} {what}): {_tally(every)}; "
    f"without weak models: {_tally(strong)}. Budgets are L∞ per pixel; ∞ = never broken "
    "within the search range; p: Wilcoxon signed-rank.",
    "",
    text,
    "",
  ]


def _h1_primary(data, weak) -> list[str]:
  names = sorted(d.name for d in data)
  parts = ["### H1 across datasets (MNIST vs LFW): primary endpoint", ""]
  if not {"lfw", "mnist"} <= set(names):
    return parts + [
      f"**H1** (primary): **not tested** — needs `{study.PRIMARY_ATTACK}` records of both MNIST "
      f"and LFW (this report has: {', '.join(names) or 'none'}).",
      "",
    ]
  tests = study.h1_primary(data)
  text, every, strong = _family_lines(
    tests,
    "less",
    study.weak_test(weak),
    lambda t: [_model(t["model"], t["dataset"], weak) + (" (primary)" if t["primary"] else "")],
    lambda t: [
      f"{t['n_low']} ({t.get('src_low', 0)})",
      f"{t['n_high']} ({t.get('src_high', 0)})",
      fmt(t.get("median_low")),
      fmt(t.get("median_high")),
    ],
    ("model", "MNIST pairs (sources)", "LFW pairs (sources)", "MNIST median", "LFW median")
    + ("median LFW − MNIST [95% CI]",),
  )
  primary = next((t for t in tests if t["primary"]), None)
  verdict = every[tests.index(primary)] if primary else "not measured"
  parts += [
    f"**H1** (primary, the CNN): **{verdict}**. The family (Holm over {len(every)} models): "
    f"{_tally(every)}; without weak models: {_tally(strong)}. p: Mann–Whitney.",
    "",
    text,
    "",
    *_h1_clustered(tests),
  ]
  return parts


def _h1_clustered(tests) -> list[str]:
  """The H1 family's verdicts with the pairs of one source as a cluster (sensitivity)."""
  plain = study.decide_family(tests, "less")
  alt = study.decide_family(study.clustered(tests), "less")
  lines, flips = [], []
  for t, c in zip(plain, alt, strict=True):
    if t.get("skip"):
      continue
    changed = c["verdict"] != t["verdict"]
    lines.append([
      t["model"], f"{t['n_low']} ({t.get('src_low', 0)})",
      f"{t['n_high']} ({t.get('src_high', 0)})",
      fmt(t["p_holm"]), fmt(c["p_holm"]), t["verdict"],
      f"**{c['verdict']}**" if changed else c["verdict"],
    ])  # fmt: skip
    if changed:
      flips.append(f"- `{t['model']}`: **{t['verdict']}** with pairs as independent, "
                   f"**{c['verdict']}** with sources as clusters")  # fmt: skip
  if not lines:
    return []
  head = ("model", "MNIST pairs (sources)", "LFW pairs (sources)", "Holm p")
  head += ("Holm p, sources as clusters", "verdict", "verdict, sources as clusters")
  return [
    "Mann–Whitney's p-value counts every pair as independent; a source attacked towards "
    "several targets gives correlated pairs. With the pairs of one source as a cluster (the "
    "same rank-sum statistic referred to random assignments of whole sources to the datasets, "
    "`stats.clustered_rank_sum`, normal approximation), Holm as above; the effects and their "
    "CIs (a bootstrap over sources) do not change:",
    "",
    table(head, lines),
    "",
    *(flips or ["No H1 verdict changes when the pairs of a source are a cluster."]),
    "",
  ]


def _h0_generative(data, weak) -> list[str]:
  """H0 for the generative classifiers (`study.GENERATIVE_ENDPOINT`): the primary family (Holm
  over the L2 tests), then every norm as a sensitivity analysis, and both with the pairs of
  one source as a cluster."""
  tests = study.h0_generative(data)
  if not any(not t.get("skip") for t in tests):
    return []
  primary = study.decide_family([t for t in tests if t["primary"]], "greater")
  primary_c = study.decide_family(study.clustered([t for t in tests if t["primary"]]), "greater")
  every = study.decide_family(tests, "greater")
  summaries = {
    (d.name, r["model"], r["norm"]): r
    for d in data
    for r in study.minimal_perturbation_summaries(d)
  }
  accuracy = {(d.name, m): a for d in data for m, a in d.accuracy.items()}

  def median(dataset, model, norm):
    r = summaries.get((dataset, model, norm))
    return None if r is None else r["median"].median

  def cnn_attacks(t):
    return summaries.get((t["dataset"], study.BASELINE, t["norm"]), {}).get("attacks", [])

  def line(t, c=None):
    acc = f"{fmt(accuracy.get((t['dataset'], t['model'])))} / "
    acc += fmt(accuracy.get((t["dataset"], study.BASELINE)))
    cells = [t["dataset"], _model(t["model"], t["dataset"], weak), t["norm"], acc,
             f"{t['n']} ({t['n_sources']})",
             _attack_set(t["attacks"], cnn_attacks(t)),
             fmt(median(t["dataset"], study.BASELINE, t["norm"])),
             fmt(median(t["dataset"], t["model"], t["norm"])),
             fmt_eci(t["effect"], t["lo"], t["hi"]), fmt(t["p"]), fmt(t["p_holm"]),
             f"**{t['verdict']}**"]  # fmt: skip
    return cells + ([fmt(c["p_holm"]), c["verdict"]] if c is not None else [])

  head = ["dataset", "model", "norm", "clean accuracy model / CNN", "pairs (sources)",
          "attacks", "CNN median", "model median", "HL model − CNN [95% CI]", "p", "Holm p",
          "verdict"]  # fmt: skip
  flips = [
    f"- {t['dataset']} `{t['model']}`, {t['norm']}: **{t['verdict']}** on its own norm's "
    f"family vs the primary's **{p['verdict']}**"
    for t in every
    for p in primary
    if not t.get("skip") and (t["dataset"], t["model"]) == (p["dataset"], p["model"])
    and t["norm"] != p["norm"] and t["verdict"] != p["verdict"]
  ]  # fmt: skip
  return [
    "### H0 for the generative classifiers (ABS, class-conditional VAE)",
    "",
    f"{study.GENERATIVE_ENDPOINT} Where a model's clean accuracy differs from the CNN's "
    "(the accuracy column), part of a difference may come from the accuracy rather than from "
    "the model being generative (an accuracy-matched CNN is the control).",
    "",
    f"**Primary** (Holm over {len([t for t in primary if not t.get('skip')])}): "
    f"{_tally([t['verdict'] for t in primary])}.",
    "",
    table(
      [*head, "Holm p, sources as clusters", "verdict, sources as clusters"],
      [line(t, c) for t, c in zip(primary, primary_c, strict=True) if not t.get("skip")],
    ),
    "",
    f"**Every norm** (sensitivity; Holm over all {len([t for t in every if not t.get('skip')])}):",
    "",
    table(head, [line(t) for t in every if not t.get("skip")]),
    "",
    *(flips or ["Every norm gives the primary endpoint's verdict."]),
    "",
    *_h0_generative_matched(data, weak, accuracy),
  ]


GEN_NORM = study.GENERATIVE_PRIMARY_NORM.upper()


def _h0_generative_matched(data, weak, accuracy) -> list[str]:
  """The generative family against the accuracy-matched CNN (`study.h0_generative_matched`),
  with its verdicts with the pairs of one source as a cluster; `accuracy`: {(dataset, model):
  clean accuracy}."""
  tests = study.h0_generative_matched(data)
  if not tests:
    return []
  plain = study.decide_family(tests, "greater")
  alt = study.decide_family(study.clustered(tests), "greater")
  lines = []
  for t, c in zip(plain, alt, strict=True):
    mc, mm = t["median_control"], t["median_model"]
    lines.append([
      t["dataset"], _model(t["model"], t["dataset"], weak),
      f"`{t['control']}` (matched to `{t['matched_to']}`)",
      f"{fmt(accuracy.get((t['dataset'], t['model'])))} / "
      f"{fmt(accuracy.get((t['dataset'], t['control'])))}",
      f"{t['n']} ({t['n_sources']}); {t['n_excluded']} left out",
      fmt_eci(mc.median, mc.median_lo, mc.median_hi),
      fmt_eci(mm.median, mm.median_lo, mm.median_hi),
      fmt_eci(t["effect"], t["lo"], t["hi"]), fmt(t["p"]), fmt(t["p_holm"]),
      f"**{t['verdict']}**", fmt(c["p_holm"]), c["verdict"],
    ])  # fmt: skip
  head = ["dataset", "model", "control", "clean accuracy model / control",
          "pairs (sources); left out: the control misclassifies the source",
          f"control median {GEN_NORM}", f"model median {GEN_NORM}",
          "HL model − control [95% CI]", "p", "Holm p", "verdict",
          "Holm p, sources as clusters", "verdict, sources as clusters"]  # fmt: skip
  return [
    f"**At matched clean accuracy** (control; Holm over {len(tests)}): the primary endpoint "
    "against the CNN stopped where its test accuracy reached the generative classifier's "
    "(same architecture and training as the CNN, evaluated every few thousand examples), on "
    "the pairs whose source that CNN classifies correctly. A margin that holds here does not "
    "come from the generative classifier's lower accuracy: "
    f"{_tally([t['verdict'] for t in plain])}.",
    "",
    table(head, lines),
    "",
  ]


def _h0_matched(data) -> list[str]:
  tests = study.h0_matched(data)
  if not tests:
    return []
  every = study.decide_family(tests, "greater")
  lines = [
    [t["dataset"], t["model"], t["baseline"], f"{fmt(t.get('acc_vae'))} / {fmt(t.get('acc_cnn'))}",
     f"{t['n']} ({t['n_sources']})", fmt(t.get("median_cnn")), fmt(t.get("median_vae")),
     fmt_eci(t["effect"], t["lo"], t["hi"]), fmt(t["p"]), fmt(t["p_holm"]), f"**{t['verdict']}**"]
    for t in every
  ]  # fmt: skip
  head = ["dataset", "VAE", "control", "clean accuracy VAE / control", "pairs (sources)",
          "control median", "VAE median", "HL VAE − control [95% CI]", "p", "Holm p",
          "verdict"]  # fmt: skip
  return [
    "### H0 at matched clean accuracy",
    "",
    "The same test as the primary endpoint, against a CNN of the same architecture and training "
    "stopped after the first epoch whose test accuracy reached the VAE classifier's (the "
    "accuracy-matched control), on the same pairs; Holm over this family. A VAE that needs a "
    "smaller budget than the full CNN but not than the matched one is less robust *because* it "
    f"is a weaker classifier, not because it is a VAE: {_tally([t['verdict'] for t in every])}.",
    "",
    table(head, lines),
    "",
  ]


# H1 within LFW per model of the resolution parts: the registered primary (the CNN) first, then
# the secondary analyses (one Holm family of their own): the CNNs stopped at one clean accuracy
# (the control for the accuracy that falls with the resolution) and the jointly trained VAEs.
H1_RESOLUTION_MODELS = (
  ("cnn", "primary", "the CNN"),
  ("cnn_matched", "secondary, accuracy-matched control", "the CNN stopped at one clean accuracy"),
  ("joint_vae", "secondary", "the jointly trained VAE classifier"),
)


def _h0_by_norm(data, primary) -> list[str]:
  """H0's sensitivity to the definition of robustness: the minimal perturbation over every
  attack, in each norm, VAE − CNN, beside the primary endpoint's verdict."""
  tests = study.decide_family(study.h0_by_norm(data, pick=_registered), "greater")
  if not tests:
    return []
  first = {(t["dataset"], t["model"]): t["verdict"] for t in primary}
  lines, flips = [], {}
  for t in tests:
    key = (t["dataset"], t["model"])
    same = first.get(key) == t["verdict"]
    if t["verdict"] in ("supported", "rejected", "not significant") and not same:
      flips.setdefault(key, []).append(f"{t['norm']}: {t['verdict']}")
    lines.append([
      t["dataset"], t["model"], t["norm"], str(len(t["attacks"])), f"{t['n']} ({t['n_sources']})",
      fmt_eci(t["effect"], t["lo"], t["hi"]), fmt(t["p"]), fmt(t["p_holm"]), f"**{t['verdict']}**",
      DASH if key not in first else ("yes" if same else "**no**"),
    ])  # fmt: skip
  head = ("dataset", "VAE", "norm", "attacks", "pairs (sources)", "HL VAE − CNN [95% CI]", "p")
  head += ("Holm p", "verdict", "same as the primary endpoint's")
  summary = [
    f"- {ds} `{m}`: primary **{first[(ds, m)]}**; " + "; ".join(f) + " — **the verdict depends "
    "on the definition of robustness**"
    for (ds, m), f in flips.items() if (ds, m) in first
  ]  # fmt: skip
  return [
    "### H0 under other definitions of robustness (sensitivity)",
    "",
    "Not the registered test: per pair the smallest successful perturbation over every attack "
    "of the model (the table below), in each norm, VAE − CNN; paired Wilcoxon, Holm over these "
    f"{len(tests)} tests. A verdict that differs from the primary endpoint's is listed.",
    "",
    table(head, lines),
    "",
    *(summary or ["Every measured norm gives the primary endpoint's verdict."]),
    "",
  ]


def _h0_clustered(data) -> list[str]:
  """The H0 families' verdicts with the pairs of one source as a cluster (a sensitivity
  analysis of the p-values; the effects and their cluster-bootstrap CIs are the same)."""
  families = (
    ("primary", study.h0_primary(data, pick=_registered)),
    ("matched accuracy", study.h0_matched(data)),
    ("every attack, by norm", study.h0_by_norm(data, pick=_registered)),
  )
  lines, flips = [], []
  for family, tests in families:
    plain = study.decide_family(tests, "greater")
    alt = study.decide_family(study.clustered(tests), "greater")
    for t, c in zip(plain, alt, strict=True):
      if t.get("skip"):
        continue
      norm = t.get("norm", "L∞ (`bim_min`)")
      changed = c["verdict"] != t["verdict"]
      lines.append([
        family, t["dataset"], t["model"], t.get("baseline", study.BASELINE), norm,
        f"{t['n']} ({t['n_sources']})", fmt(t["p_holm"]), fmt(c["p_holm"]), t["verdict"],
        f"**{c['verdict']}**" if changed else c["verdict"],
      ])  # fmt: skip
      if changed:
        flips.append(
          f"- {family}: {t['dataset']} `{t['model']}` vs `{t.get('baseline', study.BASELINE)}`, "
          f"{norm}: **{t['verdict']}** with pairs as independent, **{c['verdict']}** with "
          "sources as clusters"
        )
  if not lines:
    return []
  head = ("family", "dataset", "VAE", "against", "norm", "pairs (sources)", "Holm p")
  head += ("Holm p, sources as clusters", "verdict", "verdict, sources as clusters")
  return [
    "### H0 with the pairs of one source as a cluster (sensitivity)",
    "",
    "A source image is attacked towards several targets (the pairs (sources) columns), so the "
    "pairs of one source are not independent, and Wilcoxon's p-value, whose variance counts "
    "every pair as independent, can be too small. Here the same signed-rank statistic is "
    "referred to its distribution under sign flips of whole sources (swapping the two models' "
    "budgets on every pair of a source; `stats.clustered_signed_rank`, normal approximation, "
    "which needs many sources), then Holm within each family as above. The effects and their "
    "CIs (a bootstrap over sources) do not change. H1 across datasets has the same "
    "analysis in its section (`stats.clustered_rank_sum`); H1 within LFW (Page's L) has one "
    "face per block.",
    "",
    table(head, lines),
    "",
    *(flips or ["No verdict changes when the pairs of a source are a cluster."]),
    "",
  ]


def _h1_resolution(data) -> list[str]:
  results = [(m, kind, what, study.h1_resolution(data, baseline=m)) for m, kind, what in
             H1_RESOLUTION_MODELS]  # fmt: skip
  results = [x for x in results if x[3] is not None]
  if not results:
    return []
  parts = ["### H1 within LFW: the same faces at several resolutions", ""]
  secondary = [i for i, x in enumerate(results) if x[1] != "primary" and "skip" not in x[3]]
  holm = dict(zip(secondary, stats.holm([results[i][3]["p"] for i in secondary]), strict=True))
  for i, (model, kind, what, r) in enumerate(results):
    parts += _h1_resolution_one(model, kind, what, r, holm.get(i))
  return parts


def _h1_resolution_one(model, kind, what, r, p_holm) -> list[str]:
  if "skip" in r:
    return [f"**H1 within LFW, {what}** ({kind}): not tested — {r['skip']}.", ""]
  order = ", ".join(f"{s}x{s}" for s, _ in r["order"])
  p_decide = r["p"] if p_holm is None else p_holm
  verdict = "supported" if p_decide < study.ALPHA and r["effect"] > 0 else (
    "not significant" if p_decide >= study.ALPHA else "rejected"
  )  # fmt: skip
  rows = []
  for (size, grey), m in sorted(r["medians"].items(), key=lambda kv: (-kv[0][0], kv[0][1])):
    acc = r["accuracy"].get((size, grey))
    rows.append([f"{size}x{size}{' grey' if grey else ''}", fmt(acc),
                 fmt_eci(m.median, m.median_lo, m.median_hi)])  # fmt: skip
  lo_s, hi_s = r["order"][-1][0], r["order"][0][0]
  holm_text = "" if p_holm is None else f", Holm-adjusted over the secondary tests {fmt(p_holm)}"
  parts = [
    f"**H1 within LFW, {what}** (`{model}`; {kind}: Page's L test of its minimal L∞ budget "
    f"increasing from the most pixels to the fewest, {order}, on the {r['n']} of {r['n_all']} "
    f"pairs ({r['n_sources']} faces) that every resolution's `{model}` classifies correctly): "
    f"**{verdict}** (L = {fmt(r['page_l'], 6)}, one-sided p = {fmt(r['p'])}{holm_text}"
    f"{'; with two resolutions L reduces to the sign test' if len(r['order']) == 2 else ''}). "
    "Effect: "
    f"budget at {lo_s}x{lo_s} − at {hi_s}x{hi_s}, Hodges–Lehmann "
    f"{fmt_eci(r['effect'], r['lo'], r['hi'])} (Wilcoxon p = {fmt(r['p_wilcoxon'])}).",
    "",
    table(["resolution", f"`{model}` clean accuracy", "median budget [95% CI]"], rows),
    "",
  ]
  if "grey" in r:
    g = r["grey"]
    parts += [
      f"Grey vs colour at {g['size']}x{g['size']} for `{model}` (one channel instead of three, "
      f"same grid): Hodges–Lehmann grey − colour {fmt_eci(g['effect'], g['lo'], g['hi'])}, "
      f"Wilcoxon p = {fmt(g['p'])}.",
      "",
    ]
  return parts


def _cells(cells, direction, weak, keys, header, title) -> list[str]:
  """A secondary family: tallies per measure with and without weak models, the flips between
  validity definitions, and every cell (collapsed)."""
  if not cells:
    return [f"{title}: no cells with per-pair records on both sides.", ""]
  pred = study.weak_test(weak)
  every = {m: study.decide_cells(cells, m, direction) for m in MEASURES}
  strong = {m: study.decide_cells(cells, m, direction, pred) for m in MEASURES}
  tallies = [[MEASURE_NAMES[m], _tally(every[m]), _tally(strong[m])] for m in MEASURES]
  parts = [table(("measure", "all models", "without weak models"), tallies), ""]
  flips = study.validity_flips(cells, direction)
  if flips:
    listed = "; ".join(
      ", ".join(k(c) for _, k in keys) + ": " + ", ".join(f"{v} {w}" for v, w in by.items())
      for c, by in flips
    )
    parts += [f"Validity flips (the high-effectiveness verdict differs): {listed}.", ""]
  else:
    parts += ["Validity flips: none (every high-effectiveness verdict is the same under "
              f"{', '.join(metrics.VALIDITY)}).", ""]  # fmt: skip
  lines = []
  for i, c in enumerate(cells):
    line = [k(c) for _, k in keys]
    for m in MEASURES:
      line += [fmt_eci(c[m]["effect"], c[m]["lo"], c[m]["hi"]), fmt(c[m]["p"]), every[m][i]]
    lines.append(line)
  head = [h for h, _ in keys]
  for m in MEASURES:
    head += [f"{MEASURE_NAMES[m]} {header} [CI]", "p", "verdict"]
  parts += [details(f"{title}: every cell ({len(cells)})", table(head, lines)), ""]
  return parts


def _h0_cells(data, weak) -> list[str]:
  keys = [
    ("dataset", lambda c: c["dataset"]),
    ("VAE", lambda c: _model(c["model"], c["dataset"], weak)),
    ("attack", lambda c: c["attack"]),
    ("norm", lambda c: c["norm"]),
    ("eps", lambda c: fmt(c["eps"], 4)),
    ("pairs (sources)", lambda c: f"{c['n']} ({c['n_sources']})"),
    ("Cochran Q p (models)", lambda c: f"{fmt(c['cochran_p'])} ({c['cochran_m']})"),
  ]
  intro = (
    "Secondary (H0 cells): per (dataset, attack, norm, eps) and VAE, the difference VAE − CNN "
    "in success rate and in high-effectiveness rate under each validity definition on the same "
    "pairs (95% CI: Newcombe's paired interval, a cluster bootstrap over sources when a source "
    "is reused), exact McNemar p, Holm over the cells per measure; a cell supports H0 when the "
    "VAE's rate is significantly lower. Cochran's Q compares every model of the run on the pairs."
  )
  return ["### Secondary: the cells", "", intro, ""] + _cells(
    study.h0_cells(data), "less", weak, keys, "VAE − CNN", "H0 cells"
  )


def _h1_cells(data, weak) -> list[str]:
  if not {"lfw", "mnist"} <= {d.name for d in data}:
    return []
  keys = [
    ("model", lambda c: _model(c["model"], c["dataset"], weak)),
    ("attack", lambda c: c["attack"]),
    ("norm", lambda c: c["norm"]),
    ("eps MNIST", lambda c: fmt(c["eps"], 4)),
    ("eps LFW", lambda c: fmt(c["eps_high"], 4)),
    ("pairs (sources) MNIST / LFW", lambda c: f"{c['n_low']} ({c['src_low']}) / "
     f"{c['n_high']} ({c['src_high']})"),
  ]  # fmt: skip
  intro = (
    "Secondary (H1 cells): LFW vs MNIST at comparable budgets (as in the H1 verdict below), "
    "Newcombe's difference LFW − MNIST, Fisher's exact p, Holm per measure; a cell supports H1 "
    "when LFW's rate is significantly higher."
  )
  return [intro, ""] + _cells(
    study.h1_cells(data), "greater", weak, keys, "LFW − MNIST", "H1 cells"
  )


def _budgets(data, weak) -> list[str]:
  rows = study.budget_summaries(data)
  if not rows:
    return []
  lines = []
  for b in rows:
    s, l2 = b["budget"], b["l2n"]
    lines.append(
      [
        b["dataset"],
        _model(b["model"], b["dataset"], weak),
        f"{b['attack']} ({BUDGET_NORMS[b['attack']]})",
        fmt(b["eps"], 4),
        f"{b['n']} ({b['n_sources']})",
        fmt_eci(s.median, s.median_lo, s.median_hi),
        fmt_eci(s.q25, s.q25_lo, s.q25_hi),
        fmt_eci(s.q75, s.q75_lo, s.q75_hi),
        DASH if l2 is None else fmt_eci(l2.median, l2.median_lo, l2.median_hi),
        fmt(b["never"]),
      ]
    )
  head = ("dataset", "model", "attack (norm)", "search range / C", "pairs (sources)")
  head += ("median [95% CI]", "q25 [CI]", "q75 [CI]", "L2/√D median [CI]", "never broken")
  return [
    "### Minimal budgets",
    "",
    "Per pair, the smallest budget that broke it (bim_min, bim_l1_min: bisection, an upper "
    "bound within eps/2^n; lbfgs_c_search: the L2 norm of the smallest successful "
    "perturbation), in the attack's norm and as L2/√D (D pixel values), ∞ = never broken; "
    "intervals: cluster bootstrap over sources.",
    "",
    table(head, lines),
    "",
  ]


def _attack_set(attacks: list[str], baseline: list[str]) -> str:
  """How many attacks a model's minimum is over, and how the set differs from the CNN's."""
  extra, missing = sorted(set(attacks) - set(baseline)), sorted(set(baseline) - set(attacks))
  notes = ([f"+{', '.join(extra)}"] if extra else []) + (
    [f"without {', '.join(missing)}"] if missing else []
  )
  return f"{len(attacks)}" + (f" ({'; '.join(notes)})" if notes else "")


def _minimal(data, weak) -> list[str]:
  lines = []
  for d in data:
    rows = study.minimal_perturbation_summaries(d)
    base = next((r["attacks"] for r in rows if r["model"] == study.BASELINE), [])
    for r in rows:
      m, t = r["median"], r["test"]
      lines.append([
        r["dataset"], _model(r["model"], r["dataset"], weak), r["norm"],
        _attack_set(r["attacks"], base),
        f"{r['n']} ({r['n_sources']})", fmt_eci(m.median, m.median_lo, m.median_hi),
        fmt(r["never"]),
        DASH if t is None else fmt_eci(t.hodges_lehmann, t.lo, t.hi),
        DASH if t is None else fmt(t.pvalue, 4),
      ])  # fmt: skip
  if not lines:
    return []
  head = ("dataset", "model", "norm", "attacks", "pairs (sources)", "median [95% CI]")
  head += ("never broken", f"HL shift vs {study.BASELINE} [CI]", "Wilcoxon p")
  return [
    "### Minimal perturbation over all attacks",
    "",
    "Per pair, the smallest successful perturbation over every classifier attack and eps of "
    "the model (the robustness measure of Schott et al. 2019, Table 1), per norm; ∞ = no "
    "attack reached the target. Paired against the CNN on the same pairs: Wilcoxon "
    "signed-rank, Hodges-Lehmann shift (model − CNN) with a cluster-bootstrap CI. `attacks`: "
    "how many attacks the minimum is over, and where the set differs from the CNN's (a model "
    "missing one of the CNN's attacks is not yet compared like with like).",
    "",
    table(head, lines),
    "",
  ]


def _shares(data, weak) -> list[str]:
  parts = []
  for number, d in enumerate(data, start=2):
    cols, eps_of, cells = study.effectiveness_shares(d)
    if not cols:
      continue
    point = ", ".join(f"{c} {fmt(eps_of[c], 4)}" for c in cols)
    lines = []
    for m in dict.fromkeys(m for m, _ in cells):
      line = [_model(m, d.name, weak)]
      for c in cols:
        sh = cells.get((m, c))
        line.append(DASH if sh is None else " / ".join(f"{s:.2f}" for s in sh[0]) + f" ({sh[1]})")
      lines.append(line)
    parts += [
      f"**Table {number} ({d.name.upper()})**: shares high / moderate / low / ineffective "
      f"(validity: SSIM) of each model x attack, (pairs), at the operating point: each "
      f"attack's reference eps ({point}).",
      "",
      table(("model", *cols), lines),
      "",
    ]
  return ["### Tables 2 and 3: effectiveness at the operating point", "", *parts] if parts else []


def study_markdown(
  data: Sequence[StudyData],
  *,
  floor: float = study.WEAK_FLOOR,
  figures: Sequence[pathlib.Path] = (),
  out_dir: pathlib.Path | None = None,
) -> str:
  """The study section for datasets with per-pair records."""
  weak = study.weak_models(data, floor)
  if weak:
    listed = ", ".join(f"{d}: {m} ({a:.3g})" for (d, m), a in weak.items())
  else:
    listed = "none"
  parts = [
    "## The study: primary endpoints and statistics",
    "",
    "Each hypothesis' verdict is the test of one primary endpoint declared in advance (README "
    '"The study: primary endpoints and statistics"); the cell tables are secondary evidence.',
    "",
    f"- {H0_ENDPOINT}",
    f"- {H1_ENDPOINT}",
    *(
      [f"- {study.GENERATIVE_ENDPOINT}"] if any(map(study.is_generative, _all_models(data))) else []
    ),
    "",
    f"Weak models (clean accuracy below {floor:g} x the dataset's best; marked {WEAK_MARK} in "
    f"every table, verdicts given with and without them): {listed}.",
    "",
    *_h0_primary(data, weak),
    *_h0_matched(data),
    *_h0_by_norm(data, study.decide_family(study.h0_primary(data, pick=_registered), "greater")),
    *_h0_clustered(data),
    *_h0_generative(data, weak),
    *_h1_primary(data, weak),
    *_h1_resolution(data),
    *_h0_resolution(data, weak),
    *_h0_cells(data, weak),
    *_h1_cells(data, weak),
    *_budgets(data, weak),
    *_minimal(data, weak),
    *_shares(data, weak),
  ]
  if figures:
    parts += ["### Study figures", ""]
    for p in figures:
      parts += [f"![{p.stem}]({rel(p, out_dir) if out_dir else p})", ""]
  return "\n".join(parts)
