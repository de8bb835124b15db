"""Writes a report's summary.md and figures from run work directories.

python -m experiments.report WORKDIR                     -> WORKDIR/summary.md, figures/
python -m experiments.report --out=DIR WORKDIR [...]     -> DIR/summary.md (with H1)
[--title=TEXT] [--nofigures]
"""

from absl import app, flags

from experiments.report import cli

flags.adopt_module_key_flags(cli)

if __name__ == "__main__":
  app.run(cli.main)
