"""One progress display for a whole job, on stderr, and its timing table.

A job is every stage a command will run, in order: the trainings and attack sweeps of an image
run (`plan`), of every part of a study (`plan` per part, one `Job`), the defences' trainings and
attacks (`defense_plan`), the communication systems' trainings, crafting and evaluation
(`comm_plan`). The display shows the plan at the start (each stage with its counts), a header
line before each stage with the stage number, the time elapsed and a whole-job ETA from the
rates measured so far in this job, and, at the end, the timing table (each stage's wall
seconds and examples per second) and a last line naming the report and the figures. The table
is also written to `<workdir>/timings.json` after every stage, so an interrupted run keeps it
and a resumed one adds to it.

The bars inside a stage (training steps of an epoch, pairs of a sweep) are
`vae_attacks.progress` bars, labelled with the model and the registry's attack name.
"""

import json
import pathlib
import sys
import time
from typing import NamedTuple

from experiments import store
from vae_attacks import models as models_lib
from vae_attacks import train as train_lib
from vae_attacks.attacks import registry

TIMINGS_FILE = "timings.json"


class Stage(NamedTuple):
  kind: str  # "train" | "attack" | "craft" | "evaluate" | "transfer"
  model: str  # the model (or defence, or communication system) it works on
  attack: str  # registry name ("" for a stage of no one attack)
  label: str  # what the plan, the header and the timing table say
  units: float  # examples x epochs (train), pairs x eps (attack), ...: what the rate counts
  rate_key: str  # stages that share a measured rate
  group: str  # stages of a similar cost: "train", or "attack:<cost pass>", ...
  part: str = ""  # the study part the stage belongs to ("" outside a study)
  unit: str = "examples"  # what `units` counts, for the timing table's rate
  scale: float = 1.0  # cost of one unit relative to other parts' (pixels per image)


def _fmt(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _n(count: int, word: str) -> str:
  return f"{count} {word}{'s' * (count != 1)}"


def _epochs(config, name: str) -> int:
  t = config.train
  if name in t:
    return int(t[name].epochs)
  return int(t.vae.epochs) + int(t.latent_classifier.epochs)


_WHAT = {
  "cnn": "CNN",
  "cnn_matched": "CNN, accuracy-matched control",
  "joint_vae": "VAE trained with its latent classifier",
}


def applies(spec: registry.AttackSpec, model_name: str) -> bool:
  """Whether the attack runs on the model (a `generative_only` one on generative ones alone)."""
  return not spec.generative_only or model_name in models_lib.GENERATIVE_CLASSIFIERS


def attacked(acfg, model_name: str) -> bool:
  """Whether this run attacks the model: every model, or those `attacks.only_models` names."""
  only = tuple(acfg.get("only_models", ()))
  return not only or model_name in only


def plan(config, n_train: int, part: str = "", pixels: float = 1.0) -> list[Stage]:
  """The stages of an image run, in the order experiments.run runs them; `part` names the
  study part (a prefix of every label), `pixels` the size of one image (the cost scale that
  carries a rate measured on one part's data to another's)."""
  pre = f"{part}: " if part else ""
  stages = []
  for name in config.models:
    e = _epochs(config, name)
    what = _WHAT.get(name) or (
      "generative classifier" if name in models_lib.GENERATIVE_CLASSIFIERS
      else "VAE + latent classifier"
    )  # fmt: skip
    section = config.train[name] if name in config.train else {}
    per_epoch = train_lib.examples_per_epoch(n_train, section.get("epoch_examples", 0))
    stages.append(Stage("train", name, "", f"{pre}train {name} ({what}): {_n(e, 'epoch')} of "
                        f"{per_epoch} examples", e * per_epoch, f"train:{name}", "train", part,
                        "examples", pixels))  # fmt: skip
  acfg = config.attacks
  for k in range(registry.NUM_PASSES):
    for name in (m for m in config.models if attacked(acfg, m)):
      is_vae = models_lib.MODEL_KINDS.get(name) == "vae"
      families = ["vae", "classifier"] if is_vae and "cnn" in config.models else ["classifier"]
      for family in families:
        if family == "vae" and not acfg.vae.enabled:
          continue
        for spec in registry.enabled(acfg):
          if spec.family != family or spec.cost_pass != k or not applies(spec, name):
            continue
          pairs = registry.num_pairs_of(spec, acfg)
          sec = registry.section_of(spec, acfg)
          n_eps = len(registry.eps_grid(spec, sec))
          label = (f"{pre}attack {name} {spec.name} {registry.norm_of(spec, sec)}: "
                   f"{pairs} pairs x {n_eps} {'C' if family == 'vae' else 'eps'}")  # fmt: skip
          stages.append(Stage("attack", name, spec.name, label, pairs * n_eps,
                              f"attack:{spec.name}", f"attack:{k}", part, "examples",
                              pixels))  # fmt: skip
  return stages


def defense_plan(
  config, n_train: int, n_test: int, sections: dict, sources_to_build=(), imported=None
) -> list[Stage]:
  """The stages of a defences run (experiments/defenses.py), in its order: per defence, its
  training (the models it needs that no earlier defence trained; `sections[name]` are the
  (model, train) config sections defence `name` trains from), or the import of its model
  (`imported[name]`: "<model> from <folder>", checked on the `n_test` test images), and its
  attacks (every attack it is built with, at every eps, on its examples); then the transfer
  matrix."""
  d = config.defenses
  n_eps = len(d.attacks.eps)
  trained: set = set()
  stages = []
  imported = imported or {}

  def build(name):
    if name in imported:
      stages.append(Stage("train", name, "", f"build defence {name}: imports {imported[name]}",
                          n_test, f"import:{name}", "train"))  # fmt: skip
      return
    new = [s for s in sections[name] if s not in trained]
    trained.update(new)
    epochs = sum(int(config.train[t].epochs) for _, t in new)
    models = ", ".join(f"{m} ({t}, {config.train[t].epochs} epochs)" for m, t in new)
    what = f"trains {models} on {n_train} examples" if new else "reuses models trained above"
    stages.append(Stage("train", name, "", f"build defence {name}: {what}", epochs * n_train,
                        f"train:{name}", "train"))  # fmt: skip

  for name in d.enabled:
    build(name)
    own = d.get(name)  # a costly defence evaluates fewer examples (its num_examples)
    n = min(n_test, int(own.num_examples)) if own is not None and "num_examples" in own else n_test
    stages.append(Stage("attack", name, "", f"attack defence {name}: each of its attacks x "
                        f"{n_eps} eps on {n} examples ({d.attacks.restarts} restarts)",
                        n * n_eps, f"attack:{name}", "attack"))  # fmt: skip
  if d.transfer.enabled:
    for name in sources_to_build:
      build(name)
    n_src, n_tgt = len(d.transfer.sources), len(set(d.enabled) | set(d.transfer.sources))
    label = (f"transfer matrix: PGD examples of {n_src} sources on {n_tgt} targets, "
             f"{n_test} examples at eps {float(d.transfer.eps):g}")  # fmt: skip
    stages.append(Stage("transfer", "", "", label, n_src * n_test, "transfer", "transfer"))
  return stages


def comm_plan(config, n_points: int) -> list[Stage]:
  """The stages of a communication run (experiments/comm.py), in its order: per system, its
  training (autoencoders), the crafting of its perturbations and the evaluation of its
  `n_points` (attack, PSR, Eb/N0) points."""
  from vae_attacks.comms import system as system_lib  # noqa: PLC0415

  t, a = config.train, config.attacks
  stages = []
  blocks = int(config.eval.blocks)
  for name in config.models:
    if name in system_lib.AUTOENCODERS:
      stages.append(Stage("train", name, "", f"train {name}: {t.steps} steps of "
                          f"{t.batch_size} messages", int(t.steps) * int(t.batch_size),
                          f"train:{name}", "train", unit="messages"))  # fmt: skip
    n_psr = len({float(p) for p in (*a.psr_db, *a.curve_psr_db)})
    stages.append(Stage("craft", name, "", f"craft on {name}: {len(a.enabled)} attacks at "
                        f"{n_psr} PSRs from {a.craft_samples} blocks", len(a.enabled) * n_psr,
                        "craft", "craft", unit="tables"))  # fmt: skip
    label = f"evaluate {name}: {n_points} points x {blocks} blocks"
    stages.append(Stage("evaluate", name, "", label, n_points * blocks, "evaluate", "evaluate",
                        unit="blocks"))  # fmt: skip
  return stages


class Job:
  """The whole job's stages, their measured rates, the header lines (stderr) and the timing
  table (`timings`, written to `timings_path` after every stage when given)."""

  def __init__(self, stages: list[Stage], stream=None, timings_path=None):
    self.stages = stages
    self.stream = stream if stream is not None else sys.stderr
    self.t0 = time.perf_counter()
    self.done: set[int] = set()
    self.rates: dict[tuple[str, str], float] = {}  # (part, rate_key) -> seconds per scaled unit
    self.part = ""
    self.timings_path = pathlib.Path(timings_path) if timings_path else None
    self.timings: dict[int, dict] = {}  # stage index -> its row of the timing table
    self._earlier = self._read_earlier()
    self._current: tuple[int, float] | None = None

  def _say(self, line: str) -> None:
    print(line, file=self.stream, flush=True)

  def _read_earlier(self) -> dict[str, dict]:
    """The rows of an earlier run's timing table in the same workdir, by label."""
    if self.timings_path is None or not self.timings_path.exists():
      return {}
    try:
      rows = json.loads(self.timings_path.read_text()).get("stages", [])
    except (ValueError, AttributeError):
      return {}
    return {r["label"]: r for r in rows if isinstance(r, dict) and "label" in r}

  def enter(self, part: str) -> None:
    """The study part whose stages `start`, `skip` and `finish` name from now on."""
    self.part = part

  def show_plan(self, title: str) -> None:
    counts: dict[str, int] = {}
    for s in self.stages:
      counts[s.kind] = counts.get(s.kind, 0) + 1
    words = {"train": "training", "attack": "attack sweep", "craft": "crafting",
             "evaluate": "evaluation", "transfer": "transfer matrix"}  # fmt: skip
    what = ", ".join(f"{n} {words.get(k, k)}{'s' * (n != 1 and k != 'transfer')}"
                     for k, n in counts.items())  # fmt: skip
    self._say(f"plan of {title}: {len(self.stages)} stages ({what})")
    for i, s in enumerate(self.stages, 1):
      self._say(f"  {i:>2}. {s.label}")

  def _find(self, kind: str, model: str, attack: str = "") -> int | None:
    for i, s in enumerate(self.stages):
      if (s.part, s.kind, s.model, s.attack) == (self.part, kind, model, attack) and (
        i not in self.done
      ):
        return i
    return None

  def _rate(self, s: Stage) -> float | None:
    """Seconds per scaled unit of stage `s`: its own measured rate, else the mean of its
    group's in its part, else its rate key's in other parts, else its group's anywhere."""

    def mean(values):
      values = list(values)
      return sum(values) / len(values) if values else None

    by_group: dict[tuple[str, str], dict[str, float]] = {}
    for t in self.stages:
      if (t.part, t.rate_key) in self.rates:
        by_group.setdefault((t.part, t.group), {})[t.rate_key] = self.rates[(t.part, t.rate_key)]
    candidates = (
      lambda: self.rates.get((s.part, s.rate_key)),
      lambda: mean(by_group.get((s.part, s.group), {}).values()),
      lambda: mean(r for (_, k), r in self.rates.items() if k == s.rate_key),
      lambda: mean(r for (_, g), rs in by_group.items() if g == s.group for r in rs.values()),
    )
    for c in candidates:
      rate = c()
      if rate is not None:
        return rate
    return None

  def eta(self) -> str:
    """The remaining stages at the rates measured in this job (`_rate`); stages of a kind
    not yet measured are left out and counted."""
    if not self.rates:
      return "after the first stage"
    left, unknown = 0.0, 0
    for i, s in enumerate(self.stages):
      if i in self.done:
        continue
      rate = self._rate(s)
      if rate is None:
        unknown += 1
      else:
        left += rate * s.units * s.scale
    if not unknown:
      return f"~{_fmt(left)}"
    more = f"{_n(unknown, 'stage')} not yet measured"
    return f"~{_fmt(left)} + {more}" if left >= 0.5 else more

  def start(self, kind: str, model: str, attack: str = "", detail: str = "") -> None:
    """Begins a stage: one header line with the stage number, elapsed time and job ETA
    (`detail`, when given, is added to the stage's label: what is known only now)."""
    i = self._find(kind, model, attack)
    if i is None:
      return
    self._current = (i, time.perf_counter())
    elapsed = _fmt(time.perf_counter() - self.t0)
    extra = f" ({detail})" if detail else ""
    self._say(f"[{i + 1}/{len(self.stages)} | {elapsed} elapsed | job ETA {self.eta()}] "
              f"{self.stages[i].label}{extra}")  # fmt: skip

  def finish(self, skipped: bool = False) -> None:
    """Ends the current stage; its rate and timing row count unless it was skipped (its
    products were already in the workdir: a checkpoint restored)."""
    if self._current is None:
      return
    i, t = self._current
    self._current = None
    if skipped:
      self._mark_done_earlier(i)
      return
    self.done.add(i)
    s = self.stages[i]
    seconds = time.perf_counter() - t
    if seconds > 0 and s.units:
      self.rates[(s.part, s.rate_key)] = seconds / (s.units * s.scale)
    self.timings[i] = self._row(i, seconds, "ran")
    self._write_timings()

  def skip(self, kind: str, model: str, attack: str = "") -> None:
    """Marks a stage done without running it (its rows are already in the log)."""
    i = self._find(kind, model, attack)
    if i is not None:
      self._mark_done_earlier(i)

  def _mark_done_earlier(self, i: int) -> None:
    self.done.add(i)
    earlier = self._earlier.get(self.stages[i].label, {})
    self.timings[i] = self._row(i, earlier.get("seconds"), "done earlier")
    self._write_timings()

  def _row(self, i: int, seconds: float | None, status: str) -> dict:
    s = self.stages[i]
    rate = s.units / seconds if seconds and s.units else None
    return dict(stage=i + 1, part=s.part, kind=s.kind, model=s.model, attack=s.attack,
                label=s.label, units=s.units, unit=s.unit, seconds=seconds, per_second=rate,
                status=status)  # fmt: skip

  def _write_timings(self) -> None:
    if self.timings_path is None:
      return
    rows = [self.timings[i] for i in sorted(self.timings)]
    ran = sum(r["seconds"] for r in rows if r["status"] == "ran")
    store.write_json_atomic(self.timings_path, dict(stages=rows, seconds_this_run=ran))

  def table(self) -> list[str]:
    """The timing table: a line per stage done (run now, or earlier), then the totals."""
    width = max((len(r["label"]) for r in self.timings.values()), default=10)
    lines = [f"{'stage':<{width + 4}} {'seconds':>9}  rate"]
    for i in sorted(self.timings):
      r = self.timings[i]
      sec = f"{r['seconds']:9.1f}" if r["seconds"] is not None else f"{'-':>9}"
      rate = f"{r['per_second']:.4g} {r['unit']}/s" if r["per_second"] else ""
      note = "  (done by an earlier run)" if r["status"] != "ran" else ""
      lines.append(f"{r['stage']:>2}. {r['label']:<{width}} {sec}  {rate}{note}")
    ran = sum(r["seconds"] for r in self.timings.values() if r["status"] == "ran")
    lines.append(f"stages run now: {ran:.1f} s of {time.perf_counter() - self.t0:.1f} s")
    return lines

  def last_line(self, workdir: pathlib.Path, results: str = "results.jsonl") -> None:
    """The timing table, then one line naming the report, the figures and the rows."""
    workdir = pathlib.Path(workdir)
    if self.timings:
      where = f" (also in {self.timings_path})" if self.timings_path else ""
      self._say(f"timings{where}:")
      for line in self.table():
        self._say(f"  {line}")
    figures = sorted((workdir / "figures").glob("*.png"))
    rows = f", rows in {workdir / results}" if results else ""
    self._say(
      f"done in {_fmt(time.perf_counter() - self.t0)}: report {workdir / 'summary.md'}, "
      f"{len(figures)} figures in {workdir / 'figures'}{rows}"
    )


class NoJob(Job):
  """A Job that shows nothing (library callers, tests that pass no job)."""

  def __init__(self):
    super().__init__([], stream=None)

  def _say(self, line: str) -> None:
    pass
