"""The study's report: `summary.md` and figures from one or several run work directories.

  write_report(workdir)                      -> workdir/summary.md, workdir/figures/*.png
  write_combined_report(out_dir, workdirs)   -> out_dir/summary.md, out_dir/figures/*.png
  python -m experiments.report WORKDIR | --out=DIR WORKDIR [WORKDIR ...] [--no-figures]

What a run leaves in its work directory (see experiments/run.py, experiments/attacks.py):
config.json, train_metrics.json, results.jsonl (one row per dataset x model x attack x norm x
eps), examples/<model>_<attack>.npz and, for the latent attacks on VAEs,
curves/<model>_<attack>.npz.
This module only reads those files and writes the report; it never changes them.

The two hypotheses of the study are decided by pure functions over result rows, so that they
can be tested on rows with known numbers:

- `h0_verdict(rows)`: H0, "VAEs are less vulnerable to adversarial examples than CNN
  classifiers". In every (dataset, attack, norm, eps) cell where the CNN and a VAE (attacked as
  a classifier through its latent classifier) both have a row, the VAE is *significantly less
  vulnerable* when its 95% Wilson interval of the success rate lies entirely below the CNN's,
  *significantly more* when entirely above, else *not distinguishable*. Likewise for the rate
  of high-effectiveness examples (valid and confident; Table 1 of the study).
- `h1_verdict(rows)`: H1, "attacks on high-pixel-density inputs (LFW) are more effective than
  on low ones (MNIST)": the same comparison between LFW and MNIST rows of the same (model,
  attack, norm) at comparable budgets (L-inf eps is per pixel and is compared as is; an L2
  budget is scaled by sqrt(D_lfw / D_mnist) and an L1 / L0 budget by D_lfw / D_mnist, D the
  pixel count; attacks whose eps is a penalty weight are left out).

Verdict rule (both hypotheses): "supported" when a strict majority of the compared cells
differs significantly in the hypothesis' direction, "rejected" when a strict majority differs
significantly against it, "inconclusive" otherwise ("not tested" with no cell).
"""

import collections
import dataclasses
import html
import json
import math
import os
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from experiments import store
from vae_attacks import metrics

BASELINE = "cnn"
# The classifier attacks of experiments/attacks.py; anything else is a VAE-specific attack.
CLASSIFIER_ATTACKS = ("fgsm", "bim", "bim_l1", "pgd_l2", "lbfgs", "lbfgs_c_search")
# The VAE attacks of experiments/attacks.py (Tabacof et al. 2016; Kos et al. 2017), judged by
# the CNN on the reconstruction of the adversarial input.
VAE_ATTACKS = ("latent_l2", "latent_fgsm", "reconstruction_l2", "reconstruction_fgsm")
# Attacks whose `eps` is a penalty weight C on the distortion (larger C: smaller perturbation),
# not a norm budget: L-BFGS (Szegedy et al. 2014) and the L2-optimisation VAE attacks, which
# trade distortion against a loss with a weight C; names with these prefixes likewise.
PENALTY_ATTACKS = ("lbfgs", "lbfgs_c_search", "latent_l2", "reconstruction_l2")
PENALTY_PREFIXES = ("tabacof", "kos_")
# Reference eps of the model x attack table: the strongest setting at which the adversarial
# inputs are still mostly valid for every model.
MIN_REFERENCE_VALIDITY = 0.5
# Pixel counts D = H * W * C of the study's datasets, used when a run's examples are missing.
PIXELS = {"mnist": 28 * 28 * 1, "lfw": 154 * 154 * 3}
H0_TEXT = "VAEs are less vulnerable to adversarial examples than CNN classifiers"
H1_TEXT = (
  "attacks on high-pixel-density inputs (LFW) are more effective than on low-pixel-density "
  "inputs (MNIST)"
)
DASH = "—"
DEFENSES_FILE = "defenses.jsonl"  # experiments/defenses.py
_EPS_RTOL = 1e-6


# --------------------------------------------------------------------------------------------
# Reading a work directory.


@dataclasses.dataclass
class RunFiles:
  """What one work directory holds, as read by `load_run`."""

  workdir: pathlib.Path
  config: dict
  train: dict  # {model: metrics}
  rows: list  # result rows, one per (dataset, model, attack, norm, eps)
  left_out: int  # rows of other attack settings, or superseded by a later row of the same key
  dataset: str | None
  defense_rows: list = dataclasses.field(default_factory=list)  # defenses.jsonl (current settings)
  rejected: list = dataclasses.field(default_factory=list)  # why each unusable row was left out


def read_rows(
  path: os.PathLike, kinds: Sequence[str] = store.RESULTS_KINDS, rejected: list | None = None
) -> list[dict]:
  """The usable rows of a results.jsonl (or, with `kinds`, defenses.jsonl), in the current
  format.

  A torn line (a run killed mid-write) is skipped, not fixed; rows of an older format are
  migrated in memory; a row that fails the schema check (`store.check_rows`: a missing or
  renamed field, a newer format) is never used, and why is appended to `rejected`.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  values, _ = store.parse_lines(path.read_bytes())
  good, bad, _ = store.check_rows(values, kinds)
  if rejected is not None:
    rejected += [why for _, why in bad]
  return good


def _read_json(path: pathlib.Path) -> dict:
  try:
    value = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return {}
  return value if isinstance(value, dict) else {}


def _settings_hash(config: dict) -> str | None:
  """The `settings` hash experiments.attacks writes on rows made under `config`, if computable."""
  if "attacks" not in config or "eval" not in config:
    return None
  from experiments import run as run_lib  # noqa: PLC0415  (run.py imports this module)

  return run_lib.config_hash({"attacks": config["attacks"], "eval": config["eval"]})


def row_key(row: Mapping) -> tuple:
  """(dataset, model, attack, norm, eps): one cell of the study."""
  eps = row.get("eps")
  return (
    row.get("dataset"),
    row.get("model"),
    row.get("attack"),
    row.get("norm"),
    round(float(eps), 12) if eps is not None else None,
  )


def select_rows(rows: Sequence[Mapping], settings: str | None = None) -> tuple[list, int]:
  """One row per cell: those made under `settings` when any are, the last one of each key.

  A rerun with changed attack / eval settings appends rows with another `settings` hash; the
  report shows only the current settings' rows so that every number in it is comparable.

  Returns:
    (rows, number of rows left out).
  """
  rows = list(rows)
  if settings is not None and any(r.get("settings") == settings for r in rows):
    chosen = [r for r in rows if r.get("settings") == settings]
  else:
    chosen = rows
  last = {}
  for r in chosen:
    last[row_key(r)] = r
  kept = list(last.values())
  return kept, len(rows) - len(kept)


def load_run(workdir: os.PathLike) -> RunFiles:
  """Reads config.json, train_metrics.json and results.jsonl of one work directory."""
  workdir = pathlib.Path(workdir)
  config = _read_json(workdir / "config.json")
  train = _read_json(workdir / "train_metrics.json")
  rejected: list[str] = []
  rows = read_rows(workdir / "results.jsonl", rejected=rejected)
  rows, left_out = select_rows(rows, _settings_hash(config))
  dataset = (config.get("data") or {}).get("name")
  if dataset is None:
    names = sorted({r.get("dataset") for r in rows if r.get("dataset")})
    dataset = names[0] if len(names) == 1 else None
  defense_rows = read_rows(workdir / DEFENSES_FILE, store.DEFENSES_KINDS, rejected)
  defense_rows = select_defense_rows(defense_rows, config)
  return RunFiles(workdir, config, train, rows, left_out, dataset, defense_rows, rejected)


def select_defense_rows(rows: Sequence[Mapping], config: Mapping) -> list:
  """The rows of defenses.jsonl made under the config's settings (each defence's rows under its
  own, `run.defence_settings`; all rows when none match), one per (kind, dataset, defence,
  attack, eps, source, target): the last."""
  if "defenses" in config and "attacks" in config:
    from experiments import run as run_lib  # noqa: PLC0415

    d, a = config["defenses"], config["attacks"]
    transfer = run_lib.config_hash({"defenses": d, "attacks": a})
    own = {}

    def expected(r):  # a defence's rows carry its own settings, transfer rows the whole run's
      if r.get("kind") != "defense":
        return transfer
      name = r.get("defense")
      if name not in own:
        own[name] = run_lib.defence_settings(d, a, name)
      return own[name]

    kept = []
    for kind in dict.fromkeys(r.get("kind") for r in rows):  # all of a kind when none match
      of_kind = [r for r in rows if r.get("kind") == kind]
      kept += [r for r in of_kind if r.get("settings") == expected(r)] or of_kind
    rows = kept
  last = {}
  for r in rows:
    k = tuple(r.get(f) for f in ("kind", "dataset", "defense", "attack", "source", "target"))
    last[(*k, _num(r.get("eps")))] = r
  return list(last.values())


@dataclasses.dataclass
class DatasetView:
  """Everything the report shows for one dataset, merged over work directories."""

  name: str
  rows: list = dataclasses.field(default_factory=list)
  train: dict = dataclasses.field(default_factory=dict)  # {model: metrics}
  examples: dict = dataclasses.field(default_factory=dict)  # {(model, attack): npz path}
  curves: dict = dataclasses.field(default_factory=dict)  # {(model, attack): npz path}
  pixels: int | None = None
  workdirs: list = dataclasses.field(default_factory=list)
  left_out: int = 0
  overridden: int = 0  # rows of a cell that a later work directory also has
  rejected: list = dataclasses.field(default_factory=list)  # why unusable rows were left out
  defense_rows: list = dataclasses.field(default_factory=list)  # defenses.jsonl rows
  defense_examples: dict = dataclasses.field(default_factory=dict)  # {defence: npz path}


def _pixels(run: RunFiles, examples: Iterable[pathlib.Path]) -> int | None:
  for path in examples:
    try:
      with np.load(path) as f:
        return int(np.prod(f["x"].shape[1:]))
    except (OSError, KeyError, ValueError):
      continue
  data = run.config.get("data") or {}
  if data.get("image_size"):
    return int(data["image_size"]) ** 2 * (3 if run.dataset == "lfw" else 1)
  return PIXELS.get(run.dataset or "")


def build_views(runs: Sequence[RunFiles]) -> list[DatasetView]:
  """Groups runs by dataset; a cell present in two work directories is taken from the later."""
  views: dict[str, DatasetView] = {}
  for run in runs:
    by_dataset: dict[str, list] = {}
    for r in run.rows:
      by_dataset.setdefault(r.get("dataset") or run.dataset or "unknown", []).append(r)
    if not by_dataset and run.dataset:
      by_dataset[run.dataset] = []
    for r in run.defense_rows:
      name = r.get("dataset") or run.dataset or "unknown"
      by_dataset.setdefault(name, [])
      views.setdefault(name, DatasetView(name)).defense_rows.append(r)
      npz = run.workdir / "defense_examples" / f"{r.get('defense')}.npz"
      if npz.exists():
        views[name].defense_examples[r.get("defense")] = npz
    for name, rows in by_dataset.items():
      view = views.setdefault(name, DatasetView(name))
      view.workdirs.append(run.workdir)
      view.left_out += run.left_out
      view.rejected += run.rejected
      cells = {row_key(r): i for i, r in enumerate(view.rows)}
      for r in rows:
        if row_key(r) in cells:
          view.rows[cells[row_key(r)]] = r
          view.overridden += 1
        else:
          cells[row_key(r)] = len(view.rows)
          view.rows.append(r)
      if name == run.dataset or len(by_dataset) == 1:
        view.train.update(run.train)
      found = []
      for model, attack in sorted({(r.get("model"), r.get("attack")) for r in rows}):
        for kind, store_in in (("examples", view.examples), ("curves", view.curves)):
          path = run.workdir / kind / f"{model}_{attack}.npz"
          if path.exists():
            store_in[(model, attack)] = path
            if kind == "examples":
              found.append(path)
      view.pixels = _pixels(run, found) or view.pixels
  order = {"mnist": 0, "lfw": 1}
  return sorted(views.values(), key=lambda v: (order.get(v.name, 2), v.name))


# --------------------------------------------------------------------------------------------
# Null-safe access to row fields.


def _num(v) -> float | None:
  if v is None or isinstance(v, bool):
    return None
  try:
    v = float(v)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def _ci(row: Mapping, field: str) -> tuple[float, float] | None:
  ci = row.get(f"{field}_ci")
  if not isinstance(ci, (list, tuple)) or len(ci) != 2:
    return None
  lo, hi = _num(ci[0]), _num(ci[1])
  return None if lo is None or hi is None else (lo, hi)


def _n(row: Mapping) -> int:
  n = _num(row.get("n_pairs"))
  return int(n) if n else 0


def _effectiveness(row: Mapping) -> dict:
  eff = row.get("effectiveness")
  return eff if isinstance(eff, dict) else {}


def is_penalty_attack(attack: str) -> bool:
  """True when the attack's `eps` is a penalty weight C (smaller is stronger), not a budget."""
  attack = str(attack)
  return attack in PENALTY_ATTACKS or attack.startswith(PENALTY_PREFIXES)


def rate_with_ci(row: Mapping, measure: str) -> tuple[float | None, tuple[float, float] | None]:
  """(rate, 95% Wilson interval) of `measure` on one row: "success" or "effective".

  "effective" is the fraction of pairs of high effectiveness (valid and confident). A missing
  stored interval is recomputed from the rate and n_pairs; None when n_pairs is unknown.
  """
  n = _n(row)
  if measure == "success":
    rate = _num(row.get("success_rate"))
    ci = _ci(row, "success_rate")
    k = None if rate is None else round(rate * n)
  elif measure == "effective":
    k = _num(_effectiveness(row).get("high"))
    rate = k / n if (k is not None and n) else None
  else:
    raise ValueError(f"measure must be 'success' or 'effective'; got {measure!r}")
  if rate is None or n <= 0 or k is None:
    return rate, None
  if measure == "effective" or ci is None:
    ci = metrics.wilson_interval(min(max(int(k), 0), n), n)
  return rate, ci


# --------------------------------------------------------------------------------------------
# The hypotheses (pure functions over rows).


def compare(a: tuple[float, float] | None, b: tuple[float, float] | None) -> str | None:
  """'below' when interval a lies entirely below b, 'above' when entirely above, else 'overlap'.

  None when either interval is unknown.
  """
  if a is None or b is None:
    return None
  if a[1] < b[0]:
    return "below"
  if a[0] > b[1]:
    return "above"
  return "overlap"


def decide(favour: int, against: int, total: int) -> str:
  """The verdict from counts of cells that differ significantly for / against a hypothesis."""
  if total <= 0:
    return "not tested"
  if 2 * favour > total:
    return "supported"
  if 2 * against > total:
    return "rejected"
  return "inconclusive"


def _tally(cells: Sequence[Mapping], measure: str, favour: str, against: str) -> dict:
  outcomes = [c[measure] for c in cells if c[measure] is not None]
  f, a = outcomes.count(favour), outcomes.count(against)
  return dict(
    favour=f,
    against=a,
    same=outcomes.count("overlap"),
    total=len(outcomes),
    skipped=len(cells) - len(outcomes),
    verdict=decide(f, a, len(outcomes)),
  )


def _side(row: Mapping) -> dict:
  s_rate, s_ci = rate_with_ci(row, "success")
  e_rate, e_ci = rate_with_ci(row, "effective")
  return dict(
    n=_n(row), success=s_rate, success_ci=s_ci, effective=e_rate, effective_ci=e_ci, eps=row["eps"]
  )


def _pairs_range(cells: Sequence[Mapping], side: str) -> list[int] | None:
  ns = [c[side]["n"] for c in cells]
  return [min(ns), max(ns)] if ns else None


def _per_attack(cells: Sequence[Mapping], favour: str, against: str) -> dict:
  out = {}
  for attack in dict.fromkeys(c["attack"] for c in cells):
    mine = [c for c in cells if c["attack"] == attack]
    out[attack] = {m: _tally(mine, m, favour, against) for m in ("success", "effective")}
  return out


def h0_verdict(rows: Sequence[Mapping], *, baseline: str = BASELINE) -> dict:
  """H0: VAEs are less vulnerable than CNN classifiers, decided from result rows.

  A cell is one (dataset, attack, norm, eps, VAE model) for which both the `baseline` (CNN)
  and the VAE have a row. Per cell and measure ("success": success rate, "effective": rate of
  high-effectiveness pairs) the outcome is 'below' (the VAE's 95% Wilson interval lies entirely
  below the CNN's: significantly less vulnerable), 'above' (significantly more) or 'overlap';
  None when an interval is unknown (no pairs). Verdict per measure by `decide`.

  Args:
    rows: result rows (results.jsonl), any datasets.
    baseline: the model name of the CNN classifier.

  Returns:
    {"hypothesis", "cells": [...], "success": tally, "effective": tally, "verdict" (the
    success-rate verdict), "pairs": {"baseline": [min, max], "vae": [min, max]},
    "per_attack": {attack: {"success": tally, "effective": tally}}}, a tally being
    {favour: VAE significantly less vulnerable, against, same, total, skipped, verdict}.
  """
  base = {row_key(r)[:1] + row_key(r)[2:]: r for r in rows if r.get("model") == baseline}
  cells = []
  for r in rows:
    model = r.get("model")
    if model == baseline or not str(model).endswith("vae"):
      continue
    cnn = base.get(row_key(r)[:1] + row_key(r)[2:])
    if cnn is None:
      continue
    c, v = _side(cnn), _side(r)
    cells.append(
      dict(
        dataset=r.get("dataset"),
        attack=r.get("attack"),
        norm=r.get("norm"),
        eps=r.get("eps"),
        model=model,
        baseline=c,
        vae=v,
        success=compare(v["success_ci"], c["success_ci"]),
        effective=compare(v["effective_ci"], c["effective_ci"]),
      )
    )
  success = _tally(cells, "success", "below", "above")
  return dict(
    hypothesis=H0_TEXT,
    cells=cells,
    success=success,
    effective=_tally(cells, "effective", "below", "above"),
    verdict=success["verdict"],
    pairs=dict(baseline=_pairs_range(cells, "baseline"), vae=_pairs_range(cells, "vae")),
    per_attack=_per_attack(cells, "below", "above"),
  )


def budget_scale(norm: str, pixel_ratio: float) -> float | None:
  """Factor that maps a low-density eps budget to the comparable high-density one, by norm.

  L-inf bounds each pixel (factor 1); a perturbation of the same per-pixel size grows as
  sqrt(D) in L2 and as D in L1 and L0. None for an unknown norm.
  """
  return {"linf": 1.0, "l2": math.sqrt(pixel_ratio), "l1": pixel_ratio, "l0": pixel_ratio}.get(norm)


def h1_verdict(
  rows: Sequence[Mapping],
  *,
  high: str = "lfw",
  low: str = "mnist",
  pixels: Mapping[str, int] | None = None,
  rtol: float = 0.02,
) -> dict:
  """H1: attacks on high-pixel-density inputs (LFW) are more effective than on low (MNIST).

  A cell is one (model, attack, norm, eps) of `low` whose attack has a norm budget and for
  which `high` has a row of the same model, attack and norm at the comparable budget
  eps * `budget_scale(norm, D_high / D_low)` (within relative `rtol`). Per cell and measure the
  outcome is 'above' (the high-density interval lies entirely above the low one: the attack is
  significantly more effective on LFW), 'below' or 'overlap'. Verdict per measure by `decide`.

  Args:
    rows: result rows of both datasets.
    high, low: dataset names.
    pixels: {dataset: H * W * C}; defaults to PIXELS.
    rtol: relative tolerance when matching scaled budgets (configs round them).

  Returns:
    {"hypothesis", "cells", "success", "effective", "verdict", "pairs": {"high", "low"},
     "per_attack", "norms": norms compared, "excluded": penalty-weight attacks left out,
     "unmatched": low rows without a comparable high row, "pixel_ratio"}; tallies count
    'above' as favour.
  """
  pixels = {**PIXELS, **(pixels or {})}
  ratio = pixels[high] / pixels[low]
  high_rows = [r for r in rows if r.get("dataset") == high]
  cells, excluded, unmatched = [], set(), 0
  for r in rows:
    if r.get("dataset") != low:
      continue
    attack, norm, eps = r.get("attack"), r.get("norm"), _num(r.get("eps"))
    if is_penalty_attack(attack):
      excluded.add(attack)
      continue
    scale = budget_scale(norm, ratio)
    if scale is None or eps is None:
      unmatched += 1
      continue
    want = eps * scale
    match = [
      h
      for h in high_rows
      if (h.get("model"), h.get("attack"), h.get("norm")) == (r.get("model"), attack, norm)
      and _num(h.get("eps")) is not None
      and math.isclose(_num(h.get("eps")), want, rel_tol=rtol)
    ]
    if not match:
      unmatched += 1
      continue
    h = min(match, key=lambda m: abs(_num(m.get("eps")) - want))
    hs, ls = _side(h), _side(r)
    cells.append(
      dict(
        model=r.get("model"),
        attack=attack,
        norm=norm,
        eps=r.get("eps"),
        eps_high=h.get("eps"),
        high=hs,
        low=ls,
        success=compare(hs["success_ci"], ls["success_ci"]),
        effective=compare(hs["effective_ci"], ls["effective_ci"]),
      )
    )
  success = _tally(cells, "success", "above", "below")
  return dict(
    hypothesis=H1_TEXT,
    cells=cells,
    success=success,
    effective=_tally(cells, "effective", "above", "below"),
    verdict=success["verdict"],
    pairs=dict(high=_pairs_range(cells, "high"), low=_pairs_range(cells, "low")),
    per_attack=_per_attack(cells, "above", "below"),
    norms=sorted({c["norm"] for c in cells}),
    excluded=sorted(excluded),
    unmatched=unmatched,
    pixel_ratio=ratio,
  )


# --------------------------------------------------------------------------------------------
# Reference eps.


def _strength(attack: str, eps: float) -> float:
  return -eps if is_penalty_attack(attack) else eps


def reference_eps(rows: Sequence[Mapping], *, min_validity: float = MIN_REFERENCE_VALIDITY):
  """The eps of the model x attack table for every (dataset, attack, norm).

  The strongest setting (largest budget; smallest penalty C) at which every model with a row
  there has validity_rate >= `min_validity`; the weakest setting when none qualifies.

  Returns:
    {(dataset, attack, norm): eps}.
  """
  groups: dict[tuple, dict[float, list]] = {}
  for r in rows:
    eps = _num(r.get("eps"))
    if eps is None:
      continue
    groups.setdefault((r.get("dataset"), r.get("attack"), r.get("norm")), {}).setdefault(
      eps, []
    ).append(r)
  out = {}
  for (dataset, attack, norm), by_eps in groups.items():
    order = sorted(by_eps, key=lambda e: _strength(attack, e))
    ok = [
      e
      for e in order
      if all((_num(r.get("validity_rate")) or 0.0) >= min_validity for r in by_eps[e])
    ]
    out[(dataset, attack, norm)] = ok[-1] if ok else order[0]
  return out


# --------------------------------------------------------------------------------------------
# Markdown.


def fmt_rate(v) -> str:
  """A rate / probability / SSIM with 3 decimals, or a dash."""
  v = _num(v)
  return DASH if v is None else f"{v:.3f}"


def fmt_num(v) -> str:
  """A norm, eps or count-like number with 4 significant digits, or a dash."""
  v = _num(v)
  return DASH if v is None else f"{v:.4g}"


def fmt_int(v) -> str:
  """A count with thousands separators, or a dash."""
  v = _num(v)
  return DASH if v is None else f"{round(v):,}"


def fmt_ci(ci, fmt=fmt_rate) -> str:
  if not isinstance(ci, (list, tuple)) or len(ci) != 2:
    return f"[{DASH}]"
  return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(str(c).replace("|", "/") for c in line) + " |" for line in lines]
  return "\n".join(out)


def _sort_rows(rows: Iterable[Mapping]) -> list:
  def key(r):
    model = r.get("model") or ""
    attack = r.get("attack") or ""
    known = CLASSIFIER_ATTACKS + VAE_ATTACKS
    a_index = known.index(attack) if attack in known else len(known)
    return (model != BASELINE, model, a_index, attack, r.get("norm") or "", _num(r.get("eps")) or 0)

  return sorted(rows, key=key)


REFERENCE_HEADER = (
  "model",
  "attack",
  "norm",
  "eps",
  "success rate [95% CI]",
  "mean confidence",
  "validity rate",
  "effectiveness (modal)",
  "high / moderate / low / ineffective",
  "mean L2",
  "mean L∞",
  "n pairs",
)


def _effect_cells(row: Mapping) -> tuple[str, str]:
  eff = _effectiveness(row)
  counts = " / ".join(fmt_num(eff.get(level)) for level in metrics.LEVELS)
  return str(eff.get("modal") or DASH), counts


def _reference_line(r: Mapping) -> list[str]:
  modal, counts = _effect_cells(r)
  return [
    str(r.get("model")),
    str(r.get("attack")),
    str(r.get("norm")),
    fmt_num(r.get("eps")),
    f"{fmt_rate(r.get('success_rate'))} {fmt_ci(r.get('success_rate_ci'))}",
    fmt_rate(r.get("mean_confidence")),
    fmt_rate(r.get("validity_rate")),
    modal,
    counts,
    fmt_num(r.get("mean_l2")),
    fmt_num(r.get("mean_linf")),
    fmt_num(r.get("n_pairs")),
  ]


FULL_HEADER = (
  "model",
  "attack",
  "norm",
  "eps",
  "success rate [95% CI]",
  "mean target prob [95% CI]",
  "validity rate [95% CI]",
  "mean SSIM",
  "high eff. rate [95% CI]",
  "high / moderate / low / ineffective",
  "mean L0",
  "mean L1",
  "mean L2 [95% CI]",
  "mean L∞",
  "n pairs",
  "sources",
  "seconds",
)


def _full_line(r: Mapping) -> list[str]:
  _, counts = _effect_cells(r)
  e_rate, e_ci = rate_with_ci(r, "effective")
  return [
    str(r.get("model")),
    str(r.get("attack")),
    str(r.get("norm")),
    fmt_num(r.get("eps")),
    f"{fmt_rate(r.get('success_rate'))} {fmt_ci(r.get('success_rate_ci'))}",
    f"{fmt_rate(r.get('mean_target_prob'))} {fmt_ci(r.get('mean_target_prob_ci'))}",
    f"{fmt_rate(r.get('validity_rate'))} {fmt_ci(r.get('validity_rate_ci'))}",
    fmt_rate(r.get("mean_ssim")),
    f"{fmt_rate(e_rate)} {fmt_ci(e_ci)}",
    counts,
    fmt_num(r.get("mean_l0")),
    fmt_num(r.get("mean_l1")),
    f"{fmt_num(r.get('mean_l2'))} {fmt_ci(r.get('mean_l2_ci'), fmt_num)}",
    fmt_num(r.get("mean_linf")),
    fmt_num(r.get("n_pairs")),
    fmt_num(r.get("n_sources")),
    fmt_num(r.get("seconds")),
  ]


def _param_count(m: Mapping):
  if _num(m.get("param_count")) is not None:
    return m["param_count"]
  parts = [v.get("param_count") for v in m.values() if isinstance(v, dict)]
  parts = [p for p in parts if _num(p) is not None]
  return sum(parts) if parts else None


def _train_table(train: Mapping) -> str:
  lines = []
  for model, m in train.items():
    if not isinstance(m, dict):
      continue
    lines.append(
      [
        model,
        fmt_rate(m.get("test_accuracy")),
        fmt_num(m.get("test_neg_elbo_nats")),
        fmt_int(_param_count(m)),
        fmt_num(m.get("train_seconds")),
      ]
    )
  header = ("model", "test accuracy", "test −ELBO (nats)", "params", "train seconds")
  return _table(header, lines)


def _auddc_lines(rows: Sequence[Mapping]) -> list[list[str]]:
  """One line per (model, attack, AUDDC value): the area is over the C grid, which every row
  of that grid repeats; the grid's C values are listed."""
  groups: dict[tuple, list] = {}
  for r in _sort_rows(rows):
    if "auddc" in r:
      key = (r.get("model"), r.get("attack"), r.get("auddc"), r.get("auddc_std"))
      groups.setdefault(key, []).append(r)
  lines = []
  for (model, attack, mean, std), rs in groups.items():
    lines.append(
      [
        str(model),
        str(attack),
        ", ".join(fmt_num(r.get("eps")) for r in rs),
        f"{fmt_rate(mean)} ± {fmt_rate(std)}",
        fmt_ci(rs[0].get("auddc_ci")),
        fmt_num(rs[0].get("n_auddc_pairs")),
      ]
    )
  return lines


def _pairs_text(rng) -> str:
  if not rng:
    return DASH
  return str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}–{rng[1]}"


def _h0_markdown(v: Mapping, where: str) -> str:
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
    + (f", {s['skipped']} without an interval" if s["skipped"] else "")
    + f". Pairs per cell: CNN {_pairs_text(v['pairs']['baseline'])}, "
    f"VAE {_pairs_text(v['pairs']['vae'])}.",
    "",
    f"By high-effectiveness rate (valid and confident): **{e['verdict']}** — VAE "
    f"significantly less {e['favour']}, more {e['against']}, not distinguishable {e['same']} "
    f"of {e['total']}.",
  ]
  lines += ["", _per_attack_table(v["per_attack"], "VAE less", "VAE more")]
  detail = [
    [
      str(c["dataset"]),
      str(c["model"]),
      str(c["attack"]),
      str(c["norm"]),
      fmt_num(c["eps"]),
      _side_text(c["baseline"], "success"),
      _side_text(c["vae"], "success"),
      str(c["success"] or DASH),
      _side_text(c["baseline"], "effective"),
      _side_text(c["vae"], "effective"),
      str(c["effective"] or DASH),
    ]
    for c in v["cells"]
  ]
  header = (
    "dataset",
    "VAE",
    "attack",
    "norm",
    "eps",
    "CNN success [CI] (n)",
    "VAE success [CI] (n)",
    "VAE vs CNN",
    "CNN high-eff. [CI]",
    "VAE high-eff. [CI]",
    "VAE vs CNN (eff.)",
  )
  lines += ["", _details("H0 cells", _table(header, detail))]
  return "\n".join(lines)


def _h1_markdown(v: Mapping) -> str:
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
    + (f", {s['skipped']} without an interval" if s["skipped"] else "")
    + f". Pairs per cell: LFW {_pairs_text(v['pairs']['high'])}, "
    f"MNIST {_pairs_text(v['pairs']['low'])}.",
    "",
    f"By high-effectiveness rate: **{e['verdict']}** — LFW significantly higher "
    f"{e['favour']}, lower {e['against']}, not distinguishable {e['same']} of {e['total']}.",
    "",
    f"Scope: {scope}.",
    "",
    _per_attack_table(v["per_attack"], "LFW higher", "LFW lower"),
  ]
  detail = [
    [
      str(c["model"]),
      str(c["attack"]),
      str(c["norm"]),
      fmt_num(c["eps"]),
      fmt_num(c["eps_high"]),
      _side_text(c["low"], "success"),
      _side_text(c["high"], "success"),
      str(c["success"] or DASH),
      _side_text(c["low"], "effective"),
      _side_text(c["high"], "effective"),
      str(c["effective"] or DASH),
    ]
    for c in v["cells"]
  ]
  header = (
    "model",
    "attack",
    "norm",
    "eps MNIST",
    "eps LFW",
    "MNIST success [CI] (n)",
    "LFW success [CI] (n)",
    "LFW vs MNIST",
    "MNIST high-eff. [CI]",
    "LFW high-eff. [CI]",
    "LFW vs MNIST (eff.)",
  )
  lines += ["", _details("H1 cells", _table(header, detail))]
  return "\n".join(lines)


def _side_text(side: Mapping, measure: str) -> str:
  return f"{fmt_rate(side[measure])} {fmt_ci(side[f'{measure}_ci'])} ({side['n']})"


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
  return _table(header, lines)


def _details(summary: str, body: str) -> str:
  return f"<details><summary>{html.escape(summary)}</summary>\n\n{body}\n\n</details>"


HOW_TO_READ = f"""\
How to read this report:
- **Reference eps** (model x attack tables): per (dataset, attack, norm), the strongest setting
  -- the largest budget eps, or for penalty attacks ({", ".join(PENALTY_ATTACKS)},
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
  attacks ({", ".join(VAE_ATTACKS)}, ...) succeed when the judge (the CNN) classifies the
  VAE's reconstruction of the adversarial input as the target.
- Verdicts: a cell differs significantly when one 95% interval lies entirely on one side of the
  other; a hypothesis is *supported* when a strict majority of its cells differs in its
  direction, *rejected* when a strict majority differs against it, else *inconclusive*.
"""


def render_summary(
  views: Sequence[DatasetView],
  *,
  title: str,
  out_dir: pathlib.Path,
  figures: Mapping[str, Mapping[str, list]] | None = None,
) -> str:
  """The markdown of summary.md for `views` (figures: {dataset: {model: [png paths]}})."""
  figures = figures or {}
  rows = [r for v in views for r in v.rows]
  parts = [f"# {title}", "", HOW_TO_READ, "## Verdicts", ""]
  for v in views:
    parts += [_h0_markdown(h0_verdict(v.rows), v.name.upper()), ""]
  if len(views) > 1:
    parts += [_h0_markdown(h0_verdict(rows), "all datasets together"), ""]
  names = {v.name for v in views}
  if {"lfw", "mnist"} <= names:
    pixels = {v.name: v.pixels for v in views if v.pixels}
    parts += [_h1_markdown(h1_verdict(rows, pixels=pixels)), ""]
  else:
    parts += [
      f"**H1** ({H1_TEXT}): **not tested** — needs results of both MNIST and LFW "
      f"(this report has: {', '.join(sorted(names)) or 'none'}; see write_combined_report).",
      "",
    ]

  for v in views:
    parts += [f"## {v.name.upper()}", ""]
    where = ", ".join(
      "this folder" if _rel(w, out_dir) == "." else f"`{_rel(w, out_dir)}`" for w in v.workdirs
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
    parts += ["### Trained models", "", _train_table(v.train) if v.train else "(none yet)", ""]
    ref = reference_eps(v.rows)
    chosen = [r for r in v.rows if _num(r.get("eps")) == ref.get(row_key(r)[:1] + row_key(r)[2:4])]
    kinds = (
      ("classifier attacks", [r for r in chosen if r.get("attack") in CLASSIFIER_ATTACKS]),
      ("VAE attacks", [r for r in chosen if r.get("attack") not in CLASSIFIER_ATTACKS]),
    )
    for kind, these in kinds:
      if these:
        parts += [
          f"### Model x attack at the reference eps: {kind}",
          "",
          _table(REFERENCE_HEADER, [_reference_line(r) for r in _sort_rows(these)]),
          "",
        ]
    auddc = _auddc_lines(v.rows)
    if auddc:
      header = ("model", "attack", "C grid", "AUDDC mean ± std", "95% CI", "n pairs")
      parts += ["### AUDDC (lower: stronger attack)", "", _table(header, auddc), ""]
    model_figs = figures.get(v.name, {})
    if any(paths for m, paths in model_figs.items() if m != DEFENCE_FIGURES):
      parts += ["### Figures", ""]
      for model, paths in model_figs.items():
        if not paths or model == DEFENCE_FIGURES:
          continue
        first, rest = paths[0], paths[1:]
        parts += [f"**{model}**", "", f"![{model}: {first.stem}]({_rel(first, out_dir)})", ""]
        if rest:
          body = "\n\n".join(f"![{p.stem}]({_rel(p, out_dir)})" for p in rest)
          parts += [_details(f"{model}: examples and curves ({len(rest)} figures)", body), ""]
    if v.defense_rows:
      parts += [defense_markdown(v.defense_rows), ""]
      for p in model_figs.get(DEFENCE_FIGURES, []):
        parts += [f"![{p.stem}]({_rel(p, out_dir)})", ""]
    if v.rows:
      full = _table(FULL_HEADER, [_full_line(r) for r in _sort_rows(v.rows)])
      parts += [_details(f"{v.name.upper()}: every eps ({len(v.rows)} rows)", full), ""]
  return "\n".join(parts).rstrip() + "\n"


def _rate_ci(row: Mapping, field: str) -> str:
  """'0.912 [0.893, 0.928]' for a rate field with its `_ci`, or a dash."""
  if _num(row.get(field)) is None:
    return DASH
  return f"{fmt_rate(row.get(field))} {fmt_ci(row.get(f'{field}_ci'))}"


def _per_example_worst(attacked: Sequence[Mapping]) -> dict:
  """(defence, eps) -> {"robust_accuracy", "robust_accuracy_ci", "attacks"}: an example is
  robust only if no attack broke it, from the rows' `not_robust_examples`; for a defence that
  rejects also "defended_rate" (and its `_ci`): correct or rejected under every attack, from
  the rows' `broken_examples` (misclassified and accepted). Left out where a row lacks the
  field (rows of an older run) or the rows disagree on n."""
  groups: dict = {}
  for r in attacked:
    groups.setdefault((r.get("defense"), _num(r.get("eps"))), []).append(r)
  out = {}
  for k, rs in groups.items():
    ns = {r.get("n") for r in rs}
    if any(r.get("not_robust_examples") is None for r in rs) or len(ns) != 1:
      continue
    n = int(ns.pop())

    def unbroken(field, rs=rs, n=n):  # (rate, lo, hi) of the examples no row lists
      hit = np.zeros(n, bool)
      for r in rs:
        hit[np.asarray(r[field], int)] = True
      return metrics.success_rate(~hit)

    rate, lo, hi = unbroken("not_robust_examples")
    out[k] = {"robust_accuracy": rate, "robust_accuracy_ci": [lo, hi], "attacks": len(rs)}
    if all(r.get("broken_examples") is not None for r in rs):  # a defence that rejects
      rate, lo, hi = unbroken("broken_examples")
      out[k].update(defended_rate=rate, defended_rate_ci=[lo, hi])
  return out


def defense_markdown(rows: Sequence[Mapping]) -> str:
  """The defence tables of one dataset: worst case over adaptive attacks, every attack, and
  the black-box transfer matrix (rows of experiments/defenses.py)."""
  attacked = [r for r in rows if r.get("kind") == "defense"]
  order = {n: i for i, n in enumerate(dict.fromkeys(r.get("defense") for r in attacked))}
  attacked.sort(key=lambda r: (order[r.get("defense")], _num(r.get("eps")) or 0.0))
  parts = ["### Defences", ""]
  if attacked:
    parts += [
      "Robust accuracy: the adversarial input is classified correctly (and accepted, for a "
      "defence that rejects); an example counts as broken when any restart breaks it. "
      "*Worst case* counts an example as robust only if no attack at that eps broke it "
      "(per example, over every attack run: those that know the defence and those that do "
      "not, since a blind attack that breaks an example has broken it all the same); "
      "*lowest single attack* is the lowest robust accuracy of one attack that knows the "
      "defence (white-box on the weights, or adaptive to the defence's mechanism). For a "
      "defence that rejects, robust accuracy counts a rejected input as a loss; the "
      "*worst-case defended* rate counts it as a win (correct or rejected under every attack: "
      "no attack got a misclassified input past it). A defence with no attack that knows it "
      "gets no robustness figure. Intervals: 95% Wilson.",
      "",
    ]
    union = _per_example_worst(attacked)
    any_rejecting = any("defended_rate" in u for u in union.values())
    worst = {}
    for r in attacked:
      if r.get("adaptive"):
        k = (r.get("defense"), _num(r.get("eps")))
        if k not in worst or (_num(r.get("robust_accuracy")) or 0.0) < (
          _num(worst[k].get("robust_accuracy")) or 0.0
        ):
          worst[k] = r
    keys = list(dict.fromkeys((r.get("defense"), _num(r.get("eps"))) for r in attacked))
    lines = []
    for k in keys:
      w = worst.get(k)
      any_row = next(r for r in attacked if (r.get("defense"), _num(r.get("eps"))) == k)
      no_adaptive = f"{DASH} (no adaptive attack)"
      u = union.get(k)
      line = [
        k[0],
        fmt_num(k[1]),
        _rate_ci(any_row, "clean_accuracy"),
        (_rate_ci(u, "robust_accuracy") if u else DASH) if w else no_adaptive,
        _rate_ci(w, "robust_accuracy") if w else no_adaptive,
        w.get("attack", DASH) if w else DASH,
      ]
      if any_rejecting:
        line.append((_rate_ci(u, "defended_rate") if u else DASH) if w else no_adaptive)
      lines.append([*line, fmt_int((w or any_row).get("n"))])
    header = ["defence", "eps (L-inf)", "clean accuracy", "worst-case robust accuracy",
              "lowest single attack", "by attack"]  # fmt: skip
    if any_rejecting:
      header.append("worst-case defended (correct or rejected)")
    header.append("n")
    parts += ["**Worst case over the attacks**", "", _table(header, lines)]
    rejecting = any(_num(r.get("false_rejection_rate")) is not None for r in attacked)
    header = ["defence", "attack", "knows the defence", "eps", "n", "restarts x steps",
              "clean accuracy", "robust accuracy"]  # fmt: skip
    if rejecting:
      header += ["detection rate", "false-rejection rate", "defended (correct or rejected)"]
    impersonating = any(_num(r.get("impersonation_rate")) is not None for r in attacked)
    if impersonating:
      header += ["impersonation rate"]
    lines = []
    for r in attacked:
      line = [
        r.get("defense"),
        r.get("attack"),
        "yes" if r.get("adaptive") else "no",
        fmt_num(r.get("eps")),
        fmt_int(r.get("n")),
        f"{fmt_int(r.get('restarts'))} x {fmt_int(r.get('steps'))}",
        _rate_ci(r, "clean_accuracy"),
        _rate_ci(r, "robust_accuracy"),
      ]
      if rejecting:
        line += [_rate_ci(r, f) for f in ("detection_rate", "false_rejection_rate",
                                          "defended_rate")]  # fmt: skip
      if impersonating:
        line.append(_rate_ci(r, "impersonation_rate"))
      lines.append(line)
    parts += ["", "**Every attack**", "", _table(header, lines)]
    notes = list(dict.fromkeys(f"`{r.get('defense')}` / `{r.get('attack')}`: {r.get('note')}"
                               for r in attacked if r.get("note")))  # fmt: skip
    if notes:
      parts += ["", "Attacks: " + "; ".join(notes) + "."]
  moved = [r for r in rows if r.get("kind") == "transfer"]
  if moved:
    sources = list(dict.fromkeys(r.get("source") for r in moved))
    targets = list(dict.fromkeys(r.get("target") for r in moved))
    cell = {(r.get("source"), r.get("target")): r for r in moved}
    lines = []
    for s in sources:
      line = [f"{s} ({cell[next((s, t) for t in targets if (s, t) in cell)].get('crafted_with')})"]
      for t in targets:
        r = cell.get((s, t))
        text = _rate_ci(r, "robust_accuracy") if r else DASH
        line.append(f"**{text}**" if s == t else text)
      lines.append(line)
    eps = fmt_num(moved[0].get("eps"))
    n = fmt_int(moved[0].get("n"))
    parts += [
      "",
      f"**Black-box transfer** (L-inf eps {eps}, n = {n}): accuracy of each target (column) "
      "on the adversarial examples crafted on each source (row); the diagonal (bold) is the "
      "white-box result, the rest what an attacker without the target's gradients achieves.",
      "",
      _table(["source \\ target", *targets], lines),
    ]
  return "\n".join(parts)


def _rel(path: pathlib.Path, start: pathlib.Path) -> str:
  return pathlib.Path(os.path.relpath(path, start)).as_posix()


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on an Agg canvas: no pyplot, no global backend state).


def _new_figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _margins(fig, *, left, right, bottom, top, wspace, hspace):
  """Fixed margins in inches (tight_layout costs more than the drawing on a small CPU)."""
  w, h = fig.get_size_inches()
  fig.subplots_adjust(
    left=left / w,
    right=1 - right / w,
    bottom=bottom / h,
    top=1 - top / h,
    wspace=wspace,
    hspace=hspace,
  )


def _save_figure(fig, path: pathlib.Path) -> pathlib.Path:
  """Renders the PNG in memory, then writes it atomically (store.write_with): never a
  half-written PNG, and a full disk is one OutOfSpace naming the figure."""
  store.write_with(path, lambda f: fig.savefig(f, format="png"))
  return path


def _family(attack: str, norm: str) -> str:
  return (
    "penalty C"
    if is_penalty_attack(attack)
    else {"linf": "L∞", "l2": "L2", "l1": "L1"}.get(norm, str(norm))
  )


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_STYLES = ("-", "--", "-.", ":")


def plot_rates(rows: Sequence[Mapping], path: pathlib.Path, title: str) -> pathlib.Path:
  """Success rate and mean target confidence against eps, one column per norm family.

  Error bars are the rows' 95% intervals (Wilson for the rate, t for the mean).
  """
  families: dict[str, dict[str, list]] = {}
  for r in rows:
    if _num(r.get("eps")) is None:
      continue
    fam = families.setdefault(_family(r.get("attack"), r.get("norm")), {})
    fam.setdefault(str(r.get("attack")), []).append(r)
  cols = max(len(families), 1)
  fig = _new_figure(4.2 * cols, 6.4)
  axes = fig.subplots(2, cols, squeeze=False)
  for j, (fam, by_attack) in enumerate(sorted(families.items())):
    for a_index, (attack, rs) in enumerate(sorted(by_attack.items())):
      rs = sorted(rs, key=lambda r: _num(r["eps"]))
      eps = np.array([_num(r["eps"]) for r in rs])
      for i, field in enumerate(("success_rate", "mean_confidence")):
        ci_field = "success_rate" if field == "success_rate" else "mean_target_prob"
        y = np.array([_num(r.get(field)) if _num(r.get(field)) is not None else np.nan for r in rs])
        err = np.zeros((2, len(rs)))
        for k, r in enumerate(rs):
          ci = _ci(r, ci_field)
          if ci is not None and np.isfinite(y[k]):
            err[:, k] = [max(y[k] - ci[0], 0.0), max(ci[1] - y[k], 0.0)]
        axes[i, j].errorbar(
          eps,
          y,
          yerr=err,
          marker=_MARKERS[a_index % len(_MARKERS)],
          ls=_STYLES[a_index % len(_STYLES)],
          ms=5,
          capsize=3,
          alpha=0.85,
          label=attack,
        )
    for i, label in enumerate(("success rate", "mean target confidence")):
      ax = axes[i, j]
      ax.set_ylim(-0.03, 1.03)
      ax.set_ylabel(label)
      ax.set_xlabel("penalty C (log)" if fam == "penalty C" else f"eps ({fam})")
      if fam == "penalty C":
        ax.set_xscale("log")
      ax.grid(alpha=0.3)
      ax.set_title(fam)
      ax.legend(fontsize=8)
  fig.suptitle(title)
  _margins(fig, left=0.75, right=0.2, bottom=0.6, top=0.65, wspace=0.3, hspace=0.45)
  return _save_figure(fig, path)


def _image(a: np.ndarray) -> tuple[np.ndarray, dict]:
  a = np.asarray(a, np.float32)
  if a.ndim == 3 and a.shape[-1] == 1:
    return a[..., 0], dict(cmap="gray", vmin=0.0, vmax=1.0)
  return np.clip(a, 0.0, 1.0), {}


def amplified(delta: np.ndarray) -> np.ndarray:
  """A perturbation scaled to fill [0, 1] with 0 at 0.5 (its largest |value| maps to 0 or 1)."""
  delta = np.asarray(delta, np.float32)
  top = float(np.max(np.abs(delta))) if delta.size else 0.0
  return 0.5 + 0.5 * delta / top if top > 0 else np.full_like(delta, 0.5)


def plot_examples(
  npz: pathlib.Path, path: pathlib.Path, title: str, *, attack: str = "", max_rows: int = 8
) -> pathlib.Path | None:
  """Source / target image / adversarial / amplified perturbation / reconstruction of the adv.

  The target image and reconstruction columns appear when the file has them (VAE attacks).
  Rows are examples, at the strongest setting of the file's eps grid (the largest budget, or
  the smallest penalty C). None when the file cannot be read.
  """
  try:
    with np.load(npz) as f:
      data = {k: f[k] for k in f.files}
    x, x_adv, eps = data["x"], data["x_adv"], np.atleast_1d(data["eps"])
  except (OSError, KeyError, ValueError):
    return None
  if x_adv.ndim != x.ndim + 1 or x_adv.shape[0] == 0 or x.shape[0] == 0:
    return None
  strengths = [_strength(attack, float(e)) for e in eps]
  e = int(np.argmax(strengths)) if len(strengths) == x_adv.shape[0] else x_adv.shape[0] - 1
  n = min(x.shape[0], x_adv.shape[1], max_rows)
  rec, x_target = data.get("rec_adv"), data.get("x_target")
  columns = [("source", lambda i: x[i])]
  if x_target is not None and x_target.shape[0] >= n and x_target.shape[1:] == x.shape[1:]:
    columns.append(("target image", lambda i: x_target[i]))
  columns += [
    ("adversarial", lambda i: x_adv[e, i]),
    ("perturbation (amplified)", lambda i: amplified(x_adv[e, i] - x[i])),
  ]
  if rec is not None and rec.shape[:2] == x_adv.shape[:2]:
    columns.append(("reconstruction of adv.", lambda i: rec[e, i]))
  fig = _new_figure(1.9 * len(columns), 1.9 * n + 0.6)
  axes = fig.subplots(n, len(columns), squeeze=False)
  src_label, target = data.get("source_label"), data.get("target")
  for i in range(n):
    for j, (name, image) in enumerate(columns):
      ax = axes[i, j]
      arr, kw = _image(image(i))
      ax.imshow(arr, interpolation="nearest", **kw)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(name, fontsize=8)
      if name.startswith("perturbation"):
        ax.set_xlabel(f"max|δ| {float(np.max(np.abs(x_adv[e, i] - x[i]))):.3g}", fontsize=7)
    label = []
    if src_label is not None and i < len(src_label):
      label.append(f"src {int(src_label[i])}")
    if target is not None and i < len(target):
      label.append(f"→ {int(target[i])}")
    axes[i, 0].set_ylabel(" ".join(label), fontsize=8)
  fig.suptitle(f"{title}, eps {float(eps[e]):.4g}", fontsize=9)
  _margins(fig, left=0.35, right=0.1, bottom=0.25, top=0.6, wspace=0.08, hspace=0.2)
  return _save_figure(fig, path)


def plot_curves(
  npz: pathlib.Path, path: pathlib.Path, title: str, *, auddc_text: str = ""
) -> pathlib.Path | None:
  """Distortion-distance curves of a latent attack (Gondim-Ribeiro et al. 2018).

  Each pair's curve (x: distortion ratio, y: adversarial-target distance ratio, both clipped
  to [0, 1] and closed by (0, 1) as in `vae_attacks.metrics.auddc`) faintly; the mean over
  pairs at each C bold. None when the file cannot be read.
  """
  try:
    with np.load(npz) as f:
      xs, ys = np.asarray(f["x"], np.float64), np.asarray(f["y"], np.float64)
  except (OSError, KeyError, ValueError):
    return None
  if xs.ndim != 2 or xs.shape != ys.shape or xs.size == 0:
    return None
  xs, ys = np.clip(xs, 0.0, 1.0), np.clip(ys, 0.0, 1.0)
  fig = _new_figure(5.0, 4.4)
  ax = fig.subplots()
  alpha = float(np.clip(3.0 / xs.shape[0], 0.05, 0.5))
  for px, py in zip(xs, ys, strict=True):
    ok = np.isfinite(px) & np.isfinite(py)
    if not ok.any():
      continue
    order = np.argsort(px[ok], kind="stable")
    cx = np.concatenate([[0.0], px[ok][order], [1.0]])
    cy = np.concatenate([[1.0], py[ok][order], py[ok][order][-1:]])
    ax.plot(cx, cy, color="tab:blue", alpha=alpha, lw=0.8)
  with np.errstate(invalid="ignore"):
    mx, my = np.nanmean(xs, axis=0), np.nanmean(ys, axis=0)
  ok = np.isfinite(mx) & np.isfinite(my)
  if ok.any():
    order = np.argsort(mx[ok], kind="stable")
    ax.plot(
      np.concatenate([[0.0], mx[ok][order], [1.0]]),
      np.concatenate([[1.0], my[ok][order], my[ok][order][-1:]]),
      color="black",
      lw=2.2,
      label="mean over pairs",
    )
    ax.legend(fontsize=8)
  ax.set_xlim(0, 1)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("input distortion / ||x_orig − x_target||")
  ax.set_ylabel("normalised distance of reconstruction to target")
  ax.grid(alpha=0.3)
  ax.set_title(f"{title} ({xs.shape[0]} pairs){auddc_text}", fontsize=9)
  _margins(fig, left=0.7, right=0.2, bottom=0.6, top=0.4, wspace=0.0, hspace=0.0)
  return _save_figure(fig, path)


def write_figures(view: DatasetView, fig_dir: pathlib.Path) -> dict[str, list]:
  """All figures of one dataset view: {model: [rates png, example grids..., curves...]}."""
  out: dict[str, list] = {}
  models = list(dict.fromkeys(r.get("model") for r in _sort_rows(view.rows)))
  for model in models:
    mine = [r for r in view.rows if r.get("model") == model]
    paths = [plot_rates(mine, fig_dir / f"{view.name}_{model}_rates.png", f"{view.name}: {model}")]
    attacks = list(dict.fromkeys(r.get("attack") for r in _sort_rows(mine)))
    for attack in attacks:
      npz = view.examples.get((model, attack))
      if npz is not None:
        p = plot_examples(
          npz,
          fig_dir / f"{view.name}_{model}_{attack}_examples.png",
          f"{view.name}: {model}, {attack}",
          attack=attack,
        )
        paths += [p] if p else []
    for attack in attacks:
      npz = view.curves.get((model, attack))
      if npz is None:
        continue
      rs = [r for r in mine if r.get("attack") == attack and _num(r.get("auddc")) is not None]
      text = ""
      if rs:
        text = f", AUDDC {fmt_rate(rs[0]['auddc'])} ± {fmt_rate(rs[0].get('auddc_std'))}"
      p = plot_curves(
        npz,
        fig_dir / f"{view.name}_{model}_{attack}_curves.png",
        f"{view.name}: {model}, {attack}",
        auddc_text=text,
      )
      paths += [p] if p else []
    out[model] = paths
  defence_paths = []
  for defence, npz in view.defense_examples.items():
    plot = DEFENCE_PLOTS.get(defence)
    if plot is not None:
      p = plot(npz, fig_dir / f"{view.name}_defense_{defence}.png", f"{view.name}: {defence}")
      defence_paths += [p] if p else []
  if defence_paths:
    out[DEFENCE_FIGURES] = defence_paths
  return out


def plot_projection(npz: pathlib.Path, path: pathlib.Path, title: str) -> pathlib.Path | None:
  """Projection defence: rows clean input / adversarial input (BPDA) / its projection.

  Columns are examples, labelled with the true class and the class the CNN gives the
  projection. None when the file cannot be read.
  """
  try:
    with np.load(npz) as f:
      x, x_adv, x_proj = f["x"], f["x_adv"], f["x_proj"]
      label, pred, eps = f["label"], f["pred_adv"], float(f["eps"])
  except (OSError, KeyError, ValueError):
    return None
  n = min(len(x), len(x_adv), len(x_proj))
  if n == 0:
    return None
  rows = (("clean", x), (f"adversarial (eps {eps:.3g})", x_adv), ("its projection", x_proj))
  fig = _new_figure(1.3 * n + 0.6, 1.4 * len(rows) + 0.6)
  axes = fig.subplots(len(rows), n, squeeze=False)
  for i, (name, images) in enumerate(rows):
    for j in range(n):
      ax = axes[i, j]
      arr, kw = _image(images[j])
      ax.imshow(arr, interpolation="nearest", **kw)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == len(rows) - 1:
        ax.set_xlabel(f"y {int(label[j])} → {int(pred[j])}", fontsize=7)
    axes[i, 0].set_ylabel(name, fontsize=7)
  fig.suptitle(f"{title}: input, attack through the projection, projection", fontsize=9)
  _margins(fig, left=0.4, right=0.1, bottom=0.3, top=0.45, wspace=0.08, hspace=0.1)
  return _save_figure(fig, path)


def pca_2d(z: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
  """Coordinates [N, 2] of z and of each array in `others` on z's two principal axes."""
  z = np.asarray(z, np.float64)
  centre = z.mean(axis=0)
  _, _, vt = np.linalg.svd(z - centre, full_matrices=False)
  axes = vt[:2].T  # [D, 2]
  if axes.shape[1] < 2:  # D = 1: a zero second axis
    axes = np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))
  return tuple((np.asarray(a, np.float64) - centre) @ axes for a in (z, *others))


def plot_gmvae_latent(npz: pathlib.Path, path: pathlib.Path, title: str) -> pathlib.Path | None:
  """GMVAE latent space: 2-D PCA of clean test codes by class, class means, adversarial codes.

  The adversarial codes (naive PGD as crosses, the adaptive attack as triangles, hollow when
  the defence rejected the input) are those of the largest eps. None when unreadable.
  """
  try:
    with np.load(npz) as f:
      data = {k: f[k] for k in f.files}
    z, label, means = data["z"], data["label"], data["means"]
  except (OSError, KeyError, ValueError):
    return None
  if len(z) < 2:
    return None
  attacks = [a for a in ("pgd", "pgd_adaptive") if f"z_{a}" in data]
  z2, m2, *adv2 = pca_2d(z, means, *(data[f"z_{a}"] for a in attacks))
  from matplotlib import colormaps  # noqa: PLC0415

  cmap = colormaps["tab10" if len(means) <= 10 else "tab20"]
  fig = _new_figure(6.0, 5.0)
  ax = fig.subplots()
  for k in range(len(means)):
    c = cmap(k % cmap.N)
    mine = z2[label == k]
    ax.scatter(mine[:, 0], mine[:, 1], s=10, color=c, alpha=0.6, label=str(k))
    ax.scatter(m2[k, 0], m2[k, 1], s=120, color=c, marker="*", edgecolors="black")
  markers = {"pgd": ("x", "PGD, naive"), "pgd_adaptive": ("^", "PGD, adaptive")}
  for a, coords in zip(attacks, adv2, strict=True):
    marker, name = markers[a]
    rej = data.get(f"rejected_{a}", np.zeros(len(coords), bool)).astype(bool)
    ax.scatter(coords[~rej, 0], coords[~rej, 1], s=25, c="black", marker=marker,
               label=f"{name}, accepted")  # fmt: skip
    if marker != "x":
      ax.scatter(coords[rej, 0], coords[rej, 1], s=25, facecolors="none", edgecolors="red",
                 marker=marker, label=f"{name}, rejected")  # fmt: skip
    else:
      ax.scatter(coords[rej, 0], coords[rej, 1], s=25, c="red", marker=marker,
                 label=f"{name}, rejected")  # fmt: skip
  ax.set_xlabel("PC 1 of the clean codes", fontsize=8)
  ax.set_ylabel("PC 2", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
  eps = float(data["eps"]) if "eps" in data else float("nan")
  ax.set_title(f"{title}: latent means (stars: class means), attacks at eps {eps:.3g}", fontsize=8)
  _margins(fig, left=0.6, right=1.6, bottom=0.5, top=0.4, wspace=0.0, hspace=0.0)
  return _save_figure(fig, path)


DEFENCE_FIGURES = "defences"  # the key of the defence figures in write_figures' answer
DEFENCE_PLOTS = {"projection": plot_projection, "gmvae": plot_gmvae_latent}


# --------------------------------------------------------------------------------------------
# Entry points.


def _write(
  runs: Sequence[RunFiles], out_dir: pathlib.Path, title: str, figures: bool
) -> pathlib.Path:
  views = build_views(runs)
  figs = {v.name: write_figures(v, out_dir / "figures") for v in views} if figures else {}
  text = render_summary(views, title=title, out_dir=out_dir, figures=figs)
  path = out_dir / "summary.md"
  store.write_text_atomic(path, text)
  return path


def write_report(
  workdir: os.PathLike, *, title: str | None = None, figures: bool | None = None
) -> pathlib.Path:
  """Writes `workdir/summary.md` and `workdir/figures/*.png` for one run's work directory.

  Safe to call at any point of a run (after each model, at the end): it reads what is there.

  Args:
    workdir: the run's work directory.
    title: the report's heading; default from the config's name.
    figures: draw figures; default the config's `output.figures` (True when absent).

  Returns:
    The path of summary.md.
  """
  run = load_run(workdir)
  if figures is None:
    figures = bool((run.config.get("output") or {}).get("figures", True))
  title = title or f"vae_attacks: {run.config.get('name') or run.workdir.name}"
  return _write([run], run.workdir, title, figures)


def write_combined_report(
  out_dir: os.PathLike,
  workdirs: Sequence[os.PathLike],
  *,
  title: str | None = None,
  figures: bool = True,
) -> pathlib.Path:
  """One summary.md over several work directories (e.g. MNIST and LFW runs), with H1.

  A cell (dataset, model, attack, norm, eps) present in two work directories is taken from
  the later one in `workdirs`. Figures go to `out_dir/figures`, linked with relative paths.

  Returns:
    The path of out_dir/summary.md.
  """
  out_dir = pathlib.Path(out_dir)
  runs = [load_run(w) for w in workdirs]
  title = title or "vae_attacks: " + ", ".join(r.config.get("name") or r.workdir.name for r in runs)
  return _write(runs, out_dir, title, figures)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """`python -m experiments.report WORKDIR` or `... --out=DIR WORKDIR [WORKDIR ...]`."""
  import argparse  # noqa: PLC0415

  parser = argparse.ArgumentParser(
    prog="python -m experiments.report", description="Writes summary.md and figures."
  )
  parser.add_argument("workdirs", nargs="+", help="run work directories (MNIST and/or LFW)")
  parser.add_argument("--out", help="folder of a combined report (default: the one workdir)")
  parser.add_argument("--title", default=None)
  parser.add_argument("--no-figures", dest="figures", action="store_false")
  args = parser.parse_args(argv)
  if args.out is None and len(args.workdirs) > 1:
    parser.error("several work directories need --out=DIR for the combined report")
  try:
    if args.out is None:
      figures = None if args.figures else False
      path = write_report(args.workdirs[0], title=args.title, figures=figures)
    else:
      path = write_combined_report(args.out, args.workdirs, title=args.title, figures=args.figures)
  except store.OutOfSpace as e:  # one line naming the file, as experiments.main does
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(path)
  return path


if __name__ == "__main__":
  main()
