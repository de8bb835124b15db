"""MNIST: the CNN classifier.

Run: python -m experiments.main --config=configs/mnist_cnn.py --workdir=runs/mnist_cnn
Quick: --config=configs/mnist_cnn.py:quick
"""

from configs import base


def get_config(arg=None):
  return base.get_config(dataset="mnist", models=("cnn",), quick=base.parse_arg(arg))
