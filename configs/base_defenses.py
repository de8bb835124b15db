"""The start every defences config shares (configs/mnist_defenses.py, configs/lfw_defenses.py)."""

import ml_collections

from configs import base


def get_base(dataset: str, arg: str | None, allowed: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The base config of `dataset` with the CNN, named `<dataset>_defenses`, handed to
  experiments/defenses.py (`experiment = "defenses"`); `arg` must be one of `allowed` and
  "quick" shrinks it (configs/base.py)."""
  arg = arg or ""
  if arg not in allowed:
    shown = ", ".join(repr(a) for a in allowed)
    raise ValueError(f"config argument {arg!r} is not known; allowed: {shown}")
  c = base.get_config(dataset=dataset, models=("cnn",), quick=arg == "quick")
  c.name = f"{dataset}_defenses"
  c.experiment = "defenses"
  return c
