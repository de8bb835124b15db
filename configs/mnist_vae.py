"""MNIST: MLP and convolutional VAEs, their latent classifiers, and the judging CNN.

Run: python -m experiments.main --config=configs/mnist_vae.py --workdir=runs/mnist_vae
Quick: --config=configs/mnist_vae.py:quick
"""

from configs import base


def get_config(arg=None):
  return base.get_config(
    dataset="mnist", models=("cnn", "mlp_vae", "conv_vae"), quick=base.parse_arg(arg)
  )
