"""The study's report: `summary.md` and figures from one or several run work directories.

  write_report(workdir)                      -> workdir/summary.md, workdir/figures/*.png
  write_combined_report(out_dir, workdirs)   -> out_dir/summary.md, out_dir/figures/*.png
  python -m experiments.report WORKDIR | --out=DIR WORKDIR [WORKDIR ...] [--nofigures]

The package reads run work directories and writes the report; it never changes a run's files.
Data flows one way, and no module here imports the runs (experiments.run, .attacks,
.defenses):

  rows       reading a work directory, selecting the current rows, the rows' fields; what an
             attack's name means comes from vae_attacks.attacks.registry
  verdicts   H0, H1 and the reference eps: pure functions over rows, no I/O
  tables     number formats and markdown tables
  markdown   summary.md: how to read it, the verdicts, one section per dataset
  defenses   the defence tables
  figures    the PNGs (matplotlib, imported when drawing)
  study      the primary endpoints, paired cell tests, minimal budgets, Tables 2 and 3 from the
             rows' per-pair records (study_markdown, study_figures draw them; shown only when
             records exist)
  cli        the absl command line (`python -m experiments.report`)
"""

import os
import pathlib
from collections.abc import Sequence

from experiments import store
from experiments.report import study
from experiments.report.defenses import defense_markdown
from experiments.report.figures import (
  DEFENSE_PLOTS,
  amplified,
  pca_2d,
  plot_curves,
  plot_examples,
  plot_gmvae_latent,
  plot_projection,
  plot_rates,
  write_figures,
)
from experiments.report.markdown import h0_markdown, h1_markdown, how_to_read, render_summary
from experiments.report.rows import (
  DEFENSES_FILE,
  DatasetView,
  RunFiles,
  attack_family,
  build_views,
  is_penalty_attack,
  load_run,
  read_rows,
  row_key,
  select_defense_rows,
  select_rows,
  settings_hash,
)
from experiments.report.study_figures import write_study_figures
from experiments.report.study_markdown import study_markdown
from experiments.report.tables import DASH, DEFENCE_FIGURES, fmt_ci, fmt_int, fmt_num, fmt_rate
from experiments.report.verdicts import (
  BASELINE,
  H0_TEXT,
  H1_TEXT,
  MIN_REFERENCE_VALIDITY,
  budget_scale,
  compare,
  decide,
  h0_verdict,
  h1_verdict,
  rate_with_ci,
  reference_eps,
)

__all__ = [
  "BASELINE",
  "DASH",
  "DEFENCE_FIGURES",
  "DEFENSE_PLOTS",
  "DEFENSES_FILE",
  "H0_TEXT",
  "H1_TEXT",
  "MIN_REFERENCE_VALIDITY",
  "DatasetView",
  "RunFiles",
  "amplified",
  "attack_family",
  "budget_scale",
  "build_views",
  "compare",
  "decide",
  "defense_markdown",
  "fmt_ci",
  "fmt_int",
  "fmt_num",
  "fmt_rate",
  "h0_markdown",
  "h0_verdict",
  "h1_markdown",
  "h1_verdict",
  "how_to_read",
  "is_penalty_attack",
  "load_run",
  "pca_2d",
  "plot_curves",
  "plot_examples",
  "plot_gmvae_latent",
  "plot_projection",
  "plot_rates",
  "rate_with_ci",
  "read_rows",
  "reference_eps",
  "render_summary",
  "row_key",
  "select_defense_rows",
  "select_rows",
  "settings_hash",
  "write_combined_report",
  "write_figures",
  "write_report",
  "write_study_figures",
  "study_markdown",
]


def _write(
  runs: Sequence[RunFiles],
  out_dir: pathlib.Path,
  title: str,
  figures: bool,
  weak_floor: float = study.WEAK_FLOOR,
) -> pathlib.Path:
  """Builds the dataset views of `runs`, draws their figures if asked, writes summary.md (with
  the study section first when the rows have per-pair records)."""
  views = build_views(runs)
  figs = {v.name: write_figures(v, out_dir / "figures") for v in views} if figures else {}
  data = [study.load(v) for v in views if v.records]
  top = ""
  if data:
    study_figs = write_study_figures(data, out_dir / "figures") if figures else []
    top = study_markdown(data, floor=weak_floor, figures=study_figs, out_dir=out_dir)
  text = render_summary(
    views, title=title, out_dir=out_dir, figures=figs, top=top, weak_floor=weak_floor
  )
  path = out_dir / "summary.md"
  store.write_text_atomic(path, text)
  return path


def write_report(
  workdir: os.PathLike,
  *,
  title: str | None = None,
  figures: bool | None = None,
  weak_floor: float = study.WEAK_FLOOR,
) -> pathlib.Path:
  """Writes `workdir/summary.md` and `workdir/figures/*.png` for one run's work directory.

  Safe to call at any point of a run (after each model, at the end): it reads what is there.

  Args:
    workdir: the run's work directory.
    title: the report's heading; default from the config's name.
    figures: draw figures; default the config's `output.figures` (True when absent).
    weak_floor: a model whose clean accuracy is below this fraction of the dataset's best is
      marked weak in the study section (verdicts with and without it).

  Returns:
    The path of summary.md.
  """
  run = load_run(workdir)
  if figures is None:
    figures = bool((run.config.get("output") or {}).get("figures", True))
  title = title or f"vae_attacks: {run.config.get('name') or run.workdir.name}"
  return _write([run], run.workdir, title, figures, weak_floor)


def write_combined_report(
  out_dir: os.PathLike,
  workdirs: Sequence[os.PathLike],
  *,
  title: str | None = None,
  figures: bool = True,
  weak_floor: float = study.WEAK_FLOOR,
) -> pathlib.Path:
  """One summary.md over several work directories (e.g. MNIST and LFW runs), with H1.

  A cell (dataset, model, attack, norm, eps) present in two work directories is taken from
  the later one in `workdirs`. Figures go to `out_dir/figures`, linked with relative paths.

  Returns:
    The path of out_dir/summary.md.
  """
  out_dir = pathlib.Path(out_dir)
  runs = [load_run(w) for w in workdirs]
  # The work directories name the parts (the resolution sweep's parts share one config name).
  title = title or "vae_attacks: " + ", ".join(r.workdir.name for r in runs)
  return _write(runs, out_dir, title, figures, weak_floor)
