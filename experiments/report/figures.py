"""The report's figures: matplotlib's object API on an Agg canvas (no pyplot, no global backend
state), imported inside the drawing functions so that `import experiments.report` stays light.
"""

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from experiments import store
from experiments.report.rows import DatasetView, interval, is_penalty_attack, num
from experiments.report.tables import DEFENCE_FIGURES, fmt_rate, sort_rows
from experiments.report.verdicts import strength


def new_figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def set_margins(fig, *, left, right, bottom, top, wspace, hspace):
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


def save_figure(fig, path: pathlib.Path) -> pathlib.Path:
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


def _pairs_text(rows: Sequence[Mapping]) -> str:
  """How many pairs each point of a rates figure is over."""
  ns = sorted({int(r["n_pairs"]) for r in rows if isinstance(r.get("n_pairs"), int)})
  if not ns:
    return "pairs not recorded"
  return f"{ns[0]} pairs per point" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} pairs per point"


def plot_rates(rows: Sequence[Mapping], path: pathlib.Path, title: str) -> pathlib.Path:
  """Success rate and mean target confidence against eps, one column per norm family.

  Error bars are the rows' 95% intervals (Wilson for the rate, t for the mean).
  """
  families: dict[str, dict[str, list]] = {}
  for r in rows:
    if num(r.get("eps")) is None:
      continue
    fam = families.setdefault(_family(r.get("attack"), r.get("norm")), {})
    fam.setdefault(str(r.get("attack")), []).append(r)
  cols = max(len(families), 1)
  fig = new_figure(4.2 * cols, 6.4)
  axes = fig.subplots(2, cols, squeeze=False)
  for j, (fam, by_attack) in enumerate(sorted(families.items())):
    for a_index, (attack, rs) in enumerate(sorted(by_attack.items())):
      rs = sorted(rs, key=lambda r: num(r["eps"]))
      eps = np.array([num(r["eps"]) for r in rs])
      for i, field in enumerate(("success_rate", "mean_target_prob")):
        ci_field = field
        y = np.array([num(r.get(field)) if num(r.get(field)) is not None else np.nan for r in rs])
        err = np.zeros((2, len(rs)))
        for k, r in enumerate(rs):
          ci = interval(r, ci_field)
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
  fig.suptitle(f"{title} ({_pairs_text(rows)})")
  set_margins(fig, left=0.75, right=0.2, bottom=0.6, top=0.65, wspace=0.3, hspace=0.45)
  return save_figure(fig, path)


def as_image(a: np.ndarray) -> tuple[np.ndarray, dict]:
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
    data = store.load_examples(npz)
    x, x_adv, eps = data["x"], data["x_adv"], np.atleast_1d(data["eps"])
  except (OSError, KeyError, ValueError):
    return None
  if x_adv.ndim != x.ndim + 1 or x_adv.shape[0] == 0 or x.shape[0] == 0:
    return None
  strengths = [strength(attack, float(e)) for e in eps]
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
  fig = new_figure(1.9 * len(columns), 1.9 * n + 0.6)
  axes = fig.subplots(n, len(columns), squeeze=False)
  src_label, target = data.get("source_label"), data.get("target")
  for i in range(n):
    for j, (name, image) in enumerate(columns):
      ax = axes[i, j]
      arr, kw = as_image(image(i))
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
  fig.suptitle(f"{title}, eps {float(eps[e]):.4g}: the first {n} of the sweep's pairs", fontsize=9)
  set_margins(fig, left=0.35, right=0.1, bottom=0.25, top=0.6, wspace=0.08, hspace=0.2)
  return save_figure(fig, path)


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
  fig = new_figure(5.0, 4.4)
  ax = fig.subplots()
  alpha = float(np.clip(3.0 / xs.shape[0], 0.05, 0.5))
  drawn = 0  # pairs with at least one defined point (the others have no curve)
  for px, py in zip(xs, ys, strict=True):
    ok = np.isfinite(px) & np.isfinite(py)
    if not ok.any():
      continue
    drawn += 1
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
  shown = f"{drawn} pairs" if drawn == xs.shape[0] else f"{drawn} of {xs.shape[0]} pairs drawn"
  ax.set_title(f"{title} ({shown}){auddc_text}", fontsize=9)
  set_margins(fig, left=0.7, right=0.2, bottom=0.6, top=0.4, wspace=0.0, hspace=0.0)
  return save_figure(fig, path)


def _auddc_text(rows: Sequence[Mapping], attack: str) -> str:
  """', AUDDC mean ± std' of an attack's rows for a curves figure's title, or ''."""
  rs = [r for r in rows if r.get("attack") == attack and num(r.get("auddc")) is not None]
  if not rs:
    return ""
  n = rs[0].get("n_auddc_pairs")
  over = f" over {n} pairs" if isinstance(n, int) else ""
  return f", AUDDC{over} {fmt_rate(rs[0]['auddc'])} ± {fmt_rate(rs[0].get('auddc_std'))}"


def write_figures(view: DatasetView, fig_dir: pathlib.Path) -> dict[str, list]:
  """All figures of one dataset view: {model: [rates png, example grids..., curves...]}."""
  out: dict[str, list] = {}
  models = list(dict.fromkeys(r.get("model") for r in sort_rows(view.rows)))
  for model in models:
    mine = [r for r in view.rows if r.get("model") == model]
    paths = [plot_rates(mine, fig_dir / f"{view.name}_{model}_rates.png", f"{view.name}: {model}")]
    attacks = list(dict.fromkeys(r.get("attack") for r in sort_rows(mine)))
    for kind, files in (("examples", view.examples), ("curves", view.curves)):
      for attack in attacks:
        npz = files.get((model, attack))
        if npz is None:
          continue
        png = fig_dir / f"{view.name}_{model}_{attack}_{kind}.png"
        title = f"{view.name}: {model}, {attack}"
        if kind == "examples":
          p = plot_examples(npz, png, title, attack=attack)
        else:
          p = plot_curves(npz, png, title, auddc_text=_auddc_text(mine, attack))
        paths += [p] if p else []
    out[model] = paths
  defence_paths = []
  for defence, npz in view.defense_examples.items():
    plot = DEFENSE_PLOTS.get(_figure_kind(npz, defence))
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
  fig = new_figure(1.3 * n + 0.6, 1.4 * len(rows) + 0.6)
  axes = fig.subplots(len(rows), n, squeeze=False)
  for i, (name, images) in enumerate(rows):
    for j in range(n):
      ax = axes[i, j]
      arr, kw = as_image(images[j])
      ax.imshow(arr, interpolation="nearest", **kw)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == len(rows) - 1:
        ax.set_xlabel(f"y {int(label[j])} → {int(pred[j])}", fontsize=7)
    axes[i, 0].set_ylabel(name, fontsize=7)
  fig.suptitle(f"{title}: input, attack through the projection, projection", fontsize=9)
  set_margins(fig, left=0.4, right=0.1, bottom=0.3, top=0.45, wspace=0.08, hspace=0.1)
  return save_figure(fig, path)


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
  fig = new_figure(6.0, 5.0)
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
  set_margins(fig, left=0.6, right=1.6, bottom=0.5, top=0.4, wspace=0.0, hspace=0.0)
  return save_figure(fig, path)


# The figure of a defence's defense_examples/<defence>.npz, by the kind the run wrote into it
# (`figure_kind`, from experiments.defenses.DefenseSpec.figure).
DEFENSE_PLOTS = {"projection": plot_projection, "gmvae_latent": plot_gmvae_latent}
# Files written before the kind was recorded: the two defences that wrote them.
_LEGACY_KINDS = {"projection": "projection", "gmvae": "gmvae_latent"}


def _figure_kind(npz: pathlib.Path, defence: str) -> str | None:
  try:
    with np.load(npz) as f:
      if "figure_kind" in f.files:
        return str(f["figure_kind"])
  except (OSError, ValueError):
    return None
  return _LEGACY_KINDS.get(defence)
