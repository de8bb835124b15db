"""Reading the runs: a work directory's files, the rows the report keeps, the rows' fields.

What a run leaves in its work directory (experiments/run.py, experiments/attacks.py):
config.json, train_metrics.json, results.jsonl (one row per dataset x model x attack x norm x
eps), examples/<model>_<attack>.npz and, for the latent attacks on VAEs,
curves/<model>_<attack>.npz; a defences run also defenses.jsonl and
defense_examples/<defence>.npz. This module only reads them.

What an attack's name means (its family, whether its eps is a penalty weight) comes from the
attacks' table, `vae_attacks.attacks.registry`; pixel counts from `vae_attacks.data.DATASETS`.
"""

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from experiments import keys, store
from vae_attacks import data
from vae_attacks.attacks import registry

DEFENSES_FILE = "defenses.jsonl"  # experiments/defenses.py
# Names of no attack in the registry whose eps the report still reads as a penalty weight C.
PENALTY_PREFIXES = ("tabacof", "kos_")


# --------------------------------------------------------------------------------------------
# What an attack's name means (read from the registry at each call, so a new entry is seen).


def attack_family(attack) -> str | None:
  """The registry family of an attack ("classifier", "vae", ...), None for an unknown name."""
  spec = registry.ATTACKS.get(str(attack))
  return None if spec is None else spec.family


def attack_index(attack) -> int:
  """The attack's place in the registry's table (unknown names after every known one)."""
  names = list(registry.ATTACKS)
  return names.index(attack) if attack in names else len(names)


def penalty_attacks() -> tuple[str, ...]:
  """The registry's attacks whose eps is a penalty weight, in the table's order."""
  return tuple(n for n in registry.ATTACKS if registry.is_penalty(n))


def is_penalty_attack(attack: str) -> bool:
  """True when the attack's `eps` is a penalty weight C (smaller is stronger), not a budget."""
  return registry.is_penalty(attack) or str(attack).startswith(PENALTY_PREFIXES)


# --------------------------------------------------------------------------------------------
# Reading a work directory.


@dataclasses.dataclass
class RunFiles:
  """What one work directory holds, as read by `load_run`."""

  workdir: pathlib.Path
  config: dict
  train: dict  # {model: metrics}
  rows: list  # result rows, one per (dataset, model, attack, norm, eps)
  left_out: int  # rows of other attack settings, or superseded by a later row of the same key
  dataset: str | None
  defense_rows: list = dataclasses.field(default_factory=list)  # defenses.jsonl (current settings)
  rejected: list = dataclasses.field(default_factory=list)  # why each unusable row was left out


def read_rows(
  path: os.PathLike, kinds: Sequence[str] = store.RESULTS_KINDS, rejected: list | None = None
) -> list[dict]:
  """The usable rows of a results.jsonl (or, with `kinds`, defenses.jsonl), in the current
  format (`store.read_jsonl`): a torn line is skipped, not fixed; a row that fails the format
  check is never used, and why is appended to `rejected`."""
  return store.read_jsonl(path, kinds, rejected)


def _read_json(path: pathlib.Path) -> dict:
  try:
    value = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return {}
  return value if isinstance(value, dict) else {}


def settings_hash(config: dict) -> str | None:
  """The `settings` hash experiments.attacks writes on rows made under `config`, if computable."""
  if "attacks" not in config or "eval" not in config:
    return None
  return keys.attack_settings(config)


def row_key(row: Mapping) -> tuple:
  """(dataset, model, attack, norm, eps): one cell of the study."""
  eps = row.get("eps")
  return (
    row.get("dataset"),
    row.get("model"),
    row.get("attack"),
    row.get("norm"),
    round(float(eps), 12) if eps is not None else None,
  )


def select_rows(rows: Sequence[Mapping], settings=None) -> tuple[list, int]:
  """One row per cell: those made under `settings` when any are, the last one of each key.

  `settings`: a hash, or a function row -> the hash expected on that row (each attack's rows
  carry their own, `keys.attack_settings`).

  A rerun with changed attack / eval settings appends rows with another `settings` hash; the
  report shows only the current settings' rows so that every number in it is comparable.

  Returns:
    (rows, number of rows left out).
  """
  rows = list(rows)
  expected = settings if callable(settings) else (lambda r: settings)
  if settings is not None and any(r.get("settings") == expected(r) for r in rows):
    chosen = [r for r in rows if r.get("settings") == expected(r)]
  else:
    chosen = rows
  last = {}
  for r in chosen:
    last[row_key(r)] = r
  kept = list(last.values())
  return kept, len(rows) - len(kept)


def load_run(workdir: os.PathLike) -> RunFiles:
  """Reads config.json, train_metrics.json and results.jsonl of one work directory."""
  workdir = pathlib.Path(workdir)
  config = _read_json(workdir / "config.json")
  train = _read_json(workdir / "train_metrics.json")
  expected = None
  if "attacks" in config and "eval" in config:
    expected = lambda r: keys.attack_settings(config, r.get("attack"))  # noqa: E731
  rejected: list[str] = []
  rows = read_rows(workdir / "results.jsonl", rejected=rejected)
  rows, left_out = select_rows(rows, expected)
  dataset = (config.get("data") or {}).get("name")
  if dataset is None:
    names = sorted({r.get("dataset") for r in rows if r.get("dataset")})
    dataset = names[0] if len(names) == 1 else None
  defense_rows = read_rows(workdir / DEFENSES_FILE, store.DEFENSES_KINDS, rejected)
  defense_rows = select_defense_rows(defense_rows, config)
  return RunFiles(workdir, config, train, rows, left_out, dataset, defense_rows, rejected)


def select_defense_rows(rows: Sequence[Mapping], config: Mapping) -> list:
  """The rows of defenses.jsonl made under the config's settings (each defence's rows under its
  own, `run.defence_settings`; all rows when none match), one per (kind, dataset, defence,
  attack, eps, source, target): the last."""
  if "defenses" in config and "attacks" in config:
    d, a = config["defenses"], config["attacks"]
    transfer = keys.transfer_settings(config)
    own = {}

    def expected(r):  # a defence's rows carry its own settings, transfer rows the whole run's
      if r.get("kind") != "defense":
        return transfer
      name = r.get("defense")
      if name not in own:
        own[name] = keys.defense_settings(d, a, name)
      return own[name]

    kept = []
    for kind in dict.fromkeys(r.get("kind") for r in rows):  # all of a kind when none match
      of_kind = [r for r in rows if r.get("kind") == kind]
      kept += [r for r in of_kind if r.get("settings") == expected(r)] or of_kind
    rows = kept
  last = {}
  for r in rows:
    k = tuple(r.get(f) for f in ("kind", "dataset", "defense", "attack", "source", "target"))
    last[(*k, num(r.get("eps")))] = r
  return list(last.values())


def read_record(path: os.PathLike) -> dict[str, np.ndarray] | None:
  """Every array of a row's per-pair record (experiments/attacks.py writes it: the fields of
  `metrics.PairMeasures` per pair, source_index, source_label, target, and for a VAE attack
  quality_x / quality_y), or None when it cannot be read."""
  try:
    with np.load(path) as f:
      return {k: np.asarray(f[k]) for k in f.files}
  except (OSError, ValueError, KeyError):
    return None


@dataclasses.dataclass
class DatasetView:
  """Everything the report shows for one dataset, merged over work directories."""

  name: str
  rows: list = dataclasses.field(default_factory=list)
  train: dict = dataclasses.field(default_factory=dict)  # {model: metrics}
  examples: dict = dataclasses.field(default_factory=dict)  # {(model, attack): npz path}
  curves: dict = dataclasses.field(default_factory=dict)  # {(model, attack): npz path}
  pixels: int | None = None
  workdirs: list = dataclasses.field(default_factory=list)
  left_out: int = 0
  overridden: int = 0  # rows of a cell that a later work directory also has
  rejected: list = dataclasses.field(default_factory=list)  # why unusable rows were left out
  defense_rows: list = dataclasses.field(default_factory=list)  # defenses.jsonl rows
  defense_examples: dict = dataclasses.field(default_factory=dict)  # {defence: npz path}
  records: dict = dataclasses.field(default_factory=dict)  # {row_key: per-pair record path}


def _pixels(run: RunFiles, examples: Iterable[pathlib.Path]) -> int | None:
  """D of a run: from its examples' shape, else its config's image size, else the full size."""
  for path in examples:
    try:
      with np.load(path) as f:
        return int(np.prod(f["x"].shape[1:]))
    except (OSError, KeyError, ValueError):
      continue
  spec = data.DATASETS.get(run.dataset or "")
  size = (run.config.get("data") or {}).get("image_size")
  if size:
    return int(size) ** 2 * (spec.full_shape[2] if spec else 1)
  return spec.pixels if spec else None


def build_views(runs: Sequence[RunFiles]) -> list[DatasetView]:
  """Groups runs by dataset; a cell present in two work directories is taken from the later."""
  views: dict[str, DatasetView] = {}
  for run in runs:
    by_dataset: dict[str, list] = {}
    for r in run.rows:
      by_dataset.setdefault(r.get("dataset") or run.dataset or "unknown", []).append(r)
    if not by_dataset and run.dataset:
      by_dataset[run.dataset] = []
    for r in run.defense_rows:
      name = r.get("dataset") or run.dataset or "unknown"
      by_dataset.setdefault(name, [])
      views.setdefault(name, DatasetView(name)).defense_rows.append(r)
      npz = run.workdir / "defense_examples" / f"{r.get('defense')}.npz"
      if npz.exists():
        views[name].defense_examples[r.get("defense")] = npz
    for name, rows in by_dataset.items():
      view = views.setdefault(name, DatasetView(name))
      view.workdirs.append(run.workdir)
      view.left_out += run.left_out
      view.rejected += run.rejected
      cells = {row_key(r): i for i, r in enumerate(view.rows)}
      for r in rows:
        view.records.pop(row_key(r), None)
        if r.get("record"):
          view.records[row_key(r)] = run.workdir / str(r["record"])
        if row_key(r) in cells:
          view.rows[cells[row_key(r)]] = r
          view.overridden += 1
        else:
          cells[row_key(r)] = len(view.rows)
          view.rows.append(r)
      if name == run.dataset or len(by_dataset) == 1:
        view.train.update(run.train)
      found = []
      for model, attack in sorted({(r.get("model"), r.get("attack")) for r in rows}):
        for kind, store_in in (("examples", view.examples), ("curves", view.curves)):
          path = run.workdir / kind / f"{model}_{attack}.npz"
          if path.exists():
            store_in[(model, attack)] = path
            if kind == "examples":
              found.append(path)
      view.pixels = _pixels(run, found) or view.pixels
  order = {name: i for i, name in enumerate(data.DATASETS)}
  return sorted(views.values(), key=lambda v: (order.get(v.name, 2), v.name))


# --------------------------------------------------------------------------------------------
# Null-safe access to row fields.


def num(v) -> float | None:
  """A finite float, or None (missing, a bool, not a number, NaN or inf)."""
  if v is None or isinstance(v, bool):
    return None
  try:
    v = float(v)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def interval(row: Mapping, field: str) -> tuple[float, float] | None:
  """The row's `<field>_ci` as (lo, hi), or None when either end is unknown."""
  ci = row.get(f"{field}_ci")
  if not isinstance(ci, (list, tuple)) or len(ci) != 2:
    return None
  lo, hi = num(ci[0]), num(ci[1])
  return None if lo is None or hi is None else (lo, hi)


def n_pairs(row: Mapping) -> int:
  """The row's number of pairs (0 when unknown)."""
  n = num(row.get("n_pairs"))
  return int(n) if n else 0


def effectiveness(row: Mapping) -> dict:
  """The row's effectiveness counts ({} when absent)."""
  eff = row.get("effectiveness")
  return eff if isinstance(eff, dict) else {}
