"""Runs a vae_attacks experiment: train the models, attack them, write the results.

  python -m experiments.main --config=configs/mnist_cnn.py[:quick] [--workdir=DIR]
      [--config.attacks.bim.eps='(0.05, 0.1)']

Everything is in `experiments.run.run`; this file only reads flags (the Flax examples habit).
"""

import logging as pylogging
import os
import sys

# One XLA host device per core, so attack sweeps shard their pairs over all cores
# (PERFORMANCE.md: ~2x on 2 cores). Must be set before jax is imported; it changes nothing
# on accelerators, whose devices jax prefers.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
  ).strip()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import run as run_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config.name>).")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(pylogging.Filter):
  """Drops INFO records of orbax (a dozen lines per checkpoint) from absl's log."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  workdir = _WORKDIR.value or f"runs/{config.name}"
  try:
    run_lib.run(config, workdir)
  except run_lib.UserError as e:  # bad settings or data: one clear message, no traceback
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
