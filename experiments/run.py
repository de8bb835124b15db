"""One experiment run: data -> trained models -> attacks -> results files.

Files in the work directory (all written atomically; a rerun resumes):
  .lock                held by the one run writing here (experiments/workdir.py)
  config.json          the config of the run; a workdir holding another config is refused
  checkpoints/<model>/ orbax checkpoints, reused on rerun, resumed after a kill
  train_metrics.json   one entry per trained model
  results.jsonl        one row per (dataset, model, attack, norm, eps), appended as produced

In a run of several processes (experiments/cluster.py) process 0 writes all of these; the others
compute their share of the sweeps and write nothing.
"""

import pathlib

import ml_collections

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


def _run_locked(config, workdir: pathlib.Path) -> dict:
  """`run` of a validated attacks config, holding the workdir's lock."""
  data = workdir_lib.open_run(config, workdir)
  # The plan and stage lines: process 0's (the others run the same stages).
  stages = progress.plan(config, len(data.x_train))
  job = progress.Job(stages) if cluster.writes() else progress.NoJob()
  job.show_plan(f"{config.name} in {workdir}")

  from experiments import models as models_lib  # noqa: PLC0415  (keeps --help fast)
  from vae_attacks import train as train_lib  # noqa: PLC0415

  try:
    trained = models_lib.train_all(config, data, workdir, job=job)  # full disk: OutOfSpace
  except (train_lib.CheckpointError, train_lib.NonFiniteError) as e:  # names model and folder
    raise UserError(str(e)) from None
  train_metrics = {name: m.metrics for name, m in trained.items()}
  store.write_json_atomic(workdir / "train_metrics.json", train_metrics)

  from experiments import attacks as attacks_lib  # noqa: PLC0415

  # Every process skips the rows process 0 found done (the others never read the workdir).
  log = cluster.from_writer(lambda: store.ResultsLog(workdir / "results.jsonl", keys.RESULT_KEY))
  attacks_lib.run_all(config, data, trained, log, job=job)
  _report(workdir)
  job.last_line(workdir)
  return {"train": train_metrics, "results": log.rows}


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
  # The study's own folder (its combined report) has one writer too; each part locks its own.
  with workdir_lib.locked(workdir):
    out = {part: run(config[part], str(workdir / part)) for part in config.runs}
    _report(workdir, parts=[workdir / part for part in config.runs])
  if cluster.writes():
    progress.Job([]).last_line(workdir)
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
