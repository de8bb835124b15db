"""Throughput of `run_attack` with pairs on 1 device vs sharded over N host devices.

Workload of PERFORMANCE.md: targeted L-inf BIM-like attack (steps unrolled) on a
conv32-conv64-fc128-fc10 CNN (3x3 SAME convs, ReLU, 2x2 average pooling) on 28x28x1 inputs,
random weights and inputs (throughput does not depend on them). Run it twice:

  python benchmarks/runner_sharding.py
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/runner_sharding.py

It prints pairs/s of the second (compiled, memoised) run for each chunk size.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vae_attacks.attacks import base, runner


def init_cnn(key):
  k = jax.random.split(key, 4)
  he = lambda key, shape, fan_in: jax.random.normal(key, shape) * np.sqrt(2.0 / fan_in)
  return {
    "c1": he(k[0], (3, 3, 1, 32), 9),
    "c2": he(k[1], (3, 3, 32, 64), 9 * 32),
    "f1": he(k[2], (7 * 7 * 64, 128), 7 * 7 * 64),
    "f2": he(k[3], (128, 10), 128),
  }


def cnn_logits(params, x):
  """conv32-pool-conv64-pool-fc128-fc10 on one example x[28, 28, 1]."""
  dn = ("NHWC", "HWIO", "NHWC")
  h = x[None]
  for name in ("c1", "c2"):
    h = jax.nn.relu(lax.conv_general_dilated(h, params[name], (1, 1), "SAME", dimension_numbers=dn))
    b, hh, ww, c = h.shape
    h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean((2, 4))
  h = jax.nn.relu(h.reshape(-1) @ params["f1"])
  return h @ params["f2"]


def bim_like(logits_fn, params, x, target, *, eps, steps, step_size):
  """Targeted L-inf BIM (Kurakin et al. 2016) with the steps unrolled."""
  loss = lambda xa: base.attack_loss(logits_fn(params, xa), target, targeted=True)

  def step(_, xa):
    xa = xa - step_size * eps * jnp.sign(jax.grad(loss)(xa))
    return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)

  x_adv = lax.fori_loop(0, steps, step, x, unroll=True)
  return base.finish(
    logits_fn, params, x, x_adv, target, targeted=True, iterations=steps,
    loss_trace=loss(x_adv)[None],
  )  # fmt: skip


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--pairs", type=int, default=256)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64])
  args = parser.parse_args()
  key = jax.random.key(0)
  params = init_cnn(key)
  x = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (args.pairs, 28, 28, 1)))
  target = np.arange(args.pairs) % 10
  mesh = runner.pairs_mesh() if len(jax.devices()) > 1 else None
  print(f"devices={len(jax.devices())} pairs={args.pairs} steps={args.steps}")
  for chunk in args.chunks:
    chunk = chunk or None
    kw = dict(chunk_size=chunk, mesh=mesh, progress=False, steps=args.steps, step_size=0.1)
    t0 = time.perf_counter()
    runner.run_attack(bim_like, cnn_logits, params, x, target, (0.1,), **kw)
    t1 = time.perf_counter()
    out = runner.run_attack(bim_like, cnn_logits, params, x, target, (0.1,), **kw)
    t2 = time.perf_counter()
    print(
      f"chunk={chunk}: first call (compile+run) {t1 - t0:.1f} s, second call {t2 - t1:.2f} s "
      f"= {args.pairs / (t2 - t1):.0f} pairs/s; success rate {out.success.mean():.2f}"
    )


if __name__ == "__main__":
  main()
