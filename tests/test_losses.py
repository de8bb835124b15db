"""Losses against hand (numpy) computations and known facts of the KL divergence."""

import chex
import jax
import numpy as np

from vae_attacks import losses


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def test_negative_elbo_equals_hand_computation():
  logits = np.array([[[2.0], [-1.0]], [[0.5], [-3.0]]], np.float32)  # [2, 2, 1]
  x = np.array([[[1.0], [0.0]], [[0.25], [1.0]]], np.float32)
  mean = np.array([0.5, -1.0, 0.0], np.float32)
  logvar = np.array([0.0, np.log(0.25), np.log(2.0)], np.float32)
  p = _sigmoid(logits.astype(np.float64))
  recon = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p))
  var = np.exp(logvar.astype(np.float64))
  kl = 0.5 * np.sum(var + mean.astype(np.float64) ** 2 - 1 - np.log(var))
  got = losses.negative_elbo(logits, x, mean, logvar)
  np.testing.assert_allclose(got, recon + kl, rtol=1e-5)
  np.testing.assert_allclose(losses.bernoulli_nll(logits, x), recon, rtol=1e-5)


def test_kl_is_zero_at_the_prior_and_matches_the_general_gaussian_formula():
  np.testing.assert_allclose(losses.gaussian_kl(np.zeros(4), np.zeros(4)), 0.0, atol=1e-7)
  mean = np.array([0.3, -2.0], np.float32)
  sigma = np.array([0.5, 1.5], np.float32)
  # KL(N(m, s^2) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2 per dimension
  expected = np.sum(-np.log(sigma) + (sigma**2 + mean**2) / 2 - 0.5)
  np.testing.assert_allclose(losses.gaussian_kl(mean, 2 * np.log(sigma)), expected, rtol=1e-5)
  assert float(losses.gaussian_kl(mean, 2 * np.log(sigma))) > 0


def test_uniform_decoder_costs_log2_nats_per_pixel():
  x = np.random.default_rng(0).uniform(size=(3, 4, 2)).astype(np.float32)
  np.testing.assert_allclose(losses.bernoulli_nll(np.zeros_like(x), x), 24 * np.log(2), rtol=1e-6)


def test_cross_entropy_and_batched_versions():
  logits = np.array([[1.0, 2.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
  labels = np.array([1, 2], np.int32)
  by_hand = [
    -(2.0 - np.log(np.exp(1.0) + np.exp(2.0) + np.exp(-1.0))),
    np.log(3.0),
  ]
  chex.assert_trees_all_close(losses.batch_cross_entropy(logits, labels), np.array(by_hand))
  rng = np.random.default_rng(1)
  pix, x, mean, logvar = (
    a.astype(np.float32)
    for a in (
      rng.normal(size=(2, 3, 3, 1)),
      rng.uniform(size=(2, 3, 3, 1)),
      *rng.normal(size=(2, 2, 4)),
    )
  )
  loop = [losses.negative_elbo(pix[i], x[i], mean[i], logvar[i]) for i in range(2)]
  batched = jax.jit(losses.batch_negative_elbo)(pix, x, mean, logvar)
  chex.assert_trees_all_close(batched, np.array(loop, np.float32), rtol=1e-5)
