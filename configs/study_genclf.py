"""The study's MNIST part with the generative classifiers built from VAEs (issue 19).

Run: python -m experiments.main --config=configs/study_genclf.py --workdir=runs/study_genclf

The MNIST part of configs/study.py (its `design`: the same attacks, steps, budgets and shared
pairs) with two more models, attacked like the CNN through their logits:
- "abs": analysis by synthesis, Schott et al. (2019), one VAE per class (vae_attacks.genclf);
- "cvae": the Bayes classifier of a class-conditional VAE, Li, Bradshaw and Sharma (2019), GFY.
A model's robustness per pair is the minimum over the attacks of its minimal perturbation
(experiments.report). ABS's inference (8000 bank samples and 50 Adam steps per class and input)
makes every attack on it ~100x an attack on the CNN; the pairs are fewer than the study's.
"""

import ml_collections

from configs import base, mnist_vae
from configs import study as study_cfg

# Schott et al. (2019)'s inference (their public code, abs_models/models.py and inference.py).
ABS_MODEL = dict(
  latent_dim=8, hidden=(512, 256), n_samples=8000, steps=50, lr=0.05, radius=5.0,
  logit_scale=440.0, gradient="envelope",
)  # fmt: skip
# Li et al. (2019): latent dim 64, 10 importance samples per class.
CVAE_MODEL = dict(latent_dim=64, features=(), hidden=(500, 500), num_samples=10)
GENCLF_TRAIN = dict(epochs=20, batch_size=64, learning_rate=1e-3, lr_schedule="cosine")


def add_generative(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the generative classifiers' model and train sections and names to `c`, in place."""
  c.model.abs = dict(ABS_MODEL)
  c.model.cvae = dict(CVAE_MODEL)
  c.train.abs = dict(GENCLF_TRAIN)
  c.train.cvae = dict(GENCLF_TRAIN)
  c.models = (*c.models, "abs", "cvae")
  return c


def get_config(arg=None):
  quick = base.parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.name = "study_genclf"
  c.runs = ("mnist_vae",)
  c.mnist_vae = add_generative(mnist_vae.get_config("quick" if quick else None))
  study_cfg.design(c.mnist_vae)
  # The attacks that know the generative models: latent descent (run on abs and cvae only) and
  # the decision-based HopSkipJump (every model: the check that no robustness is masking).
  base.add_attacks(c.mnist_vae, "latent_descent", "hop_skip_jump")
  # Inference-heavy models: 200 shared pairs (the issue: "a few hundred pairs" on this CPU).
  c.mnist_vae.attacks.num_pairs = 200
  c.mnist_vae.attacks.vae.num_pairs = 100
  if quick:
    study_cfg._shrink(c.mnist_vae)
    c.mnist_vae.model.abs.update(n_samples=200, steps=5, hidden=(64,))
    for name in ("abs", "cvae"):
      c.mnist_vae.train[name].update(epochs=2)
    c.mnist_vae.model.cvae.update(hidden=(64,), latent_dim=8, num_samples=2)
    c.mnist_vae.attacks.hop_skip_jump.update(iterations=3, num_evals=16, bisect_steps=8)
    c.mnist_vae.attacks.latent_descent.update(steps=3, bisect_steps=4)
  return c
