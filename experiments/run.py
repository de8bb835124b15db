"""One experiment run: data -> trained models -> attacks -> results files.

Files in the work directory (all written atomically; a rerun resumes):
  .lock                held by the one run writing here (experiments/workdir.py)
  config.json          the config of the run; a workdir holding another config is refused
  checkpoints/<model>/ orbax checkpoints, reused on rerun, resumed after a kill
  train_metrics.json   one entry per trained model
  timings.json         each stage's wall seconds and rate (experiments/progress.py)
  results.jsonl        one row per (dataset, model, attack, norm, eps), appended as produced

In a run of several processes (experiments/cluster.py) process 0 writes all of these; the others
compute their share of the sweeps and write nothing.
"""

import contextlib
import pathlib

import ml_collections
import numpy as np

from experiments import cluster, keys, progress, store, validate
from experiments import workdir as workdir_lib
from experiments.errors import UserError


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment `config` in `workdir`; returns {'train': ..., 'results': [...]}.

  A study config (one with `runs`) runs each part in workdir/<part> and writes one combined
  report in workdir.
  """
  if "runs" in config:
    return _run_study(config, pathlib.Path(workdir))
  if config.get("experiment") == "comm":
    from experiments import comm  # noqa: PLC0415  (configs/comm_ae.py; validates itself)

    comm.validate(config)  # before the lock, as the others: bad settings touch no workdir
    with workdir_lib.locked(workdir):
      return comm.run(config, workdir)
  try:
    validate.validate(config)
  except validate.ConfigError as e:
    raise UserError(str(e)) from None
  # One writer per workdir: two runs would train into one checkpoint folder and append every
  # row twice.
  with workdir_lib.locked(workdir):
    if config.get("experiment") == "defenses":
      from experiments import defenses  # noqa: PLC0415  (configs/mnist_defenses.py)

      return defenses.run(config, workdir)
    return _run_locked(config, pathlib.Path(workdir))


def _run_locked(config, workdir: pathlib.Path, data=None, job=None) -> dict:
  """`run` of a validated attacks config, holding the workdir's lock. A study passes each
  part's opened `data` and its whole-job `job`; a run alone opens its data and shows its own
  plan, timing table and last line (process 0's in a multi-process run: the others run the
  same stages and show nothing)."""
  alone = job is None
  if data is None:
    data = workdir_lib.open_run(config, workdir)
  if alone:
    job = _job(_plan(config, data), workdir)
    job.show_plan(f"{config.name} in {workdir}")

  from experiments import models as models_lib  # noqa: PLC0415  (keeps --help fast)
  from vae_attacks import train as train_lib  # noqa: PLC0415

  # What always answering the test set's most frequent class scores: the chance level the
  # report compares each model's test accuracy with (LFW's classes are far from balanced).
  counts = np.bincount(np.asarray(data.y_test, np.int64))
  majority = float(counts.max() / counts.sum()) if counts.size else None

  def metrics_of(trained) -> dict:
    return {name: dict(m.metrics, majority_accuracy=majority) for name, m in trained.items()}

  def save(trained) -> None:  # after each model: a run stopped later keeps the finished ones'
    store.write_json_atomic(workdir / "train_metrics.json", metrics_of(trained))

  try:  # full disk: OutOfSpace
    trained = models_lib.train_all(config, data, workdir, job=job, on_model=save)
  except (train_lib.CheckpointError, train_lib.NonFiniteError) as e:  # names model and folder
    raise UserError(str(e)) from None
  train_metrics = metrics_of(trained)

  from experiments import attacks as attacks_lib  # noqa: PLC0415

  # Every process skips the rows process 0 found done (the others never read the workdir).
  log = cluster.from_writer(lambda: store.ResultsLog(workdir / "results.jsonl", keys.RESULT_KEY))
  attacks_lib.run_all(config, data, trained, log, job=job)
  _report(workdir)
  if alone:
    job.last_line(workdir)
  return {"train": train_metrics, "results": log.rows}


def _job(stages, workdir: pathlib.Path) -> progress.Job:
  """The progress display and timing table of `stages` (process 0's; silent elsewhere)."""
  if not cluster.writes():
    return progress.NoJob()
  return progress.Job(stages, timings_path=workdir / progress.TIMINGS_FILE)


def _plan(config, data, part: str = "") -> list[progress.Stage]:
  """The stages of an image run on its loaded `data` (`progress.plan`)."""
  pixels = float(data.x_train[0].size) if len(data.x_train) else 1.0
  return progress.plan(config, len(data.x_train), part=part, pixels=pixels)


def _run_study(config, workdir: pathlib.Path) -> dict:
  for part in config.runs:
    if part not in config:
      raise UserError(f"runs lists {part!r} but the config has no section {part!r}")
  # Validate every part before any of them starts.
  for part in config.runs:
    try:
      validate.validate(config[part])
    except validate.ConfigError as e:
      raise UserError(f"{part}: {e}") from None
  # The study's own folder (its combined report) has one writer too, and so has each part's.
  # Every attack part's data is opened first, so that the plan covers the whole study (and a
  # wrong data folder of the last part stops the run before the first part's work). A part of
  # another kind (a defences or comm config) runs as it does alone, with its own plan, in order.
  image = [part for part in config.runs if config[part].get("experiment") in (None, "attacks")]
  with contextlib.ExitStack() as held:
    held.enter_context(workdir_lib.locked(workdir))
    opened = {}
    for part in image:
      held.enter_context(workdir_lib.locked(workdir / part))
      opened[part] = workdir_lib.open_run(config[part], workdir / part)
    stages = [s for part in image for s in _plan(config[part], opened[part], part)]
    job = _job(stages, workdir)
    if image:
      job.show_plan(f"{config.name} in {workdir} (parts: {', '.join(image)})")
    out = {}
    for part in config.runs:
      if part in opened:
        job.enter(part)
        out[part] = _run_locked(config[part], workdir / part, opened.pop(part), job)
      else:
        out[part] = run(config[part], str(workdir / part))
    _report(workdir, parts=[workdir / part for part in config.runs])
  if cluster.writes():
    job.last_line(workdir, results="")
  return out


def _report(workdir: pathlib.Path, parts=None) -> None:
  """summary.md and figures/ for a run (or, with `parts`, one combined study report); process
  0's work in a multi-process run."""
  if not cluster.writes():
    return
  from experiments import report  # noqa: PLC0415  (matplotlib only when reporting)

  if parts is None:
    report.write_report(workdir)
  else:
    report.write_combined_report(workdir, parts)
