"""The study's verdicts and reference eps: pure functions over result rows, no I/O, so that
they can be tested on rows with known numbers.

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

import math
from collections.abc import Mapping, Sequence

from experiments.report.rows import (
  effectiveness,
  interval,
  is_penalty_attack,
  n_pairs,
  num,
  row_key,
)
from vae_attacks import data, metrics

BASELINE = "cnn"
H0_TEXT = "VAEs are less vulnerable to adversarial examples than CNN classifiers"
H1_TEXT = (
  "attacks on high-pixel-density inputs (LFW) are more effective than on low-pixel-density "
  "inputs (MNIST)"
)
# Reference eps of the model x attack table: the strongest setting at which the adversarial
# inputs are still mostly valid for every model.
MIN_REFERENCE_VALIDITY = 0.5


def rate_with_ci(row: Mapping, measure: str) -> tuple[float | None, tuple[float, float] | None]:
  """(rate, 95% Wilson interval) of `measure` on one row: "success" or "effective".

  "effective" is the fraction of pairs of high effectiveness (valid and confident). A missing
  stored interval is recomputed from the rate and n_pairs; None when n_pairs is unknown.
  """
  n = n_pairs(row)
  if measure == "success":
    rate = num(row.get("success_rate"))
    ci = interval(row, "success_rate")
    k = None if rate is None else round(rate * n)
  elif measure == "effective":
    k = num(effectiveness(row).get("high"))
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
    n=n_pairs(row),
    success=s_rate,
    success_ci=s_ci,
    effective=e_rate,
    effective_ci=e_ci,
    eps=row["eps"],
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


def _cell(ref: tuple[str, Mapping], other: tuple[str, Mapping], **keys) -> dict:
  """One compared cell: its `keys`, the numbers of each side (a (name, row) pair) and how the
  other side's intervals lie against the reference's, per measure (see `compare`)."""
  (ref_name, ref_row), (name, row) = ref, other
  a, b = _side(ref_row), _side(row)
  return dict(
    keys,
    **{ref_name: a, name: b},
    success=compare(b["success_ci"], a["success_ci"]),
    effective=compare(b["effective_ci"], a["effective_ci"]),
  )


def _verdict(text: str, cells: list, favour: str, against: str, sides: Sequence[str], **extra):
  """A hypothesis' answer from its cells: tallies per measure and per attack, the verdict (by
  success rate) and the range of pairs per cell on each side."""
  success = _tally(cells, "success", favour, against)
  return dict(
    hypothesis=text,
    cells=cells,
    success=success,
    effective=_tally(cells, "effective", favour, against),
    verdict=success["verdict"],
    pairs={side: _pairs_range(cells, side) for side in sides},
    per_attack=_per_attack(cells, favour, against),
    **extra,
  )


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
    keys = dict(dataset=r.get("dataset"), attack=r.get("attack"), norm=r.get("norm"))
    cells.append(_cell(("baseline", cnn), ("vae", r), **keys, eps=r.get("eps"), model=model))
  return _verdict(H0_TEXT, cells, "below", "above", ("baseline", "vae"))


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
    pixels: {dataset: H * W * C}; defaults to each dataset's full size (data.DATASETS).
    rtol: relative tolerance when matching scaled budgets (configs round them).

  Returns:
    {"hypothesis", "cells", "success", "effective", "verdict", "pairs": {"high", "low"},
     "per_attack", "norms": norms compared, "excluded": penalty-weight attacks left out,
     "unmatched": low rows without a comparable high row, "pixel_ratio"}; tallies count
    'above' as favour.
  """
  pixels = {**{n: spec.pixels for n, spec in data.DATASETS.items()}, **(pixels or {})}
  ratio = pixels[high] / pixels[low]
  high_rows = [r for r in rows if r.get("dataset") == high]
  cells, excluded, unmatched = [], set(), 0
  for r in rows:
    if r.get("dataset") != low:
      continue
    attack, norm, eps = r.get("attack"), r.get("norm"), num(r.get("eps"))
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
      and num(h.get("eps")) is not None
      and math.isclose(num(h.get("eps")), want, rel_tol=rtol)
    ]
    if not match:
      unmatched += 1
      continue
    h = min(match, key=lambda m: abs(num(m.get("eps")) - want))
    keys = dict(model=r.get("model"), attack=attack, norm=norm, eps=r.get("eps"))
    cells.append(_cell(("low", r), ("high", h), **keys, eps_high=h.get("eps")))
  return _verdict(
    H1_TEXT,
    cells,
    "above",
    "below",
    ("high", "low"),
    norms=sorted({c["norm"] for c in cells}),
    excluded=sorted(excluded),
    unmatched=unmatched,
    pixel_ratio=ratio,
  )


# --------------------------------------------------------------------------------------------
# Reference eps.


def strength(attack: str, eps: float) -> float:
  """Larger is stronger: a budget eps as is, a penalty weight C negated."""
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
    eps = num(r.get("eps"))
    if eps is None:
      continue
    groups.setdefault((r.get("dataset"), r.get("attack"), r.get("norm")), {}).setdefault(
      eps, []
    ).append(r)
  out = {}
  for (dataset, attack, norm), by_eps in groups.items():
    order = sorted(by_eps, key=lambda e: strength(attack, e))
    ok = [
      e
      for e in order
      if all((num(r.get("validity_rate")) or 0.0) >= min_validity for r in by_eps[e])
    ]
    out[(dataset, attack, norm)] = ok[-1] if ok else order[0]
  return out
