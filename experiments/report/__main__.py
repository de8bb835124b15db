"""`python -m experiments.report`: see experiments/report/cli.py."""

from absl import app

from experiments.report import cli

if __name__ == "__main__":
  app.run(cli.main)
