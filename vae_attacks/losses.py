"""Training losses, each written for ONE example; batch them with `jax.vmap`.

The VAE objective is the negative evidence lower bound of Kingma & Welling (2014), "Auto-Encoding
Variational Bayes", with a Bernoulli decoder and a diagonal Gaussian encoder, in nats.
"""

import jax
import jax.numpy as jnp
import optax

from vae_attacks.types import Array


def cross_entropy(logits: Array, label: Array) -> Array:
  """Softmax cross-entropy -log p(label | x) in nats.

  Args:
    logits: [K] classifier outputs for one example.
    label: [] int class index.

  Returns:
    [] the loss.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def bernoulli_nll(pixel_logits: Array, x: Array) -> Array:
  """-log p(x | z) of a Bernoulli decoder, summed over pixels, in nats.

  The sigmoid cross-entropy softplus(l) - x * l, which is exact for x in {0, 1} and the usual
  continuous relaxation for grey values x in [0, 1].

  Args:
    pixel_logits: [H, W, C] decoder logits.
    x: [H, W, C] target image in [0, 1].

  Returns:
    [] the reconstruction term.
  """
  return jnp.sum(optax.sigmoid_binary_cross_entropy(pixel_logits, x))


def gaussian_kl(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, diag(exp(logvar))) || N(0, I)) in nats, in closed form.

  KL = 1/2 sum_d (exp(logvar_d) + mean_d^2 - 1 - logvar_d) (Kingma & Welling 2014, App. B).

  Args:
    mean: [D] encoder mean.
    logvar: [D] encoder log-variance.

  Returns:
    [] the divergence.
  """
  return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)


def negative_elbo(pixel_logits: Array, x: Array, mean: Array, logvar: Array) -> Array:
  """Negative ELBO of one example in nats: Bernoulli reconstruction NLL + KL to the prior.

  A single-sample estimate when `pixel_logits` decode one z ~ q(z | x).

  Args:
    pixel_logits: [H, W, C] decoder logits for a sample z ~ q(z | x).
    x: [H, W, C] image in [0, 1].
    mean: [D] encoder mean.
    logvar: [D] encoder log-variance.

  Returns:
    [] -ELBO(x) = -E_q[log p(x | z)] + KL(q(z | x) || p(z)).
  """
  return bernoulli_nll(pixel_logits, x) + gaussian_kl(mean, logvar)


batch_cross_entropy = jax.vmap(cross_entropy)  # ([B, K], [B]) -> [B]
batch_negative_elbo = jax.vmap(negative_elbo)  # ([B, H, W, C], [B, H, W, C], [B, D], [B, D]) -> [B]
