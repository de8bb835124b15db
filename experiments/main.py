"""Runs a vae_attacks experiment: train the models, attack them, write the results.

  python -m experiments.main --config=configs/mnist_cnn.py[:quick] [--workdir=DIR]
      [--config.attacks.bim.eps='(0.05, 0.1)']

Everything is in `experiments.run.run`; this file only reads flags (the Flax examples habit).
"""

import os
import signal
import sys
import traceback

from experiments import userio  # (standard library only: cheap, before the heavy imports)


def _interrupted_at_start_up(signum, frame) -> None:
  """Ctrl-C before `main` runs (imports, JAX start-up, loading the config): one line and exit
  130, not a traceback from inside an import."""
  del signum, frame
  sys.stderr.write(f"\n{userio.interrupted_at_start_up(sys.argv[1:])}\n")
  sys.stderr.flush()
  os._exit(130)  # nothing of this run is written yet: nothing to unwind


# Ctrl-C's handler as the command was started: ignored (a background job of a shell script)
# stays ignored, as Python itself leaves it.
_SIGINT_IGNORED = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
if __name__ == "__main__" and not _SIGINT_IGNORED:  # first thing (tests import this module)
  signal.signal(signal.SIGINT, _interrupted_at_start_up)

import importlib.util  # noqa: E402
import logging as pylogging  # noqa: E402

# One XLA host device per core, so attack sweeps shard their pairs over all cores
# (docs/performance.md: ~2x on 2 cores). Must be set before jax is imported; it changes nothing
# on accelerators, whose devices jax prefers.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
  ).strip()
# The host devices meet in collectives (the sharded sweeps' all-gathers); XLA aborts the whole
# process when one device's thread is 40 s late (its default), which happened on 2026-12-06
# with four processes sharing the 2 cores, losing a 25-minute L-BFGS sweep. A late thread on an
# oversubscribed CPU is not a deadlock: wait an hour.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] += (
    " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
    " --xla_cpu_collective_timeout_seconds=3600"
  )

from experiments import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # before jax starts its threads (experiments/hostmem.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cluster, store  # noqa: E402
from experiments import run as run_lib  # noqa: E402
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


def main(argv):
  # From here on Ctrl-C is a KeyboardInterrupt, caught below once the workdir is known.
  if not _SIGINT_IGNORED:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = userio.redeliver_interrupt
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  workdir = _WORKDIR.value or f"runs/{config.name}"
  try:
    distributed = cluster.settings_of(config)  # config.distributed, or a study part's
    if distributed is not None:
      cluster.initialize(distributed)  # before anything touches a device
      logging.info(
        "jax.distributed: process %d of %d", cluster.process_index(), cluster.process_count()
      )
    run_lib.run(config, workdir)
  except UserError as e:  # settings, data, a busy workdir, a full disk: one line
    _fail(e)
  except KeyboardInterrupt:  # Ctrl-C: what is kept, and that a rerun resumes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while leaving: no traceback
    print(f"\n{userio.interrupted(workdir)}", file=sys.stderr)
    _exit(130, now=True)
  except Exception as e:
    if cluster.is_lost_process(e):  # another process of a multi-process run is gone
      line = cluster.lost_process(e, workdir)
      logging.error("%s", line)
      print(f"error: {line}", file=sys.stderr)
      _exit(2)
    # A full disk met by a writer that is not ours (a library's file): the same one line.
    if store.is_out_of_space(e):
      _fail(store.OutOfSpace(getattr(e, "filename", None) or workdir))
    if not isinstance(e, OSError):
      if cluster.process_count() > 1:  # a bug: its traceback, then leave at once (see _fail)
        traceback.print_exc()
        _exit(1)
      raise
    print(f"error: {userio.os_error(e, workdir)}", file=sys.stderr)  # a read-only workdir
    _exit(2)


def _fail(e: UserError) -> None:
  """Reports `e` as one line on stderr and exits with status 2 (not also as an absl log line,
  which would print the same words a second time)."""
  print(f"error: {e}", file=sys.stderr)
  _exit(2, now=isinstance(e, store.OutOfSpace))


def _exit(status: int, now: bool = False) -> None:
  """sys.exit(status); or, with `now` or in a multi-process run, leaves at once (our output
  flushed) without the interpreter's shutdown.

  `now`: orbax's writer threads and coroutines, cut short (by a full disk, by Ctrl-C), each
  print a traceback at shutdown ("Exception ignored in ...", "cannot schedule new futures after
  interpreter shutdown"): dozens of lines after our one line. Our files are complete and
  fsynced (a checkpoint cut short is a temporary folder the rerun ignores, as after a kill),
  and the workdir's lock was released when run() unwound. In a multi-process run JAX's
  shutdown would wait for the other processes at a barrier while they wait for this one at
  their next collective; leaving at once closes this process's connections, so that they stop
  too (cluster.lost_process)."""
  if not now and cluster.process_count() == 1:
    sys.exit(status)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
