"""The whole study: MNIST and LFW, CNN and VAEs, one combined summary (H0 and H1).

Run: python -m experiments.main --config=configs/study.py --workdir=runs/study
Each part is a full config of its own, overridable as e.g.
--config.lfw_vae.attacks.num_pairs=100; it runs in DIR/<part> and the combined summary goes to
DIR/summary.md.

The MNIST part runs the LFW part's attack sweep (`base.cpu_attack_budget`: FGSM, 10-step BIM,
20-iteration L-BFGS, the VAE attacks at 20 iterations), so that H1 compares the same attacks
with the same number of steps at per-pixel-matched budgets; configs/mnist_vae.py alone runs the
fuller MNIST grid.
"""

import ml_collections

from configs import base, lfw_vae, mnist_vae


def get_config(arg=None):
  quick = base.parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.name = "study"
  c.runs = ("mnist_vae", "lfw_vae")  # each VAE config also trains and attacks the CNN
  c.mnist_vae = mnist_vae.get_config("quick" if quick else None)
  if not quick:
    base.cpu_attack_budget(c.mnist_vae)
  c.lfw_vae = lfw_vae.get_config("quick" if quick else None)
  return c
