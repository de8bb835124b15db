"""Runs the config's attacks on every trained model and appends one row per
(model, attack, eps) to results.jsonl as soon as that sweep finishes."""

import contextlib
import hashlib
import pathlib
import time
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from experiments import cluster, keys, progress, store
from experiments.errors import UserError
from vae_attacks import metrics
from vae_attacks.attacks import registry, runner
from vae_attacks.attacks import vae as vae_attacks


class _Measure(NamedTuple):
  """The per-pair measures of a classifier attack (`metrics.pair_measures`), hashable; its
  parameters are the attacked model's (for the predicted class)."""

  settings: metrics.EvalSettings
  logits_fn: object

  def __call__(self, params, x, result):
    logits = self.logits_fn(params, result.x_adv)
    return metrics.pair_measures(x, result, self.settings, logits)


class _VaeMeasure(NamedTuple):
  """The per-pair measures of a VAE attack (the judge's prediction on the reconstruction) plus
  its AUDDC curve point, hashable; its parameters are {"vae", "judge"}."""

  settings: metrics.EvalSettings
  model: object  # vae_attacks.VAEModel

  def __call__(self, params, x, x_target, result):
    vae, rec = params["vae"], self.model.reconstruct
    rec_adv = rec(vae, result.x_adv)  # one reconstruction: the judge's input and the AUDDC's
    logits = self.model.judge(params["judge"], rec_adv)
    quality = metrics.quality_curve_point(
      x, x_target, result.x_adv - x, rec_adv, rec(vae, x), rec(vae, x_target)
    )
    return metrics.pair_measures(x, result, self.settings, logits), quality


class NonFiniteError(UserError):
  """An attack produced NaN or inf; its rows were not written (the other rows were)."""


def _non_finite(res) -> dict[str, np.ndarray]:
  """Per quantity, bool[E, P]: the pair's value at that eps is NaN or inf."""
  flat = lambda a: np.asarray(a, np.float64).reshape(a.shape[0], a.shape[1], -1)
  bad = lambda a: ~np.isfinite(flat(a)).all(-1)
  return {
    "loss": bad(res.loss_trace),
    "x_adv": bad(res.x_adv),
    "confidence": bad(res.target_prob),
    "distortion": np.any([bad(d) for d in res.distortion], axis=0),
  }


def _report_non_finite(flags, where: str, problems: list[str]) -> bool:
  """Logs and records the quantities that are non-finite in `flags` {name: bool[P]}; True if
  any is (the point's row must not be written)."""
  counts = {name: int(f.sum()) for name, f in flags.items() if f.any()}
  if not counts:
    return False
  n = len(next(iter(flags.values())))
  what = ", ".join(f"{name} in {c}/{n} pairs" for name, c in counts.items())
  problems.append(f"{where}: non-finite {what}")
  logging.error("%s: non-finite %s; row not written", where, what)
  return True


def _make_pairs(setting: str, *args, **kwargs) -> runner.Pairs:
  """runner.make_pairs, with a pairs request the data cannot meet reported as a UserError."""
  try:
    return runner.make_pairs(*args, **kwargs)
  except ValueError as e:
    raise UserError(f"{setting}: {e}; lower it or choose another attacks.target_strategy") from None


class _Sweep(NamedTuple):
  """One attack's sweep on one model: what the runner needs and what the rows record."""

  spec: registry.AttackSpec
  norm: str
  eps: tuple[float, ...]
  knobs: dict


class _Target(NamedTuple):
  """What is attacked and how its pairs are measured: the runner's model, the attack input
  per pair, the measure and its inputs, and fields every row of it carries."""

  name: str
  model_fn: object
  params: object
  x: np.ndarray  # [P, ...] the attack's input per pair (source, or source and target stacked)
  source: np.ndarray  # [P, H, W, C] the source images
  pairs: runner.Pairs
  measure: object
  measure_params: object
  measure_inputs: tuple
  row_extra: dict
  # [P, 2, H, W, C] source and a test image of the target class, the input of the classifier
  # attacks that start from one (`AttackSpec.pair_input`); None for the VAE attacks.
  pair_x: np.ndarray | None = None


def _plan(acfg, key, family: str, model_name: str) -> list[_Sweep]:
  """The enabled attacks of one family that apply to the model (`progress.applies`), with
  their eps grid and knobs, in the config's order.

  An attack with a random start gets fold_in(key, its index in the family's plan)."""
  plan = []
  for index, spec in enumerate(s for s in registry.enabled(acfg) if s.family == family):
    if not progress.applies(spec, model_name):
      continue
    sec = registry.section_of(spec, acfg)
    knobs = registry.knobs_of(spec, sec, jax.random.fold_in(key, index))
    plan.append(_Sweep(spec, registry.norm_of(spec, sec), registry.eps_grid(spec, sec), knobs))
  return plan


def _row_base(config, model_name: str) -> dict:
  """A row's dataset and model. The dataset is `dataset_label` where a config sets one (a
  variant of a dataset, e.g. the study's LFW at 56x56: its own rows, not the full size's)."""
  return dict(dataset=config.get("dataset_label") or config.data.name, model=model_name)


def _row(config, base_row: dict, sweep: _Sweep, eps: float) -> dict:
  """A row's key fields (its settings hash is its attack's: `keys.attack_settings`)."""
  settings = keys.attack_settings(config, sweep.spec.name)
  return dict(base_row, attack=sweep.spec.name, norm=sweep.norm, eps=eps, settings=settings)


def _done(log, config, base_row: dict, sweep: _Sweep) -> bool:
  return all(log.has(_row(config, base_row, sweep, e)) for e in sweep.eps)


def _todo(plan, k: int, log, config, base_row: dict, job, model_name: str) -> list:
  """The sweeps of pass k still to run (those done are reported to the progress display)."""
  todo = []
  for w in plan:
    if w.spec.cost_pass != k:
      continue
    if _done(log, config, base_row, w):
      job.skip("attack", model_name, w.spec.name)
    else:
      todo.append(w)
  return todo


def run_all(config, data, trained, log, job=None) -> None:
  """Attacks every model in `trained` with every attack of the config; resumable via `log`.

  Three passes over the models (`registry.AttackSpec.cost_pass`): the gradient-step attacks
  (FGSM, BIM and their VAE variants), then the L-BFGS attacks on the classifiers, then the
  L-BFGS VAE attacks (they cost 10-50x the others), so that a run stopped early (a budget, a
  crash) has every model's cheap rows, and the cells the H0 verdict compares before the
  VAE-only ones. The order changes no number: each attack's key and pairs come from the
  model's index and the attack's place in the config, not from when it runs.

  A point (model, attack, eps) whose loss, adversarial images, confidence or distortion hold
  NaN or inf is reported and not written; the other points are, and then NonFiniteError lists
  the bad ones. `job` (experiments.progress.Job) shows each sweep as a stage of the whole job.
  """
  job = job or progress.NoJob()
  problems: list[str] = []
  acfg = config.attacks
  root = jax.random.fold_in(jax.random.key(config.seed), 1_000_003)
  runner_kwargs = dict(
    chunk_size=acfg.chunk_size or None,
    memory_budget_bytes=int(acfg.memory_budget_mb * 2**20),
    mesh=runner.pairs_mesh() if acfg.shard and jax.local_device_count() > 1 else None,
  )
  settings = metrics.EvalSettings.from_config(config.eval)
  out_dir = pathlib.Path(log.path).parent
  shared = (  # process 0's (read back, or drawn and saved), in a multi-process run
    cluster.from_writer(lambda: _shared_pairs(config, data, trained, root, out_dir))
    if acfg.shared_pairs
    else None
  )
  finished_before = {  # models whose every sweep was already in the log when this run began
    name: all(
      _done(log, config, _row_base(config, name), w) for w in _plan(acfg, root, "classifier", name)
    )
    for name in trained
  }
  for k in range(registry.NUM_PASSES):
    for m_index, (model_name, model) in enumerate(trained.items()):
      if not progress.attacked(acfg, model_name):
        continue
      key = jax.random.fold_in(root, m_index)
      base_row = _row_base(config, model_name)
      if model.kind == "vae" and "cnn" in trained and acfg.vae.enabled:
        vae_key = jax.random.fold_in(key, 7)
        todo = _todo(
          _plan(acfg, vae_key, "vae", model_name), k, log, config, base_row, job, model_name
        )
        groups = {}  # the sweeps by how many of the VAE pairs they attack
        for w in todo:
          groups.setdefault(registry.num_pairs_of(w.spec, acfg), []).append(w)
        for n, group in sorted(groups.items(), reverse=True):
          chosen = _prefix(shared, n)
          target = _vae_target(
            config, data, model, trained["cnn"], vae_key, settings, chosen, num_pairs=n
          )
          problems += _run_sweeps(config, target, group, log, base_row, out_dir, runner_kwargs, job)
      todo = _todo(
        _plan(acfg, key, "classifier", model_name), k, log, config, base_row, job, model_name
      )
      if not todo:
        if k == 0 and finished_before[model_name]:
          logging.info("%s: all classifier attacks already in %s", model_name, log.path)
        continue
      chosen = _prefix(shared, acfg.num_pairs)
      target = _classifier_target(config, data, model, key, settings, chosen)
      problems += _run_sweeps(config, target, todo, log, base_row, out_dir, runner_kwargs, job)
  if problems:
    raise NonFiniteError("; ".join(problems))


PAIRS_DIR = "pairs"  # <workdir>/pairs/<settings>.npz: the run's shared pairs


def _shared_pairs(config, data, trained, root, out_dir: pathlib.Path):
  """The run's pairs, the same for every model: (Pairs, target image index per pair).

  Sources: test examples that every model of `keys.pair_models` (default: every model)
  classifies correctly (with `attacks.only_correct`), and, when the run has VAE attacks, whose
  reconstruction by every such VAE the judge (the CNN) also classifies correctly; each source
  once where the test set allows; targets drawn once. As many pairs as the larger of
  attacks.num_pairs and attacks.vae.num_pairs; the classifier and VAE attacks take prefixes of
  the list. Saved to pairs/<settings>.npz with every model's clean prediction of every test
  example, and read back from there on a rerun (the record of which pairs the rows were made
  on); a model added since (a control outside `pair_models`) has its predictions added.
  """
  acfg = config.attacks
  path = out_dir / PAIRS_DIR / f"{keys.pairs_settings(config)}.npz"
  if path.exists():
    return _read_pairs(path, data, trained)
  y = np.asarray(data.y_test)
  eligible = np.ones(len(y), bool)
  choosers = [trained[m] for m in keys.pair_models(config) if m in trained]
  vae_attacks_on = (
    bool(acfg.vae.enabled) and "cnn" in trained and any(m.kind == "vae" for m in choosers)
  )
  # Each model's clean prediction of every test example, kept with the pairs: a comparison
  # across runs on the same pairs (the study's resolution sweep) keeps the pairs every model
  # classified correctly.
  predictions = {
    f"prediction_{model.name}": _predictions(model, data) for model in trained.values()
  }
  if acfg.only_correct:
    for model in choosers:
      eligible &= predictions[f"prediction_{model.name}"] == y
      if model.kind == "vae" and vae_attacks_on:
        judge = trained["cnn"]
        fn = _ReconstructThen(model.vae.reconstruct, judge.logits_fn)
        params = {"vae": model.params["vae"], "judge": judge.params}
        eligible &= np.argmax(runner.batched_logits(fn, params, data.x_test), -1) == y
  pair_input = any(s.pair_input for s in registry.enabled(acfg))
  num_pairs = max(acfg.num_pairs, acfg.vae.num_pairs if vae_attacks_on else 0)
  first = choosers[0]  # least_likely targets: the first model's logits
  key = jax.random.fold_in(root, 999_983)
  try:
    pairs = runner.make_pairs(
      first.logits_fn, first.params, data.x_test, y, strategy=acfg.target_strategy,
      num_pairs=num_pairs, key=key, num_classes=len(data.class_names),
      only_correct=acfg.only_correct, targets=tuple(acfg.fixed_targets) or None,
      eligible=eligible,
    )  # fmt: skip
  except ValueError as e:
    raise UserError(
      f"attacks.num_pairs / attacks.vae.num_pairs: {e} (sources every model of the run "
      "classifies correctly); lower them or choose another attacks.target_strategy"
    ) from None
  # A test image of each pair's target class, for the VAE attacks and the classifier attacks
  # that start from one (`pair_input`; -1: the run has none).
  target_images = (
    _target_images(y, pairs, jax.random.fold_in(key, 1))
    if vae_attacks_on or pair_input
    else np.full(len(pairs.index), -1, np.int64)
  )
  store.save_npz_atomic(
    path, index=pairs.index, source_label=pairs.source_label, target=pairs.target,
    target_image=target_images, eligible=eligible, **predictions,
  )  # fmt: skip
  logging.info(
    "pairs: %d shared by every model, %d distinct sources (%d of %d test examples eligible)",
    len(pairs.index), len(np.unique(pairs.index)), int(eligible.sum()), len(y),
  )  # fmt: skip
  return pairs, target_images


def _predictions(model, data) -> np.ndarray:
  """A model's clean class for every test example."""
  return np.argmax(runner.batched_logits(model.logits_fn, model.params, data.x_test), -1)


def _read_pairs(path: pathlib.Path, data, trained):
  """The pairs saved at `path` and their target images; the clean predictions of a model the
  file lacks are added to it (atomically; the pairs are unchanged)."""
  with np.load(path) as f:
    saved = {k: f[k] for k in f.files}
  missing = [m for m in trained.values() if f"prediction_{m.name}" not in saved]
  if missing:
    saved.update({f"prediction_{m.name}": _predictions(m, data) for m in missing})
    store.save_npz_atomic(path, **saved)
  pairs = runner.Pairs(saved["index"], saved["source_label"], saved["target"])
  return pairs, saved["target_image"]


def _prefix(shared, n: int | None):
  """The first n (None: all) of the shared pairs and their target images, or None without
  sharing."""
  if shared is None:
    return None
  pairs, target_images = shared
  return runner.Pairs(*(a[:n] for a in pairs)), target_images[:n]


def _pairs(config, setting: str, logits_fn, params, data, key, num_pairs) -> runner.Pairs:
  acfg = config.attacks
  return _make_pairs(
    setting,
    logits_fn,
    params,
    data.x_test,
    data.y_test,
    strategy=acfg.target_strategy,
    num_pairs=num_pairs,
    key=key,
    num_classes=len(data.class_names),
    only_correct=acfg.only_correct,
    targets=tuple(acfg.fixed_targets) or None,
  )


def _classifier_target(config, data, model, key, settings, shared=None) -> _Target:
  """A classifier (the CNN, a VAE through its latent classifier, a generative classifier) and
  its pairs: `shared` (the run's pairs, `_shared_pairs`) or, without them, pairs of its own."""
  if shared is not None:
    pairs, target_images = shared
  else:
    pairs = _pairs(
      config, f"{model.name}: attacks.num_pairs", model.logits_fn, model.params, data, key,
      config.attacks.num_pairs,
    )  # fmt: skip
    target_images = _target_images(data.y_test, pairs, jax.random.fold_in(key, 1))
  x = data.x_test[pairs.index]
  pair_x = np.stack([x, data.x_test[target_images]], axis=1) if np.all(target_images >= 0) else None
  measure = _Measure(settings, model.logits_fn)
  return _Target(model.name, model.logits_fn, model.params, x, x, pairs, measure, model.params,
                 (x,), {}, pair_x)  # fmt: skip


def _vae_target(config, data, model, judge, key, settings, shared=None, num_pairs=None) -> _Target:
  """A VAE under the Tabacof et al. (2016) and Kos et al. (2017) attacks, judged by the CNN.

  Pairs: a source the judge classifies correctly from its reconstruction, and a target image
  of another class; the first `num_pairs` of them (default `attacks.vae.num_pairs`: an attack
  with its own `num_pairs` takes the first that many). Rows as for classifier attacks; the
  latent L-BFGS attacks' rows also carry their AUDDC over the C grid (Gondim-Ribeiro et al.
  2018), and its per-pair curves go to curves/<model>_<attack>.npz.
  """
  vae_model = vae_attacks.VAEModel(
    encode=model.vae.encode, reconstruct=model.vae.reconstruct, judge=judge.logits_fn
  )
  params = {"vae": model.params["vae"], "judge": judge.params}
  if shared is not None:
    pairs, target_images = shared
  else:
    rec_logits_fn = _ReconstructThen(model.vae.reconstruct, judge.logits_fn)
    pairs = _pairs(
      config, f"{model.name}: attacks.vae.num_pairs", rec_logits_fn, params, data, key,
      config.attacks.vae.num_pairs,
    )  # fmt: skip
    target_images = _target_images(data.y_test, pairs, key)
    pairs, target_images = _prefix((pairs, target_images), num_pairs)
  x = data.x_test[pairs.index]
  x_target = data.x_test[target_images]
  return _Target(
    model.name,
    vae_model,
    params,
    np.stack([x, x_target], axis=1),  # [P, 2, H, W, C]
    x,
    pairs,
    _VaeMeasure(settings, vae_model),
    params,
    (x, x_target),
    dict(judge=judge.name, x_target=x_target),
  )


def _run_sweeps(
  config, t: _Target, todo, log, base_row, out_dir, runner_kwargs, job=None
) -> list[str]:
  """Runs each sweep of `todo` on target `t` and appends its rows; returns the non-finite
  problems found (their rows are not written)."""
  problems: list[str] = []
  n_examples = config.output.num_examples
  vae = "x_target" in t.row_extra
  job = job or progress.NoJob()
  for w in todo:
    name = w.spec.name
    job.start("attack", t.name, name)
    t0 = time.perf_counter()
    partial = _Partial(out_dir, t, w, _row(config, base_row, w, w.eps[0])["settings"])
    measures, quality, nonfinite, examples, before = partial.load(vae)
    start = sum(m.success.shape[1] for m in measures)  # pairs done
    chunks = runner.iter_measured_chunks(
      w.spec.run,
      t.model_fn,
      t.params,
      t.pair_x if w.spec.pair_input else t.x,
      t.pairs.target,
      w.eps,
      measure=t.measure,
      measure_params=t.measure_params,
      measure_inputs=t.measure_inputs,
      batched=w.spec.batched,
      desc=f"{t.name} {name} {w.norm} x {len(w.eps)} {'C' if vae else 'eps'}",
      start=start,
      **runner_kwargs,
      **w.knobs,
    ) if start < len(t.pairs.target) else ()  # fmt: skip
    for _, res, m in chunks:
      if vae:
        m, q = m
        quality.append(q)
      measures.append(m)
      nonfinite.append(_non_finite(res))
      if examples is None:
        examples = res.x_adv[:, :n_examples]
      partial.save(measures, quality, nonfinite, examples, before + time.perf_counter() - t0)
    seconds = before + time.perf_counter() - t0
    job.finish()
    measures = jax.tree.map(lambda *p: _cat(p), *measures)
    nonfinite = jax.tree.map(lambda *p: _cat(p), *nonfinite)
    extra, quality_xy = {}, None
    if vae:
      quality_xy = tuple(_cat([q[i] for q in quality]) for i in (0, 1))  # [E, P] each
      extra = _vae_outputs(out_dir, t, w, quality_xy, examples)
    else:
      _save_examples(out_dir / "examples" / f"{t.name}_{name}.npz", t.x, t.pairs, examples, w.eps)
    for e, eps_value in enumerate(w.eps):
      row = _row(config, base_row, w, eps_value)
      if log.has(row):
        continue
      flags = {k: v[e] for k, v in nonfinite.items()}
      if _report_non_finite(flags, f"model {t.name}, attack {name}, eps={eps_value:g}",
                            problems):  # fmt: skip
        continue
      at_eps = jax.tree.map(lambda a, e=e: a[e], measures)
      row.update(metrics.row_stats(at_eps))
      row.update(extra, seconds=seconds / len(w.eps), n_sources=int(len(np.unique(t.pairs.index))))
      if vae:
        row["judge"] = t.row_extra["judge"]
      curve = {"quality_x": quality_xy[0][e], "quality_y": quality_xy[1][e]} if vae else {}
      row["record"] = _write_record(out_dir, row, t.pairs, at_eps, curve)
      log.append({k: metrics.finite(v) for k, v in row.items()})
      logging.info(
        "%s %s %s=%g: success %.3f, %s prob %.3f, valid %.3f (%d pairs)%s",
        t.name,
        name,
        "C/eps" if vae else "eps",
        eps_value,
        row["success_rate"],
        "judge" if vae else "target",
        row["mean_target_prob"],
        row["validity_rate"],
        row["n_pairs"],
        f", AUDDC {extra['auddc']:.3f}" if "auddc" in extra else "",
      )
    partial.remove()
  return problems


PARTIAL_DIR = "partial"  # <workdir>/partial/<model>/<attack>_<norm>_<settings>.npz


class _Partial:
  """The finished chunks of a sweep not yet in the log, on disk as they come (atomically), so
  that a run stopped mid-sweep resumes at its next chunk instead of its first: an hour-long
  sweep (HopSkipJump on ABS) loses at most one chunk. Its measures, non-finite flags, quality
  points (VAE sweeps), examples and seconds so far, with a digest of what the pairs' results
  depend on (the pairs, the eps grid, the model's parameters): a partial of other pairs or of a
  retrained model is set aside, not mixed in. Removed once the sweep's rows are written. Single
  process only (another process of a multi-process run could not see the file); a
  multi-process run runs its sweeps whole.
  """

  def __init__(self, out_dir: pathlib.Path, t: _Target, w: _Sweep, settings: str):
    self.path = out_dir / PARTIAL_DIR / t.name / f"{w.spec.name}_{w.norm}_{settings}.npz"
    self.on = cluster.process_count() == 1
    digest = hashlib.sha256()
    for a in (t.pairs.index, t.pairs.target, np.asarray(w.eps, np.float64)):
      digest.update(np.ascontiguousarray(a).tobytes())
    if self.on:
      for leaf in jax.tree.leaves(t.params):
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    self.digest = digest.hexdigest()

  def load(self, vae: bool) -> tuple[list, list, list, np.ndarray | None, float]:
    """(measures, quality, non-finite flags, examples, seconds) of the chunks done: one part
    each (empty lists, None and 0 when there is no usable partial)."""
    if not (self.on and self.path.exists()):
      return [], [], [], None, 0.0
    with np.load(self.path) as f:
      if str(f["digest"]) != self.digest:
        logging.warning("%s: of other pairs or parameters; starting the sweep over", self.path)
        return [], [], [], None, 0.0
      m = metrics.PairMeasures(**{k: f[f"m_{k}"] for k in metrics.PairMeasures._fields})
      flags = {k[3:]: f[k] for k in f.files if k.startswith("nf_")}
      quality = [(f["q_x"], f["q_y"])] if vae else []
      done, seconds = m.success.shape[1], float(f["seconds"])
      logging.info("%s: resuming after %d pairs (%.0f s)", self.path.name, done, seconds)
      return [m], quality, [flags], f["examples"], seconds

  def save(self, measures, quality, nonfinite, examples, seconds: float) -> None:
    if not self.on:
      return
    m = jax.tree.map(lambda *p: _cat(p), *measures)
    flags = jax.tree.map(lambda *p: _cat(p), *nonfinite)
    q = {f"q_{k}": _cat([p[i] for p in quality]) for i, k in enumerate("xy")} if quality else {}
    store.save_npz_atomic(
      self.path, digest=self.digest, seconds=seconds, examples=examples,
      **{f"m_{k}": v for k, v in m._asdict().items()}, **{f"nf_{k}": v for k, v in flags.items()},
      **q,
    )  # fmt: skip

  def remove(self) -> None:
    self.path.unlink(missing_ok=True)
    for folder in (self.path.parent, self.path.parent.parent):  # once empty
      with contextlib.suppress(OSError):
        folder.rmdir()


# The examples a VAE sweep keeps (each with its reconstruction at every C or eps): the report's
# figures draw 8. Reconstructing every pair first cost minutes per cell at 154x154 (13 C x 200
# pairs of decodes) for examples the 4.5 MB cap then dropped.
VAE_EXAMPLES = 32


def _vae_outputs(out_dir, t: _Target, w: _Sweep, quality_xy, examples) -> dict:
  """A VAE sweep's example file, and for a latent L-BFGS attack (either divergence,
  `registry.auddc_attacks`) over a C grid its per-pair AUDDC curves
  (curves/<model>_<attack>.npz) and the rows' AUDDC fields."""
  name, x_target = w.spec.name, t.row_extra["x_target"]
  qx, qy = quality_xy  # [E, P]
  extra = {}
  if name in registry.auddc_attacks() and len(w.eps) > 1:
    areas = np.asarray(jax.vmap(metrics.auddc, in_axes=(1, 1))(qx, qy))  # per pair
    mean, std, lo, hi = metrics.auddc_summary(areas)
    extra = dict(
      auddc=mean, auddc_std=std, auddc_ci=[lo, hi], n_auddc_pairs=int(np.isfinite(areas).sum())
    )
    curves = out_dir / "curves" / f"{t.name}_{name}.npz"
    store.save_npz_atomic(curves, c=np.asarray(w.eps), x=qx.T, y=qy.T, auddc=areas)
  n = min(examples.shape[1], VAE_EXAMPLES)
  examples = examples[:, :n]
  flat = examples.reshape(-1, *examples.shape[2:])  # [E * n, H, W, C]
  rec = runner.batched_map(t.model_fn.reconstruct, t.params["vae"], flat).reshape(examples.shape)
  store.save_examples_npz(
    out_dir / "examples" / f"{t.name}_{name}.npz",
    n,
    lambda k: dict(
      x=t.source[:k], x_adv=examples[:, :k], rec_adv=rec[:, :k], x_target=x_target[:k],
      source_label=t.pairs.source_label[:k], target=t.pairs.target[:k], eps=np.asarray(w.eps),
    ),
  )  # fmt: skip
  return extra


RECORDS_DIR = "records"  # <workdir>/records/<model>/<attack>_<norm>_<eps>_<settings>.npz


def _write_record(out_dir: pathlib.Path, row: dict, pairs, m, curve: dict) -> str:
  """The per-pair record of one row (every field of `metrics.PairMeasures` for each pair, the
  pair's source index and target, and a VAE attack's AUDDC curve point), written atomically
  BEFORE the row, so that a row in the log always has its record; returns its path relative
  to the workdir (the row's `record` field). Every rate of the row is recomputed from it by
  `metrics.row_stats` (a test)."""
  name = f"{row['attack']}_{row['norm']}_{row['eps']:.6g}_{row['settings']}.npz"
  rel = pathlib.PurePosixPath(RECORDS_DIR, str(row["model"]), name)
  store.save_npz_atomic(
    out_dir / rel, source_index=pairs.index, source_label=pairs.source_label,
    target=pairs.target, **m._asdict(), **curve,
  )  # fmt: skip
  return str(rel)


def read_record(workdir: pathlib.Path, row: dict) -> metrics.PairMeasures:
  """The per-pair measures of a row, from its record."""
  with np.load(pathlib.Path(workdir) / row["record"]) as f:
    return metrics.PairMeasures(**{k: f[k] for k in metrics.PairMeasures._fields})


class _ReconstructThen(NamedTuple):
  """judge(reconstruct(x)) as one logits_fn over {"vae", "judge"} params (hashable)."""

  reconstruct: object
  judge: object

  def __call__(self, params, x):
    return self.judge(params["judge"], self.reconstruct(params["vae"], x))


def _target_images(y, pairs, key) -> np.ndarray:
  """For each pair, the index of a test image of the target class (not the source itself)."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  out = np.empty(len(pairs.target), np.int64)
  for i, (src, t) in enumerate(zip(pairs.index, pairs.target, strict=True)):
    candidates = np.flatnonzero((y == t) & (np.arange(len(y)) != src))
    if candidates.size == 0:
      raise UserError(f"no test image of class {int(t)} to serve as an attack target")
    out[i] = rng.choice(candidates)
  return out


def _cat(parts):
  return np.concatenate(parts, axis=1)


def _save_examples(path: pathlib.Path, x, pairs, x_adv, eps) -> None:
  """A few (source, adversarial) examples per eps for the figures, written atomically (as
  many of them as fit in `store.MAX_EXAMPLES_BYTES`)."""
  store.save_examples_npz(
    path,
    x_adv.shape[1],
    lambda k: dict(
      x=x[:k], x_adv=x_adv[:, :k], source_label=pairs.source_label[:k], target=pairs.target[:k],
      eps=np.asarray(eps),
    ),
  )  # fmt: skip
