"""The work directory of a run: who may use it, and which config it belongs to."""

import json
import pathlib

from absl import logging

from experiments import identity, keys, store
from experiments.errors import UserError
from vae_attacks import data as data_lib

# What decides an image run's trained models; attacks/eval/output may change between runs (result
# rows carry a hash of those settings in their key).
IMAGE_CLAIM_FIELDS = ("seed", "models", "data", "model", "train")


def claim_workdir(config, workdir: pathlib.Path, fixed=IMAGE_CLAIM_FIELDS) -> None:
  """Writes config.json, or checks that the workdir's run trains the same models."""
  new = keys.to_dict(config)
  path = workdir / "config.json"
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise UserError(
        f"{path} is not valid JSON ({e}); delete it or use another --workdir"
      ) from None
    # Where the data were read from is not part of a run's identity (experiments/identity.py).
    old_id, new_id = identity.without_location(old), identity.without_location(new)
    changed = keys.diff({k: old_id.get(k) for k in fixed}, {k: new_id.get(k) for k in fixed})
    if changed:
      raise UserError(
        f"workdir {workdir} belongs to a different config (differs in: {', '.join(changed)}); "
        "use another --workdir or delete that folder"
      )
  store.write_json_atomic(path, new)


def open_run(config, workdir: pathlib.Path) -> data_lib.Dataset:
  """Claims `workdir` for `config` (`claim_workdir`), then loads the run's data; a data
  problem is a UserError."""
  claim_workdir(config, workdir)
  try:
    data = data_lib.load(config.data)
  except data_lib.DataError as e:
    raise UserError(str(e)) from None
  identity.check_data(workdir, data, record=True, folder=identity.source_folder(config.data))
  logging.info(
    "data %s: train %s, test %s, %d classes",
    data.name,
    data.x_train.shape,
    data.x_test.shape,
    len(data.class_names),
  )
  return data
