"""Batched attacks against per-example loops, side by side (workload: docs/performance.md).

  python -m benchmarks.attacks [--n=256] [--steps=40] [--lbfgs_iters=50] [--json=PATH]
  python -m benchmarks.attacks --size=lfw --n=16 --skip=bim --scipy_n=4   # 154x154x3

On the MNIST CNN (`models.CNN(num_classes=10)`: conv32-conv64-fc128-fc10, random weights) and
N random MNIST-like pairs (80% of the pixels 0, the box matters):

- BIM (L-inf, targeted, `steps` unrolled steps): a Python loop over a jitted one-pair attack,
  against `jit(vmap(bim))` on one device and with the pairs sharded over the host devices
  (a 1-D mesh over the pairs axis; this process sets
  `XLA_FLAGS=--xla_force_host_platform_device_count=2` before importing jax).
  The achieved GFLOP/s (FLOPs from XLA's cost analysis of the compiled batched attack) are set
  against a float32 2048x2048 matmul in the same run.
- L-BFGS on the Szegedy objective c * ||x_adv - x||^2 + CE(x_adv, target) (fixed c) with the
  same iteration budget: scipy's `fmin_l_bfgs_b` per example (a jitted value_and_grad,
  float64 on the host) against the batched attack, as `jit(vmap(lbfgs))` (the fully compiled
  while loop the runner uses) and as `lbfgs_batch` (a host loop over jitted steps) on one
  device and sharded. Mean final objectives are reported for both.

`--size=lfw` runs the same on the study's LFW CNN (configs/base.py: 154x154x3 inputs, 7
classes). The rows `runner_compiled` and `runner_host_loop` are the runner's two L-BFGS paths
(`runner.run_attack` with and without `batched=lbfgs_batch`, pairs sharded over the mesh); the
runs take the host loop (`registry.ATTACKS["lbfgs"].batched`).

Timings are the best of `--repeats` runs after a compiling run; compile times are printed.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  ).strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import base  # noqa: E402
from vae_attacks import data, models  # noqa: E402
from vae_attacks.attacks import lbfgs as lb  # noqa: E402
from vae_attacks.attacks import registry, runner  # noqa: E402
from vae_attacks.attacks.bim import bim  # noqa: E402

CLASSES = {"mnist": 10, "lfw": 7}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--size", choices=sorted(CLASSES), default="mnist", help="problem size")
  p.add_argument("--n", type=int, default=256, help="pairs")
  p.add_argument("--steps", type=int, default=40, help="BIM steps")
  p.add_argument("--eps", type=float, default=0.1, help="BIM L-inf radius")
  p.add_argument("--lbfgs_iters", type=int, default=50, help="L-BFGS iteration budget")
  p.add_argument("--c", type=float, default=0.1, help="Szegedy penalty c")
  p.add_argument("--scipy_n", type=int, default=None, help="pairs for scipy (default: all)")
  p.add_argument("--repeats", type=int, default=2, help="timed runs of each batched variant")
  p.add_argument("--skip", default="", help="comma list of sections to skip: bim,lbfgs")
  p.add_argument("--json", default=None, help="write the numbers here")
  return p.parse_args(argv)


def timed(fn, repeats: int) -> tuple[float, float, object]:
  """(compile+first run seconds, best of `repeats` seconds, last output)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return first, best, out


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
  _, best, _ = timed(lambda: f(a, a), repeats)
  return 2 * 2048**3 / best / 1e9


def bench_bim(args, logits_fn, params, x, target, mesh) -> dict:
  n = x.shape[0]
  attack = functools.partial(
    bim, logits_fn, eps=args.eps, step_size=args.eps / 10, steps=args.steps, norm="linf"
  )
  one = jax.jit(attack)

  def loop():
    return [one(params, x[i], target[i]).x_adv for i in range(n)]

  batched_fn = jax.vmap(attack, in_axes=(None, 0, 0))
  batched = jax.jit(batched_fn)
  rep, by_pair = NamedSharding(mesh, P()), NamedSharding(mesh, P(runner.PAIRS_AXIS))
  sharded = jax.jit(batched_fn, in_shardings=(rep, by_pair, by_pair), out_shardings=by_pair)
  xs, ts = jax.device_put(x, by_pair), jax.device_put(target, by_pair)
  ps = jax.device_put(params, rep)

  flops = batched.lower(params, x, target).compile().cost_analysis()["flops"]
  rows = {}
  first, best, _ = timed(loop, 1)
  rows["loop"] = (first, best)
  first, best, out_b = timed(lambda: batched(params, x, target), args.repeats)
  rows["batched"] = (first, best)
  first, best, out_s = timed(lambda: sharded(ps, xs, ts), args.repeats)
  rows["sharded"] = (first, best)
  np.testing.assert_allclose(out_b.x_adv, out_s.x_adv, atol=1e-5)
  return {"rows": rows, "flops": flops, "success": float(np.mean(out_s.success))}


def szegedy(logits_fn, c):
  """The batched objective (x_adv, params, (x, target)) -> scalar of `minimise_box_batched`."""

  def objective(x_adv, params, per_pair):
    x, target = per_pair
    return lb.szegedy_objective(logits_fn, params, x, target, jnp.float32(c), x_adv)

  return objective


def bench_lbfgs(args, logits_fn, params, x, target, mesh) -> dict:
  n = x.shape[0]
  objective = szegedy(logits_fn, args.c)
  knobs = dict(max_iters=args.lbfgs_iters)
  rows, objectives = {}, {}

  # scipy per example: a jitted value_and_grad, float64 on the host.
  value_and_grad = jax.jit(jax.value_and_grad(objective))
  n_scipy = n if args.scipy_n is None else min(n, args.scipy_n)

  def scipy_one(i):
    xi, ti = x[i], target[i]

    def fun(z):
      v, g = value_and_grad(z.reshape(xi.shape).astype(np.float32), params, (xi, ti))
      return float(v), np.asarray(g, np.float64).ravel()

    z0 = np.asarray(xi, np.float64).ravel()
    _, f, info = scipy.optimize.fmin_l_bfgs_b(
      fun, z0, bounds=[(0.0, 1.0)] * z0.size, m=10, maxiter=args.lbfgs_iters
    )
    return f, info["nit"], info["funcalls"]

  scipy_one(0)  # compile
  t0 = time.perf_counter()
  out = [scipy_one(i) for i in range(n_scipy)]
  rows["scipy"] = (np.nan, (time.perf_counter() - t0) * n / n_scipy)  # scaled to n pairs
  objectives["scipy"] = np.array([o[0] for o in out])
  scipy_iters = np.mean([o[1] for o in out])
  scipy_evals = np.mean([o[2] for o in out])

  # Fully compiled: jit(vmap(lbfgs)) -- the rolled while loop, as the runner runs it.
  compiled = jax.jit(
    jax.vmap(
      lambda params, xi, ti: lb.lbfgs(logits_fn, params, xi, ti, eps=args.c, **knobs),
      in_axes=(None, 0, 0),
    )
  )
  first, best, res = timed(lambda: compiled(params, x, target), args.repeats)
  rows["vmap_while"] = (first, best)
  stats = {"vmap_while": res}

  # Host loop over compiled steps (lbfgs_batch), on one device and sharded over the mesh.
  rep, by_pair = NamedSharding(mesh, P()), NamedSharding(mesh, P(runner.PAIRS_AXIS))
  placements = {
    "blocks": (params, x, target),
    "blocks_sharded": (
      jax.device_put(params, rep),
      jax.device_put(x, by_pair),
      jax.device_put(target, by_pair),
    ),
  }
  for name, (p_, x_, t_) in placements.items():
    run = lambda p_=p_, x_=x_, t_=t_: lb.lbfgs_batch(logits_fn, p_, x_, t_, eps=args.c, **knobs)
    first, best, res = timed(run, args.repeats)
    rows[name] = (first, best)
    stats[name] = res
  # The runner's two paths, as the runs call them (pairs sharded over the mesh, [E=1, P]).
  spec = registry.ATTACKS["lbfgs"]
  for name, batched in (("runner_compiled", None), ("runner_host_loop", spec.batched)):
    run = lambda batched=batched: jax.tree.map(
      lambda a: a[0],
      runner.run_attack(
        spec.run, logits_fn, params, np.asarray(x), np.asarray(target), (args.c,),
        mesh=mesh, progress=False, batched=batched, max_iters=args.lbfgs_iters,
      ),
    )  # fmt: skip
    first, best, res = timed(run, args.repeats)
    rows[name] = (first, best)
    stats[name] = res
  for name, res in stats.items():
    objectives[name] = np.asarray(res.loss_trace[:, -1])  # the trace is padded: final value
  return {
    "rows": rows,
    "objectives": objectives,
    "n_scipy": n_scipy,
    "scipy_iters": scipy_iters,
    "scipy_evals": scipy_evals,
    "iters": {k: float(np.mean(r.iterations)) for k, r in stats.items()},
    "success": {k: float(np.mean(r.success)) for k, r in stats.items()},
  }


def main(argv=None) -> dict:
  args = parse_args(argv)
  skip = set(filter(None, args.skip.split(",")))
  n = args.n
  mesh = runner.pairs_mesh()
  shape = data.DATASETS[args.size].full_shape
  print(f"jax {jax.__version__}, devices {jax.devices()}, N={n} pairs of {args.size} {shape}")
  logits_fn, params, x, target = make_problem(n, size=args.size)
  results: dict = {
    "n": n, "size": args.size, "devices": len(jax.devices()), "loadavg_start": os.getloadavg()[0]
  }  # fmt: skip
  print(f"1-min load average {results['loadavg_start']:.1f} on {os.cpu_count()} cores")

  mm = matmul_gflops()
  results["matmul_gflops"] = mm
  print(f"float32 2048x2048 matmul: {mm:.1f} GFLOP/s (measured again after BIM; the best counts)")

  if "bim" not in skip:
    b = bench_bim(args, logits_fn, params, x, target, mesh)
    mm = max(mm, matmul_gflops())
    results["matmul_gflops"] = mm
    print(f"float32 2048x2048 matmul, best of both measurements: {mm:.1f} GFLOP/s")
    print(f"\nBIM L-inf, eps={args.eps}, {args.steps} unrolled steps (success {b['success']:.2f})")
    print(f"{'variant':<28}{'ex/s':>10}{'vs loop':>10}{'GFLOP/s':>10}{'compile+1st s':>15}")
    loop_rate = n / b["rows"]["loop"][1]
    for name, (first, best) in b["rows"].items():
      rate, gf = n / best, b["flops"] / best / 1e9
      print(f"{name:<28}{rate:>10.1f}{rate / loop_rate:>10.2f}{gf:>10.1f}{first:>15.1f}")
    best_name = max(("batched", "sharded"), key=lambda k: n / b["rows"][k][1])
    results.update(
      bim_loop_ex_per_s=loop_rate,
      bim_batched_ex_per_s=n / b["rows"][best_name][1],
      bim_batched_variant=best_name,
      bim_batched_1dev_ex_per_s=n / b["rows"]["batched"][1],
      bim_sharded_ex_per_s=n / b["rows"]["sharded"][1],
      bim_gflops=b["flops"] / b["rows"][best_name][1] / 1e9,
      bim_mflop_per_example_step=b["flops"] / n / args.steps / 1e6,
    )
    print(
      f"BIM FLOPs (XLA cost analysis): {b['flops'] / n / args.steps / 1e6:.1f} MFLOP per "
      f"example-step; best batched = {results['bim_gflops'] / mm:.0%} of the matmul rate"
    )

  if "lbfgs" not in skip:
    r = bench_lbfgs(args, logits_fn, params, x, target, mesh)
    m = r["n_scipy"]
    print(
      f"\nL-BFGS, Szegedy objective c={args.c}, {args.lbfgs_iters} iterations "
      f"(scipy on {m} pairs, rate scaled to N; objectives over those {m} pairs)"
    )
    print(f"{'variant':<28}{'ex/s':>10}{'vs scipy':>10}{'mean obj':>12}{'iters':>8}{'1st s':>8}")
    scipy_rate = n / r["rows"]["scipy"][1]
    for name, (first, best) in r["rows"].items():
      rate = n / best
      obj = r["objectives"][name][:m].mean()
      iters = r["scipy_iters"] if name == "scipy" else r["iters"][name]
      print(
        f"{name:<28}{rate:>10.1f}{rate / scipy_rate:>10.2f}{obj:>12.6f}{iters:>8.1f}{first:>8.1f}"
      )
    print(f"scipy: {r['scipy_evals']:.1f} function+gradient evaluations per pair")
    batched = [k for k in r["rows"] if k != "scipy"]
    best_name = max(batched, key=lambda k: n / r["rows"][k][1])
    results.update(
      lbfgs_scipy_ex_per_s=scipy_rate,
      lbfgs_batched_ex_per_s=n / r["rows"][best_name][1],
      lbfgs_batched_variant=best_name,
      lbfgs_objective_scipy=float(r["objectives"]["scipy"].mean()),
      lbfgs_objective_batched=float(r["objectives"][best_name][:m].mean()),
      lbfgs_variants_ex_per_s={k: n / r["rows"][k][1] for k in batched},
      lbfgs_scipy_pairs=m,
    )

  results["loadavg_end"] = os.getloadavg()[0]
  print(f"\n1-min load average at the end {results['loadavg_end']:.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=float)
    print(f"\nwrote {args.json}")
  return results


if __name__ == "__main__":
  main()
