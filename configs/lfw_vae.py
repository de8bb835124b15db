"""LFW: MLP and convolutional VAEs, their latent classifiers, and the judging CNN.

Run: python -m experiments.main --config=configs/lfw_vae.py --workdir=runs/lfw_vae
Quick: --config=configs/lfw_vae.py:quick
"""

from configs import base


def get_config(arg=None):
  return base.get_config(
    dataset="lfw", models=("cnn", "mlp_vae", "conv_vae"), quick=base.parse_arg(arg)
  )
