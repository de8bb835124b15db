"""APGD against PGD at equal cost on the study's trained MNIST CNN, on real test images.

  VAE_ATTACKS_DATA_DIR=/work/shared/data python -m benchmarks.apgd [--n=500]
      [--eps=0.02,0.03,0.05] [--steps=40] [--params=results/study/mnist_vae/params/cnn.msgpack]
      [--ensemble]

The model is the CNN committed with the study's MNIST run (conv32-conv64-fc128, 99.4% test
accuracy; `--params` takes another flax msgpack of the same architecture, e.g. an adversarially
trained one). On the first `--n` test images it classifies correctly, untargeted L-inf attacks
with the same number of gradients:

- pgd: PGD-`steps` (Madry et al. 2018): BIM from a uniform random start, step 2.5 eps / steps
  (the study's choice) -- `steps` gradients and one forward pass;
- pgd_madry_step: the same with Madry et al.'s MNIST step, 0.01 at eps 0.3 (eps / 30);
- apgd_ce, apgd_dlr: APGD (Croce & Hein 2020) with `steps - 1` updates, i.e. `steps` gradients
  (one at the start, one per update), in a rolled loop (the default); apgd_ce_unrolled: the
  same fully unrolled, as the PGD rows are (`bim`'s default): same numbers, other timings;
- with `--ensemble`: AutoAttack's APGD part at full strength (APGD-CE and APGD-T over the 9
  other classes, 100 updates each; `vae_attacks.robustness.autoattack_apgd`) as the reference.

Prints robust accuracy (correct and not broken) per attack and eps, and each attack's compile
and run seconds (one compile serves the eps grid), with the load average: the CPU is shared.

Measured 2026-12-06 (`--n=300 --eps=0.05,0.1,0.15`, load average 31-38, jax 0.10.2), robust
accuracy at eps 0.05 / 0.1 / 0.15: pgd 0.9367 / 0.4233 / 0.0233; pgd_madry_step 0.9433 /
0.5000 / 0.0500; apgd_ce 0.9333 / 0.3933 / 0.0167; apgd_dlr 0.9333 / 0.4067 / 0.0233;
apgd_ce_unrolled the same as apgd_ce (compile 151 s against 10 s rolled; run 69 s against 92 s).
"""

import argparse
import os
import pathlib
import time

import flax.serialization
import jax
import numpy as np

from vae_attacks import data, models, robustness
from vae_attacks.attacks import registry, runner

DEFAULT_PARAMS = pathlib.Path(__file__).parent.parent / "results/study/mnist_vae/params/cnn.msgpack"
CNN = models.CNN(num_classes=10, features=(32, 64), dense=(128,))


def cnn_logits(params, x):
  return CNN.apply(params, x[None])[0]


def _timed(attack, params, x, y, eps, **knobs):
  """(success bool[E, N], compile s, run s) of one runner sweep."""
  t0 = time.perf_counter()
  chunks = runner.iter_attack_chunks(
    attack, cnn_logits, params, x, y, eps, progress=False, **knobs
  )  # compiles here
  t1 = time.perf_counter()
  success = np.concatenate([np.asarray(r.success) for _, r in chunks], axis=1)
  return success, t1 - t0, time.perf_counter() - t1


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=500)
  p.add_argument("--eps", default="0.02,0.03,0.05")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--params", default=str(DEFAULT_PARAMS))
  p.add_argument("--ensemble", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  if not os.environ.get(data.DATA_ENV):
    raise SystemExit(f"set {data.DATA_ENV} to the folder holding mnist/ (real data needed)")
  eps = tuple(float(e) for e in a.eps.split(","))
  ds = data.load(dict(name="mnist", source="local"))
  params = flax.serialization.msgpack_restore(pathlib.Path(a.params).read_bytes())
  logits = runner.batched_logits(cnn_logits, params, ds.x_test[: a.n])
  correct = np.argmax(logits, 1) == ds.y_test[: a.n]
  x, y = ds.x_test[: a.n][correct], ds.y_test[: a.n][correct]
  key = jax.random.key(a.seed)
  print(f"clean accuracy {correct.mean():.4f} on the first {a.n} test images; attacking {len(x)}")
  bim = registry.ATTACKS["bim"].run
  runs = {
    "pgd": (bim, dict(steps=a.steps, step_size_rel=2.5 / a.steps, random_start=True)),
    "pgd_madry_step": (bim, dict(steps=a.steps, step_size_rel=1 / 30, random_start=True)),
    "apgd_ce": (registry.UNTARGETED["apgd_ce"].run, dict(steps=a.steps - 1)),
    "apgd_dlr": (registry.UNTARGETED["apgd_dlr"].run, dict(steps=a.steps - 1)),
    "apgd_ce_unrolled": (registry.UNTARGETED["apgd_ce"].run, dict(steps=a.steps - 1, unroll=True)),
  }
  table = {}
  for name, (attack, knobs) in runs.items():
    extra = dict(targeted=False) if attack is bim else {}
    ok, tc, tr = _timed(attack, params, x, y, eps, norm="linf", key=key, **knobs, **extra)
    table[name] = (1 - ok.mean(axis=1)) * correct.mean(), tc, tr
    print(f"  {name}: compile {tc:.1f} s, run {tr:.1f} s", flush=True)
  if a.ensemble:
    acc, t0 = [], time.perf_counter()
    for e in eps:
      flags = robustness.autoattack_apgd(cnn_logits, params, x, y, eps=e, key=key)
      acc.append(robustness.worst_case(np.ones(len(x), bool), flags).robust_accuracy)
    table["autoattack_apgd (100 steps, CE + T x 9)"] = (
      np.asarray(acc) * correct.mean(),
      0.0,
      time.perf_counter() - t0,
    )
  load = os.getloadavg()
  print(f"\nrobust accuracy (of all {a.n} images), {a.steps} gradients per attack;")
  print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, jax {jax.__version__}")
  print("| attack | " + " | ".join(f"eps {e:g}" for e in eps) + " | compile s | run s |")
  print("|---|" + "---|" * (len(eps) + 2))
  for name, (acc, tc, tr) in table.items():
    cells = " | ".join(f"{v:.4f}" for v in acc)
    print(f"| {name} | {cells} | {tc:.1f} | {tr:.1f} |")


if __name__ == "__main__":
  main()
