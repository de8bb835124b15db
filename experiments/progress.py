"""One progress display for a whole image run, on stderr: the plan at the start (the models to
train, then the attack sweeps of each pass with their pairs and eps), a header line before each
stage with the stage number, the time elapsed and a whole-job ETA from the rates measured so
far in this job, and a last line naming the report and the figures.

The bars inside a stage (training steps of an epoch, pairs of a sweep) are
`vae_attacks.progress` bars, labelled with the model and the registry's attack name.
"""

import pathlib
import sys
import time
from typing import NamedTuple

from vae_attacks import models as models_lib
from vae_attacks.attacks import registry


class Stage(NamedTuple):
  kind: str  # "train" | "attack"
  model: str
  attack: str  # registry name ("" for training)
  label: str  # what the plan and the header say
  units: float  # examples x epochs (train), pairs x eps (attack)
  rate_key: str  # stages that share a measured rate
  group: str  # stages of a similar cost: "train", or "attack:<cost pass>"


def _fmt(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _epochs(config, name: str) -> int:
  t = config.train
  if name in t:
    return int(t[name].epochs)
  return int(t.vae.epochs) + int(t.latent_classifier.epochs)


def applies(spec: registry.AttackSpec, model_name: str) -> bool:
  """Whether the attack runs on the model (a `generative_only` one on generative ones alone)."""
  return not spec.generative_only or model_name in models_lib.GENERATIVE_CLASSIFIERS


def plan(config, n_train: int) -> list[Stage]:
  """The stages of an image run, in the order experiments.run runs them."""
  stages = []
  for name in config.models:
    e = _epochs(config, name)
    what = (
      "CNN" if name == "cnn"
      else "generative classifier" if name in models_lib.GENERATIVE_CLASSIFIERS
      else "VAE + latent classifier"
    )  # fmt: skip
    stages.append(Stage("train", name, "", f"train {name} ({what}): {e} epochs of {n_train} "
                        "examples", e * n_train, f"train:{name}", "train"))  # fmt: skip
  acfg = config.attacks
  for k in range(registry.NUM_PASSES):
    for name in config.models:
      is_vae = models_lib.MODEL_KINDS.get(name) == "vae"
      families = ["vae", "classifier"] if is_vae and "cnn" in config.models else ["classifier"]
      for family in families:
        if family == "vae" and not acfg.vae.enabled:
          continue
        pairs = int(acfg.vae.num_pairs if family == "vae" else acfg.num_pairs)
        for spec in registry.enabled(acfg):
          if spec.family != family or spec.cost_pass != k or not applies(spec, name):
            continue
          sec = registry.section_of(spec, acfg)
          n_eps = len(registry.eps_grid(spec, sec))
          label = (f"attack {name} {spec.name} {registry.norm_of(spec, sec)}: "
                   f"{pairs} pairs x {n_eps} {'C' if family == 'vae' else 'eps'}")  # fmt: skip
          stages.append(Stage("attack", name, spec.name, label, pairs * n_eps,
                              f"attack:{spec.name}", f"attack:{k}"))  # fmt: skip
  return stages


class Job:
  """The whole job's stages, their measured rates and the header lines (stderr)."""

  def __init__(self, stages: list[Stage], stream=None):
    self.stages = stages
    self.stream = stream if stream is not None else sys.stderr
    self.t0 = time.perf_counter()
    self.done: set[int] = set()
    self.rates: dict[str, float] = {}  # rate_key -> seconds per unit
    self._current: tuple[int, float] | None = None

  def _say(self, line: str) -> None:
    print(line, file=self.stream, flush=True)

  def show_plan(self, title: str) -> None:
    n_train = sum(s.kind == "train" for s in self.stages)
    n_sweeps = len(self.stages) - n_train
    self._say(f"plan of {title}: {n_train} model{'s' * (n_train != 1)} to train, "
              f"{n_sweeps} attack sweep{'s' * (n_sweeps != 1)}")  # fmt: skip
    for i, s in enumerate(self.stages, 1):
      self._say(f"  {i:>2}. {s.label}")

  def _find(self, kind: str, model: str, attack: str = "") -> int | None:
    for i, s in enumerate(self.stages):
      if s.kind == kind and s.model == model and s.attack == attack and i not in self.done:
        return i
    return None

  def eta(self) -> str:
    """The remaining stages at the rates measured in this job: a stage's own rate (its model's
    training, its attack on an earlier model), else the mean rate of its group (trainings; the
    attacks of its cost pass), else it is left out and counted."""
    left, unknown = 0.0, 0
    groups: dict[str, list[float]] = {}
    for s in self.stages:
      if s.rate_key in self.rates:
        groups.setdefault(s.group, []).append(self.rates[s.rate_key])
    for i, s in enumerate(self.stages):
      if i in self.done:
        continue
      rate = self.rates.get(s.rate_key)
      if rate is None and groups.get(s.group):
        rate = sum(groups[s.group]) / len(groups[s.group])
      if rate is None:
        unknown += 1
      else:
        left += rate * s.units
    if not self.rates:
      return "after the first stage"
    more = f" + {unknown} stages not yet measured" if unknown else ""
    return f"~{_fmt(left)}{more}"

  def start(self, kind: str, model: str, attack: str = "") -> None:
    """Begins a stage: one header line with the stage number, elapsed time and job ETA."""
    i = self._find(kind, model, attack)
    if i is None:
      return
    self._current = (i, time.perf_counter())
    elapsed = _fmt(time.perf_counter() - self.t0)
    self._say(f"[{i + 1}/{len(self.stages)} | {elapsed} elapsed | job ETA {self.eta()}] "
              f"{self.stages[i].label}")  # fmt: skip

  def finish(self, skipped: bool = False) -> None:
    """Ends the current stage; its rate counts unless it was skipped (already done)."""
    if self._current is None:
      return
    i, t = self._current
    self._current = None
    self.done.add(i)
    seconds = time.perf_counter() - t
    if not skipped and seconds > 1.0 and self.stages[i].units:
      self.rates[self.stages[i].rate_key] = seconds / self.stages[i].units

  def skip(self, kind: str, model: str, attack: str = "") -> None:
    """Marks a stage done without running it (its rows are already in the log)."""
    i = self._find(kind, model, attack)
    if i is not None:
      self.done.add(i)

  def last_line(self, workdir: pathlib.Path) -> None:
    figures = sorted((workdir / "figures").glob("*.png"))
    self._say(
      f"done in {_fmt(time.perf_counter() - self.t0)}: report {workdir / 'summary.md'}, "
      f"{len(figures)} figures in {workdir / 'figures'}, rows in {workdir / 'results.jsonl'}"
    )


class NoJob(Job):
  """A Job that shows nothing (library callers, tests that pass no job)."""

  def __init__(self):
    super().__init__([], stream=None)

  def _say(self, line: str) -> None:
    pass
