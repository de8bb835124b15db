"""The autoencoder-communication experiment (Sadeghi and Larsson 2019): train, attack, report.

  python -m experiments.main --config=configs/comm_ae.py --workdir=results/comm_ae

`experiment = "comm"` in a config sends `experiments.run.run` here. Files in the workdir:
  config.json               the run's config (a workdir of another system / training is refused)
  params/<model>.msgpack    trained autoencoder parameters (flax serialisation, a few kB),
                            reused on a rerun with the same training settings
  train_metrics.json        per autoencoder: loss history, seconds, parameter count; per model:
                            the substitute receiver's agreement with the attacked one
  perturbations/<model>.npz the crafted perturbations per attack and PSR
  results.jsonl             one row per (model, attack, PSR, Eb/N0): blocks, block errors, BLER
                            and its 95% Wilson interval; appended as produced, skipped on rerun
  summary.md, figures/*.png the report

Every evaluation point goes through the image attacks' runner (`runner.iter_attack_chunks`):
`system.transmit_block` is the "attack" for one block at one Eb/N0, vmapped over blocks x
Eb/N0 in one compiled function, chunked and sharded over the devices of a 1-D mesh. Blocks
carry the messages 0..M-1 in turn (equal counts) and block i's channel noise is
fold_in(key, i) with one key per model, so every attack of a model sees the same noise draws
(paired comparisons).
"""

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import serialization

from experiments import keys, progress, store
from experiments import validate as validate_lib
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from experiments.report.figures import new_figure, save_figure
from vae_attacks import metrics
from vae_attacks.attacks import runner
from vae_attacks.comms import attacks as attacks_lib
from vae_attacks.comms import baselines
from vae_attacks.comms import system as system_lib

ROW_KEY = ("dataset", "model", "attack", "psr_db", "ebn0_db", "settings")
DATASET = "comm"
# How each attack's perturbation enters the block (system.MODES) and who knows what.
ATTACK_MODE = {
  "jamming": "jamming",
  "fgm": "table",
  "uap": "table",
  "uap_unsync": "shifted",
  "uap_shift": "shifted",
  "substitute": "table",
  "substitute_shift": "shifted",
}
THREAT = {
  "none": "no attacker",
  "jamming": "no model knowledge",
  "fgm": "white-box, input-specific (knows the message)",
  "uap": "white-box, universal, synchronous",
  "uap_unsync": "white-box universal, received at a random cyclic offset",
  "uap_shift": "white-box, shift-invariant universal, random offset",
  "substitute": "black-box (substitute receiver), universal, synchronous",
  "substitute_shift": "black-box (substitute), shift-invariant, random offset",
}


# ----------------------------------------------------------------------------------------------
# Validation (one line per problem, as experiments/validate.py does for the image configs).


def validate(c) -> None:
  """Raises run.UserError naming the first bad setting and what is allowed."""

  def bad(field, value, allowed):
    raise UserError(f"{field}={value!r}: allowed {allowed}")

  try:  # every number finite first (dB values may be negative), so int() below cannot fail
    validate_lib.numbers(c, negative=True)
  except validate_lib.ConfigError as e:
    raise UserError(str(e)) from None
  n, k = c.system.n, c.system.k
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    bad("system.n", n, "a positive integer (channel uses)")
  if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n:
    bad("system.k", k, f"an integer with 1 <= k <= n = {n}")
  if k > 12:
    bad("system.k", k, "k <= 12 (one-hot over 2^k messages)")
  if not c.models:
    bad("models", c.models, f"a non-empty tuple of {system_lib.SYSTEMS}")
  for m in c.models:
    if m not in system_lib.SYSTEMS:
      bad("models[]", m, f"one of {', '.join(system_lib.SYSTEMS)}")
    if m.startswith("hamming74") and (k, n) != (4, 7):
      bad("models[]", m, f"Hamming(7,4) only with system.k=4, system.n=7 (got k={k}, n={n})")
  for name in c.attacks.enabled:
    if name not in ATTACK_MODE:
      bad("attacks.enabled[]", name, f"one of {', '.join(ATTACK_MODE)}")
  if not isinstance(c.seed, int) or c.seed < 0:
    bad("seed", c.seed, "a non-negative integer")
  if int(c.eval.blocks) < 1:
    bad("eval.blocks", c.eval.blocks, "a positive integer")
  grid = tuple(c.eval.ebn0_db)
  if not grid or not all(math.isfinite(float(e)) for e in grid):
    bad("eval.ebn0_db", grid, "a non-empty tuple of finite dB values")
  for field in ("psr_db", "curve_psr_db"):
    for v in c.attacks[field]:
      if not math.isfinite(float(v)) or float(v) > 20:
        bad(f"attacks.{field}[]", v, "finite dB values <= 20")
  if float(c.attacks.curve_ebn0_db) not in [float(e) for e in grid]:
    bad("attacks.curve_ebn0_db", c.attacks.curve_ebn0_db, f"one of eval.ebn0_db {grid}")
  for field in ("craft_samples", "passes", "search_steps"):
    if int(c.attacks[field]) < 1:
      bad(f"attacks.{field}", c.attacks[field], "a positive integer")
  t = c.train
  if int(t.steps) < 1 or int(t.batch_size) < 1 or not float(t.learning_rate) > 0:
    bad("train", dict(t), "steps >= 1, batch_size >= 1, learning_rate > 0")
  s = c.attacks.substitute
  if int(s.observations) < int(c.attacks.craft_samples) or int(s.steps) < 1:
    bad(
      "attacks.substitute.observations",
      s.observations,
      f">= attacks.craft_samples ({c.attacks.craft_samples}), with steps >= 1",
    )


def settings_hash(c) -> str:
  """What every row depends on besides its key: seed, system, training, blocks, crafting."""
  a = c.attacks
  return keys.config_hash(
    dict(
      seed=c.seed,
      system=keys.to_dict(c.system),
      train=keys.to_dict(c.train),
      blocks=int(c.eval.blocks),
      craft=dict(
        ebn0_db=float(a.craft_ebn0_db),
        samples=int(a.craft_samples),
        passes=int(a.passes),
        search_steps=int(a.search_steps),
        substitute=keys.to_dict(a.substitute),
      ),
    )
  )


# ----------------------------------------------------------------------------------------------
# The run.


# What decides the trained systems: a workdir holding another setting of these is refused.
CLAIM_FIELDS = ("experiment", "seed", "system", "train")


def run(config, workdir) -> dict:
  """Trains, crafts, evaluates and reports `config` (configs/comm_ae.py) in `workdir`."""
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir_lib.claim_workdir(config, workdir, fixed=CLAIM_FIELDS)
  root = jax.random.key(config.seed)
  k, n = config.system.k, config.system.n
  settings = settings_hash(config)
  metrics_path = workdir / "train_metrics.json"
  train_metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
  log = store.ResultsLog(workdir / "results.jsonl", ROW_KEY, store.COMM_KINDS)
  a = config.attacks
  runner_kwargs = dict(
    mesh=runner.pairs_mesh() if a.shard and jax.device_count() > 1 else None,
    chunk_size=int(a.chunk_size) or None,
    memory_budget_bytes=int(a.memory_budget_mb * 2**20),
  )
  psrs = sorted({float(p) for p in (*a.psr_db, *a.curve_psr_db)})
  points = _points(config)
  job = progress.Job(
    progress.comm_plan(config, sum(len(grid) for _, _, grid in points)),
    timings_path=workdir / progress.TIMINGS_FILE,
  )
  job.show_plan(f"{config.name} in {workdir}")

  for name in config.models:
    model_key = jax.random.fold_in(root, system_lib.SYSTEMS.index(name))
    # A code's soft scores (what gradient attacks differentiate) at the training Eb/N0.
    system = system_lib.make_system(name, k=k, n=n, logit_ebn0_db=float(config.train.ebn0_db))
    job.start("train", name)
    params, tm = _trained(config, system, jax.random.fold_in(model_key, 0), workdir)
    job.finish(skipped=tm is None)
    if tm is not None:
      train_metrics[name] = {**train_metrics.get(name, {}), **tm}
      store.write_json_atomic(metrics_path, train_metrics)

    def missing(point, name=name):
      attack, psr, grid = point
      return [
        e
        for e in grid
        if not log.has(
          dict(dataset=DATASET, model=name, attack=attack, psr_db=psr, ebn0_db=e, settings=settings)
        )
      ]

    todo = [(p, missing(p)) for p in points]
    todo = [(p, m) for p, m in todo if m]
    if not todo:
      job.skip("craft", name)
      job.skip("evaluate", name)
      continue
    job.start("craft", name)
    tables, sub_metrics = _craft(config, system, params, psrs, jax.random.fold_in(model_key, 1))
    job.finish()
    if sub_metrics:
      train_metrics[name] = {**train_metrics.get(name, {}), "substitute": sub_metrics}
      store.write_json_atomic(metrics_path, train_metrics)
    arrays = {f"{att}_psr{psr:g}": np.asarray(t) for (att, psr), t in tables.items()}
    store.write_with(
      workdir / "perturbations" / f"{name}.npz", lambda f, a=arrays: np.savez(f, **a)
    )
    eval_key = jax.random.fold_in(model_key, 2)
    job.start("evaluate", name, detail=f"{sum(len(m) for _, m in todo)} points to do")
    for (attack, psr, _), grid in todo:
      rows = evaluate(
        system,
        params,
        attack=attack,
        psr_db=psr,
        ebn0_grid=grid,
        blocks=int(config.eval.blocks),
        table=tables.get((attack, psr)),
        key=eval_key,
        runner_kwargs=runner_kwargs,
      )
      for row in rows:
        log.append(dict(row, dataset=DATASET, model=name, settings=settings))
      logging.info(
        "%s %s psr %s: %s",
        name,
        attack,
        psr,
        " ".join(f"{r['ebn0_db']:g}dB:{r['bler']:.2e}" for r in rows),
      )
    job.finish()

  rows = [r for r in log.rows if r.get("settings") == settings]
  write_report(workdir, rows, config, train_metrics)
  job.last_line(workdir)
  return {"train": train_metrics, "results": rows}


def _points(config) -> list[tuple[str, float | None, tuple[float, ...]]]:
  """(attack, PSR dB, Eb/N0 grid) of every evaluation point of a system: no attack over the
  whole grid; each attack at the main PSRs over the whole grid, at the curve's PSRs at one
  Eb/N0."""
  a = config.attacks
  ebn0_grid = tuple(float(e) for e in config.eval.ebn0_db)
  points = [("none", None, ebn0_grid)]
  for attack in a.enabled:
    for psr in sorted({float(p) for p in (*a.psr_db, *a.curve_psr_db)}):
      main = psr in [float(p) for p in a.psr_db]
      points.append((attack, psr, ebn0_grid if main else (float(a.curve_ebn0_db),)))
  return points


def _trained(config, system, key, workdir: pathlib.Path):
  """(params, metrics or None): trained (or reloaded) autoencoder params; {} for a code."""
  if not isinstance(system, system_lib.AutoencoderSystem):
    return {}, None
  t = config.train
  train_hash = keys.config_hash(
    dict(seed=config.seed, system=keys.to_dict(config.system), train=keys.to_dict(t))
  )
  path = workdir / "params" / f"{system.name}.msgpack"
  meta = path.with_suffix(".json")
  template = system.init(key)
  if path.exists() and meta.exists() and json.loads(meta.read_text()).get("hash") == train_hash:
    return serialization.from_bytes(template, path.read_bytes()), None
  start = time.perf_counter()
  params, hist = system_lib.train_autoencoder(
    system,
    key=key,
    steps=int(t.steps),
    batch_size=int(t.batch_size),
    learning_rate=float(t.learning_rate),
    ebn0_db=float(t.ebn0_db),
    decay_at=tuple(t.decay_at),
  )
  seconds = time.perf_counter() - start
  store.write_bytes_atomic(path, serialization.to_bytes(params))
  store.write_json_atomic(meta, {"hash": train_hash})
  count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  logging.info("%s trained in %.1f s, final loss %.2e", system.name, seconds, hist["loss"][-1])
  return params, dict(
    train_seconds=seconds, params=count, loss_history=hist["loss"], steps=hist["steps"]
  )


def _craft(config, system, params, psrs, key):
  """Every attack's perturbation table [M, dims] per (attack, PSR), and substitute metrics."""
  a = config.attacks
  m, dims, sd = system.num_messages, system.dims, system.symbol_dim
  energies = attacks_lib.psr_energy(jnp.asarray(psrs), system.n)  # [S]
  k_lab, k_noise, k_shift, k_obs, k_sub, k_check = jax.random.split(key, 6)
  sigma = system_lib.noise_std(float(a.craft_ebn0_db), system.rate)
  n_craft = int(a.craft_samples)
  labels = jax.random.randint(k_lab, (n_craft,), 0, m)
  enc = jax.vmap(system.encode, in_axes=(None, 0))
  signals = enc(params, labels) + sigma * jax.random.normal(k_noise, (n_craft, dims))
  shifts = jax.random.randint(k_shift, (n_craft,), 0, system.n) * sd  # whole channel uses
  enabled = set(a.enabled)
  tables = {}

  def uap_all(receiver, rparams, sig, lab, sh):  # [S, dims]
    craft = jax.jit(
      jax.vmap(
        lambda e: attacks_lib.universal_perturbation(
          receiver,
          rparams,
          sig,
          lab,
          energy=e,
          shifts=sh,
          passes=int(a.passes),
          search_steps=int(a.search_steps),
        )
      )
    )
    return craft(energies)

  def put(attack, per_psr, universal=True):
    for i, psr in enumerate(psrs):
      t = per_psr[i]
      tables[(attack, psr)] = jnp.tile(t[None], (m, 1)) if universal else t

  if "fgm" in enabled:
    codewords = enc(params, jnp.arange(m))  # [M, dims]

    def fgm_one(e):
      return jax.vmap(lambda x, lab: attacks_lib.fgm(system, params, x, lab, energy=e))(
        codewords, jnp.arange(m)
      )

    put("fgm", jax.jit(jax.vmap(fgm_one))(energies), universal=False)
  if enabled & {"uap", "uap_unsync"}:
    u = uap_all(system, params, signals, labels, None)
    put("uap", u)
    put("uap_unsync", u)
  if "uap_shift" in enabled:
    put("uap_shift", uap_all(system, params, signals, labels, shifts))
  if "jamming" in enabled:
    put("jamming", jnp.zeros((len(psrs), dims)))
  sub_metrics = {}
  if enabled & {"substitute", "substitute_shift"}:
    s = a.substitute
    n_obs = int(s.observations)
    k_ol, k_on = jax.random.split(k_obs)
    obs_msgs = jax.random.randint(k_ol, (n_obs,), 0, m)
    obs = enc(params, obs_msgs) + sigma * jax.random.normal(k_on, (n_obs, dims))
    decided = jax.vmap(system.decide, in_axes=(None, 0))(params, obs)  # what the attacker sees
    sub = system_lib.ReceiverOnly(
      name="substitute",
      n=dims,
      receiver=system_lib.Receiver(num_messages=m, arch="mlp", hidden=tuple(s.hidden)),
    )
    start = time.perf_counter()
    sub_params = system_lib.train_receiver(
      sub,
      obs,
      decided,
      key=k_sub,
      steps=int(s.steps),
      batch_size=int(s.batch_size),
      learning_rate=float(s.learning_rate),
    )
    # Agreement with the attacked receiver on fresh blocks at the crafting Eb/N0.
    k_cl, k_cn = jax.random.split(k_check)
    check_msgs = jax.random.randint(k_cl, (10000,), 0, m)
    check = enc(params, check_msgs) + sigma * jax.random.normal(k_cn, (10000, dims))
    agree = jnp.mean(
      jax.vmap(sub.decide, in_axes=(None, 0))(sub_params, check)
      == jax.vmap(system.decide, in_axes=(None, 0))(params, check)
    )
    sub_metrics = dict(
      agreement_with_receiver=float(agree),
      observations=n_obs,
      hidden=list(s.hidden),
      seconds=time.perf_counter() - start,
    )
    sig, lab = obs[:n_craft], decided[:n_craft]
    if "substitute" in enabled:
      put("substitute", uap_all(sub, sub_params, sig, lab, None))
    if "substitute_shift" in enabled:
      put("substitute_shift", uap_all(sub, sub_params, sig, lab, shifts))
  return tables, sub_metrics


def evaluate(
  system,
  params,
  *,
  attack: str,
  psr_db: float | None,
  ebn0_grid,
  blocks: int,
  table,
  key,
  runner_kwargs: dict | None = None,
) -> list[dict]:
  """BLER rows (one per Eb/N0) of `attack` at `psr_db`: the runner's sweep over blocks x Eb/N0
  (`runner_kwargs`: mesh, chunk_size, memory_budget_bytes of `runner.iter_attack_chunks`).

  Returns:
    dicts with attack, psr_db, ebn0_db, blocks, block_errors, bler, bler_lo, bler_hi (95%
    Wilson), psr_measured_db (from the perturbations actually added), threat, seconds.
  """
  mode = "clean" if attack == "none" else ATTACK_MODE.get(attack)
  if mode is None:
    raise ValueError(f"attack {attack!r} is not known; allowed: none, {', '.join(ATTACK_MODE)}")
  m, dims = system.num_messages, system.dims
  energy = 0.0 if psr_db is None else float(attacks_lib.psr_energy(psr_db, system.n))
  table = jnp.zeros((m, dims), jnp.float32) if table is None else jnp.asarray(table, jnp.float32)
  messages = (np.arange(blocks) % m).astype(np.int32)
  start = time.perf_counter()
  errors = np.zeros(len(ebn0_grid), np.int64)
  p_energy = 0.0
  for _, res in runner.iter_attack_chunks(
    system_lib.transmit_block,
    system,
    params,
    messages,
    messages,
    np.asarray(ebn0_grid, np.float32),
    progress=False,
    **(runner_kwargs or {}),
    mode=mode,
    delta=table,
    energy=jnp.asarray(energy, jnp.float32),
    key=key,
  ):
    errors += np.asarray(res.success, np.int64).sum(axis=1)
    p_energy += float(np.sum(np.asarray(res.distortion.l2[0], np.float64) ** 2))
  seconds = time.perf_counter() - start
  mean_energy = p_energy / blocks
  psr_measured = 10 * math.log10(mean_energy / system.n) if mean_energy > 0 else None
  rows = []
  for e, err in zip(ebn0_grid, errors, strict=True):
    lo, hi = metrics.wilson_interval(int(err), blocks)
    rows.append(
      dict(
        attack=attack,
        psr_db=psr_db,
        ebn0_db=float(e),
        blocks=int(blocks),
        block_errors=int(err),
        bler=int(err) / blocks,
        bler_lo=lo,
        bler_hi=hi,
        psr_measured_db=psr_measured,
        threat=THREAT[attack],
        seconds=seconds,
      )
    )
  return rows


# ----------------------------------------------------------------------------------------------
# Report: summary.md and figures.


def _index(rows):
  return {(r["model"], r["attack"], r["psr_db"], r["ebn0_db"]): r for r in rows}


def _fmt(r) -> str:
  if r is None:
    return "-"
  return f"{r['bler']:.2e} [{r['bler_lo']:.1e}, {r['bler_hi']:.1e}]"


def closed_form(model: str, ebn0_db: float) -> str:
  """The baseline's closed form (or ML bounds) at ebn0_db, as text; '' for an autoencoder."""
  if model == "bpsk_uncoded":
    return f"{float(baselines.uncoded_bpsk_bler(ebn0_db)):.2e}"
  if model == "hamming74_hard":
    return f"{float(baselines.hamming74_hard_bler(ebn0_db)):.2e}"
  if model == "hamming74_ml":
    lo, hi = baselines.hamming74_ml_bounds(ebn0_db)
    return f"[{float(lo):.1e}, {float(hi):.1e}]"
  return ""


def ratios(
  rows,
  *,
  ebn0_db: float,
  psrs,
  models,
  attacks=("uap", "substitute", "substitute_shift", "uap_shift", "fgm"),
):
  """{(model, psr, attack): (ratio, conservative ratio)} of BLER(attack) / BLER(jamming).

  The conservative ratio divides the attack's lower 95% bound by jamming's upper bound.
  """
  idx = _index(rows)
  out = {}
  for model in models:
    for psr in psrs:
      jam = idx.get((model, "jamming", psr, ebn0_db))
      if jam is None:
        continue
      for att in attacks:
        r = idx.get((model, att, psr, ebn0_db))
        if r is None:
          continue
        ratio = r["bler"] / jam["bler"] if jam["bler"] > 0 else math.inf
        cons = r["bler_lo"] / jam["bler_hi"] if jam["bler_hi"] > 0 else math.inf
        out[(model, psr, att)] = (ratio, cons)
  return out


def write_report(workdir: pathlib.Path, rows, config, train_metrics) -> None:
  """summary.md (tables, ratios, the order-of-magnitude check) and figures/*.png."""
  a = config.attacks
  models = [m for m in config.models if any(r["model"] == m for r in rows)]
  attacks = [att for att in a.enabled]
  idx = _index(rows)
  grid = [float(e) for e in config.eval.ebn0_db]
  op = float(a.curve_ebn0_db)
  main_psrs = [float(p) for p in a.psr_db]
  lines = [
    "# Physical adversarial attacks on an autoencoder communication system",
    "",
    "Sadeghi and Larsson (2019), IEEE Communications Letters 23(5), on the (n, k) = "
    f"({config.system.n}, {config.system.k}) autoencoder of O'Shea and Hoydis (2017), trained at "
    f"Eb/N0 = {config.train.ebn0_db} dB. BLER over {config.eval.blocks:,} blocks per point, "
    "[95% Wilson interval]. PSR = ||p||^2 / ||x||^2 per block.",
    "",
    "## No attack: BLER vs Eb/N0",
    "",
    "| Eb/N0 (dB) | " + " | ".join(models) + " | BPSK closed form | Hamming hard closed form "
    "| Hamming ML bounds |",
    "|---" * (len(models) + 4) + "|",
  ]
  for e in grid:
    cells = [_fmt(idx.get((m, "none", None, e))) for m in models]
    lines.append(
      f"| {e:g} | "
      + " | ".join(cells)
      + f" | {closed_form('bpsk_uncoded', e)} | {closed_form('hamming74_hard', e)}"
      f" | {closed_form('hamming74_ml', e)} |"
    )
  lines += ["", f"## Under attack at Eb/N0 = {op:g} dB", ""]
  for psr in main_psrs:
    lines += [
      f"PSR = {psr:g} dB",
      "",
      "| model | none | " + " | ".join(attacks) + " |",
      "|---" * (len(attacks) + 2) + "|",
    ]
    for m in models:
      cells = [_fmt(idx.get((m, att, psr, op))) for att in attacks]
      lines.append(f"| {m} | {_fmt(idx.get((m, 'none', None, op)))} | " + " | ".join(cells) + " |")
    lines.append("")
  rat = ratios(rows, ebn0_db=op, psrs=main_psrs, models=models)
  lines += [
    f"## BLER(attack) / BLER(jamming) at Eb/N0 = {op:g} dB (same power)",
    "",
    "ratio of point estimates (conservative: attack's lower bound / jamming's upper bound)",
    "",
    "| model | PSR (dB) | uap | uap_shift | substitute | substitute_shift | fgm |",
    "|---|---|---|---|---|---|---|",
  ]
  for m in models:
    for psr in main_psrs:
      cells = []
      for att in ("uap", "uap_shift", "substitute", "substitute_shift", "fgm"):
        v = rat.get((m, psr, att))
        cells.append("-" if v is None else f"{v[0]:.1f} ({v[1]:.1f})")
      lines.append(f"| {m} | {psr:g} | " + " | ".join(cells) + " |")
  lines += ["", "## The paper's finding, measured", ""]
  for m in [m for m in models if m in system_lib.AUTOENCODERS]:
    for psr in main_psrs:
      v = rat.get((m, psr, "uap"))
      if v is None:
        continue
      verdict = (
        "holds" if v[1] >= 10 else ("holds by point estimate only" if v[0] >= 10 else "fails")
      )
      bb = []
      for att in ("substitute", "substitute_shift"):
        rj = idx.get((m, "jamming", psr, op))
        ru = idx.get((m, "uap", psr, op))
        rb = idx.get((m, att, psr, op))
        if rj and ru and rb:
          between = rj["bler"] < rb["bler"] <= ru["bler"]
          bb.append(f"{att} {'between' if between else 'not between'} jamming and uap")
      lines.append(
        f"- {m}, PSR {psr:g} dB: UAP / jamming = {v[0]:.1f} (conservative {v[1]:.1f}): "
        f"10x {verdict}; " + "; ".join(bb)
      )
  subs = {m: tm.get("substitute") for m, tm in train_metrics.items() if tm.get("substitute")}
  if subs:
    lines += ["", "Substitute receivers (agreement with the attacked receiver on 10,000 blocks at "
              f"{a.craft_ebn0_db} dB): " + ", ".join(
                f"{m} {s['agreement_with_receiver']:.4f}" for m, s in subs.items())]  # fmt: skip
  figs = []
  if config.output.figures:
    figs = write_figures(workdir, rows, models, attacks, grid, main_psrs, op)
    lines += ["", "## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figs]
  store.write_text_atomic(workdir / "summary.md", "\n".join(lines) + "\n")


def _style(ax, xlabel: str, title: str, legend: float | None) -> None:
  """Log BLER axis, labels and grid; a legend of font size `legend` (None: none)."""
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("BLER")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  if legend is not None:
    ax.legend(fontsize=legend)


def _curve(ax, rs, x_field, label, **kw):
  rs = sorted((r for r in rs if r is not None), key=lambda r: r[x_field])
  rs = [r for r in rs if r["block_errors"] > 0]  # log axis: a zero count is left out
  if not rs:
    return
  x = np.array([r[x_field] for r in rs])
  y = np.array([r["bler"] for r in rs])
  err = np.array([[r["bler"] - r["bler_lo"] for r in rs], [r["bler_hi"] - r["bler"] for r in rs]])
  ax.errorbar(x, y, yerr=err, label=label, capsize=2, marker="o", markersize=3, **kw)


def write_figures(workdir, rows, models, attacks, grid, psrs, op) -> list[pathlib.Path]:
  """BLER vs Eb/N0 per model (one panel per PSR), BLER vs PSR, the AE against Hamming(7,4)."""
  idx = _index(rows)
  out = []
  for m in models:
    fig = new_figure(4.2 * len(psrs), 3.8)
    for i, psr in enumerate(psrs):
      ax = fig.add_subplot(1, len(psrs), i + 1)
      _curve(ax, [idx.get((m, "none", None, e)) for e in grid], "ebn0_db", "no attack", color="k")
      for att in attacks:
        _curve(ax, [idx.get((m, att, psr, e)) for e in grid], "ebn0_db", att)
      _style(ax, "Eb/N0 (dB)", f"{m}, PSR {psr:g} dB", 7 if i == 0 else None)
    fig.tight_layout()
    out.append(save_figure(fig, workdir / "figures" / f"bler_vs_ebn0_{m}.png"))
  fig = new_figure(4.2 * len(models), 3.8)
  all_psrs = sorted({r["psr_db"] for r in rows if r["psr_db"] is not None})
  for i, m in enumerate(models):
    ax = fig.add_subplot(1, len(models), i + 1)
    for att in attacks:
      _curve(ax, [idx.get((m, att, p, op)) for p in all_psrs], "psr_db", att)
    none = idx.get((m, "none", None, op))
    if none is not None and none["block_errors"] > 0:
      ax.axhline(none["bler"], color="k", ls="--", label="no attack")
    _style(ax, "PSR (dB)", f"{m}, Eb/N0 {op:g} dB", 7 if i == 0 else None)
  fig.tight_layout()
  out.append(save_figure(fig, workdir / "figures" / "bler_vs_psr.png"))
  versus = [m for m in ("mlp_ae", "mlp_ae_iq", "hamming74_ml", "hamming74_hard") if m in models]
  if len(versus) > 1:
    comp = [att for att in ("jamming", "uap", "substitute") if att in attacks]
    fig = new_figure(4.2 * len(psrs), 3.8)
    styles = dict(jamming=":", uap="-", substitute="--")
    for i, psr in enumerate(psrs):
      ax = fig.add_subplot(1, len(psrs), i + 1)
      for j, m in enumerate(versus):
        for att in comp:
          _curve(ax, [idx.get((m, att, psr, e)) for e in grid], "ebn0_db", f"{m} {att}",
                 color=f"C{j}", ls=styles[att])  # fmt: skip
      _style(
        ax, "Eb/N0 (dB)", f"autoencoder vs Hamming(7,4), PSR {psr:g} dB", 6 if i == 0 else None
      )
    fig.tight_layout()
    out.append(save_figure(fig, workdir / "figures" / "ae_vs_hamming.png"))
  return out
