"""Shared fixtures: a PRNG key, strict rank promotion, and the real-data folder."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

DATA_ENV = "VAE_ATTACKS_DATA_DIR"


@pytest.fixture
def key():
  return jax.random.key(0)


@pytest.fixture
def real_data_dir():
  """The folder of real MNIST/LFW files, or a skip saying how to provide it."""
  value = os.environ.get(DATA_ENV)
  if not value:
    pytest.skip(f"real data not configured: set {DATA_ENV} to a folder holding mnist/ and lfw/")
  path = pathlib.Path(value)
  if not path.is_dir():
    pytest.skip(f"{DATA_ENV}={value} is not a directory")
  return path
