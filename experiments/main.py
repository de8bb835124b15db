"""Runs a vae_attacks experiment: train the models, attack them, write the results.

  python -m experiments.main --config=configs/mnist_cnn.py[:quick] [--workdir=DIR]
      [--config.attacks.bim.eps='(0.05, 0.1)']

Everything is in `experiments.run.run`; this file only reads flags (the Flax examples habit).
"""

import importlib.util
import logging as pylogging
import os
import sys

# One XLA host device per core, so attack sweeps shard their pairs over all cores
# (docs/performance.md: ~2x on 2 cores). Must be set before jax is imported; it changes nothing
# on accelerators, whose devices jax prefers.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
  ).strip()

from experiments import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # before jax starts its threads (experiments/hostmem.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import run as run_lib  # noqa: E402
from experiments import store, userio  # noqa: E402
from experiments.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file[:arg].\n" + userio.configs_help()
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config.name>).")
flags.mark_flags_as_required(["config"])


def _load_config_file(spec: str):
  """get_config(arg) of a `path[:arg]` config spec, as config_flags would load it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_for_errors", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _explain_override_error(argv, error) -> str:
  """One line naming the misspelt `--config.` field and listing the valid ones."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    config = _load_config_file(spec) if spec else None
  except Exception:  # noqa: BLE001  (the config file itself is broken: report the original)
    config = None
  if config is not None:
    for a in argv:
      if not a.startswith("--config."):
        continue
      path = a[len("--config.") :].split("=", 1)[0]
      node, done = config, []
      for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
          where = ".".join(done) or "the config"
          valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
          return f"unknown config field {path!r}: {where} has no field {part!r}; valid: {valid}"
        node, done = node[part], [*done, part]
  return f"bad command line: {error}"


def _parse_flags(argv):
  problem = userio.config_file_error(argv[1:])
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  (config_flags raises AttributeError, KeyError, ...)
    print(f"error: {_explain_override_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries(pylogging.Filter):
  """Drops INFO records of orbax (a dozen lines per checkpoint) from absl's log, and its errors
  about a full disk (each with a long traceback), which the run reports in one line."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= pylogging.WARNING and not store.is_out_of_space(
      Exception(record.getMessage())
    )


def _wants_distributed(config) -> bool:
  """config.distributed, or that of any part of a study config."""
  parts = [config] + [config[p] for p in config.get("runs", ()) if p in config]
  return any(part.get("distributed", False) is True for part in parts)


def _init_distributed() -> None:
  """jax.distributed.initialize(), before anything touches a device; a failure is one line."""
  import jax  # noqa: PLC0415

  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError, TypeError) as e:
    raise UserError(
      f"distributed=True but jax.distributed.initialize() failed ({e}); run under a cluster "
      "manager JAX detects (SLURM, Open MPI, Cloud TPU, ...) or set --config.distributed=False"
    ) from None
  logging.info(
    "jax.distributed: process %d of %d, %d devices in all",
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  workdir = _WORKDIR.value or f"runs/{config.name}"
  try:
    if _wants_distributed(config):
      _init_distributed()
    run_lib.run(config, workdir)
  except UserError as e:  # settings, data, a busy workdir, a full disk: one line
    _fail(e)
  except KeyboardInterrupt:  # Ctrl-C: what is kept, and that a rerun resumes
    print(f"\n{userio.interrupted(workdir)}", file=sys.stderr)
    sys.exit(130)
  except Exception as e:
    # A full disk met by a writer that is not ours (a library's file): the same one line.
    if store.is_out_of_space(e):
      _fail(store.OutOfSpace(getattr(e, "filename", None) or workdir))
    if not isinstance(e, OSError):
      raise
    print(f"error: {userio.os_error(e, workdir)}", file=sys.stderr)  # a read-only workdir
    sys.exit(2)


def _fail(e: UserError) -> None:
  """Reports `e` as one line on stderr and exits with status 2."""
  logging.error("%s", e)
  print(f"error: {e}", file=sys.stderr)
  if isinstance(e, store.OutOfSpace):
    # orbax's writer threads and coroutines, cut short by the full disk, each print a traceback
    # at interpreter shutdown ("Exception ignored in ..."): dozens of lines after ours. Leave
    # without that shutdown, so that this error stays the last line. Our files are complete
    # and fsynced, and the workdir's lock was released when run() unwound.
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
