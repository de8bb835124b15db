"""The report's command line, absl as experiments.main (usage: experiments/report/__main__.py).

Without --figures / --nofigures a single work directory follows its config's
`output.figures`, and a combined report draws them.
"""

import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from experiments import store
from experiments.report import study, write_combined_report, write_report

FLAGS = flags.FLAGS
_OUT = flags.DEFINE_string("out", None, "Folder of a combined report (default: the one WORKDIR).")
_TITLE = flags.DEFINE_string("title", None, "The report's heading (default: the configs' names).")
_FIGURES = flags.DEFINE_bool(
  "figures", None, "Draw the figures (default: the config's output.figures; --nofigures: none)."
)

_WEAK_FLOOR = flags.DEFINE_float(
  "weak_floor",
  study.WEAK_FLOOR,
  "A model whose clean accuracy is below this fraction of its dataset's best is marked weak "
  "(the study section gives verdicts with and without it).",
)


def report_from_flags(argv: Sequence[str]) -> pathlib.Path:
  """Writes the report the flags ask for, prints and returns the path of its summary.md.

  Args:
    argv: absl's remaining arguments: the program, then the work directories.
  """
  workdirs = list(argv[1:])
  if not workdirs:
    raise app.UsageError("name a run work directory (or several, with --out=DIR)")
  if _OUT.value is None and len(workdirs) > 1:
    raise app.UsageError("several work directories need --out=DIR for the combined report")
  try:
    if _OUT.value is None:
      path = write_report(
        workdirs[0], title=_TITLE.value, figures=_FIGURES.value, weak_floor=_WEAK_FLOOR.value
      )
    else:
      figures = True if _FIGURES.value is None else _FIGURES.value
      path = write_combined_report(
        _OUT.value, workdirs, title=_TITLE.value, figures=figures, weak_floor=_WEAK_FLOOR.value
      )
  except store.OutOfSpace as e:  # one line naming the file, as experiments.main does
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(path)
  return path


def main(argv: Sequence[str]) -> None:
  """absl's main (app.run exits with the answer, so this one returns nothing)."""
  report_from_flags(argv)
