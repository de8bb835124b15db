"""Per-face cost of the LFW defences run at full size (154 x 154 x 3), to size its config.

  VAE_ATTACKS_DATA_DIR=/work/shared/data python benchmarks/lfw_defenses_cost.py \
    [--params=results/study/lfw_vae] [--faces=8] [--steps=5]

Times, after compilation, one L-inf PGD step per face (forward + input gradient) of each model
configs/lfw_defenses.py attacks: the study's CNN, its conv VAE probe and joint VAE (imported
from the committed parameters) and the siamese identifier (the CNN's architecture with an
embedding head; random weights: the cost does not depend on them), and the siamese net's
training throughput (faces/s, batch 64). Prints a table and the run's projected total from
configs/lfw_defenses.py's settings. State the load average with the figures: the CPU is shared.
"""

import argparse
import os
import pathlib
import time

import jax
import numpy as np

from configs import lfw_defenses
from experiments import models as models_lib
from vae_attacks import data as data_lib
from vae_attacks import train
from vae_attacks.attacks import runner
from vae_attacks.defenses import adversarial, siamese


def _pgd_seconds_per_face_step(logits_fn, params, x, y, steps: int) -> float:
  """Seconds per face and PGD step, the second of two identical calls (the first compiles)."""
  kw = dict(steps=steps, step_size_rel=2.5 / steps, key=jax.random.key(0), progress=False)
  for _ in range(2):
    t0 = time.perf_counter()
    res = runner.run_attack(adversarial.pgd_linf, logits_fn, params, x, y, (0.05,), **kw)
    jax.block_until_ready(res.x_adv)
    seconds = time.perf_counter() - t0
  return seconds / (len(y) * steps)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--params", default="results/study/lfw_vae")
  ap.add_argument("--faces", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--train_faces", type=int, default=128)
  args = ap.parse_args()
  c = lfw_defenses.get_config()
  data = data_lib.load(c.data)
  x = np.asarray(data.x_test[: args.faces])
  y = np.asarray(data.y_test[: args.faces], np.int32)
  folder = pathlib.Path(args.params)
  fns = {}
  for defence, model in (("none", "cnn"), ("conv_vae", "conv_vae"), ("joint_vae", "joint_vae")):
    m = models_lib.import_committed(model, c, data, folder)
    fns[defence] = (m.logits_fn, m.params)
  net = siamese.EmbeddingNet(**c.model.siamese)
  variables = net.init(jax.random.key(0), x[:1])
  centres = jax.random.normal(jax.random.key(1), (len(data.class_names), net.embedding_dim))
  temperature = float(c.defenses.siamese.temperature)
  fns["siamese"] = (
    siamese.identification_logits_fn(net, temperature=temperature),
    {"net": variables, "centres": centres},
  )
  print(f"load average {os.getloadavg()}; {args.faces} faces, {args.steps} PGD steps")
  print("| model | s per face per PGD step |\n|---|---|")
  per_step = {}
  for name, (fn, params) in fns.items():
    per_step[name] = _pgd_seconds_per_face_step(fn, params, x, y, args.steps)
    print(f"| {name} | {per_step[name]:.4f} |", flush=True)

  # Siamese training throughput: 2 epochs on a subset (the first epoch compiles).
  small = data._replace(x_train=data.x_train[: args.train_faces],
                        y_train=data.y_train[: args.train_faces])  # fmt: skip
  t = dict(c.train.siamese, epochs=2)
  _, m = siamese.train_siamese(
    net, small, key=jax.random.key(0),
    settings=train.TrainSettings.from_config(t, extra=("margin", "mining")),
  )  # fmt: skip
  print(f"siamese training: {m['examples_per_second']:.1f} faces/s (batch {t['batch_size']})")

  d = c.defenses
  a = d.attacks
  steps_per_face = len(a.eps) * (
    int(a.fgsm) + a.pgd_steps * a.restarts * (1 + int(a.impersonation))
  )
  attack_s = sum(per_step.values()) * steps_per_face * d.num_examples
  transfer_s = sum(per_step[s] for s in d.transfer.sources) * a.pgd_steps * d.num_examples
  train_s = c.train.siamese["epochs"] * len(data.x_train) / m["examples_per_second"]
  print(f"projected at load {os.getloadavg()[0]:.1f}: attacks {attack_s / 60:.1f} min, transfer "
        f"{transfer_s / 60:.1f} min, siamese training {train_s / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
  main()
