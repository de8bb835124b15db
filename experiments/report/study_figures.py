"""The study section's figures (matplotlib's object API through figures.py's canvas and atomic
writer): survival curves of the minimal budgets, and Tables 2 and 3 as stacked bars. Each
title states the pairs it shows. (The AUDDC curves of latent_l2 and latent_kl per VAE are
figures.py's `plot_curves`, drawn from the runs' curves/*.npz.)"""

import pathlib
from collections.abc import Sequence

import numpy as np

from experiments import store
from experiments.report import study
from experiments.report.figures import amplified, as_image, new_figure, save_figure, set_margins
from experiments.report.study import BUDGET_NORMS, StudyData
from vae_attacks import metrics, stats

_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
_LEVEL_COLOURS = ("tab:red", "tab:orange", "tab:olive", "lightgrey")


def pairs_text(recs: dict) -> str:
  """What pairs a figure shows: 'the same N pairs (K sources) for every model' or per model."""
  items = list(recs.items())
  if not items:
    return "no pairs"
  first = items[0][1]
  if all(study.same_pairs(first, r) for _, r in items[1:]):
    n = first["source_index"].size
    k = study.n_sources(first)
    return f"the same {n} pairs ({k} sources) for {', '.join(m for m, _ in items)}"
  return "pairs: " + ", ".join(f"{m} {r['source_index'].size}" for m, r in items)


def plot_survival(d: StudyData, attack: str, path: pathlib.Path) -> pathlib.Path | None:
  """Fraction of pairs broken against the budget (`stats.survival`, 95% Wilson band), every
  model with a record of `attack` on the same axes; None when no model has one."""
  recs = {}
  for model in d.models():
    row = d.budget_row(model, attack)
    if row is not None:
      recs[model] = d.record(row)
  if not recs:
    return None
  budgets = {m: study.budgets_of(r) for m, r in recs.items()}
  finite = np.concatenate([b[np.isfinite(b)] for b in budgets.values()])
  top = float(finite.max()) * 1.05 if finite.size else 1.0
  grid = np.linspace(0.0, top, 200)
  fig = new_figure(5.6, 4.2)
  ax = fig.subplots()
  for i, (model, b) in enumerate(budgets.items()):
    s = stats.survival(b, grid)
    colour = _COLOURS[i % len(_COLOURS)]
    ax.step(grid, s.fraction, where="post", color=colour, label=model, lw=1.6)
    ax.fill_between(grid, s.lo, s.hi, step="post", color=colour, alpha=0.15)
  ax.set_xlim(0, top)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel(f"budget ({BUDGET_NORMS.get(attack, '')})")
  ax.set_ylabel("fraction of pairs broken")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  ax.set_title(f"{d.name}: {attack} minimal budget\n{pairs_text(recs)}", fontsize=8)
  set_margins(fig, left=0.7, right=0.2, bottom=0.6, top=0.55, wspace=0.0, hspace=0.0)
  return save_figure(fig, path)


def plot_shares(d: StudyData, path: pathlib.Path) -> pathlib.Path | None:
  """Tables 2 / 3 as stacked bars: per attack a group of bars, one per model, stacked by
  effectiveness level at the attack's reference eps; None when there is no cell."""
  cols, eps_of, cells = study.effectiveness_shares(d)
  models = list(dict.fromkeys(m for m, _ in cells))
  if not cols:
    return None
  width = 0.8 / max(len(models), 1)
  fig = new_figure(max(6.0, 0.3 * len(cols) * max(len(models), 1) + 2), 4.6)
  ax = fig.subplots()
  ns = set()
  for j, model in enumerate(models):
    for i, col in enumerate(cols):
      sh = cells.get((model, col))
      if sh is None:
        continue
      ns.add(sh[1])
      bottom = 0.0
      x = i + (j - (len(models) - 1) / 2) * width
      for k, share in enumerate(sh[0]):
        label = metrics.LEVELS[k] if (i, j) == (0, 0) else None
        ax.bar(x, share, width * 0.9, bottom=bottom, color=_LEVEL_COLOURS[k], label=label)
        bottom += share
      ax.text(x, 1.01, model[:4], rotation=90, fontsize=6, ha="center", va="bottom")
  ax.set_xticks(range(len(cols)))
  ax.set_xticklabels([f"{c}\n{eps_of[c]:.3g}" for c in cols], fontsize=7, rotation=30)
  ax.set_ylim(0, 1.25)
  ax.set_ylabel("share of pairs")
  ax.legend(fontsize=7, ncol=4, loc="upper right")
  n = ", ".join(str(v) for v in sorted(ns))
  ax.set_title(
    f"{d.name}: effectiveness at each attack's reference eps ({n} pairs per bar; "
    "bars: " + ", ".join(models) + ")",
    fontsize=8,
  )
  set_margins(fig, left=0.7, right=0.2, bottom=1.0, top=0.4, wspace=0.0, hspace=0.0)
  return save_figure(fig, path)


# The study's three attacks, whose examples are shown on every model for the same pairs.
EXAMPLE_ATTACKS = ("bim", "bim_l1", "lbfgs")


def plot_same_pairs(
  d: StudyData, attack: str, path: pathlib.Path, *, max_pairs: int = 6
) -> pathlib.Path | None:
  """The same pairs on every model: the sources (top row), then per model the adversarial
  input at the attack's reference eps, titled with the model's prediction, the target and
  whether the attack succeeded, and its perturbation amplified. From the runs' examples/*.npz
  (the first pairs of the shared list, so the same on every model) and the rows' records.
  None when a model lacks the file or its row at that eps."""
  _, eps_of, _ = study.effectiveness_shares(d)
  eps = eps_of.get(attack)
  if eps is None:
    return None
  panels = []  # (model, x, x_adv at eps, record)
  for model in d.models():
    npz, row = d.examples.get((model, attack)), None
    for r in d.rows:
      if (r.get("model"), r.get("attack")) == (model, attack) and np.isclose(r.get("eps"), eps):
        row = r
    if npz is None or row is None or d.record(row) is None:
      continue
    try:
      f = store.load_examples(npz)
      grid = np.atleast_1d(f["eps"])
      e = int(np.argmin(np.abs(grid - eps)))
      panels.append((model, f["x"], f["x_adv"][e], d.record(row)))
    except (OSError, KeyError, ValueError):
      continue
  if not panels:
    return None
  x = panels[0][1]
  n = min(max_pairs, *(len(p[1]) for p in panels))
  if any(not np.array_equal(p[1][:n], x[:n]) for p in panels):
    return None  # not the same pairs: a per-model run (attacks.shared_pairs=False)
  rows = 1 + 2 * len(panels)
  fig = new_figure(1.6 * n + 0.8, 1.55 * rows + 0.7)
  axes = fig.subplots(rows, n, squeeze=False)
  target = panels[0][3]["target"]
  for i in range(n):
    arr, kw = as_image(x[i])
    axes[0, i].imshow(arr, interpolation="nearest", **kw)
    axes[0, i].set_title(f"source {int(panels[0][3]['source_label'][i])} → {int(target[i])}",
                         fontsize=7)  # fmt: skip
    for j, (model, _, x_adv, rec) in enumerate(panels):
      ok = bool(rec["success"][i])
      arr, kw = as_image(x_adv[i])
      axes[1 + 2 * j, i].imshow(arr, interpolation="nearest", **kw)
      axes[1 + 2 * j, i].set_title(
        f"pred {int(rec['prediction'][i])} {'✓' if ok else '✗'}", fontsize=7,
        color="tab:red" if ok else "black",
      )  # fmt: skip
      arr, kw = as_image(amplified(x_adv[i] - x[i]))
      axes[2 + 2 * j, i].imshow(arr, interpolation="nearest", **kw)
      axes[2 + 2 * j, i].set_xlabel(f"max|δ| {float(np.max(np.abs(x_adv[i] - x[i]))):.3g}",
                                    fontsize=6)  # fmt: skip
      if i == 0:
        axes[1 + 2 * j, 0].set_ylabel(f"{model}\nadversarial", fontsize=7)
        axes[2 + 2 * j, 0].set_ylabel("δ (amplified)", fontsize=7)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(
    f"{d.name}: {attack} at eps {eps:.4g}, the same first {n} pairs on "
    + ", ".join(p[0] for p in panels)
    + " (✓: the model gives the target)",
    fontsize=8,
  )
  set_margins(fig, left=0.55, right=0.1, bottom=0.3, top=0.6, wspace=0.08, hspace=0.35)
  return save_figure(fig, path)


def write_study_figures(data: Sequence[StudyData], fig_dir: pathlib.Path) -> list[pathlib.Path]:
  """Every study figure: per dataset the survival curves of each budget attack, then the
  effectiveness shares."""
  out = []
  for d in data:
    for attack in study.BUDGET_ATTACKS:
      p = plot_survival(d, attack, fig_dir / f"{d.name}_study_survival_{attack}.png")
      out += [p] if p else []
    p = plot_shares(d, fig_dir / f"{d.name}_study_effectiveness.png")
    out += [p] if p else []
    for attack in EXAMPLE_ATTACKS:
      p = plot_same_pairs(d, attack, fig_dir / f"{d.name}_study_examples_{attack}.png")
      out += [p] if p else []
  return out
