"""Markdown building blocks of the report: number formats, tables, the per-row lines."""

import html
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

from experiments.report.rows import attack_index, effectiveness, num
from experiments.report.verdicts import BASELINE, rate_with_ci
from vae_attacks import metrics

DASH = "—"
DEFENCE_FIGURES = "defences"  # the key of the defence figures in figures.write_figures' answer


def fmt_rate(v) -> str:
  """A rate / probability / SSIM with 3 decimals, or a dash."""
  v = num(v)
  return DASH if v is None else f"{v:.3f}"


def fmt_num(v) -> str:
  """A norm, eps or count-like number with 4 significant digits, or a dash."""
  v = num(v)
  return DASH if v is None else f"{v:.4g}"


def fmt_int(v) -> str:
  """A count with thousands separators, or a dash."""
  v = num(v)
  return DASH if v is None else f"{round(v):,}"


def fmt_ci(ci, fmt=fmt_rate) -> str:
  """'[lo, hi]' of an interval, or '[—]'."""
  if not isinstance(ci, (list, tuple)) or len(ci) != 2:
    return f"[{DASH}]"
  return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
  """A markdown table ('|' inside a cell becomes '/')."""
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(str(c).replace("|", "/") for c in line) + " |" for line in lines]
  return "\n".join(out)


def sort_rows(rows: Iterable[Mapping]) -> list:
  """The CNN first, then by model, attack (in the registry's order), norm and eps."""

  def key(r):
    model = r.get("model") or ""
    attack = r.get("attack") or ""
    a_index = attack_index(attack)
    return (model != BASELINE, model, a_index, attack, r.get("norm") or "", num(r.get("eps")) or 0)

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
  """(modal level, 'high / moderate / low / ineffective' counts) of a row."""
  eff = effectiveness(row)
  counts = " / ".join(fmt_num(eff.get(level)) for level in metrics.LEVELS)
  return str(eff.get("modal") or DASH), counts


def _cell_and_success(r: Mapping) -> list[str]:
  """The first columns of a row's line: model, attack, norm, eps, success rate [CI]."""
  return [
    str(r.get("model")),
    str(r.get("attack")),
    str(r.get("norm")),
    fmt_num(r.get("eps")),
    f"{fmt_rate(r.get('success_rate'))} {fmt_ci(r.get('success_rate_ci'))}",
  ]


def reference_line(r: Mapping) -> list[str]:
  """A row's line of the model x attack table at the reference eps."""
  modal, counts = _effect_cells(r)
  return [
    *_cell_and_success(r),
    fmt_rate(r.get("mean_target_prob", r.get("mean_confidence"))),  # older rows: both
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


def full_line(r: Mapping) -> list[str]:
  """A row's line of the full table (every eps)."""
  _, counts = _effect_cells(r)
  e_rate, e_ci = rate_with_ci(r, "effective")
  return [
    *_cell_and_success(r),
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
  """A model's parameter count, or the sum of its parts' (a VAE and its latent classifier)."""
  if num(m.get("param_count")) is not None:
    return m["param_count"]
  parts = [v.get("param_count") for v in m.values() if isinstance(v, dict)]
  parts = [p for p in parts if num(p) is not None]
  return sum(parts) if parts else None


def train_table(train: Mapping) -> str:
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
  return table(header, lines)


# Classes of a dataset when fixed (LFW's depend on data.min_faces_per_person).
NUM_CLASSES = {"mnist": 10}


CHANCE_MARGIN = 0.05  # test accuracy at most chance + this: "at chance level"


def weak_model_warnings(train: Mapping, dataset: str, floor: float) -> list[str]:
  """One warning per model too weak for a verdict: at chance level (test accuracy at most
  `CHANCE_MARGIN` above chance: always answering the test set's most frequent class, the
  `majority_accuracy` a run records, else guessing among a fixed class count), or below
  `floor` x the best model's test accuracy (the study section's weak-model floor)."""
  acc = {
    m: float(v["test_accuracy"])
    for m, v in train.items()
    if isinstance(v, dict) and isinstance(v.get("test_accuracy"), (int, float))
  }
  if not acc:
    return []
  best_model = max(acc, key=acc.get)
  best, k = acc[best_model], NUM_CLASSES.get(dataset)
  out = []
  for m, a in acc.items():
    majority = train[m].get("majority_accuracy")
    if isinstance(majority, (int, float)):
      chance, how = float(majority), "always answering the most frequent class gives"
    elif k:
      chance, how = 1.0 / k, f"guessing among {k} classes gives"
    else:
      chance, how = None, ""
    if chance is not None and a <= chance + CHANCE_MARGIN:
      out.append(
        f"⚠ **{m} is at chance level**: test accuracy {a:.3f}, {how} {chance:.3f}; its rows "
        "say nothing about its robustness, and no verdict should rest on them (train it "
        "longer: the :quick configs are for trying the pipeline)."
      )
    elif a < floor * best:
      out.append(
        f"⚠ **{m} is weak**: test accuracy {a:.3f} is below {floor:g} x that of {best_model} "
        f"({best:.3f}); comparisons involving it are weak evidence (the study section gives "
        "every verdict with and without it)."
      )
  return out


def _left_out(r: Mapping) -> str:
  """Pairs of the row without a finite AUDDC (left out of the mean), or '' when unknown."""
  n, kept = r.get("n_pairs"), r.get("n_auddc_pairs")
  if not isinstance(n, int) or not isinstance(kept, int):
    return ""
  return str(n - kept)


def auddc_lines(rows: Sequence[Mapping]) -> list[list[str]]:
  """One line per (model, attack, AUDDC value): the area is over the C grid, which every row
  of that grid repeats; the grid's C values are listed."""
  groups: dict[tuple, list] = {}
  for r in sort_rows(rows):
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
        _left_out(rs[0]),
      ]
    )
  return lines


def details(summary: str, body: str) -> str:
  """A collapsed HTML <details> block around markdown."""
  return f"<details><summary>{html.escape(summary)}</summary>\n\n{body}\n\n</details>"


def rel(path: pathlib.Path, start: pathlib.Path) -> str:
  """`path` relative to `start`, with forward slashes (a link inside summary.md)."""
  return pathlib.Path(os.path.relpath(path, start)).as_posix()


def stage_seconds(train: Mapping, rows: Iterable[Mapping]) -> list[tuple[str, str, float]]:
  """(kind, what, wall seconds) of each stage of a dataset's run: each model's training
  (`train_seconds`, as recorded where it was trained, also for an imported model) and each
  (model, attack, norm) sweep (its rows' `seconds`, one share per eps, summed back), a
  defence's rows by (defence, attack), a transfer's by (source -> target, attack). Stages
  without a recorded time are left out."""
  out = [
    ("train", model, num(m.get("train_seconds")))
    for model, m in train.items()
    if isinstance(m, dict) and num(m.get("train_seconds")) is not None
  ]
  sweeps: dict = {}
  for r in sort_rows(rows):
    if num(r.get("seconds")) is None:
      continue
    who = r.get("model") or r.get("defense")
    if r.get("source") and r.get("target"):
      who = f"{r['source']} -> {r['target']}"
    what = f"{who} {r.get('attack')} {r.get('norm') or ''}".rstrip()
    sweeps[what] = sweeps.get(what, 0.0) + num(r["seconds"])
  return out + [("attack", what, s) for what, s in sweeps.items()]


def stage_table(stages: Sequence[tuple[str, str, float]]) -> str:
  """The stages, longest first, with their share of the total, and the totals per kind."""
  total = sum(s for _, _, s in stages)
  if not stages or total <= 0:
    return "(no stage has a recorded time)"
  lines = [
    [kind, what, f"{s:,.0f}", f"{s / 60:.1f}", f"{s / total:.1%}"]
    for kind, what, s in sorted(stages, key=lambda st: -st[2])
  ]
  for kind in ("train", "attack"):
    s = sum(t for k, _, t in stages if k == kind)
    lines.append([f"**all {kind}**", "", f"{s:,.0f}", f"{s / 60:.1f}", f"{s / total:.1%}"])
  lines.append(["**total**", "", f"{total:,.0f}", f"{total / 60:.1f}", "100%"])
  return table(("stage", "model / sweep", "wall s", "min", "share"), lines)
