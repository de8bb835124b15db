"""Runs the config's attacks on every trained model and appends one row per
(model, attack, eps) to results.jsonl as soon as that sweep finishes."""

import functools
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import run as run_lib
from experiments import store
from vae_attacks import metrics
from vae_attacks.attacks import bim, fgsm, lbfgs, runner
from vae_attacks.attacks import vae as vae_attacks


# Attacks as the runner calls them: (logits_fn, params, x, target, *, eps, **knobs). Module-level
# functions, so their identity is stable and the runner's compile cache hits on a rerun.
def _fgsm(logits_fn, params, x, target, *, eps, norm):
  return fgsm.fgsm(logits_fn, params, x, target, eps=eps, norm=norm)


def _bim(logits_fn, params, x, target, *, eps, norm, steps, step_size_rel, **knobs):
  """BIM / PGD / SLIDE with a step size proportional to eps, so one compile serves the grid."""
  return bim.bim(
    logits_fn,
    params,
    x,
    target,
    eps=eps,
    norm=norm,
    steps=steps,
    step_size=step_size_rel * eps,
    **knobs,
  )


def _lbfgs(logits_fn, params, x, target, *, eps, max_iters):
  return lbfgs.lbfgs(logits_fn, params, x, target, eps=eps, max_iters=max_iters)


def _lbfgs_search(logits_fn, params, x, target, *, eps, max_iters, search_steps):
  return lbfgs.lbfgs_c_search(
    logits_fn, params, x, target, c_init=eps, max_iters=max_iters, search_steps=search_steps
  )


def _pairwise(attack):
  """A VAE attack (model, params, x, x_target, target) seen by the runner: the pair's source and
  target images travel stacked as one input xx[2, H, W, C]."""

  def run_pair(model, params, xx, target, *, eps, **knobs):
    return attack(model, params, xx[0], xx[1], target, eps=eps, **knobs)

  run_pair.__name__ = attack.__name__
  return run_pair


# Module-level, so each has one identity and the runner's compile cache hits.
VAE_ATTACKS = {name: _pairwise(fn) for name, fn in vae_attacks.ATTACKS.items()}


def attack_plan(cfg, key) -> list[tuple[str, str, object, tuple, dict]]:
  """(name, norm, attack fn, eps grid, knobs) for every enabled attack of `cfg.attacks`."""
  plan = []
  for name in cfg.enabled:
    sec = cfg[name]
    eps = tuple(float(e) for e in sec.eps)
    if name == "fgsm":
      plan.append((name, sec.norm, _fgsm, eps, dict(norm=sec.norm)))
    elif name in ("bim", "bim_l1", "pgd_l2"):
      knobs = dict(norm=sec.norm, steps=sec.steps, step_size_rel=float(sec.step_size_rel))
      if sec.get("random_start", False):
        knobs.update(random_start=True, key=jax.random.fold_in(key, len(plan)))
      if "sparsity" in sec:
        knobs["sparsity"] = float(sec.sparsity)
      plan.append((name, sec.norm, _bim, eps, knobs))
    elif name == "lbfgs":
      plan.append((name, "l2", _lbfgs, eps, dict(max_iters=sec.max_iters)))
      if sec.c_search:
        knobs = dict(max_iters=sec.max_iters, search_steps=sec.search_steps)
        plan.append(("lbfgs_c_search", "l2", _lbfgs_search, (max(eps),), knobs))
  return plan


@functools.partial(jax.jit, static_argnames=("ssim_kwargs",))
def _ssim_grid(x, x_adv, ssim_kwargs=()):
  """SSIM of x[P, ...] against every x_adv[E, P, ...] -> [E, P]."""
  one = functools.partial(metrics.ssim, **dict(ssim_kwargs))
  return jax.vmap(jax.vmap(one))(jnp.broadcast_to(x, x_adv.shape), x_adv)


class NonFiniteError(run_lib.UserError):
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


# Pairs per call of the per-pair metrics (SSIM, AUDDC points): one fixed shape whatever the
# attack's chunk size, so XLA runs the same program and the values are bit-identical across
# chunk sizes (a batch of another size may be vectorised, and so rounded, differently).
METRIC_BLOCK = 32


def _by_blocks(fn, pair_args: tuple, x_adv):
  """fn(*pair_args[B], x_adv[:, B]) -> [E, B] outputs over blocks of METRIC_BLOCK pairs (the
  last padded by repeating its last pair), as host arrays [E, P]."""
  n, outs = len(pair_args[0]), []
  for start in range(0, n, METRIC_BLOCK):
    idx = np.minimum(np.arange(start, start + METRIC_BLOCK), n - 1)
    out = fn(*(a[idx] for a in pair_args), x_adv[:, idx])
    keep = min(METRIC_BLOCK, n - start)
    outs.append([np.asarray(o)[:, :keep] for o in (out if isinstance(out, tuple) else (out,))])
  joined = tuple(np.concatenate(parts, axis=1) for parts in zip(*outs, strict=True))
  return joined if len(joined) > 1 else joined[0]


def _make_pairs(setting: str, *args, **kwargs) -> runner.Pairs:
  """runner.make_pairs, with a pairs request the data cannot meet reported as a UserError."""
  try:
    return runner.make_pairs(*args, **kwargs)
  except ValueError as e:
    raise run_lib.UserError(
      f"{setting}: {e}; lower it or choose another attacks.target_strategy"
    ) from None


# When run_all runs an attack: pass 0 (every attack not listed) the gradient-step attacks; 1 the
# L-BFGS attacks on the classifiers (the cells H0 compares across models); 2 the L-BFGS VAE
# attacks (VAE-only). An L-BFGS solve per pair and eps (tens of gradients plus the solver's
# algebra on [memory x pixels] arrays) costs 10-50x the others at 154x154x3.
_PASS = {"lbfgs": 1, "lbfgs_c_search": 1, "latent_l2": 2, "reconstruction_l2": 2}
NUM_PASSES = 3


def attack_pass(name: str) -> int:
  """The pass of `run_all` that runs attack `name` (see `_PASS`)."""
  return _PASS.get(name, 0)


def run_all(config, data, trained, log) -> None:
  """Attacks every model in `trained` with every attack of the config; resumable via `log`.

  Three passes over the models (`attack_pass`): the gradient-step attacks (FGSM, BIM and their
  VAE variants), then the L-BFGS attacks on the classifiers, then the L-BFGS VAE attacks
  (they cost 10-50x the others), so that a run stopped early (a budget, a crash)
  has every model's cheap rows, and the cells the H0 verdict compares before the VAE-only ones.
  The order changes no number: each attack's key and pairs come from the model's index and the
  attack's place in the config, not from when it runs.

  A point (model, attack, eps) whose loss, adversarial images, confidence or distortion hold
  NaN or inf is reported and not written; the other points are, and then NonFiniteError lists
  the bad ones.
  """
  problems: list[str] = []
  acfg, ecfg = config.attacks, config.eval
  settings = run_lib.config_hash({"attacks": acfg.to_dict(), "eval": ecfg.to_dict()})
  root = jax.random.fold_in(jax.random.key(config.seed), 1_000_003)
  mesh = runner.pairs_mesh() if acfg.shard and jax.device_count() > 1 else None
  chunk = acfg.chunk_size or None
  budget = int(acfg.memory_budget_mb * 2**20)
  examples_dir = pathlib.Path(log.path).parent / "examples"
  num_classes = len(data.class_names)

  passes = [(k, m) for k in range(NUM_PASSES) for m in enumerate(trained.items())]
  for k, (m_index, (model_name, model)) in passes:
    in_pass = lambda name, k=k: attack_pass(name) == k
    key = jax.random.fold_in(root, m_index)
    plan = attack_plan(acfg, key)
    base_row = dict(dataset=config.data.name, model=model_name, settings=settings)
    todo = [
      p
      for p in plan
      if in_pass(p[0])
      and not all(log.has(dict(base_row, attack=p[0], norm=p[1], eps=e)) for e in p[3])
    ]
    if model.kind == "vae" and "cnn" in trained and acfg.vae.enabled:
      try:
        run_vae_attacks(
          config,
          data,
          model,
          trained["cnn"],
          jax.random.fold_in(key, 7),
          log,
          mesh,
          chunk,
          budget,
          pathlib.Path(log.path).parent,
          names=tuple(n for n in acfg.vae.enabled if in_pass(n)),
        )
      except NonFiniteError as e:
        problems.append(str(e))
    if not todo:
      if k == NUM_PASSES - 1:
        logging.info("%s: all attacks already in %s", model_name, log.path)
      continue
    pairs = _make_pairs(
      f"{model_name}: attacks.num_pairs",
      model.logits_fn,
      model.params,
      data.x_test,
      data.y_test,
      strategy=acfg.target_strategy,
      num_pairs=acfg.num_pairs,
      key=key,
      num_classes=num_classes,
      only_correct=acfg.only_correct,
      targets=tuple(acfg.fixed_targets) or None,
    )
    x = data.x_test[pairs.index]
    for name, norm, fn, eps, knobs in todo:
      t0 = time.perf_counter()
      ok, prob, ssim, dist, nonfinite, examples = [], [], [], [], [], None
      for sl, res in runner.iter_attack_chunks(
        fn,
        model.logits_fn,
        model.params,
        x,
        pairs.target,
        eps,
        chunk_size=chunk,
        memory_budget_bytes=budget,
        mesh=mesh,
        **knobs,
      ):
        ok.append(res.success)
        prob.append(res.target_prob)
        ssim.append(_by_blocks(_ssim_grid, (x[sl],), res.x_adv))
        dist.append(res.distortion)
        nonfinite.append(_non_finite(res))
        if examples is None:
          examples = res.x_adv[:, : config.output.num_examples]
      seconds = time.perf_counter() - t0
      ok, prob, ssim = _cat(ok), _cat(prob), _cat(ssim)
      dist = jax.tree.map(lambda *p: _cat(p), *dist)
      nonfinite = jax.tree.map(lambda *p: _cat(p), *nonfinite)
      _save_examples(examples_dir / f"{model_name}_{name}.npz", x, pairs, examples, eps)
      for e, eps_value in enumerate(eps):
        row = dict(base_row, attack=name, norm=norm, eps=eps_value)
        if log.has(row):
          continue
        flags = {k: v[e] for k, v in nonfinite.items()}
        if _report_non_finite(flags, f"model {model_name}, attack {name}, eps={eps_value:g}",
                              problems):  # fmt: skip
          continue
        row.update(_row_stats(ok[e], prob[e], ssim[e], _at(dist, e), ecfg))
        row.update(seconds=seconds / len(eps), n_sources=int(len(np.unique(pairs.index))))
        log.append(row)
        logging.info(
          "%s %s eps=%g: success %.3f, target prob %.3f, valid %.3f (%d pairs)",
          model_name,
          name,
          eps_value,
          row["success_rate"],
          row["mean_target_prob"],
          row["validity_rate"],
          row["n_pairs"],
        )
  if problems:
    raise NonFiniteError("; ".join(problems))


def run_vae_attacks(config, data, model, judge, key, log, mesh, chunk, budget, out_dir, names=None):
  """Tabacof et al. (2016) and Kos et al. (2017) attacks on one VAE, judged by the CNN.

  `names`: the VAE attacks to run (default: every enabled one, in the config's order).

  Pairs: a correctly reconstructed-and-judged source and a target image of another class.
  Rows as for classifier attacks; the latent L2 attack's rows also carry its AUDDC over the
  C grid (Gondim-Ribeiro et al. 2018), and its per-pair curves go to curves/<model>_<attack>.npz.
  """
  vcfg, ecfg = config.attacks.vae, config.eval
  settings = run_lib.config_hash({"attacks": config.attacks.to_dict(), "eval": ecfg.to_dict()})
  base_row = dict(dataset=config.data.name, model=model.name, settings=settings)
  names = vcfg.enabled if names is None else names
  plan = [(name, tuple(float(e) for e in vcfg[name].eps)) for name in names]
  todo = [
    (n, eps)
    for n, eps in plan
    if not all(log.has(dict(base_row, attack=n, norm=_vae_norm(n), eps=e)) for e in eps)
  ]
  if not todo:
    return
  problems: list[str] = []
  vae_model = vae_attacks.VAEModel(
    encode=model.vae.encode, reconstruct=model.vae.reconstruct, judge=judge.logits_fn
  )
  params = {"vae": model.params["vae"], "judge": judge.params}
  # Sources the judge classifies correctly from their reconstruction, like the classifier runs.
  rec_logits_fn = _reconstruct_then(model.vae.reconstruct, judge.logits_fn)
  pairs = _make_pairs(
    f"{model.name}: attacks.vae.num_pairs",
    rec_logits_fn,
    params,
    data.x_test,
    data.y_test,
    strategy=config.attacks.target_strategy,
    num_pairs=vcfg.num_pairs,
    key=key,
    num_classes=len(data.class_names),
    only_correct=config.attacks.only_correct,
    targets=tuple(config.attacks.fixed_targets) or None,
  )
  x = data.x_test[pairs.index]
  x_target = data.x_test[_target_images(data.y_test, pairs, key)]
  xx = np.stack([x, x_target], axis=1)  # [P, 2, H, W, C]
  for name, eps in todo:
    knobs = {k: v for k, v in vcfg[name].items() if k != "eps"}
    t0 = time.perf_counter()
    ok, prob, ssim, dist, qx, qy, nonfinite, examples = [], [], [], [], [], [], [], None
    for sl, res in runner.iter_attack_chunks(
      VAE_ATTACKS[name],
      vae_model,
      params,
      xx,
      pairs.target,
      eps,
      chunk_size=chunk,
      memory_budget_bytes=budget,
      mesh=mesh,
      **knobs,
    ):
      ok.append(res.success)
      prob.append(res.target_prob)
      ssim.append(_by_blocks(_ssim_grid, (x[sl],), res.x_adv))
      dist.append(res.distortion)
      nonfinite.append(_non_finite(res))
      quality = functools.partial(_quality_grid, model.vae.reconstruct, params["vae"])
      a, b = _by_blocks(quality, (x[sl], x_target[sl]), res.x_adv)
      qx.append(a)
      qy.append(b)
      if examples is None:
        n = config.output.num_examples
        examples = (
          res.x_adv[:, :n],
          np.asarray(_reconstruct_grid(model.vae.reconstruct, params["vae"], res.x_adv[:, :n])),
        )
    seconds = time.perf_counter() - t0
    ok, prob, ssim, qx, qy = _cat(ok), _cat(prob), _cat(ssim), _cat(qx), _cat(qy)
    dist = jax.tree.map(lambda *p: _cat(p), *dist)
    nonfinite = jax.tree.map(lambda *p: _cat(p), *nonfinite)
    extra = {}
    if name == "latent_l2" and len(eps) > 1:
      areas = np.asarray(jax.vmap(metrics.auddc, in_axes=(1, 1))(qx, qy))  # per pair
      mean, std, lo, hi = metrics.auddc_summary(areas)
      extra = dict(
        auddc=mean, auddc_std=std, auddc_ci=[lo, hi], n_auddc_pairs=int(np.isfinite(areas).sum())
      )
      _save_npz(
        out_dir / "curves" / f"{model.name}_{name}.npz",
        c=np.asarray(eps),
        x=qx.T,
        y=qy.T,
        auddc=areas,
      )
    n = examples[0].shape[1]
    _save_npz(
      out_dir / "examples" / f"{model.name}_{name}.npz",
      x=x[:n],
      x_adv=examples[0],
      rec_adv=examples[1],
      x_target=x_target[:n],
      source_label=pairs.source_label[:n],
      target=pairs.target[:n],
      eps=np.asarray(eps),
    )
    for e, eps_value in enumerate(eps):
      row = dict(base_row, attack=name, norm=_vae_norm(name), eps=eps_value)
      if log.has(row):
        continue
      flags = {k: v[e] for k, v in nonfinite.items()}
      if _report_non_finite(flags, f"model {model.name}, attack {name}, eps={eps_value:g}",
                            problems):  # fmt: skip
        continue
      row.update(_row_stats(ok[e], prob[e], ssim[e], _at(dist, e), ecfg))
      row.update(
        extra,
        seconds=seconds / len(eps),
        n_sources=int(len(np.unique(pairs.index))),
        judge=judge.name,
      )
      log.append({k: _finite(v) for k, v in row.items()})
      logging.info(
        "%s %s C/eps=%g: success %.3f, judge prob %.3f, valid %.3f (%d pairs)%s",
        model.name,
        name,
        eps_value,
        row["success_rate"],
        row["mean_target_prob"],
        row["validity_rate"],
        row["n_pairs"],
        f", AUDDC {extra['auddc']:.3f}" if extra else "",
      )
  if problems:
    raise NonFiniteError("; ".join(problems))


def _vae_norm(name: str) -> str:
  """The FGSM variants take an L-inf step of size eps; the L2 variants penalise ||d||_2^2."""
  return "linf" if name.endswith("_fgsm") else "l2"


class _ReconstructThen(NamedTuple):
  """judge(reconstruct(x)) as one logits_fn over {"vae", "judge"} params (hashable)."""

  reconstruct: object
  judge: object

  def __call__(self, params, x):
    return self.judge(params["judge"], self.reconstruct(params["vae"], x))


def _reconstruct_then(reconstruct, judge):
  return _ReconstructThen(reconstruct, judge)


@functools.partial(jax.jit, static_argnums=0)
def _quality_grid(reconstruct, vae_params, x, x_target, x_adv):
  """AUDDC curve points [E, P] for sources x[P], targets x_target[P], x_adv[E, P]."""
  one = functools.partial(vae_attacks.quality_point, reconstruct, vae_params)
  per_pair = jax.vmap(one)
  return jax.vmap(per_pair, in_axes=(None, None, 0))(x, x_target, x_adv)


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct_grid(reconstruct, vae_params, x_adv):
  return jax.vmap(jax.vmap(lambda x: reconstruct(vae_params, x)))(x_adv)


def _target_images(y, pairs, key) -> np.ndarray:
  """For each pair, the index of a test image of the target class (not the source itself)."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  out = np.empty(len(pairs.target), np.int64)
  for i, (src, t) in enumerate(zip(pairs.index, pairs.target, strict=True)):
    candidates = np.flatnonzero((y == t) & (np.arange(len(y)) != src))
    if candidates.size == 0:
      raise run_lib.UserError(f"no test image of class {int(t)} to serve as an attack target")
    out[i] = rng.choice(candidates)
  return out


def _save_npz(path: pathlib.Path, **arrays) -> None:
  """np.savez in memory, then written atomically (store.write_with): never half a file."""
  store.write_with(path, lambda f: np.savez_compressed(f, **arrays))


def _cat(parts):
  return np.concatenate(parts, axis=1)


def _at(tree, e):
  return jax.tree.map(lambda a: a[e], tree)


def _row_stats(success, prob, ssim, dist, ecfg) -> dict:
  """The statistics of one (model, attack, eps) point, with 95% intervals."""
  valid = ssim >= ecfg.ssim_min
  if ecfg.linf_max > 0:
    valid &= dist.linf <= ecfg.linf_max + 1e-6
  if ecfg.l2_max > 0:
    valid &= dist.l2 <= ecfg.l2_max + 1e-6
  confident = prob >= ecfg.confidence_min
  levels = np.asarray(metrics.effectiveness(valid, confident))
  rate, rate_lo, rate_hi = metrics.success_rate(success)
  vrate, vlo, vhi = metrics.success_rate(valid)
  pmean, plo, phi = metrics.mean_interval(prob)
  row = dict(
    n_pairs=int(success.size),
    success_rate=rate,
    success_rate_ci=[rate_lo, rate_hi],
    mean_target_prob=pmean,
    mean_target_prob_ci=[plo, phi],
    mean_confidence=pmean,
    validity_rate=vrate,
    validity_rate_ci=[vlo, vhi],
    mean_ssim=float(np.mean(ssim)),
    effectiveness=dict(metrics.effectiveness_counts(levels), modal=metrics.modal_level(levels)),
  )
  for norm in ("l0", "l1", "l2", "linf"):
    mean, lo, hi = metrics.mean_interval(np.asarray(getattr(dist, norm), np.float64))
    row[f"mean_{norm}"] = mean
    row[f"mean_{norm}_ci"] = [lo, hi]
  return {k: _finite(v) for k, v in row.items()}


def _finite(v):
  """NaN (an interval of one sample) is written as null, never as a fake number."""
  if isinstance(v, float):
    return v if np.isfinite(v) else None
  if isinstance(v, list):
    return [_finite(a) for a in v]
  return v


def _save_examples(path: pathlib.Path, x, pairs, x_adv, eps) -> None:
  """A few (source, adversarial) examples per eps for the figures, written atomically."""
  n = x_adv.shape[1]
  _save_npz(
    path,
    x=x[:n],
    x_adv=x_adv,
    source_label=pairs.source_label[:n],
    target=pairs.target[:n],
    eps=np.asarray(eps),
  )
