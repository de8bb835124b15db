"""The work directory of a run: who may use it, and which config it belongs to."""

import json
import pathlib

from experiments import keys, store
from experiments.errors import UserError


def claim_workdir(config, workdir: pathlib.Path) -> None:
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
    # What decides the trained models must match; attacks/eval/output may change between runs
    # (result rows carry a hash of those settings in their key).
    fixed = ("seed", "models", "data", "model", "train")
    changed = keys.diff({k: old.get(k) for k in fixed}, {k: new.get(k) for k in fixed})
    if changed:
      raise UserError(
        f"workdir {workdir} belongs to a different config (differs in: {', '.join(changed)}); "
        "use another --workdir or delete that folder"
      )
  store.write_json_atomic(path, new)
