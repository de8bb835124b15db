"""What identifies a result row: its key fields and the settings hashes written on it.

Shared by the runs that write rows (experiments/attacks.py, experiments/defenses.py) and the
report that selects them, so that both compute one hash from one definition.
"""

import hashlib
import json
import math
from collections.abc import Mapping

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


def attack_settings(config: Mapping) -> str:
  """The `settings` hash of the attack rows made under a run config (its attacks and eval)."""
  return config_hash({"attacks": to_dict(config["attacks"]), "eval": to_dict(config["eval"])})


def transfer_settings(config: Mapping) -> str:
  """The `settings` hash of a defence run's transfer rows (its defences and attacks)."""
  return config_hash(
    {"defenses": to_dict(config["defenses"]), "attacks": to_dict(config["attacks"])}
  )


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
      "num_examples": int(defenses["num_examples"]),
      "defense": own if isinstance(own, dict) else None,
      "runner": to_dict(attacks),
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
