"""Files a run writes: atomic JSON documents and an append-only, resumable JSONL log.

Why our own ~60 lines and not a library: we need (1) whole-file atomic replacement and (2) an
append-only row log that survives SIGKILL mid-write and lets a rerun skip finished rows. Neither
CLU's metric writers nor TensorBoard offer row-level resume; both are one `os.replace` and one
`os.write(O_APPEND)` away.
"""

import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def write_text_atomic(path: os.PathLike, text: str) -> None:
  """Writes `text` to `path` so that readers see the old file or the new one, never half."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are meant to be shared
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json_atomic(path: os.PathLike, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(o):
  if hasattr(o, "tolist"):  # numpy / jax scalars and arrays
    return o.tolist()
  if isinstance(o, (set, frozenset)):
    return sorted(o)
  raise TypeError(f"cannot write {type(o).__name__} to JSON")


def read_jsonl(path: os.PathLike) -> list[dict]:
  """The rows of a JSONL file, [] when it is absent; a torn line (a kill mid-write) or a line
  that is not a JSON object is skipped, and the file is left as it is."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_bytes().split(b"\n"):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError of a torn multi-byte character
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


class ResultsLog:
  """`results.jsonl`: one JSON row per finished point, keyed by `key_fields`.

  On open, a torn last line (a kill mid-write) is dropped by an atomic rewrite of the good
  rows; `append` writes one whole line with a single O_APPEND write and fsyncs it, so a row
  is either fully there or absent. `has(row)` lets a rerun skip what is done.
  """

  def __init__(self, path: os.PathLike, key_fields: Sequence[str]):
    self.path = pathlib.Path(path)
    self.key_fields = tuple(key_fields)
    self.rows: list[dict] = []
    self._keys: set = set()
    good = read_jsonl(self.path)
    text = "".join(_line(r) for r in good)
    if self.path.exists() and self.path.read_bytes() != text.encode():  # a torn line
      write_text_atomic(self.path, text)
    for r in good:
      self._remember(r)

  def key(self, row: Mapping) -> tuple:
    return tuple(_freeze(row.get(k)) for k in self.key_fields)

  def has(self, row: Mapping) -> bool:
    return self.key(row) in self._keys

  def append(self, row: Mapping) -> None:
    if self.has(row):
      raise ValueError(f"row {self.key(row)} is already in {self.path}")
    data = _line(row).encode()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
    self._remember(json.loads(data))

  def extend(self, rows: Iterable[Mapping]) -> None:
    for r in rows:
      self.append(r)

  def _remember(self, row: dict) -> None:
    self.rows.append(row)
    self._keys.add(self.key(row))


def _line(row: Mapping) -> str:
  return json.dumps(row, sort_keys=True, default=_jsonable, allow_nan=True) + "\n"


def _freeze(v):
  if isinstance(v, float):
    return round(v, 12)
  if isinstance(v, list):
    return tuple(_freeze(x) for x in v)
  return v


def save_npz_atomic(path: os.PathLike, **arrays) -> None:
  """Arrays to one compressed .npz: a temporary file, then a rename (never half a file)."""
  import numpy as np  # noqa: PLC0415  (numpy only for the writers of arrays)

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
