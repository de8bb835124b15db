"""Files a run writes: atomic whole files and an append-only, resumable, versioned JSONL log.

Why our own few hundred lines and not a library: we need (1) whole-file atomic replacement, (2)
an append-only row log that survives SIGKILL mid-write and lets a rerun skip finished rows, and
(3) one answer to a full disk everywhere. Neither CLU's metric writers nor TensorBoard offer
row-level resume; all three are `os.replace`, `os.write(O_APPEND)` and a check of what
`os.write` returned away.

Every write of experiments/ goes through `write_all`: it loops on short writes and turns a full
disk (ENOSPC, EDQUOT) into `OutOfSpace`, a one-line error naming the file. What it leaves behind
is never torn: a whole file is written to a temporary name and renamed only when complete, and
a log row that did not fit is cut off again (`ftruncate`) before the error is raised.

In a run of several processes only process 0 writes (`experiments.cluster`): on the others every
writer here returns having written nothing.

Rows carry `format_version` (`FORMAT_VERSION`). On open, a log migrates rows of an older
version, and sets aside (into `<log>.rejected`) rows that fail its schema (`SCHEMAS`) or come
from a newer version, with one log line saying how many and why; a rerun then recomputes them.
Rows that repeat the key of a later row are set aside too (the last is kept). The report applies
the same check (`read_jsonl`, the one reader) and never uses a row that fails it.
"""

import contextlib
import errno
import io
import json
import math
import os
import pathlib
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging

from experiments import cluster, errors

# errno values that mean "no room for these bytes": disk full, quota exceeded.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OutOfSpace(errors.UserError):
  """A write found the disk (or the user's quota) full; names the file it could not write."""

  def __init__(self, path: os.PathLike, detail: str = ""):
    self.path = str(path)
    super().__init__(
      f"out of disk space writing {self.path}{f' ({detail})' if detail else ''}; nothing torn "
      "was kept: free some space (or use another --workdir) and rerun, which resumes"
    )


def is_out_of_space(e: BaseException) -> bool:
  """True if `e`, or an exception it was raised from, says that the disk or quota is full.

  Libraries that write in their own threads (orbax's tensorstore) re-raise a full disk as
  ValueError or RuntimeError holding the OS message, so the message is read too.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return True
    text = str(e)
    if "No space left on device" in text or "Disk quota exceeded" in text:
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def _space_errors(path: os.PathLike):
  """Re-raises a full disk inside the block as OutOfSpace(path)."""
  try:
    yield
  except OutOfSpace:
    raise
  except OSError as e:
    if e.errno in _NO_SPACE:
      raise OutOfSpace(path, os.strerror(e.errno)) from None
    raise


def write_all(fd: int, data: bytes, path: os.PathLike) -> None:
  """Writes every byte of `data` to `fd`, or raises OutOfSpace(path) (or the OSError).

  `os.write` may write fewer bytes than asked (a disk filling up, a signal); the rest is written
  by the next call, and a call that writes nothing means no room is left.
  """
  view = memoryview(data)
  with _space_errors(path):
    while view:
      n = os.write(fd, view)
      if n <= 0:
        raise OutOfSpace(path, f"a write of {len(view)} bytes wrote none")
      view = view[n:]


def write_bytes_atomic(path: os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the new one, never half.

  On any failure (a full disk included) the temporary file is removed and `path` is unchanged.
  Nothing is written on a process other than 0 of a multi-process run (`cluster.writes`).
  """
  if not cluster.writes():
    return
  path = pathlib.Path(path)
  with _space_errors(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    try:
      write_all(fd, data, path)
      with _space_errors(path):
        os.fsync(fd)  # some file systems (NFS, delayed allocation) report a full disk here
    finally:
      os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are meant to be shared
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_text_atomic(path: os.PathLike, text: str) -> None:
  """`write_bytes_atomic` of `text` in UTF-8."""
  write_bytes_atomic(path, text.encode())


def write_json_atomic(path: os.PathLike, obj: Any) -> None:
  """`obj` as indented JSON, atomically."""
  text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
  write_text_atomic(path, text + "\n")


def write_with(path: os.PathLike, write: Callable[[io.BytesIO], Any]) -> None:
  """`write(buffer)` into memory, then the bytes to `path` atomically (np.savez, savefig).

  Libraries that write to a file object do not all check what each write wrote; a buffer in
  memory cannot be short, and `write_bytes_atomic` checks the one write that matters.
  """
  if not cluster.writes():
    return
  buffer = io.BytesIO()
  write(buffer)
  write_bytes_atomic(path, buffer.getvalue())


def _jsonable(o):
  if hasattr(o, "tolist"):  # numpy / jax scalars and arrays
    return o.tolist()
  if isinstance(o, (set, frozenset)):
    return sorted(o)
  raise TypeError(f"cannot write {type(o).__name__} to JSON")


# ---------------------------------------------------------------------------------------------
# Row format: version, migrations and schemas.

# 1: rows before the field existed (no `format_version`); 2: the same fields plus
# `format_version`. A change of a field's name or meaning bumps this and adds a migration.
FORMAT_VERSION = 2


def _v1_to_v2(row: dict) -> dict:
  """Format 2 only added the version field itself."""
  return dict(row, format_version=2)


# MIGRATIONS[v] turns a row of format v into one of format v + 1.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def row_version(row: Mapping) -> Any:
  """The row's format version (1 when it has none: rows written before versions existed)."""
  return row.get("format_version", 1)


_ATTACK_STATS = (
  "n_pairs", "success_rate", "mean_target_prob", "validity_rate", "mean_ssim",
  "mean_l0", "mean_l1", "mean_l2", "mean_linf",
)  # fmt: skip
_ATTACK_INTERVALS = (
  "success_rate_ci", "mean_target_prob_ci", "validity_rate_ci",
  "mean_l0_ci", "mean_l1_ci", "mean_l2_ci", "mean_linf_ci",
)  # fmt: skip
_EFFECTIVENESS = ("high", "moderate", "low", "ineffective")

# Per log kind: the fields a row must have, by type. "numbers": int/float or null (a statistic
# of too few samples is written as null); "intervals": [lo, hi] of numbers or nulls.
SCHEMAS: dict[str, dict[str, tuple[str, ...]]] = {
  # results.jsonl (experiments/attacks.py): one (dataset, model, attack, norm, eps) point.
  "attack": dict(
    strings=("dataset", "model", "attack", "norm", "settings"),
    finite=("eps",),
    numbers=_ATTACK_STATS,
    intervals=_ATTACK_INTERVALS,
    counts=("effectiveness",),
    # Fields later rows carry and earlier ones (results/study/, format 1) lack: checked when
    # present, never required. The per-pair record (records/...), the other validity
    # definitions (metrics.EvalSettings: PSNR, SSIM at a common scale), the VAE attacks' judge.
    optional=dict(
      strings=("record", "judge"),
      numbers=(
        "validity_rate_psnr",
        "validity_rate_ssim_common",
        "median_psnr",
        "mean_ssim_common",
        "mean_confidence",
        "n_sources",
        "seconds",
        "auddc",
        "auddc_std",
        "n_auddc_pairs",
        "median_budget",
        "mean_budget_broken",
        "unbroken_rate",
      ),
      intervals=("validity_rate_psnr_ci", "validity_rate_ssim_common_ci", "auddc_ci"),
      counts=("effectiveness_psnr", "effectiveness_ssim_common"),
    ),
  ),
  # defenses.jsonl (experiments/defenses.py): one (defence, attack, eps) point ...
  "defense": dict(
    strings=("kind", "dataset", "defense", "attack", "settings"),
    finite=("eps",),
    numbers=("n", "clean_accuracy", "robust_accuracy"),
    intervals=("clean_accuracy_ci", "robust_accuracy_ci"),
    lists=("not_robust_examples",),
  ),
  # ... and one (source, target) entry of the transfer matrix.
  "transfer": dict(
    strings=("kind", "dataset", "defense", "attack", "source", "target", "settings"),
    finite=("eps",),
    numbers=("n", "robust_accuracy"),
    intervals=("robust_accuracy_ci",),
  ),
}
SCHEMAS["comm"] = dict(  # the comm experiment's results.jsonl (experiments/comm.py)
  strings=("dataset", "model", "attack", "settings"),
  finite=("ebn0_db",),
  numbers=("psr_db", "blocks", "block_errors", "bler", "bler_lo", "bler_hi"),
)
RESULTS_KINDS = ("attack",)  # the kinds of rows results.jsonl holds
DEFENSES_KINDS = ("defense", "transfer")  # defenses.jsonl's
COMM_KINDS = ("comm",)  # the comm experiment's results.jsonl


def row_kind(row: Mapping, kinds: Sequence[str]) -> str:
  """The schema a row follows: its `kind` field (defenses.jsonl), else its log's first kind."""
  return row.get("kind", kinds[0])


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def schema_problem(row: Any, kinds: Sequence[str] | None) -> str | None:
  """Why `row` (of the current format) cannot be used by a log of `kinds`, or None if it can.

  The reason names the first missing or mistyped field (a renamed field reads as missing).
  `kinds=None`: any JSON object (a log of rows without a schema).
  """
  if not isinstance(row, dict):
    return f"not a JSON object ({type(row).__name__})"
  if kinds is None:
    return None
  kind = row_kind(row, kinds)
  if kind not in kinds:
    return f"kind {kind!r} (allowed: {', '.join(kinds)})"
  spec = {k: v for k, v in SCHEMAS[kind].items() if k != "optional"}
  for field in (f for group in spec.values() for f in group):
    if field not in row:
      return f"missing field {field!r}"
  optional = SCHEMAS[kind].get("optional", {})
  present = {g: tuple(f for f in fields if f in row) for g, fields in optional.items()}
  return _type_problem(row, spec) or _type_problem(row, present)


def _type_problem(row: dict, spec: Mapping[str, Sequence[str]]) -> str | None:
  """The first field of `spec` (groups of field names by type) whose value has another type."""
  for f in spec.get("strings", ()):
    if not isinstance(row[f], str):
      return f"field {f!r} is not a string"
  for f in spec.get("finite", ()):
    if not _is_number(row[f]) or not math.isfinite(row[f]):
      return f"field {f!r} is not a finite number"
  for f in spec.get("numbers", ()):
    v = row[f]
    if v is not None and (not _is_number(v) or not math.isfinite(v)):
      return f"field {f!r} is not a finite number or null"
  for f in spec.get("intervals", ()):
    v = row[f]
    if not (isinstance(v, list) and len(v) == 2 and all(x is None or _is_number(x) for x in v)):
      return f"field {f!r} is not an interval [lo, hi]"
  for f in spec.get("counts", ()):  # {} is a point of no pairs
    v = row[f]
    if not (isinstance(v, dict) and all(_is_number(v[k]) for k in _EFFECTIVENESS if k in v)):
      return f"field {f!r} is not counts of {', '.join(_EFFECTIVENESS)}"
  for f in spec.get("lists", ()):
    if not isinstance(row[f], list):
      return f"field {f!r} is not a list"
  return None


def upgrade(row: Any) -> tuple[Any, int | None, str | None]:
  """(row in the current format, the version it had, None) or (row, version, why not).

  Rows of an older format are migrated; a newer or unknown version cannot be read.
  """
  if not isinstance(row, dict):
    return row, None, f"not a JSON object ({type(row).__name__})"
  version = row_version(row)
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    return row, None, f"format_version {version!r} is not a version"
  if version > FORMAT_VERSION:
    return row, version, f"format {version} is newer than this code's {FORMAT_VERSION}"
  out = row
  for v in range(version, FORMAT_VERSION):
    out = MIGRATIONS[v](out)
  return out, version, None


def check_rows(
  rows: Iterable[Any], kinds: Sequence[str] | None
) -> tuple[list[dict], list, Counter]:
  """Rows of a log as read: (usable rows in the current format, [(raw row, why not)], Counter of
  the older versions migrated). The one check both a rerun and the report apply."""
  good, bad, migrated = [], [], Counter()
  for raw in rows:
    row, version, why = upgrade(raw)
    if why is None:
      why = schema_problem(row, kinds)
    if why is not None:
      bad.append((raw, why))
      continue
    if version != FORMAT_VERSION:
      migrated[version] += 1
    good.append(row)
  return good, bad, migrated


def parse_lines(raw: bytes) -> tuple[list, int]:
  """The JSON values of the lines of a log, and how many lines were not JSON (torn writes)."""
  rows, torn = [], 0
  for line in raw.split(b"\n"):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError of a torn multi-byte character
      torn += 1
  return rows, torn


def read_jsonl(
  path: os.PathLike, kinds: Sequence[str] | None = None, rejected: list | None = None
) -> list[dict]:
  """The usable rows of a JSONL log, in the current format; [] when the file is absent.

  The one reader of the logs (the report's; `ResultsLog` applies the same two steps and also
  repairs the file): a torn line (a kill mid-write) is skipped; rows of an older format are
  migrated in memory; a row that fails the check of `kinds` (`check_rows`: a missing or renamed
  field, a newer format; `kinds=None`: anything but a JSON object) is never returned, and why
  is appended to `rejected`. The file is left as it is.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  values, _ = parse_lines(path.read_bytes())
  good, bad, _ = check_rows(values, kinds)
  if rejected is not None:
    rejected += [why for _, why in bad]
  return good


def _summary(reasons: Iterable[str]) -> str:
  """'missing field 'x' (3), ...': the reasons and how often each occurs."""
  return ", ".join(f"{why} ({n})" for why, n in Counter(reasons).most_common())


class ResultsLog:
  """A JSONL log (`results.jsonl`, `defenses.jsonl`): one row per finished point, keyed by
  `key_fields`.

  On open: a torn line (a kill mid-write) is dropped; rows of an older format are migrated; rows
  that fail the schema of `kinds` (`SCHEMAS`; None: any JSON object) or come from a newer
  format are moved to `<log>.rejected` with one log line saying how many and why, and a rerun
  recomputes their points; rows that repeat the key of a later row (a hand edit, two files
  concatenated) are moved there too, with a line of their own: the last row of a key is kept,
  as the report shows it. The file is then rewritten atomically with the rows kept.

  `append` writes one whole line with a single O_APPEND write (looping on a short write) and
  fsyncs it, so a row is either fully there or absent; a full disk cuts the partial line off
  again and raises OutOfSpace. `has(row)` lets a rerun skip what is done.
  """

  def __init__(
    self,
    path: os.PathLike,
    key_fields: Sequence[str],
    kinds: Sequence[str] | None = RESULTS_KINDS,
  ):
    self.path = pathlib.Path(path)
    self.key_fields = tuple(key_fields)
    self.kinds = None if kinds is None else tuple(kinds)
    self.rows: list[dict] = []
    self._keys: set = set()
    if not self.path.exists():
      return
    raw = self.path.read_bytes()
    values, torn = parse_lines(raw)
    good, bad, migrated = check_rows(values, self.kinds)
    last = {self.key(r): i for i, r in enumerate(good)}
    repeated = [(r, "a later row has the same key") for i, r in enumerate(good)
                if last[self.key(r)] != i]  # fmt: skip
    good = [r for i, r in enumerate(good) if last[self.key(r)] == i]
    name = self.path.name
    if migrated:
      olds = ", ".join(f"{n} of format {v}" for v, n in sorted(migrated.items()))
      logging.warning("%s: migrated %s to format %d", name, olds, FORMAT_VERSION)
    if bad:
      logging.warning(
        "%s: %d rows set aside in %s.rejected, to be recomputed: %s",
        name,
        len(bad),
        name,
        _summary(why for _, why in bad),
      )
    if repeated:  # nothing to recompute: the key stays, with its last row
      logging.warning(
        "%s: %d rows repeat the key of a later row (a hand edit? two files joined?); kept the "
        "last row of each key, set the others aside in %s.rejected",
        name,
        len(repeated),
        name,
      )
    if bad or repeated:
      rejected = self.path.with_name(f"{name}.rejected")
      old = rejected.read_text() if rejected.exists() else ""
      lines = "".join(_line({"reason": why, "row": r}) for r, why in bad + repeated)
      write_text_atomic(rejected, old + lines)
    if torn or migrated or bad or repeated or (raw and not raw.endswith(b"\n")):
      write_text_atomic(self.path, "".join(_line(r) for r in good))
    for r in good:
      self._remember(r)

  def key(self, row: Mapping) -> tuple:
    return tuple(_freeze(row.get(k)) for k in self.key_fields)

  def has(self, row: Mapping) -> bool:
    return self.key(row) in self._keys

  def append(self, row: Mapping) -> None:
    """Appends `row` (with `format_version` added) as one line, durably; see the class."""
    if self.has(row):
      raise ValueError(f"row {self.key(row)} is already in {self.path}")
    row = dict(row, format_version=FORMAT_VERSION)
    # The row as a reader will see it (numpy scalars as numbers; NaN kept, to be named here).
    parsed = json.loads(json.dumps(row, default=_jsonable))
    why = schema_problem(parsed, self.kinds)
    if why is None and not _all_finite(parsed):
      why = "a number is NaN or infinite (not JSON)"
    if why is not None:  # a bug of the writer: never leave a row the next run would set aside
      raise ValueError(f"row {self.key(row)} does not fit {self.path.name}'s schema: {why}")
    data = _line(row).encode()
    if not cluster.writes():  # a process other than 0 keeps the row in memory only
      self._remember(json.loads(data))
      return
    with _space_errors(self.path):
      self.path.parent.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      size = os.fstat(fd).st_size  # one writer per workdir (experiments.workdir): stays the end
      try:
        write_all(fd, data, self.path)
        with _space_errors(self.path):
          os.fsync(fd)
      except BaseException:
        # Cut the partial line off, so the file holds whole rows only; freeing those bytes
        # cannot fail for lack of space. (A kill here leaves a torn line the next open drops.)
        with contextlib.suppress(OSError):
          os.ftruncate(fd, size)
          os.fsync(fd)
        raise
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
  # allow_nan=False: NaN or inf would be written as a token that is not JSON.
  return json.dumps(row, sort_keys=True, default=_jsonable, allow_nan=False) + "\n"


def _all_finite(v) -> bool:
  if isinstance(v, float):
    return math.isfinite(v)
  if isinstance(v, dict):
    return all(_all_finite(x) for x in v.values())
  if isinstance(v, list):
    return all(_all_finite(x) for x in v)
  return True


def _freeze(v):
  if isinstance(v, float):
    return round(v, 12)
  if isinstance(v, list):
    return tuple(_freeze(x) for x in v)
  return v


# The largest examples file a run writes: the study commits its records with every file under
# 5 MB, and a few 154x154x3 float32 images per budget of a VAE attack (adversarial input and
# its reconstruction) came to 12.6 MB.
MAX_EXAMPLES_BYTES = 4_500_000


def save_examples_npz(path: os.PathLike, n: int, arrays_for, max_bytes=MAX_EXAMPLES_BYTES) -> int:
  """`arrays_for(k)` (the first k examples' arrays) to one compressed .npz, atomically, with k
  halved from n until the file fits in `max_bytes` (at least 1). When one example is still too
  large (a VAE attack over 13 C values at 154x154x3: 6.7 MB), its float32 arrays are stored
  as float16 (images in [0, 1]: steps of at most 2^-11); `load_examples` reads them back as
  float32. Returns k (n on a process that does not write, which compresses nothing).
  """
  if not cluster.writes():
    return n
  import numpy as np  # noqa: PLC0415  (numpy only for the writers of arrays)

  def half(arrays):
    return {a: v.astype(np.float16) if v.dtype == np.float32 else v for a, v in arrays.items()}

  k, shrink = max(int(n), 1), lambda arrays: arrays
  while True:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **shrink({a: np.asarray(v) for a, v in arrays_for(k).items()}))
    if buffer.tell() <= max_bytes or (k == 1 and shrink is half):
      break
    if k == 1:
      shrink = half
    else:
      k //= 2
  write_bytes_atomic(path, buffer.getvalue())
  return k


def load_examples(path: os.PathLike) -> dict:
  """An examples file of `save_examples_npz` as {name: array}, float16 arrays as float32."""
  import numpy as np  # noqa: PLC0415

  with np.load(path) as f:
    return {a: f[a].astype(np.float32) if f[a].dtype == np.float16 else f[a] for a in f.files}


def save_npz_atomic(path: os.PathLike, **arrays) -> None:
  """Arrays to one compressed .npz, built in memory and written atomically (`write_with`):
  never half a file, and a full disk is one OutOfSpace naming it."""
  import numpy as np  # noqa: PLC0415  (numpy only for the writers of arrays)

  write_with(path, lambda f: np.savez_compressed(f, **arrays))
