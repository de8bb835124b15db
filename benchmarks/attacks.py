"""The runner's attacks against the peer libraries and scipy, in one run (docs/performance.md).

  pip install -r benchmarks/requirements.txt      # foolbox 3.3.x, cleverhans 4 (optional)
  python -m benchmarks.attacks [--n=256] [--steps=40] [--lbfgs_n=32] [--json=PATH]
  python -m benchmarks.attacks --size=lfw --skip=bim,lbfgs --step_pairs=8   # 154x154x3 step

Everything runs on the study's CNN for `--size` (random weights, `models.CNN` with the
config's settings) and the same random pairs (80% of the pixels 0, so the box matters); every
variant gets the same pairs in one batch and one `jax.jit`. Variants run interleaved, in
`--repeats` rounds after a compiling run, and the best round counts: the machine is shared,
so the 1-minute load average is printed with every section, and the ratios (measured in one
run) are the result, not the absolute rates.

- BIM, targeted L-inf, `--steps` steps of eps/10: the runner as the runs call it
  (`runner.run_attack` of the registry's `bim`) on one device and with the pairs on the host
  devices (`XLA_FLAGS=--xla_force_host_platform_device_count=<cores>`, set here before jax is
  imported, as experiments/main.py does); a per-pair Python loop over a jitted one-pair attack;
  cleverhans 4 (JAX) and foolbox 3.3 (JAX) at their best (benchmarks/peers.py). Each peer's
  adversarial images are checked against the runner's. GFLOP/s use the FLOPs of XLA's cost
  analysis of the compiled batched attack, set against a float32 2048x2048 matmul measured at
  the start, between sections and at the end (the best counts).
- L-BFGS on the Szegedy objective c ||x_adv - x||^2 + CE(x_adv, target), `--lbfgs_n` pairs:
  scipy's L-BFGS-B per pair at its best (peers.scipy_lbfgs: jitted value_and_grad, the solver's
  stop rules) against the runner's host-loop path (the runs' path: registry `lbfgs.batched`)
  and its compiled `jit(vmap(while_loop))` path. The final objectives are compared pair by pair.
  The batched value_and_grad of the same pairs alone is timed too, for the ceiling at equal
  evaluations (`lbfgs_ceiling`): what bounds the ratio to scipy (docs/performance.md).
- The L-BFGS loop step against the objective's value_and_grad (`--step_pairs` pairs): one
  compiled step of `lbfgs.minimise_box_batched` (trial point, value_and_grad, line-search
  bookkeeping, the direction from the [memory x pixels] curvature pairs) over the
  value_and_grad of the same pairs alone.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
  ).strip()

from experiments import hostmem  # noqa: E402

# As experiments/main.py: freed memory is reused (every variant, peers included, gains alike).
MALLOC_TUNED = hostmem.keep_freed_memory()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import peers  # noqa: E402
from configs import base  # noqa: E402
from vae_attacks import data, models  # noqa: E402
from vae_attacks.attacks import lbfgs as lb  # noqa: E402
from vae_attacks.attacks import registry, runner  # noqa: E402
from vae_attacks.attacks.bim import bim  # noqa: E402

CLASSES = {"mnist": 10, "lfw": 7}
SECTIONS = ("bim", "lbfgs", "step")
# "Equal" final objectives: within this relative gap (twice the solver's ftol, ~8 float32
# ulps of an objective near 2), besides lower.
OBJECTIVE_RTOL = 1e-6


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--size", choices=sorted(CLASSES), default="mnist", help="problem size")
  p.add_argument("--n", type=int, default=256, help="BIM pairs")
  p.add_argument("--steps", type=int, default=40, help="BIM steps")
  p.add_argument("--eps", type=float, default=0.1, help="BIM L-inf radius")
  p.add_argument("--lbfgs_n", type=int, default=32, help="L-BFGS pairs")
  p.add_argument("--lbfgs_iters", type=int, default=50, help="L-BFGS iteration budget")
  p.add_argument("--c", type=float, default=0.1, help="Szegedy penalty c")
  p.add_argument("--step_pairs", type=int, default=8, help="pairs of the L-BFGS step section")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds of each variant")
  p.add_argument("--skip", default="", help=f"comma list of sections to skip: {SECTIONS}")
  p.add_argument("--json", default=None, help="write the numbers here")
  return p.parse_args(argv)


def rounds(variants: dict, repeats: int) -> dict:
  """{name: (compile+first s, best s, last output)} for zero-argument callables, timed in
  interleaved rounds (so a change of the machine's load hits every variant alike)."""
  first, outs = {}, {}
  for name, fn in variants.items():
    t0 = time.perf_counter()
    outs[name] = jax.block_until_ready(fn())
    first[name] = time.perf_counter() - t0
  best = dict.fromkeys(variants, np.inf)
  for _ in range(repeats):
    for name, fn in variants.items():
      t0 = time.perf_counter()
      outs[name] = jax.block_until_ready(fn())
      best[name] = min(best[name], time.perf_counter() - t0)
  return {k: (first[k], best[k], outs[k]) for k in variants}


def make_problem(n: int, seed: int = 0, size: str = "mnist"):
  """The study's CNN for `size` (random weights) and n random pairs (80% of pixels 0)."""
  cfg = base.get_config(dataset=size, models=("cnn",), quick=False)
  shape = data.DATASETS[size].full_shape
  model = models.CNN(num_classes=CLASSES[size], **cfg.model.cnn)
  logits_fn = models.classifier_fns(model)
  params = model.init(jax.random.key(seed), jnp.zeros((1, *shape)))
  k_img, k_mask, k_target = jax.random.split(jax.random.key(seed + 1), 3)
  ink = jax.random.uniform(k_img, (n, *shape))
  x = jnp.where(jax.random.uniform(k_mask, (n, *shape)) > 0.8, ink, 0.0)
  target = jax.random.randint(k_target, (n,), 0, CLASSES[size])
  return logits_fn, params, x, target


def matmul_gflops(repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  (_, best, _), *_ = rounds({"mm": lambda: f(a, a)}, repeats).values()
  return 2 * 2048**3 / best / 1e9


def device_line() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  d = jax.devices()
  return f"{len(d)} x {d[0].platform} device ({d[0].device_kind}) on {os.cpu_count()} cores, {cpu}"


def load() -> float:
  return os.getloadavg()[0]


# ---------------------------------------------------------------------------------------- BIM


def bench_bim(args, logits_fn, params, x, target, mesh) -> dict:
  n, num_classes = x.shape[0], CLASSES[args.size]
  step = args.eps / 10
  spec = registry.ATTACKS["bim"]
  knobs = dict(norm="linf", steps=args.steps, step_size_rel=0.1)
  x_host, t_host = np.asarray(x), np.asarray(target)

  def run_runner(mesh):
    res = runner.run_attack(
      spec.run, logits_fn, params, x_host, t_host, (args.eps,), mesh=mesh, progress=False,
      memory_budget_bytes=2 << 30, **knobs,
    )  # fmt: skip
    return res.x_adv[0]

  one = jax.jit(functools.partial(bim, logits_fn, eps=args.eps, step_size=step, steps=args.steps))
  batch_logits = jax.jit(jax.vmap(logits_fn, in_axes=(None, 0)))
  variants = {
    f"runner, {len(mesh.devices.flat)} host devices": lambda: run_runner(mesh),
    "runner, 1 device": lambda: run_runner(None),
    "per-pair loop of a jitted attack": lambda: jnp.stack(
      [one(params, x[i], target[i]).x_adv for i in range(n)]
    ),
  }
  peer_rows, notes = [], []
  try:
    ch = peers.cleverhans_bim(batch_logits, num_classes, eps=args.eps, step_size=step,
                              steps=args.steps)  # fmt: skip
    variants["cleverhans 4 JAX, jit"] = lambda: ch(params, x, target)
    rep, by_pair = NamedSharding(mesh, P()), NamedSharding(mesh, P(runner.PAIRS_AXIS))
    ch_sharded = peers.cleverhans_bim(
      batch_logits, num_classes, eps=args.eps, step_size=step, steps=args.steps,
      jit_kwargs=dict(in_shardings=(rep, by_pair, by_pair), out_shardings=by_pair),
    )  # fmt: skip
    variants["cleverhans + the runner's host devices*"] = lambda: ch_sharded(params, x, target)
    peer_rows.append("cleverhans 4 JAX, jit")
  except ImportError as e:
    notes.append(f"cleverhans not installed ({e}); pip install -r benchmarks/requirements.txt")
  try:
    fb = peers.foolbox_bim(batch_logits, params, eps=args.eps, step_size=step, steps=args.steps)
    variants["foolbox 3.3 JAX, eager (documented)"] = lambda: fb["eager"](x, target)
    variants["foolbox 3.3 JAX, whole attack jitted"] = lambda: fb["jit"](x, target)
    peer_rows += ["foolbox 3.3 JAX, eager (documented)", "foolbox 3.3 JAX, whole attack jitted"]
  except ImportError as e:
    notes.append(f"foolbox not installed ({e}); pip install -r benchmarks/requirements.txt")

  flops = (
    jax.jit(jax.vmap(one, in_axes=(None, 0, 0))).lower(params, x, target).compile()
  ).cost_analysis()["flops"]
  load_start = load()
  timed = rounds(variants, args.repeats)
  ref = np.asarray(timed["runner, 1 device"][2])
  hit = lambda xa: np.asarray(jnp.argmax(batch_logits(params, jnp.asarray(xa)), -1)) == t_host
  rows = {}
  for name, (first, best, out) in timed.items():
    out = np.asarray(out)
    rows[name] = dict(
      ex_per_s=n / best, first_s=first, max_abs_diff=float(np.max(np.abs(out - ref))),
      same_success=float(np.mean(hit(out) == hit(ref))),
    )  # fmt: skip
  return dict(rows=rows, peers=peer_rows, flops_per_pair=flops / n, notes=notes,
              success=float(np.mean(hit(ref))), load=(load_start, load()))  # fmt: skip


def print_bim(args, b: dict, mm: float) -> dict:
  rows, n = b["rows"], args.n
  ours = max((k for k in rows if k.startswith("runner")), key=lambda k: rows[k]["ex_per_s"])
  peer = max(b["peers"], key=lambda k: rows[k]["ex_per_s"]) if b["peers"] else None
  print(
    f"\nBIM L-inf, eps={args.eps}, {args.steps} steps of eps/10, {n} pairs (runner success "
    f"{b['success']:.2f}); load {b['load'][0]:.1f} -> {b['load'][1]:.1f}"
  )
  head = f"{'variant':<50}{'ex/s':>8}{'ours/it':>9}{'GFLOP/s':>9}{'% mm':>7}{'same succ':>10}"
  print(head + f"{'max|dx|':>9}{'1st s':>7}")
  for name, r in rows.items():
    gf = r["ex_per_s"] * b["flops_per_pair"] / 1e9
    print(
      f"{name:<50}{r['ex_per_s']:>8.1f}{rows[ours]['ex_per_s'] / r['ex_per_s']:>9.2f}{gf:>9.1f}"
      f"{gf / mm:>7.0%}{r['same_success']:>10.3f}{r['max_abs_diff']:>9.1e}{r['first_s']:>7.1f}"
    )
  print(
    f"FLOPs (XLA cost analysis): {b['flops_per_pair'] / args.steps / 1e6:.1f} MFLOP per "
    f"pair-step; matmul {mm:.0f} GFLOP/s. * not a feature of the peer: the runner's pairs "
    f"sharding applied to cleverhans' jitted function."
  )
  for note in b["notes"]:
    print(note)
  out = dict(
    bim_best_runner=ours,
    bim_ex_per_s={k: r["ex_per_s"] for k, r in rows.items()},
    bim_flops_per_pair_step=b["flops_per_pair"] / args.steps,
    bim_gflops=rows[ours]["ex_per_s"] * b["flops_per_pair"] / 1e9,
    bim_fraction_of_matmul=rows[ours]["ex_per_s"] * b["flops_per_pair"] / 1e9 / mm,
    bim_load=b["load"],
  )
  if peer:
    out.update(
      bim_fastest_peer=peer,
      bim_ratio_to_fastest_peer=rows[ours]["ex_per_s"] / rows[peer]["ex_per_s"],
      bim_ratio_to_each={k: rows[ours]["ex_per_s"] / rows[k]["ex_per_s"] for k in rows},
    )
    print(f"best runner / fastest peer ({peer}): {out['bim_ratio_to_fastest_peer']:.2f}x")
  return out


# ------------------------------------------------------------------------------------- L-BFGS


def szegedy_problems(logits_fn, x, target, c: float):
  """The runs' one-pair Szegedy objective (as `lbfgs.lbfgs_batch` solves it) and its per-pair
  arguments (images, targets, c) for a batch of pairs."""
  return lb._batched_szegedy(logits_fn, True), (x, target, jnp.full(target.shape, c, x.dtype))


def bench_lbfgs(args, logits_fn, params, x, target, mesh) -> dict:
  n = x.shape[0]
  spec = registry.ATTACKS["lbfgs"]
  cfg = lb.make_config(max_iters=args.lbfgs_iters)
  c = jnp.float32(args.c)
  value_and_grad = jax.jit(
    jax.value_and_grad(lambda z, x0, t: lb.szegedy_objective(logits_fn, params, x0, t, c, z))
  )
  x_host, t_host = np.asarray(x), np.asarray(target)
  rules = dict(memory=cfg.memory, max_iters=cfg.max_iters, max_evals=cfg.max_steps + 1,
               tol=cfg.tol, ftol=cfg.ftol, ftol_iters=cfg.ftol_iters)  # fmt: skip

  def scipy_all():
    out = []
    for i in range(n):
      xi, ti = x[i], target[i]
      out.append(peers.scipy_lbfgs(lambda z, xi=xi, ti=ti: value_and_grad(z, xi, ti), x_host[i],
                                   **rules))  # fmt: skip
    return out

  def run_runner(batched, mesh, direction="subspace"):
    res = runner.run_attack(
      spec.run, logits_fn, params, x_host, t_host, (args.c,), mesh=mesh, progress=False,
      batched=batched, max_iters=args.lbfgs_iters, direction=direction,
    )  # fmt: skip
    return jax.tree.map(lambda a: a[0], res)

  n_dev = len(mesh.devices.flat)
  variants = {
    f"runner host loop, {n_dev} host devices": lambda: run_runner(spec.batched, mesh),
    "runner host loop, 1 device": lambda: run_runner(spec.batched, None),
    f"runner host loop, restricted direction, {n_dev} devices": lambda: run_runner(
      spec.batched, mesh, "restricted"
    ),
    f"runner compiled while loop, {n_dev} devices": lambda: run_runner(None, mesh),
    "scipy L-BFGS-B per pair": scipy_all,
  }
  # The gradient-bound ceiling: the batched value_and_grad of the same pairs alone (sharded as
  # the runs shard them, and on one device), the cost a solve cannot go below per evaluation.
  objective, per_pair = szegedy_problems(logits_fn, x, target, args.c)
  rep, by_pair = NamedSharding(mesh, P()), NamedSharding(mesh, P(runner.PAIRS_AXIS))
  vg = jax.vmap(jax.value_and_grad(objective), in_axes=(0, None, 0))
  vg_one = jax.jit(vg)
  vg_mesh = jax.jit(vg, in_shardings=(by_pair, rep, by_pair), out_shardings=by_pair)
  x_mesh, pp_mesh = jax.device_put(x, by_pair), jax.device_put(per_pair, by_pair)
  grad_variants = {
    f"batched value_and_grad alone, {n_dev} devices": lambda: vg_mesh(x_mesh, params, pp_mesh),
    "batched value_and_grad alone, 1 device": lambda: vg_one(x, params, per_pair),
  }
  load_start = load()
  timed = rounds(variants, args.repeats)
  # A call of a few milliseconds: more rounds than the solves, as the step section takes.
  grads = rounds(grad_variants, max(3 * args.repeats, 10))
  scipy_out = timed["scipy L-BFGS-B per pair"][2]
  f_scipy = np.array([o[0] for o in scipy_out])
  rows = {}
  for name, (first, best, out) in timed.items():
    if name.startswith("scipy"):
      f, iters = f_scipy, np.mean([o[1] for o in scipy_out])
      evals = np.mean([o[2] for o in scipy_out])
    else:
      f, iters = np.asarray(out.loss_trace[:, -1], np.float64), float(np.mean(out.iterations))
      evals = np.nan
    gap = (f - f_scipy) / np.maximum(np.abs(f_scipy), 1.0)
    rows[name] = dict(
      ex_per_s=n / best, first_s=first, mean_objective=float(f.mean()), iterations=iters,
      evaluations=evals, lower_or_equal=float(np.mean(gap <= OBJECTIVE_RTOL)),
      within_1e5=float(np.mean(gap <= 1e-5)),
      strictly_not_higher=float(np.mean(f <= f_scipy)), worst_gap=float(gap.max()),
    )  # fmt: skip
  grad_s = {k: best for k, (_, best, _) in grads.items()}
  return dict(rows=rows, grad_s=grad_s, load=(load_start, load()))


def lbfgs_ceiling(grad_s: float, solve_s: float, scipy_s: float, scipy_evals: float):
  """Where the L-BFGS ratio to scipy is bounded, from same-run seconds: `grad_s` one batched
  value_and_grad of the pairs, `solve_s` the runner's whole solve of them, `scipy_s` scipy's
  solves of the same pairs one by one, `scipy_evals` its mean evaluations per pair.

  Returns (the runner's solve in units of the batched gradient, the ratio to scipy of a solver
  that spent exactly scipy's evaluations per pair at the batched gradient's cost and nothing
  else). The runner's ratio is the second times scipy_evals / the first.
  """
  return solve_s / grad_s, scipy_s / (scipy_evals * grad_s)


def print_lbfgs(args, r: dict) -> dict:
  rows = r["rows"]
  scipy_rate = rows["scipy L-BFGS-B per pair"]["ex_per_s"]
  print(
    f"\nL-BFGS, Szegedy objective c={args.c}, {args.lbfgs_iters} iterations, {args.lbfgs_n} "
    f"pairs; load {r['load'][0]:.1f} -> {r['load'][1]:.1f}"
  )
  print(
    f"{'variant':<50}{'ex/s':>8}{'/scipy':>8}{'mean obj':>11}{'iters':>7}{'<= scipy':>9}"
    f"{'<=, 1e-5':>9}{'worst gap':>11}{'1st s':>7}"
  )
  for name, x in rows.items():
    print(
      f"{name:<50}{x['ex_per_s']:>8.1f}{x['ex_per_s'] / scipy_rate:>8.2f}"
      f"{x['mean_objective']:>11.6f}{x['iterations']:>7.1f}{x['lower_or_equal']:>9.2f}"
      f"{x['within_1e5']:>9.2f}{x['worst_gap']:>11.1e}{x['first_s']:>7.1f}"
    )
  scipy = rows["scipy L-BFGS-B per pair"]
  print(
    f"scipy: {scipy['evaluations']:.1f} evaluations per pair. '<= scipy': the fraction of pairs "
    f"whose final objective is lower than scipy's or within {OBJECTIVE_RTOL:g} of it "
    f"(relative; '<=, 1e-5': within 1e-5); worst gap: the largest relative excess."
  )
  # The ratio and the objective test are the runs' path's (the first variant: the subspace
  # direction, chosen for its objectives); the fastest runner variant is named beside it.
  ours = next(iter(rows))
  fastest = max((k for k in rows if k.startswith("runner")), key=lambda k: rows[k]["ex_per_s"])
  print(
    f"the runs' path ({ours}) / scipy: {rows[ours]['ex_per_s'] / scipy_rate:.2f}x, "
    f"<= scipy on {rows[ours]['lower_or_equal']:.2f} of pairs; fastest runner variant: {fastest}"
  )
  # The ceiling (lbfgs_ceiling): what bounds the ratio, from the same run's seconds.
  scipy_s = args.lbfgs_n / scipy_rate
  ceiling = {}
  for gname, gs in r["grad_s"].items():
    units, bound = lbfgs_ceiling(
      gs, args.lbfgs_n / rows[ours]["ex_per_s"], scipy_s, scipy["evaluations"]
    )
    ceiling[gname] = dict(grad_ms=gs * 1e3, solve_in_grads=units, bound=bound)
    print(
      f"{gname}: {gs * 1e3:.1f} ms; the runs' path costs {units:.1f} of it against scipy's "
      f"{scipy['evaluations']:.1f} evaluations a pair; a solver with scipy's evaluations at "
      f"this cost and no other would be {bound:.2f}x scipy (the ceiling at equal evaluations)"
    )
  return dict(
    lbfgs_ceiling=ceiling,
    lbfgs_runs_path=ours,
    lbfgs_fastest_runner=fastest,
    lbfgs_ex_per_s={k: x["ex_per_s"] for k, x in rows.items()},
    lbfgs_ratio_to_scipy=rows[ours]["ex_per_s"] / scipy_rate,
    lbfgs_ratio_to_scipy_each={k: x["ex_per_s"] / scipy_rate for k, x in rows.items()},
    lbfgs_lower_or_equal=rows[ours]["lower_or_equal"],
    lbfgs_rows=rows,
    lbfgs_load=r["load"],
  )


# ---------------------------------------------------------------------- L-BFGS step vs gradient


def bench_step(args, logits_fn, params, x, target) -> dict:
  """The host loop's compiled step over the value_and_grad of the same pairs (one device),
  for each L-BFGS direction (`lbfgs.DIRECTIONS`)."""
  objective, per_pair = szegedy_problems(logits_fn, x, target, args.c)
  grad = jax.jit(jax.vmap(jax.value_and_grad(objective), in_axes=(0, None, 0)))
  variants = {"value_and_grad": lambda: grad(x, params, per_pair)}
  for direction in lb.DIRECTIONS:
    # max_iters: nobody finishes while timed.
    cfg = lb.make_config(max_iters=10_000, max_steps=10_000, direction=direction)
    state = {"s": lb._batched_init(objective, x, params, per_pair, cfg)}

    def step(state=state, cfg=cfg):
      state["s"], running = lb._batched_block(objective, state["s"], params, per_pair, cfg, 1)
      return running

    for _ in range(3):  # past the first steps, where pairs are still being stored
      step()
    variants[f"step, {direction}"] = step
  load_start = load()
  timed = rounds(variants, max(3 * args.repeats, 10))
  vg = timed["value_and_grad"][1]
  print(
    f"\nL-BFGS step at {tuple(x.shape[1:])}, {x.shape[0]} pairs, memory {cfg.memory}: "
    f"value_and_grad {vg * 1e3:.1f} ms; load {load_start:.1f} -> {load():.1f}"
  )
  print(f"{'direction':<14}{'loop step ms':>14}{'/ value_and_grad':>18}")
  out = dict(value_and_grad_ms=vg * 1e3, step_pairs=int(x.shape[0]), step_load=(load_start, load()))
  for direction in lb.DIRECTIONS:
    st = timed[f"step, {direction}"][1]
    print(f"{direction:<14}{st * 1e3:>14.1f}{st / vg:>18.2f}")
    out[f"step_ms_{direction}"], out[f"step_ratio_{direction}"] = st * 1e3, st / vg
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  skip = set(filter(None, args.skip.split(",")))
  if skip - set(SECTIONS):
    raise SystemExit(f"--skip: unknown sections {sorted(skip - set(SECTIONS))}; allowed {SECTIONS}")
  mesh = runner.pairs_mesh()
  shape = data.DATASETS[args.size].full_shape
  results: dict = dict(size=args.size, shape=shape, device=device_line(), jax=jax.__version__,
                       loadavg_start=load(), malloc_tuned=MALLOC_TUNED)  # fmt: skip
  print(f"jax {jax.__version__}; {results['device']}; {args.size} {shape}")
  print(f"malloc keeps freed memory (experiments/hostmem.py): {MALLOC_TUNED}")
  print(f"1-min load average {results['loadavg_start']:.1f} on {os.cpu_count()} cores")
  print(f"peers import TensorFlow / PyTorch: {peers.imported_frameworks() or 'neither'}")
  mms = [matmul_gflops()]
  print(f"float32 2048x2048 matmul: {mms[-1]:.0f} GFLOP/s")

  if "bim" not in skip:
    logits_fn, params, x, target = make_problem(args.n, size=args.size)
    b = bench_bim(args, logits_fn, params, x, target, mesh)
    mms.append(matmul_gflops())
    results.update(print_bim(args, b, max(mms)))
  if "lbfgs" not in skip:
    logits_fn, params, x, target = make_problem(args.lbfgs_n, size=args.size)
    results.update(print_lbfgs(args, bench_lbfgs(args, logits_fn, params, x, target, mesh)))
    mms.append(matmul_gflops())
  if "step" not in skip:
    logits_fn, params, x, target = make_problem(args.step_pairs, size=args.size)
    results.update(bench_step(args, logits_fn, params, x, target))

  mms.append(matmul_gflops())
  results.update(matmul_gflops=max(mms), matmul_gflops_each=mms, loadavg_end=load(),
                 frameworks_imported=peers.imported_frameworks())  # fmt: skip
  print(f"\nmatmul GFLOP/s measured {', '.join(f'{m:.0f}' for m in mms)} (the best counts)")
  print(f"1-min load average at the end {results['loadavg_end']:.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=float)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
