"""LFW: the CNN, the conv VAE with a probe, the jointly trained VAE, the accuracy-matched CNN.

Run: python -m experiments.main --config=configs/lfw_vae.py --workdir=runs/lfw_vae
Quick: --config=configs/lfw_vae.py:quick

The models of the study's LFW part (configs/study.py adds its attack design to this config):
- `cnn`, the classifier the VAEs are compared with (and the judge of their reconstructions);
- `conv_vae`, the convolutional VAE with a probe trained on its frozen latent mean;
- `joint_vae`, the conv VAE trained jointly with its latent classifier (Kingma et al. 2014's
  supervised objective, -ELBO + lambda x cross-entropy);
- `cnn_matched`, the CNN stopped at the probe's clean accuracy (the accuracy-matched control).
No MLP VAE on LFW since 2026-12-06: at 154x154x3 its first layer alone is 71,148 x 1,024 (147 M
parameters, 590 MB), and its probe reached 0.556 against a 0.41 prior; `mnist_vae` keeps it.
"""

from configs import base

MODELS = ("cnn", "conv_vae", "joint_vae", "cnn_matched")


def get_config(arg=None):
  return base.get_config(dataset="lfw", models=MODELS, quick=base.parse_arg(arg))
