"""A run's identity is its settings and a fingerprint of its data, not where the data came from.

The claim of a workdir (experiments/workdir.py) compares the settings that decide the trained
models, less the fields that only say where the data are (`LOCATION_FIELDS`: the folder,
`$VAE_ATTACKS_DATA_DIR`, TFDS's folder, the source); the data themselves are compared by
`fingerprint`, recorded in `<workdir>/data_identity.json` by the first run that loads them.
"""

import hashlib
import json
import os
import pathlib

import numpy as np
from absl import logging

from experiments import store
from experiments.errors import UserError
from vae_attacks import data as data_lib

IDENTITY_FILE = "data_identity.json"
# data fields that say where the data are read from, not which data they are.
LOCATION_FIELDS = ("dir", "tfds_data_dir", "source", "download")


def without_location(config_dict: dict) -> dict:
  """A config (plain dict) without the data section's location fields."""
  out = dict(config_dict)
  if isinstance(out.get("data"), dict):
    out["data"] = {k: v for k, v in out["data"].items() if k not in LOCATION_FIELDS}
  return out


def fingerprint(data: data_lib.Dataset) -> str:
  """sha256 of the loaded arrays (dtype, shape, bytes) and class names: the same data read from
  any folder, or from TFDS in the same order, give the same fingerprint (~0.5 s for LFW at
  154x154)."""
  h = hashlib.sha256()
  h.update(json.dumps([data.name, list(data.class_names)]).encode())
  for a in (data.x_train, data.y_train, data.x_test, data.y_test):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


def source_folder(data_cfg) -> str:
  """The absolute data folder a data section reads (data.dir, else $VAE_ATTACKS_DATA_DIR), or
  '' (TFDS)."""
  folder = data_cfg.get("dir") or os.environ.get(data_lib.DATA_ENV, "")
  return os.path.abspath(folder) if folder else ""


def recorded_folder(workdir: pathlib.Path) -> str:
  """The absolute data folder the workdir's run read ('' when unknown or TFDS)."""
  return (_recorded(pathlib.Path(workdir)) or {}).get("folder", "")


def _record(data: data_lib.Dataset, folder: str) -> dict:
  return dict(
    fingerprint=fingerprint(data),
    dataset=data.name,
    train_shape=list(data.x_train.shape),
    test_shape=list(data.x_test.shape),
    folder=folder,  # where the first run read them; informative, not part of the identity
  )


def _recorded(workdir: pathlib.Path) -> dict | None:
  path = workdir / IDENTITY_FILE
  if not path.exists():
    return None
  try:
    recorded = json.loads(path.read_text())
  except ValueError:  # a torn or foreign file: the fingerprint is recomputed and rewritten
    logging.warning("%s is not valid JSON: ignored", path)
    return None
  return recorded if isinstance(recorded, dict) else None


def check_data(
  workdir: pathlib.Path,
  data: data_lib.Dataset,
  *,
  record: bool = False,
  folder: str = "",
  products: bool = True,
) -> None:
  """Refuses data whose fingerprint differs from the one the workdir's run recorded, unless
  that run made nothing (`products` False: workdir.has_products); with `record`, records it
  (and `folder`, where they were read) when none is, or when it is replaced."""
  workdir = pathlib.Path(workdir)
  old, new = _recorded(workdir), _record(data, folder)
  if old is not None and old.get("fingerprint") != new["fingerprint"] and not products:
    logging.warning("%s: replacing the data identity of a run that made nothing", workdir)
    old = None
  if old is None:
    if record:
      store.write_json_atomic(workdir / IDENTITY_FILE, new)
    return
  if old.get("fingerprint") != new["fingerprint"]:
    raise UserError(
      f"workdir {workdir} was run on other data: {data.name} train {tuple(new['train_shape'])} "
      f"test {tuple(new['test_shape'])} has fingerprint {new['fingerprint'][:12]}, the run's "
      f"({workdir / IDENTITY_FILE}) is {str(old.get('fingerprint'))[:12]}; point at the run's "
      "data, or use another --workdir"
    )
