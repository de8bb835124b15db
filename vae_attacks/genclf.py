"""Generative classifiers built from VAEs: analysis by synthesis and a class-conditional VAE.

Two ways a VAE classifies besides a probe on its latent code (vae_attacks.models):

- ABS, Schott, Rauber, Bethge and Brendel (2019), "Towards the first adversarially robust neural
  network model on MNIST" (ICLR): one small VAE per class (latent dim 8). The score of class k
  for an input x is the negative of the per-class objective

      l_k(x) = min_z [ ||x - G_k(z)||^2 + 1/2 ||z||^2 ] / (H W C)

  (a Gaussian decoder G_k with the prior's log density: their `ELBOs`, with beta = 1 and the
  posterior's variance dropped), the latent found by picking the best of a fixed bank of prior
  samples (8000, the 10% least likely of 8000 / 0.9 draws dismissed) and then a few Adam steps
  (50, step 0.05) kept inside the ball ||z|| <= 5. Logits are -alpha l_k with their scale
  alpha = 440 (the "scaled softmax"; their public code, bethgelab/AnalysisBySynthesis,
  `abs_models/models.py` and `inference.py`, gives every setting used here).
- A class-conditional VAE Bayes classifier, Li, Bradshaw and Sharma (2019), "Are generative
  classifiers more robust to adversarial attacks?" (ICML): their "GFY" factorisation
  p(y) p(z | y) p(x | z, y) with a class-independent prior p(z | y) = N(0, I) (the generative
  model M2 of Kingma et al. 2014) and an encoder q(z | x, y). Class scores are the
  importance-weighted bound (Burda et al. 2016) on log p(x, y) with S samples,

      log p(x, y) >= log 1/S sum_s p(x | z_s, y) p(z_s) / q(z_s | x, y) + log p(y),

  with the uniform p(y) of balanced MNIST dropped (it cancels in the softmax). The noise of
  the S samples is fixed by a key held in the model's parameters, so the logits are a
  deterministic function of the input (needed by every attack) and differentiable.

Deviations from the papers, and why: the ABS VAEs are MLPs without BatchNorm (`ABSVAE`: the
library's modules are pure `{"params": ...}` pytrees, and dense decoders are 10x cheaper than
transposed convolutions on this CPU); the ball
projection of the latent is the true Euclidean projection (the public code's
`clip_to_sphere` drops the sign of the coordinates it rescales); ABS is the base model of
their Table 1 ("ABS"), without the input binarisation and per-class rescaling of "Binary ABS".

Attacks see either model as `logits_fn(params, x[H, W, C]) -> logits[K]`, like any classifier
(`abs_logits_fn`, `cvae_logits_fn`), plus `class_reconstructions(params, x) -> [K, H, W, C]`,
what each class's generative model makes of x (ABS's latent-descent attack moves towards it).
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from vae_attacks.types import Array, Params, PRNGKey

GRADIENTS = ("envelope", "unrolled")


# ---------------------------------------------------------------------------------------------
# ABS (Schott et al. 2019)


class ABSVAE(nn.Module):
  """One class's VAE of the ABS model: latent dim 8, Gaussian (squared-error) likelihood.

  Schott et al. (2019) use a small convolutional VAE (transposed convolutions in the decoder,
  BatchNorm, ELU). Here encoder and decoder are MLPs with ELU (flatten -> Dense(h) for h in
  `hidden` -> mean and logvar heads; the decoder mirrors it and ends in H*W*C pixel logits):
  ABS's inference decodes K classes x (8000 bank samples + 50 Adam steps) per input, and XLA's
  transposed convolutions on this CPU cost ~2 ms per decode (measured), 10x a dense decoder of
  the same width. The image is sigmoid(pixel logits).

  Attributes:
    image_shape: (H, W, C).
    latent_dim: D (8 in the paper).
    hidden: encoder widths (the decoder uses them reversed).
  """

  image_shape: Sequence[int]
  latent_dim: int = 8
  hidden: Sequence[int] = (512, 256)

  def setup(self):
    self.encoder = [nn.Dense(h) for h in self.hidden]
    self.head = nn.Dense(2 * self.latent_dim)
    self.decoder = [nn.Dense(h) for h in reversed(self.hidden)]
    self.pixels = nn.Dense(math.prod(self.image_shape))

  def encode(self, x: Array) -> tuple[Array, Array]:
    """(mean [B, D], logvar [B, D]) of q(z | x) for images x [B, H, W, C]."""
    h = x.reshape((x.shape[0], -1))
    for layer in self.encoder:
      h = nn.elu(layer(h))
    h = self.head(h)
    return h[:, : self.latent_dim], h[:, self.latent_dim :]

  def decode(self, z: Array) -> Array:
    """Images [B, H, W, C] in (0, 1) (sigmoid of the pixel logits) for codes z [B, D]."""
    h = z
    for layer in self.decoder:
      h = nn.elu(layer(h))
    return jax.nn.sigmoid(self.pixels(h)).reshape((z.shape[0], *self.image_shape))

  def __call__(self, x: Array, key: PRNGKey) -> tuple[Array, Array, Array]:
    """(image [B, H, W, C], mean [B, D], logvar [B, D]), z sampled by reparameterisation."""
    mean, logvar = self.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar


def abs_training_loss(vae: ABSVAE, params: Params, x: Array, key: PRNGKey) -> Array:
  """Mean over the batch of the ABS VAE's training objective: squared error + KL (beta = 1).

  Args:
    vae: one class's `ABSVAE`.
    params: its variables.
    x: images [B, H, W, C] of that class.
    key: the reparameterisation noise.

  Returns:
    [] sum over pixels of (x - G(z))^2 plus KL(q(z | x) || N(0, I)), averaged over the batch.
  """
  rec, mean, logvar = vae.apply(params, x, key)
  sq = jnp.sum(jnp.square(x - rec).reshape(x.shape[0], -1), -1)
  kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, -1)
  return jnp.mean(sq + kl)


def latent_bank(key: PRNGKey, n: int, dim: int, *, dismiss: float = 0.1) -> np.ndarray:
  """The fixed prior samples of ABS's first inference stage (Schott et al.'s GaussianSamples).

  Draws round(n / (1 - dismiss)) codes from N(0, I) and keeps the n most likely (smallest norm).

  Args:
    key: the bank's randomness.
    n: samples kept.
    dim: latent dimension D.
    dismiss: the fraction of draws dismissed.

  Returns:
    float32 [n, D].
  """
  draws = np.asarray(jax.random.normal(key, (int(round(n / (1.0 - dismiss))), dim)))
  order = np.argsort(np.sum(draws**2, -1), kind="stable")
  return draws[order[:n]].astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _decode_bank(vae: nn.Module, class_params: Params, z: Array) -> Array:
  """Every class's images [K, S, H, W, C] of the codes z [S, D] (one compilation per module)."""
  return jax.vmap(lambda p: vae.apply(p, z, method="decode"))(class_params)


def abs_params(vae: ABSVAE, class_params: Params, key: PRNGKey, *, n_samples: int = 8000) -> dict:
  """The variables `abs_logits_fn` takes: the stacked class VAEs and the decoded bank.

  Args:
    vae: the `ABSVAE` module (shared by the classes).
    class_params: its variables with a leading class axis K on every leaf.
    key: the bank's randomness (`latent_bank`).
    n_samples: bank size S (8000 in the paper).

  Returns:
    {"vae": class_params, "bank_z": [S, D], "bank_x": [K, S, H*W*C]}: the bank's images are
    decoded once here, not per input.
  """
  z = jnp.asarray(latent_bank(key, n_samples, vae.latent_dim))
  images = _decode_bank(vae, class_params, z)  # [K, S, H, W, C]
  return {"vae": class_params, "bank_z": z, "bank_x": images.reshape(images.shape[:2] + (-1,))}


def _project_ball(z: Array, radius: float) -> Array:
  """Euclidean projection of each row of z [K, D] onto the ball of `radius`."""
  norm = jnp.sqrt(jnp.sum(z * z, -1, keepdims=True))
  return z * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


@dataclasses.dataclass(frozen=True)
class ABSInference:
  """ABS's per-class objective and its minimisation over the latent, for ONE input.

  Attributes:
    vae: the `ABSVAE` module.
    steps: Adam steps after the bank's best sample (50 in the paper; 0 keeps the sample).
    lr: Adam's step size (0.05).
    radius: the latent is kept in the ball ||z|| <= radius (5).
    gradient: "envelope": the gradient with respect to x is that of l_k(x, z*) at the found
      latent z*, held fixed (Danskin's theorem for an exact minimiser); "unrolled": through the
      whole Adam loop.
  """

  vae: nn.Module
  steps: int = 50
  lr: float = 0.05
  radius: float = 5.0
  gradient: str = "envelope"

  def decode_all(self, vae_params: Params, z: Array) -> Array:
    """Each class's image [K, P] of its code z [K, D]."""
    imgs = jax.vmap(lambda p, zk: self.vae.apply(p, zk[None], method="decode")[0])(vae_params, z)
    return imgs.reshape(z.shape[0], -1)

  def objective(self, vae_params: Params, z: Array, x: Array) -> Array:
    """l_k(x, z_k) [K] for codes z [K, D] and one flat image x [P]."""
    rec = self.decode_all(vae_params, z)
    return (jnp.sum(jnp.square(x[None] - rec), -1) + 0.5 * jnp.sum(z * z, -1)) / x.shape[0]

  def latents(self, params: Params, x: Array) -> Array:
    """The found latent of every class, z [K, D], for a flat image x [P]."""
    if self.gradient not in GRADIENTS:
      raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
    bank_x, bank_z = params["bank_x"], params["bank_z"]
    # ||x - b||^2 for every bank image, without forming x - b: [K, S].
    sq = jnp.sum(bank_x * bank_x, -1) - 2.0 * bank_x @ x + jnp.sum(x * x)
    first = sq + 0.5 * jnp.sum(bank_z * bank_z, -1)[None]
    z = bank_z[jnp.argmin(first, -1)]
    z = lax.stop_gradient(z)  # a discrete choice: no gradient flows through it
    if self.steps == 0:
      return z
    opt = optax.adam(self.lr)
    x_in = lax.stop_gradient(x) if self.gradient == "envelope" else x
    total = lambda z: jnp.sum(self.objective(params["vae"], z, x_in))

    def step(carry, _):
      z, state = carry
      updates, state = opt.update(jax.grad(total)(z), state)
      return (_project_ball(optax.apply_updates(z, updates), self.radius), state), None

    (z, _), _ = lax.scan(step, (z, opt.init(z)), None, length=int(self.steps))
    return lax.stop_gradient(z) if self.gradient == "envelope" else z

  def __call__(self, params: Params, x: Array) -> tuple[Array, Array]:
    """(l_k [K], z [K, D]) for one image x [H, W, C]."""
    flat = x.reshape(-1)
    z = self.latents(params, flat)
    return self.objective(params["vae"], z, flat), z


@dataclasses.dataclass(frozen=True)
class _ABSLogits:
  inference: ABSInference
  logit_scale: float

  def __call__(self, params: Params, x: Array) -> Array:
    return -self.logit_scale * self.inference(params, x)[0]

  def class_reconstructions(self, params: Params, x: Array) -> Array:
    z = self.inference.latents(params, x.reshape(-1))
    return self.inference.decode_all(params["vae"], z).reshape((z.shape[0], *x.shape))


def abs_logits_fn(
  vae: nn.Module,
  *,
  steps: int = 50,
  lr: float = 0.05,
  radius: float = 5.0,
  logit_scale: float = 440.0,
  gradient: str = "envelope",
):
  """The ABS classifier as `logits_fn(params, x[H, W, C]) -> logits[K]` (Schott et al. 2019).

  Logits are -logit_scale * l_k(x) (see the module docstring); the function also has
  `class_reconstructions(params, x) -> [K, H, W, C]`, each class's image at its found latent.

  Args:
    vae: the `ABSVAE` module.
    steps, lr, radius, gradient: as in `ABSInference`.
    logit_scale: alpha of the scaled softmax (440 in the public code).

  Returns:
    A hashable pure function of (`abs_params(...)`, one image).
  """
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
  inference = ABSInference(vae, int(steps), float(lr), float(radius), gradient)
  return _ABSLogits(inference, float(logit_scale))


def per_class_rows(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
  """Training rows of the K class VAEs: row i holds the i-th example of every class.

  Classes with fewer examples than the largest repeat theirs cyclically, so every epoch shows
  each class VAE all of its examples at least once.

  Args:
    x: [N, H, W, C] images.
    y: int[N] labels in [0, K).
    num_classes: K.

  Returns:
    [M, K, H, W, C], M the largest class count.
  """
  idx = [np.flatnonzero(np.asarray(y) == k) for k in range(num_classes)]
  if any(len(i) == 0 for i in idx):
    raise ValueError("every class needs at least one training example")
  m = max(len(i) for i in idx)
  return np.stack([np.asarray(x)[i[np.arange(m) % len(i)]] for i in idx], axis=1)


# ---------------------------------------------------------------------------------------------
# Class-conditional VAE Bayes classifier (Li, Bradshaw and Sharma 2019, GFY)


class ConditionalVAE(nn.Module):
  """VAE with q(z | x, y) and p(x | z, y), Bernoulli pixels (Li et al. 2019's GFY).

  Encoder: x flattened (after 3x3 SAME convolutions with ReLU and 2x2 average pooling, one
  per entry of `features`; none by default), joined with the one-hot y, Dense + ReLU layers
  (`hidden`), two Dense heads (mean, logvar). Decoder:
  [z, one-hot y] through Dense + ReLU layers (reversed `hidden`) to the H*W*C pixel logits.

  Attributes:
    image_shape: (H, W, C).
    num_classes: K.
    latent_dim: D (64 in Li et al.).
    features: encoder convolution channels.
    hidden: Dense widths.
  """

  image_shape: Sequence[int]
  num_classes: int
  latent_dim: int = 64
  features: Sequence[int] = ()
  hidden: Sequence[int] = (500, 500)

  def setup(self):
    self.convs = [nn.Conv(f, (3, 3), padding="SAME") for f in self.features]
    self.enc_dense = [nn.Dense(h) for h in self.hidden]
    self.mean_head = nn.Dense(self.latent_dim)
    self.logvar_head = nn.Dense(self.latent_dim)
    self.dec_dense = [nn.Dense(h) for h in reversed(self.hidden)]
    self.pixel_head = nn.Dense(math.prod(self.image_shape))

  def features_of(self, x: Array) -> Array:
    """The encoder's image features [B, F] of x [B, H, W, C] (shared by every class)."""
    h = x
    for conv in self.convs:
      h = nn.avg_pool(nn.relu(conv(h)), (2, 2), strides=(2, 2), padding="SAME")
    return h.reshape((x.shape[0], -1))

  def encode_features(self, f: Array, y_onehot: Array) -> tuple[Array, Array]:
    """(mean [B, D], logvar [B, D]) of q(z | x, y) from features f [B, F] and y [B, K]."""
    h = jnp.concatenate([f, y_onehot], -1)
    for layer in self.enc_dense:
      h = nn.relu(layer(h))
    return self.mean_head(h), self.logvar_head(h)

  def decode(self, z: Array, y_onehot: Array) -> Array:
    """Bernoulli pixel logits [B, H, W, C] of p(x | z, y) for z [B, D] and y [B, K]."""
    h = jnp.concatenate([z, y_onehot], -1)
    for layer in self.dec_dense:
      h = nn.relu(layer(h))
    return self.pixel_head(h).reshape((z.shape[0], *self.image_shape))

  def __call__(self, x: Array, y_onehot: Array, key: PRNGKey) -> tuple[Array, Array, Array]:
    """(pixel logits, mean, logvar) for x [B, H, W, C], y [B, K]; z by reparameterisation."""
    mean, logvar = self.encode_features(self.features_of(x), y_onehot)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return self.decode(z, y_onehot), mean, logvar


def _log_normal(z: Array, mean: Array, logvar: Array) -> Array:
  """log N(z; mean, diag(exp(logvar))) summed over the last axis."""
  return -0.5 * jnp.sum(jnp.square(z - mean) * jnp.exp(-logvar) + logvar + jnp.log(2 * jnp.pi), -1)


def _bernoulli_loglik(pixel_logits: Array, x: Array) -> Array:
  """log p(x | z, y) summed over pixels: [S] for logits [S, P] and x [P]."""
  return -jnp.sum(optax.sigmoid_binary_cross_entropy(pixel_logits, x[None]), -1)


@dataclasses.dataclass(frozen=True)
class _CVAELogits:
  vae: nn.Module

  def _posteriors(self, params: Params, x: Array) -> tuple[Array, Array, Array]:
    k = self.vae.num_classes
    f = self.vae.apply(params["vae"], x[None], method="features_of")  # [1, F]
    eye = jnp.eye(k, dtype=x.dtype)
    mean, logvar = self.vae.apply(
      params["vae"], jnp.broadcast_to(f, (k, f.shape[-1])), eye, method="encode_features"
    )
    return mean, logvar, eye

  def __call__(self, params: Params, x: Array) -> Array:
    mean, logvar, eye = self._posteriors(params, x)  # [K, D]
    k, d = mean.shape
    eps = params["noise"].astype(x.dtype)  # [S, D], fixed
    s = eps.shape[0]
    z = mean[:, None] + jnp.exp(0.5 * logvar)[:, None] * eps[None]  # [K, S, D]
    ys = jnp.repeat(eye, s, axis=0)  # [K*S, K]
    logits = self.vae.apply(params["vae"], z.reshape(-1, d), ys, method="decode")
    loglik = _bernoulli_loglik(logits.reshape(k * s, -1), x.reshape(-1))
    log_w = (
      loglik.reshape(k, s)
      + _log_normal(z, 0.0, jnp.zeros_like(z))
      - _log_normal(z, mean[:, None], logvar[:, None])
    )
    return jax.nn.logsumexp(log_w, -1) - jnp.log(float(s))

  def class_reconstructions(self, params: Params, x: Array) -> Array:
    mean, _, eye = self._posteriors(params, x)
    logits = self.vae.apply(params["vae"], mean, eye, method="decode")
    return jax.nn.sigmoid(logits)


def cvae_logits_fn(vae: nn.Module):
  """The class-conditional VAE's Bayes classifier, `logits_fn(params, x) -> logits[K]`.

  logits_k = the importance-weighted bound on log p(x, y=k) with S samples of q(z | x, k), the
  rows of the params' `noise` (Li et al. 2019 use S = 10; Burda et al. 2016); softmax gives
  p(y | x) under the uniform p(y). Also `class_reconstructions(params, x) -> [K, H, W, C]`, the
  decoded posterior means.

  Args:
    vae: a `ConditionalVAE`.

  Returns:
    A hashable pure function of (`cvae_params(...)`, one image); the params fix the samples'
    noise, so the logits are deterministic.
  """
  return _CVAELogits(vae)


def cvae_params(vae_params: Params, key: PRNGKey, *, num_samples: int, latent_dim: int) -> dict:
  """The variables `cvae_logits_fn` takes: the VAE's and the fixed noise of its samples.

  Args:
    vae_params: the `ConditionalVAE`'s variables.
    key: draws the noise.
    num_samples: S.
    latent_dim: D.

  Returns:
    {"vae": vae_params, "noise": [S, D] standard normal draws, z_s = mean + std * noise_s}.
  """
  return {"vae": vae_params, "noise": jax.random.normal(key, (num_samples, latent_dim))}


def cvae_training_loss(vae: ConditionalVAE, params: Params, x: Array, y: Array, key) -> Array:
  """Mean negative ELBO of log p(x, y) over a batch (one sample of q(z | x, y)), in nats.

  Args:
    vae: the `ConditionalVAE`.
    params: its variables.
    x: [B, H, W, C] images in [0, 1].
    y: int[B] labels.
    key: the reparameterisation noise.

  Returns:
    [] Bernoulli reconstruction NLL + KL(q(z | x, y) || N(0, I)), averaged.
  """
  onehot = jax.nn.one_hot(y, vae.num_classes, dtype=x.dtype)
  logits, mean, logvar = vae.apply(params, x, onehot, key)
  nll = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x).reshape(x.shape[0], -1), -1)
  kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, -1)
  return jnp.mean(nll + kl)
