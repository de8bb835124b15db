"""The work directory of a run: one writer at a time, the config it belongs to, and its data.

- `locked(workdir)`: an advisory `fcntl.flock` on `<workdir>/.lock`, held for the whole run
  (`experiments.run.run` takes it for every kind of run: attacks, defences, the study and its
  parts, the comm experiment). A second run on a busy workdir stops at once with one line
  naming the holder (pid, host, start time, command), which the holder writes into the lock
  file. The kernel drops the lock of a process that dies (SIGKILL included), so a lock left
  behind is simply taken over; the holder line it left says whose it was.
- `claim_workdir(config, workdir, fixed=...)`: writes config.json, or checks that the
  config.json there agrees on the `fixed` fields (what decides the trained models). A workdir
  holding nothing made under its config.json (a run that failed before producing anything: bad
  data folder, NaN at the first epoch, a kill at start-up) never blocks a rerun: its
  config.json is replaced.
- `open_run(config, workdir)`: the claim, then the run's data.

In a run of several processes (experiments/cluster.py) process 0 alone takes the lock, claims the
workdir and records the data's identity; the others touch nothing in the workdir, and stop with
process 0's one line when it refuses the workdir.
"""

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Iterator

from absl import logging

from experiments import cluster, identity, keys, store
from experiments.errors import UserError
from vae_attacks import data as data_lib

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
# What a run makes (besides config.json): if none of these is there, nothing depends on the
# config.json of the workdir. Files: the metrics, the row logs, the report. Folders, once they
# hold a file that is not a temporary one: the shared pairs and per-pair records of an image
# run, the comm experiment's trained parameters and perturbations. Checkpoints count once orbax
# has finalised one (a folder named by its step; a save in flight is
# `<step>.orbax-checkpoint-tmp-*`).
PRODUCTS = ("train_metrics.json", "results.jsonl", "defenses.jsonl", "summary.md")
PRODUCT_DIRS = ("pairs", "records", "params", "perturbations")

# What decides an image run's trained models; attacks/eval/output may change between runs (result
# rows carry a hash of those settings in their key).
IMAGE_CLAIM_FIELDS = ("seed", "models", "data", "model", "train")


class WorkdirBusy(UserError):
  """Another live process holds the workdir's lock."""


def _holder_line() -> str:
  """Who holds the lock: written into the lock file for the next run's message."""
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  command = " ".join(sys.argv)[:300]
  return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n"


def _read_holder(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  return os.read(fd, 4096).decode(errors="replace").strip()


@contextlib.contextmanager
def locked(workdir: os.PathLike) -> Iterator[pathlib.Path]:
  """Holds the workdir's lock for the block, or raises WorkdirBusy naming its holder.

  Released (and the holder line cleared) when the block ends, by an exception too; the kernel
  releases it when the process dies. Not re-entrant: take it once per workdir and process.
  In a multi-process run only process 0 takes it; every process gets its refusal.
  """
  with contextlib.ExitStack() as stack:
    yield cluster.from_writer(lambda: stack.enter_context(_lock(workdir)))


@contextlib.contextmanager
def _lock(workdir: os.PathLike) -> Iterator[pathlib.Path]:
  """`locked` in this process."""
  workdir = pathlib.Path(workdir)
  path = workdir / LOCK_FILE
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    if store.is_out_of_space(e):
      raise store.OutOfSpace(path) from None
    raise UserError(
      f"cannot create the lock file {path} ({e.strerror}); use a writable --workdir"
    ) from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      # The holder writes its line right after taking the lock: give it a moment, so that the
      # message names it (two runs started together meet exactly there).
      holder = _read_holder(fd)
      for _ in range(20):
        if holder:
          break
        time.sleep(0.1)
        holder = _read_holder(fd)
      holder = holder or "another process (starting up)"
      raise WorkdirBusy(
        f"workdir {workdir} is in use by {holder} (lock {path}); wait for that run to end or "
        "use another --workdir"
      ) from None
    left = _read_holder(fd)
    if left:  # whoever wrote it ended without releasing: a kill, a crash, a power cut
      logging.warning("%s: took over the lock left by %s, which is no longer running", path, left)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    store.write_all(fd, _holder_line().encode(), path)
    try:
      yield path
    finally:
      # Cleared before unlocking, so an empty lock file means "released properly". The file
      # itself stays: unlinking it would let a process that opened it before the unlink and one
      # that opens a new one after both hold "the" lock.
      with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def has_products(workdir: os.PathLike) -> bool:
  """True if the workdir holds anything a run made under its config.json (see PRODUCTS)."""
  workdir = pathlib.Path(workdir)
  if any((workdir / name).exists() for name in PRODUCTS):
    return True
  for name in PRODUCT_DIRS:
    folder = workdir / name
    if folder.is_dir() and any(
      p.is_file() and not p.name.startswith(".") for p in folder.rglob("*")
    ):
      return True
  checkpoints = workdir / "checkpoints"
  return checkpoints.is_dir() and any(
    p.is_dir() and p.name.isdigit() for p in checkpoints.rglob("*")
  )


def claim_workdir(config, workdir: pathlib.Path, fixed=IMAGE_CLAIM_FIELDS) -> None:
  """Writes config.json, or checks that the workdir's run agrees on the `fixed` fields.

  Raises UserError when config.json is unreadable, or differs in a `fixed` field, while the
  workdir holds what its config made (`has_products`); with nothing made, config.json is
  replaced (one warning line). Call it holding `locked(workdir)`.
  """
  workdir = pathlib.Path(workdir)
  new = keys.to_dict(config)
  path = workdir / CONFIG_FILE
  if path.exists():
    products = has_products(workdir)
    try:
      old = json.loads(path.read_text())
      if not isinstance(old, dict):
        raise ValueError(f"a JSON {type(old).__name__}, not an object")
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      if products:
        raise UserError(
          f"{path} is not valid JSON ({e}); delete it or use another --workdir"
        ) from None
      old = None
      logging.warning("%s is not valid JSON and nothing was made under it: replaced", path)
    if old is not None:
      # Where the data were read from is not part of a run's identity (experiments/identity.py).
      old_id, new_id = identity.without_location(old), identity.without_location(new)
      changed = keys.diff({k: old_id.get(k) for k in fixed}, {k: new_id.get(k) for k in fixed})
      changed = _beyond_appended_models(old_id, new_id, changed)
      if changed and products:
        raise UserError(
          f"workdir {workdir} belongs to a different config (differs in: "
          f"{', '.join(changed)}); use another --workdir or delete that folder"
        )
      if changed:
        logging.warning(
          "%s: replacing the config of a run that produced nothing (it differed in: %s)",
          path,
          ", ".join(changed),
        )
  store.write_json_atomic(path, new)


def _beyond_appended_models(old: dict, new: dict, changed: list[str]) -> list[str]:
  """`changed` less what appending models to a run changes: "models", when the old models are
  the first of the new, and the new models' own model and train sections. The models before
  are trained as they were (a model's key is fold_in(seed, its index in `models`)), and a
  control can join a finished run (with `attacks.pair_models`, on its pairs)."""
  before, after = list(old.get("models") or ()), list(new.get("models") or ())
  added = set(after[len(before) :])
  if not added or after[: len(before)] != before:
    return changed

  def appended_section(field: str) -> bool:
    top, _, name = field.partition(".")
    return top in ("model", "train") and name in added and name not in (old.get(top) or {})

  return [f for f in changed if f != "models" and not appended_section(f)]


def open_run(config, workdir: pathlib.Path) -> data_lib.Dataset:
  """Claims `workdir` for `config` (`claim_workdir`), then loads the run's data; a data
  problem is a UserError. Call it holding `locked(workdir)`."""
  cluster.from_writer(lambda: claim_workdir(config, workdir))
  try:
    data = data_lib.load(config.data)
  except data_lib.DataError as e:
    raise UserError(str(e)) from None
  cluster.from_writer(
    lambda: identity.check_data(
      workdir,
      data,
      record=True,
      folder=identity.source_folder(config.data),
      products=has_products(workdir),
    )
  )
  logging.info(
    "data %s: train %s, test %s, %d classes",
    data.name,
    data.x_train.shape,
    data.x_test.shape,
    len(data.class_names),
  )
  return data
