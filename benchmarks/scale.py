"""How attack sweeps scale: time, pairs/s and peak resident memory against the number of pairs,
1 versus 8 devices, and 1 versus 2 and 4 processes (jax.distributed on this machine).

  python -m benchmarks.scale [--pairs=1000,2000,4000,8000] [--big=10000] [--devices=1,8]
      [--processes=1,2,4] [--steps=10] [--json=scale.json]

Workload: targeted L-inf BIM (`experiments.attacks._bim`, the runner's call of the study), 8
epsilons, on the MNIST CNN architecture of `configs/base.py` (`config.model.cnn`), with the
configured `attacks.memory_budget_mb` choosing the chunk size, as `experiments.main` runs it.
The weights are a seeded random init of that architecture, not the trained checkpoint, and the
inputs seeded uniform noise: the cost of an attack step does not depend on the values (the same
convolutions run on any weights), so timing needs neither training nor the data.

`--steps` defaults to 8 (the study's MNIST grid uses 40) so that the whole default run, 26,000
pairs x 8 eps x 8 gradient steps, fits in about 22 minutes on a 2-core CPU (~1,400 gradient
evaluations/s on one device); time per pair is linear in the number of steps, so the figures
scale by 5 for the study's walks.

Every point runs in its own subprocess (this file with `--point`), so compilation caches, XLA's
allocator and the peak resident set of one point do not leak into the next; the child reports
its peak resident memory (VmHWM of /proc/self/status, the kernel's high-water mark of the
resident set; ru_maxrss elsewhere). The device count is set in the child's XLA_FLAGS before jax
is imported (`--xla_force_host_platform_device_count`).

Points: the ladder (`--pairs`) on the first device count of `--devices`; `--big` pairs (the
issue's 10,000 x 8 eps, which must stay under 4 GB) on the same; the smallest ladder point
on each other device count of `--devices` (the comparison with the first); and the smallest
ladder point as a run of each process count of `--processes` (experiments/cluster.py: a
localhost coordinator, gloo collectives), each process with an equal share of the CPU cores as
its XLA host devices (at least one), the runner dealing the chunks out to the processes and
gathering them on every process. A run's time is its slowest process's; the peak resident
memory is given per process (the largest), as each process holds the model, its chunks in
flight and the gathered results.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

EPS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
LIMIT_GB = 4.0


def _peak_rss_bytes() -> int:
  """This process's peak resident memory (VmHWM), in bytes."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return usage if sys.platform == "darwin" else usage * 1024


def run_point(pairs: int, steps: int, budget_mb: float, cluster: tuple | None = None) -> dict:
  """One measurement, in this process: compile, then the timed sweep (printed as JSON).
  `cluster`: (coordinator address, number of processes, this process's id) of a multi-process
  point."""
  import jax  # noqa: PLC0415  (after the parent set XLA_FLAGS)
  import numpy as np  # noqa: PLC0415

  if cluster is not None:
    address, n, i = cluster
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, n, i)

  from configs import base  # noqa: PLC0415
  from vae_attacks import models  # noqa: PLC0415
  from vae_attacks.attacks import registry, runner  # noqa: PLC0415

  config = base.get_config(dataset="mnist", models=("cnn",), quick=False)
  cnn = models.CNN(num_classes=10, **config.model.cnn)
  key = jax.random.key(0)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(pairs, 28, 28, 1)).astype(np.float32)
  target = rng.integers(0, 10, pairs).astype(np.int32)
  params = cnn.init(key, x[:1])
  mesh = runner.pairs_mesh() if jax.local_device_count() > 1 else None
  knobs = dict(norm="linf", steps=steps, step_size_rel=2.5 / steps)

  t0 = time.perf_counter()
  chunks = runner.iter_attack_chunks(
    registry.ATTACKS["bim"].run,
    models.classifier_fns(cnn),
    params,
    x,
    target,
    EPS,
    memory_budget_bytes=int(budget_mb * 2**20),
    mesh=mesh,
    progress=False,
    **knobs,
  )
  t1 = time.perf_counter()  # arguments checked, chunk size chosen, sweep compiled
  # Keep what experiments.attacks keeps per chunk (success, confidence, distortions), not x_adv.
  kept, sizes = [], []
  for sl, res in chunks:
    kept.append((res.success, res.target_prob, res.distortion))
    sizes.append(sl.stop - sl.start)
  t2 = time.perf_counter()
  success = np.concatenate([k[0] for k in kept], axis=1)
  return dict(
    pairs=pairs,
    eps=len(EPS),
    steps=steps,
    devices=jax.local_device_count(),  # per process
    processes=jax.process_count(),
    budget_mb=budget_mb,
    chunk=max(sizes),
    chunks=len(sizes),
    compile_s=t1 - t0,
    run_s=t2 - t1,
    pairs_per_s=pairs / (t2 - t1),
    grad_evals_per_s=pairs * len(EPS) * steps / (t2 - t1),
    success_rate=float(success.mean()),
    peak_rss_mb=_peak_rss_bytes() / 2**20,
  )


def measure(pairs: int, devices: int, steps: int, budget_mb: float, timeout: float) -> dict:
  """run_point in a fresh subprocess with `devices` XLA host devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  cmd = [sys.executable, "-m", "benchmarks.scale", "--point", f"--pairs={pairs}"]
  cmd += [f"--steps={steps}", f"--budget_mb={budget_mb}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"point pairs={pairs} devices={devices} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def measure_processes(
  pairs: int, processes: int, steps: int, budget_mb: float, timeout: float
) -> dict:
  """run_point as `processes` processes of one jax.distributed run on this machine, each with
  an equal share of the cores as host devices; the time of the slowest, the largest peak RSS."""
  devices = max(1, (os.cpu_count() or 1) // processes)
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  port = _free_port()
  procs = []
  for i in range(processes):
    cmd = [sys.executable, "-m", "benchmarks.scale", "--point", f"--pairs={pairs}"]
    cmd += [f"--steps={steps}", f"--budget_mb={budget_mb}"]
    cmd += [f"--cluster=localhost:{port},{processes},{i}"]
    procs.append(
      subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
  outs = []
  for i, p in enumerate(procs):
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    if p.returncode != 0:
      raise RuntimeError(f"point pairs={pairs} process {i}/{processes} failed:\n{err[-3000:]}")
    outs.append(json.loads(out.strip().splitlines()[-1]))
  slowest = max(outs, key=lambda r: r["run_s"])
  run_s = slowest["run_s"]
  return dict(
    slowest,
    compile_s=max(r["compile_s"] for r in outs),
    pairs_per_s=pairs / run_s,
    grad_evals_per_s=pairs * slowest["eps"] * steps / run_s,
    peak_rss_mb=max(r["peak_rss_mb"] for r in outs),
    peak_rss_mb_each=[r["peak_rss_mb"] for r in outs],
  )


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def table(rows: list[dict]) -> str:
  head = (
    "| pairs x eps | processes | devices per process | chunk | compile s | run s | pairs/s | "
    "grad evals/s | peak RSS per process |"
  )
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    lines.append(
      f"| {r['pairs']} x {r['eps']} | {r.get('processes', 1)} | {r['devices']} | {r['chunk']} | "
      f"{r['compile_s']:.1f} | "
      f"{r['run_s']:.1f} | {r['pairs_per_s']:.1f} | {r['grad_evals_per_s']:.0f} | "
      f"{r['peak_rss_mb'] / 1024:.2f} GB |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pairs", default="1000,2000,4000,8000", help="the ladder, comma-separated")
  parser.add_argument("--big", type=int, default=10_000, help="the memory point (0: skip)")
  parser.add_argument("--devices", default="1,8", help="device counts; the first runs the ladder")
  parser.add_argument(
    "--processes", default="1,2,4", help="process counts of the multi-process points ('': none)"
  )
  parser.add_argument("--steps", type=int, default=8, help="BIM steps (the study uses 40)")
  parser.add_argument("--budget_mb", type=float, default=None, help="default: the config's")
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per point")
  parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--cluster", default=None, help=argparse.SUPPRESS)  # address,n,id
  args = parser.parse_args(argv)
  if args.budget_mb is None:
    from configs import base  # noqa: PLC0415

    args.budget_mb = base.get_config(dataset="mnist", models=("cnn",), quick=False).attacks[
      "memory_budget_mb"
    ]
  ladder, devices = _ints(args.pairs), _ints(args.devices)
  if args.point:
    cluster = None
    if args.cluster:
      address, n, i = args.cluster.split(",")
      cluster = (address, int(n), int(i))
    print(json.dumps(run_point(ladder[0], args.steps, args.budget_mb, cluster)))
    return 0
  if not ladder or not devices or min(ladder + devices) < 1 or args.steps < 1:
    parser.error("--pairs, --devices and --steps need positive integers")

  points = [(n, devices[0]) for n in ladder]
  if args.big:
    points.append((args.big, devices[0]))
  points += [(min(ladder), d) for d in devices[1:]]
  processes = _ints(args.processes)
  print(
    f"BIM L-inf, MNIST CNN (random init), {len(EPS)} eps, {args.steps} steps, memory budget "
    f"{args.budget_mb:g} MB; {os.cpu_count()} CPU cores; load average "
    f"{os.getloadavg()[0]:.2f}",
    flush=True,
  )
  rows = []
  for n, d in points:
    rows.append(measure(n, d, args.steps, args.budget_mb, args.timeout))
    r = rows[-1]
    print(
      f"  {n} pairs on {d} device(s): {r['run_s']:.1f} s, {r['pairs_per_s']:.1f} pairs/s, "
      f"peak {r['peak_rss_mb']:.0f} MB",
      flush=True,
    )
  for p in processes:
    rows.append(measure_processes(min(ladder), p, args.steps, args.budget_mb, args.timeout))
    r = rows[-1]
    print(
      f"  {min(ladder)} pairs as {p} process(es) of {r['devices']} device(s): {r['run_s']:.1f} s, "
      f"{r['pairs_per_s']:.1f} pairs/s, peak {r['peak_rss_mb']:.0f} MB per process "
      f"(load average {os.getloadavg()[0]:.2f})",
      flush=True,
    )
  print(table(rows))
  base_rows = [
    r
    for r in rows
    if r["devices"] == devices[0] and r["pairs"] in ladder and "peak_rss_mb_each" not in r
  ]
  if len(base_rows) > 1:  # linear growth: time per pair at each size over the smallest's
    per_pair = [r["run_s"] / r["pairs"] for r in base_rows]
    ratios = ", ".join(
      f"{r['pairs']}: {p / per_pair[0]:.2f}" for r, p in zip(base_rows, per_pair, strict=True)
    )
    print(f"time per pair relative to {base_rows[0]['pairs']} pairs: {ratios}")
  if args.big:
    big = next(
      r
      for r in rows
      if r["pairs"] == args.big and r["devices"] == devices[0] and "peak_rss_mb_each" not in r
    )
    verdict = "under" if big["peak_rss_mb"] / 1024 < LIMIT_GB else "OVER"
    print(f"{args.big} pairs x {len(EPS)} eps: peak RSS {big['peak_rss_mb'] / 1024:.2f} GB, "
          f"{verdict} {LIMIT_GB:g} GB")  # fmt: skip
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        dict(rows=rows, steps=args.steps, budget_mb=args.budget_mb, load=os.getloadavg()), f
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
