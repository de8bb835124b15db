"""A finished run, loaded back from its workdir for a notebook: data, models, parameters, rows.

from experiments.load import load_run
run = load_run("runs/mnist_cnn")          # a workdir that `experiments.main` finished
cnn = run.models["cnn"]                   # models.Trained: logits_fn, params, vae, metrics
run.data.x_test, run.rows                 # the run's data and its results.jsonl rows
"""

import json
import os
import pathlib
from typing import NamedTuple

import ml_collections

from experiments import store
from experiments.errors import UserError
from vae_attacks import data as data_lib


class Run(NamedTuple):
  """A finished run as a notebook sees it."""

  workdir: pathlib.Path
  config: ml_collections.ConfigDict  # the run's config.json
  data: data_lib.Dataset  # the run's data, loaded as the run loaded it
  models: dict  # name -> experiments.models.Trained (restored from checkpoints/, not retrained)
  train_metrics: dict  # train_metrics.json
  rows: list[dict]  # results.jsonl


def load_run(workdir: str | os.PathLike, *, data_dir: str | None = None) -> Run:
  """Loads a finished image run (`experiments.main` on a mnist_* / lfw_* config).

  Args:
    workdir: the run's work directory (holding config.json, checkpoints/, train_metrics.json).
    data_dir: the data folder (default: the absolute folder the run recorded in
      data_identity.json if it still exists, else the run's `data.dir`, else
      $VAE_ATTACKS_DATA_DIR). The data must be the run's: their fingerprint is checked against
      the one the run recorded.

  Returns:
    A `Run`. Each model's parameters are restored from its finished checkpoint.

  Raises:
    UserError: not a finished image run's workdir, or its data cannot be loaded.
  """
  workdir = pathlib.Path(workdir)
  config_path, metrics_path = workdir / "config.json", workdir / "train_metrics.json"
  for path in (config_path, metrics_path):
    if not path.is_file():
      raise UserError(f"{workdir} is not a finished run's workdir: it has no {path.name}")
  config = ml_collections.ConfigDict(_tuples(json.loads(config_path.read_text())))
  if "runs" in config or config.get("experiment") in ("comm", "defenses"):
    raise UserError(f"{workdir}: load_run reads an image run's workdir (mnist_*, lfw_* configs)")
  from experiments import identity  # noqa: PLC0415

  if data_dir is None and os.path.isdir(identity.recorded_folder(workdir)):
    data_dir = identity.recorded_folder(workdir)  # absolute: works from any directory
  if data_dir is not None:
    config.data.dir = str(data_dir)
  try:
    data = data_lib.load(config.data)
  except data_lib.DataError as e:
    raise UserError(str(e)) from None
  identity.check_data(workdir, data)
  from experiments import models as models_lib  # noqa: PLC0415

  train_metrics = json.loads(metrics_path.read_text())
  missing = [m for m in config.models if m not in train_metrics]
  if missing:
    raise UserError(f"{workdir}: the run has not finished training {', '.join(missing)}")
  models = models_lib.train_all(config, data, workdir)  # finished checkpoints: restored
  results = workdir / "results.jsonl"
  rows = store.read_jsonl(results) if results.exists() else []
  return Run(workdir, config, data, models, train_metrics, rows)


def _tuples(obj):
  """JSON's lists back to the configs' tuples (the models' hyper-parameters compare equal)."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj
