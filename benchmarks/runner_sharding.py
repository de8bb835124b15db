"""Throughput of `run_attack` with pairs on 1 device vs sharded over N host devices.

Workload (docs/performance.md): targeted L-inf BIM (`bim.bim`, 40 unrolled steps, step eps/4) on the
MNIST CNN (`models.CNN`: conv32-conv64-fc128-fc10, 3x3 SAME convs, ReLU, 2x2 average pooling),
random weights and inputs (throughput does not depend on them), one eps. Run it twice:

  python benchmarks/runner_sharding.py
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/runner_sharding.py

It prints pairs/s of the second (compiled, memoised) run for each chunk size.
"""

import argparse
import time

import jax
import numpy as np

from vae_attacks import models
from vae_attacks.attacks import bim, runner


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--pairs", type=int, default=256)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64], help="0: from budget")
  args = parser.parse_args()
  key = jax.random.key(0)
  model = models.CNN(num_classes=10)
  x = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (args.pairs, 28, 28, 1)))
  params = model.init(key, x[:1])
  logits_fn = models.classifier_fns(model)
  target = np.arange(args.pairs) % 10
  mesh = runner.pairs_mesh() if len(jax.devices()) > 1 else None
  print(f"devices={len(jax.devices())} pairs={args.pairs} steps={args.steps}")
  for chunk in args.chunks:
    kw = dict(chunk_size=chunk or None, mesh=mesh, progress=False)
    knobs = dict(steps=args.steps, step_size=runner.EpsScaled(0.25))
    t0 = time.perf_counter()
    runner.run_attack(bim.bim, logits_fn, params, x, target, (0.1,), **kw, **knobs)
    t1 = time.perf_counter()
    out = runner.run_attack(bim.bim, logits_fn, params, x, target, (0.1,), **kw, **knobs)
    t2 = time.perf_counter()
    print(
      f"chunk={chunk or None}: first call (compile+run) {t1 - t0:.1f} s, second call "
      f"{t2 - t1:.2f} s = {args.pairs / (t2 - t1):.0f} pairs/s; success {out.success.mean():.2f}"
    )


if __name__ == "__main__":
  main()
