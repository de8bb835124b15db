"""What identifies a result row: its key fields and the settings hashes written on it.

Shared by the runs that write rows (experiments/attacks.py, experiments/defenses.py) and the
report that selects them, so that both compute one hash from one definition.
"""

import hashlib
import json
import math
from collections.abc import Mapping

from vae_attacks.attacks import registry

# results.jsonl: one row per (dataset, model, attack, norm, eps) under one attack/eval setting.
RESULT_KEY = ("dataset", "model", "attack", "norm", "eps", "settings")
# defenses.jsonl: one row per (kind, dataset, defence, attack, eps, source, target) and setting.
DEFENSE_KEY = ("kind", "dataset", "defense", "attack", "eps", "source", "target", "settings")


def to_dict(c):
  """A ConfigDict (or a plain dict) as plain JSON-able dicts."""
  return json.loads(c.to_json()) if hasattr(c, "to_json") else c


def config_hash(section) -> str:
  """Short stable hash of a config section (part of each result row's key)."""
  text = json.dumps(to_dict(section), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


# What decides a run's shared pairs besides the models: attacks fields (and attacks.vae.num_pairs).
PAIR_FIELDS = ("num_pairs", "target_strategy", "fixed_targets", "only_correct", "shared_pairs")
# attacks fields that pick which rows a run makes, not what a row measures: in no hash.
SELECTION_FIELDS = ("only_models",)


def _measured(attacks) -> dict:
  """The attacks section less SELECTION_FIELDS (as plain dicts)."""
  return {k: v for k, v in to_dict(attacks).items() if k not in SELECTION_FIELDS}


def pair_models(config: Mapping) -> tuple[str, ...]:
  """The models every pair's source must be classified correctly by: `attacks.pair_models`
  where a config sets it (a control added to a finished run is attacked on its pairs, which
  it did not choose), else every model of the run."""
  return tuple(config["attacks"].get("pair_models") or config["models"])


def pairs_settings(config: Mapping) -> str:
  """The hash of what decides a run's pairs and how every pair is measured: the models that
  choose them (`pair_models`), the pair settings and the eval section."""
  a = to_dict(config["attacks"])
  pairs = {k: a.get(k) for k in PAIR_FIELDS}
  pairs["vae_num_pairs"] = a["vae"]["num_pairs"]
  return config_hash(
    {"models": list(pair_models(config)), "pairs": pairs, "eval": to_dict(config["eval"])}
  )


def attack_settings(config: Mapping, attack: str | None = None) -> str:
  """The `settings` hash of `attack`'s rows under a run config.

  With shared pairs (`attacks.shared_pairs` in the config): the pairs' settings and the
  attack's own config section, so that enabling another attack, or changing another's grid,
  keeps finished rows (and runner settings such as chunk_size, which change no number, are
  not in it). Configs from before (no `shared_pairs`), or `attack` None: one hash over the
  whole attacks and eval sections, as their rows were written.
  """
  a = _measured(config["attacks"])
  if attack is None or "shared_pairs" not in a or attack not in registry.ATTACKS:
    return config_hash({"attacks": a, "eval": to_dict(config["eval"])})
  spec = registry.ATTACKS[attack]
  sections = a["vae"] if spec.family == "vae" else a
  return config_hash(
    {"pairs": pairs_settings(config), "attack": sections[spec.section or spec.name]}
  )


def transfer_settings(config: Mapping) -> str:
  """The `settings` hash of a defence run's transfer rows (its defences and attacks; not
  `only_attacks`, which picks the rows a run makes, not what they measure)."""
  defenses = {k: v for k, v in to_dict(config["defenses"]).items() if k != "only_attacks"}
  return config_hash({"defenses": defenses, "attacks": _measured(config["attacks"])})


def defense_settings(defenses, attacks, name: str) -> str:
  """The settings hash of a defence's rows in defenses.jsonl (ConfigDicts or plain dicts).

  What its attack points depend on: the defence attacks, the examples, the runner section
  (`attacks`) and the defence's own section `defenses.<name>` if it has one; so enabling
  another defence or changing another's knobs keeps finished rows. The models themselves are
  guarded by their checkpoints' hyper-parameters.
  """
  defenses = to_dict(defenses)
  own = defenses.get(name)
  return config_hash(
    {
      "attacks": defenses["attacks"],
      "apgd": defenses.get("apgd"),  # the APGD ensemble every defence also runs
      "num_examples": int(defenses["num_examples"]),
      "defense": own if isinstance(own, dict) else None,
      "runner": _measured(attacks),
    }
  )


def diff(a: Mapping, b: Mapping, prefix="") -> list[str]:
  """Dotted names of the fields where two config dicts differ (NaN equals NaN here)."""
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      out += diff(va, vb, f"{prefix}{k}.")
    elif not same(va, vb):
      out.append(f"{prefix}{k}")
  return out


def same(a, b) -> bool:
  """a == b, except that NaN equals NaN, also inside lists and tuples: a config.json written
  with NaN in it must not make the identical command a "different config"."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
  return a == b
