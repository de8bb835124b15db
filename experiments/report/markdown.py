"""The markdown of summary.md: how to read it, the verdicts, and one section per dataset."""

import collections
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence

from experiments.report.defenses import defense_markdown
from experiments.report.rows import (
  PENALTY_PREFIXES,
  DatasetView,
  attack_family,
  num,
  row_key,
)
from experiments.report.tables import (
  DASH,
  DEFENCE_FIGURES,
  FULL_HEADER,
  REFERENCE_HEADER,
  auddc_lines,
  details,
  fmt_ci,
  fmt_num,
  fmt_rate,
  full_line,
  reference_line,
  rel,
  sort_rows,
  stage_seconds,
  stage_table,
  table,
  train_table,
  weak_model_warnings,
)
from experiments.report.verdicts import (
  H1_TEXT,
  MIN_REFERENCE_VALIDITY,
  h0_verdict,
  h1_verdict,
  reference_eps,
)
from vae_attacks.attacks import registry

# The model x attack tables' headings by registry family (another family: "<family> attacks").
FAMILY_TITLES = {"classifier": "classifier attacks", "vae": "VAE attacks"}
UNKNOWN_TITLE = "attacks not in the registry"


def how_to_read(present: Iterable[str] = ()) -> str:
  """The report's reading notes. The attack lists come from the registry: the attacks the
  configs run by default, and any other the report's rows hold (`present`)."""
  present = set(present)
  listed = [n for n, spec in registry.ATTACKS.items() if spec.default_enabled or n in present]
  vae_attacks = ", ".join(n for n in listed if registry.ATTACKS[n].family == "vae")
  penalties = ", ".join(n for n in listed if registry.is_penalty(n))
  return f"""\
How to read this report:
- **Reference eps** (model x attack tables): per (dataset, attack, norm), the strongest setting
  -- the largest budget eps, or for penalty attacks ({penalties},
  {", ".join(p + "*" for p in PENALTY_PREFIXES)}: eps is the weight C on the distortion) the
  smallest C -- at which every model with a row there has
  validity rate >= {MIN_REFERENCE_VALIDITY}; the weakest setting when none does. Every eps is in
  the full tables.
- Intervals are 95%: Wilson score for rates, Student t for means; {DASH} where undefined
  (too few pairs).
- Effectiveness of one pair: high = valid and confident, moderate = confident not valid,
  low = valid not confident, ineffective = neither (valid: SSIM and norm bounds of the run's
  `eval` config; confident: target probability >= its confidence_min). A VAE is attacked as a
  classifier through its latent classifier; its test accuracy is that classifier's. VAE
  attacks ({vae_attacks}, ...) succeed when the judge (the CNN) classifies the
  VAE's reconstruction of the adversarial input as the target.
- Verdicts: a cell differs significantly when one 95% interval lies entirely on one side of the
  other; a hypothesis is *supported* when a strict majority of its cells differs in its
  direction, *rejected* when a strict majority differs against it, else *inconclusive*.
"""


# --------------------------------------------------------------------------------------------
# The verdicts.


def _pairs_text(rng) -> str:
  if not rng:
    return DASH
  return str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}–{rng[1]}"


def _side_text(side: Mapping, measure: str) -> str:
  return f"{fmt_rate(side[measure])} {fmt_ci(side[f'{measure}_ci'])} ({side['n']})"


def _skipped_text(tally: Mapping) -> str:
  return f", {tally['skipped']} without an interval" if tally["skipped"] else ""


def _per_attack_table(per_attack: Mapping, favour: str, against: str) -> str:
  lines = []
  for attack, t in per_attack.items():
    s, e = t["success"], t["effective"]
    lines.append(
      [attack, str(s["total"]), str(s["favour"]), str(s["against"]), str(s["same"])]
      + [str(e["favour"]), str(e["against"]), str(e["same"])]
    )
  header = (
    "attack",
    "cells",
    f"success: {favour}",
    f"success: {against}",
    "success: n.s.",
    f"high-eff.: {favour}",
    f"high-eff.: {against}",
    "high-eff.: n.s.",
  )
  return table(header, lines)


def _cells_details(summary: str, cells: Sequence[Mapping], keys: Sequence, ref, other) -> str:
  """A verdict's cells in a collapsed table: the `keys` columns ((header, cell -> text)), then
  success and high-effectiveness of the reference side and the other side and how they compare.

  `ref` and `other` are (side field of a cell, its name in the headers)."""
  (ref_side, ref_name), (side, name) = ref, other
  vs = f"{name} vs {ref_name}"
  header = [h for h, _ in keys]
  header += [f"{ref_name} success [CI] (n)", f"{name} success [CI] (n)", vs]
  header += [f"{ref_name} high-eff. [CI]", f"{name} high-eff. [CI]", f"{vs} (eff.)"]
  lines = []
  for c in cells:
    line = [text(c) for _, text in keys]
    for measure in ("success", "effective"):
      line += [_side_text(c[ref_side], measure), _side_text(c[side], measure)]
      line.append(str(c[measure] or DASH))
    lines.append(line)
  return details(summary, table(header, lines))


def _key_columns(*names: str) -> list:
  return [(n, lambda c, n=n: str(c[n])) for n in names]


def h0_markdown(v: Mapping, where: str) -> str:
  """The H0 paragraph of `h0_verdict`'s answer, its per-attack tally and its cells."""
  s, e = v["success"], v["effective"]
  if s["total"] == 0 and s["skipped"] == 0:
    return (
      f"**H0** ({v['hypothesis']}), {where}: **not tested** — no (attack, eps) cell has rows of "
      "both the CNN and a VAE."
    )
  lines = [
    f"**H0** ({v['hypothesis']}), {where}: by success rate **{s['verdict']}** — in "
    f"{s['favour']} of {s['total']} (dataset, attack, norm, eps, VAE) cells the VAE's 95% "
    f"Wilson interval lies entirely below the CNN's (significantly less vulnerable), "
    f"{s['against']} entirely above (significantly more), {s['same']} not distinguishable"
    + _skipped_text(s)
    + f". Pairs per cell: CNN {_pairs_text(v['pairs']['baseline'])}, "
    f"VAE {_pairs_text(v['pairs']['vae'])}.",
    "",
    f"By high-effectiveness rate (valid and confident): **{e['verdict']}** — VAE "
    f"significantly less {e['favour']}, more {e['against']}, not distinguishable {e['same']} "
    f"of {e['total']}.",
    "",
    _per_attack_table(v["per_attack"], "VAE less", "VAE more"),
    "",
  ]
  keys = [*_key_columns("dataset"), ("VAE", lambda c: str(c["model"]))]
  keys += [*_key_columns("attack", "norm"), ("eps", lambda c: fmt_num(c["eps"]))]
  lines.append(_cells_details("H0 cells", v["cells"], keys, ("baseline", "CNN"), ("vae", "VAE")))
  return "\n".join(lines)


def h1_markdown(v: Mapping) -> str:
  """The H1 paragraph of `h1_verdict`'s answer, its scope, per-attack tally and cells."""
  s, e = v["success"], v["effective"]
  scope = (
    f"norms compared: {', '.join(v['norms']) or 'none'} (L-inf eps as is; L2 budgets scaled "
    f"by sqrt(D_lfw / D_mnist) = {math.sqrt(v['pixel_ratio']):.3g}, L1 by "
    f"{v['pixel_ratio']:.4g}); "
    f"{v['unmatched']} MNIST rows had no LFW row at the comparable budget"
    + (
      f"; left out (eps is a penalty weight, not a budget): {', '.join(v['excluded'])}"
      if v["excluded"]
      else ""
    )
  )
  if s["total"] == 0 and s["skipped"] == 0:
    return f"**H1** ({v['hypothesis']}): **not tested** — no comparable cells; {scope}."
  lines = [
    f"**H1** ({v['hypothesis']}): by success rate **{s['verdict']}** — in {s['favour']} of "
    f"{s['total']} (model, attack, norm, eps) cells the LFW 95% Wilson interval lies entirely "
    f"above the MNIST one (attack significantly more effective on LFW), {s['against']} "
    f"entirely below, {s['same']} not distinguishable"
    + _skipped_text(s)
    + f". Pairs per cell: LFW {_pairs_text(v['pairs']['high'])}, "
    f"MNIST {_pairs_text(v['pairs']['low'])}.",
    "",
    f"By high-effectiveness rate: **{e['verdict']}** — LFW significantly higher "
    f"{e['favour']}, lower {e['against']}, not distinguishable {e['same']} of {e['total']}.",
    "",
    f"Scope: {scope}.",
    "",
    _per_attack_table(v["per_attack"], "LFW higher", "LFW lower"),
    "",
  ]
  keys = _key_columns("model", "attack", "norm")
  keys += [
    ("eps MNIST", lambda c: fmt_num(c["eps"])),
    ("eps LFW", lambda c: fmt_num(c["eps_high"])),
  ]
  lines.append(_cells_details("H1 cells", v["cells"], keys, ("low", "MNIST"), ("high", "LFW")))
  return "\n".join(lines)


def _verdicts(views: Sequence[DatasetView]) -> list[str]:
  rows = [r for v in views for r in v.rows]
  parts = []
  for v in views:
    parts += [h0_markdown(h0_verdict(v.rows), v.name.upper()), ""]
  if len(views) > 1:
    parts += [h0_markdown(h0_verdict(rows), "all datasets together"), ""]
  names = {v.name for v in views}
  if {"lfw", "mnist"} <= names:
    pixels = {v.name: v.pixels for v in views if v.pixels}
    parts += [h1_markdown(h1_verdict(rows, pixels=pixels)), ""]
  else:
    parts += [
      f"**H1** ({H1_TEXT}): **not tested** — needs results of both MNIST and LFW "
      f"(this report has: {', '.join(sorted(names)) or 'none'}; see write_combined_report).",
      "",
    ]
  return parts


# --------------------------------------------------------------------------------------------
# One dataset.


def _reference_tables(rows: Sequence[Mapping]) -> list[str]:
  """The model x attack tables at the reference eps, one per registry family of attacks, then
  one of the attacks the registry does not know (named, so that none passes unnoticed)."""
  ref = reference_eps(rows)
  chosen = [r for r in rows if num(r.get("eps")) == ref.get(row_key(r)[:1] + row_key(r)[2:4])]
  families = list(dict.fromkeys(spec.family for spec in registry.ATTACKS.values()))
  parts = []
  for family in [*families, None]:
    these = [r for r in chosen if attack_family(r.get("attack")) == family]
    if not these:
      continue
    title = UNKNOWN_TITLE if family is None else FAMILY_TITLES.get(family, f"{family} attacks")
    parts += [f"### Model x attack at the reference eps: {title}", ""]
    if family is None:
      names = ", ".join(dict.fromkeys(str(r.get("attack")) for r in sort_rows(these)))
      parts += [
        f"Not in vae_attacks/attacks/registry.py, so of no known family: {names}.",
        "",
      ]
    parts += [table(REFERENCE_HEADER, [reference_line(r) for r in sort_rows(these)]), ""]
  return parts


def _figure_links(model_figs: Mapping[str, list], out_dir: pathlib.Path) -> list[str]:
  """Each model's first figure shown, the rest collapsed."""
  if not any(paths for m, paths in model_figs.items() if m != DEFENCE_FIGURES):
    return []
  parts = ["### Figures", ""]
  for model, paths in model_figs.items():
    if not paths or model == DEFENCE_FIGURES:
      continue
    first, rest = paths[0], paths[1:]
    parts += [f"**{model}**", "", f"![{model}: {first.stem}]({rel(first, out_dir)})", ""]
    if rest:
      body = "\n\n".join(f"![{p.stem}]({rel(p, out_dir)})" for p in rest)
      parts += [details(f"{model}: examples and curves ({len(rest)} figures)", body), ""]
  return parts


def _dataset_section(
  v: DatasetView, out_dir: pathlib.Path, model_figs: Mapping, weak_floor: float
) -> list[str]:
  parts = [f"## {v.name.upper()}", ""]
  where = ", ".join(
    "this folder" if rel(w, out_dir) == "." else f"`{rel(w, out_dir)}`" for w in v.workdirs
  )
  notes = [f"Work directories: {where}. {len(v.rows)} result rows"]
  if v.pixels:
    notes.append(f"; D = {v.pixels} pixel values per input")
  if v.left_out:
    notes.append(f"; {v.left_out} rows of other attack settings or superseded left out")
  if v.overridden:
    notes.append(f"; {v.overridden} cells taken from the later of two work directories")
  if v.rejected:
    why = collections.Counter(v.rejected).most_common(1)[0][0]
    notes.append(
      f"; {len(v.rejected)} rows that fail the format check left out (e.g. {why}; a rerun "
      "recomputes them)"
    )
  parts += ["".join(notes) + ".", ""]
  parts += ["### Trained models", "", train_table(v.train) if v.train else "(none yet)", ""]
  warnings = weak_model_warnings(v.train or {}, v.name, weak_floor)
  if warnings:
    parts += ["\n\n".join(warnings), ""]
  stages = stage_seconds(v.train or {}, [*v.rows, *(v.defense_rows or ())])
  if stages:
    total = sum(s for _, _, s in stages)
    summary = f"{v.name.upper()}: time per stage ({len(stages)} stages, {total / 3600:.2f} h)"
    note = (
      "Wall seconds as recorded where each stage ran (a model's training where it was trained, "
      "an attack's rows where they were made), on whatever machine and load that was: a "
      "record built over several sessions mixes them."
    )
    parts += [details(summary, f"{note}\n\n{stage_table(stages)}"), ""]
  parts += _reference_tables(v.rows)
  auddc = auddc_lines(v.rows)
  if auddc:
    header = ("model", "attack", "C grid", "AUDDC mean ± std", "95% CI", "n pairs", "left out")
    parts += ["### AUDDC (lower: stronger attack)", "", table(header, auddc), ""]
    parts += [
      "n pairs: the pairs with a finite AUDDC, over which the mean is taken; left out: the "
      "row's other pairs, whose curve is undefined (`metrics.quality_curve_point`): the VAE "
      "reconstructs the target no closer to it than it reconstructs the source (common for a "
      "weak VAE), or the source equals the target.",
      "",
    ]
  parts += _figure_links(model_figs, out_dir)
  if v.defense_rows:
    parts += [defense_markdown(v.defense_rows), ""]
    for p in model_figs.get(DEFENCE_FIGURES, []):
      parts += [f"![{p.stem}]({rel(p, out_dir)})", ""]
  if v.rows:
    full = table(FULL_HEADER, [full_line(r) for r in sort_rows(v.rows)])
    parts += [details(f"{v.name.upper()}: every eps ({len(v.rows)} rows)", full), ""]
  return parts


def render_summary(
  views: Sequence[DatasetView],
  *,
  title: str,
  out_dir: pathlib.Path,
  figures: Mapping[str, Mapping[str, list]] | None = None,
  top: str = "",
  weak_floor: float = 0.9,
) -> str:
  """The markdown of summary.md for `views` (figures: {dataset: {model: [png paths]}}); `top`
  (the study section, when the rows have per-pair records) goes right under the title; a
  model at chance level, or below `weak_floor` x its dataset's best, gets a warning under the
  trained models' table."""
  figures = figures or {}
  parts = [f"# {title}", "", *([top.rstrip(), ""] if top else [])]
  present = {r.get("attack") for v in views for r in v.rows}
  # With per-pair records the study section above holds the registered verdicts (paired
  # tests of one primary endpoint); the votes over non-overlapping cell intervals stay as
  # secondary evidence, under a heading that says so.
  heading = (
    "## Secondary: votes over the cells (the registered verdicts are in the study section above)"
    if top
    else "## Verdicts"
  )
  parts += [how_to_read(present), heading, "", *_verdicts(views)]
  for v in views:
    parts += _dataset_section(v, out_dir, figures.get(v.name, {}), weak_floor)
  return "\n".join(parts).rstrip() + "\n"
