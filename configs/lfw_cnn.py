"""LFW: the CNN classifier.

Run: python -m experiments.main --config=configs/lfw_cnn.py --workdir=runs/lfw_cnn
Quick: --config=configs/lfw_cnn.py:quick
"""

from configs import base


def get_config(arg=None):
  return base.get_config(dataset="lfw", models=("cnn",), quick=base.parse_arg(arg))
