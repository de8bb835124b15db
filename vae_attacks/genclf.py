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
  p(y) p(z | y) p(x | z, y) with an encoder q(z | x, y); the prior p(z | y) is learned (theirs,
  `prior="learned"`) or N(0, I) (the generative model M2 of Kingma et al. 2014), the likelihood
  their MNIST "l2" (-||x - mean||^2) or Bernoulli. Class scores are the importance-weighted
  bound (Burda et al. 2016) on log p(x, y) with S samples,

      log p(x, y) >= log 1/S sum_s p(x | z_s, y) p(z_s | y) / q(z_s | x, y) + log p(y),

  with the uniform p(y) of balanced MNIST dropped (it cancels in the softmax). The noise of
  the S samples is fixed by a key held in the model's parameters, so the logits are a
  deterministic function of the input (needed by every attack) and differentiable. Their code,
  deepgenerativeclassifier/DeepBayes (models/conv_encoder_mnist.py, conv_generator_mnist_B.py,
  alg/lowerbound_functions.py, vae_mnist.py), gives the settings of configs/study_genclf.py.

Deviations from the papers, and why: no BatchNorm in ABS's convolutional VAE (`ABSVAE`: the
library's modules are pure `{"params": ...}` pytrees), and the study's config uses its MLP
variant (a conv decoder made the inference ~8x slower on this CPU, configs/study_genclf.py); the
class-conditional VAE's decoder is dense (theirs ends in transposed convolutions, 20x the cost of
a decode, and a class score decodes K x S times); the ball
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


# Schott et al.'s class VAE (their abs_models/models.py, get_VAE; nets.py, ConvEncoder and
# ConvDecoder), VALID padding as PyTorch's default: (features, kernel, stride) per layer.
# Encoder 28 -> 24 -> 11 -> 5 -> 1 (the last layer gives the mean and logvar heads, 2 D
# channels); decoder 1 -> 4 -> 11 -> 25 -> 28 (transposed convolutions, the last to C channels).
ABS_CONV_ENCODER = ((32, 5, 1), (32, 4, 2), (64, 3, 2))
ABS_CONV_ENCODER_HEAD = (5, 1)  # kernel, stride of the head (2 D channels)
ABS_CONV_DECODER = ((32, 4, 1), (16, 5, 2), (16, 5, 2))
ABS_CONV_DECODER_OUT = (4, 1)  # kernel, stride of the last transposed convolution (C channels)
ABS_ARCHITECTURES = ("mlp", "conv")


class ABSVAE(nn.Module):
  """One class's VAE of the ABS model: latent dim 8, Gaussian (squared-error) likelihood.

  Encoder and decoder are each "conv" or "mlp" (`encoder`, `decoder`):
  - "conv": Schott et al.'s layers (`ABS_CONV_ENCODER`, `ABS_CONV_DECODER`; their public code,
    abs_models/models.py `get_VAE` and nets.py), ELU between layers, VALID padding, without
    their BatchNorm (the library's modules are pure `{"params": ...}` pytrees, with no batch
    statistics to carry; at this depth ELU nets train without it);
  - "mlp": flatten -> Dense(h) + ELU for h in `hidden` -> the mean and logvar heads; the decoder
    mirrors it (reversed `hidden`) and ends in H*W*C pixel logits.
  The image is sigmoid(pixel logits), as in their inference. ABS's inference decodes K classes x
  (8000 bank samples once, then 50 Adam steps per input) and never encodes, so the encoder's
  architecture costs only training time; the decoder's sets the cost of every attack step.
  The conv shapes fit 28 x 28 inputs (MNIST) only.

  `batch_norm` puts Schott et al.'s BatchNorm after every layer but the heads (conv -> BN ->
  ELU, as their nets.py). Training (`__call__`, `train=True`) normalises with the batch's
  statistics; `encode` and `decode` (the inference: the bank and the latent search decode
  single codes) with population statistics that `population_statistics` stores in the
  variables after training (the averaged batch statistics of "precise BN", Wu and Johnson
  2021), so the classifier stays a pure function of its variables.

  Attributes:
    image_shape: (H, W, C).
    latent_dim: D (8 in the paper).
    hidden: widths of the "mlp" parts (the decoder uses them reversed).
    encoder: "conv" or "mlp".
    decoder: "conv" or "mlp".
    beta: the weight of the latent's prior term (KL in training, 1/2 ||z||^2 in inference)
      against the squared error: 1 in Schott et al.; 2 sd^2 for a Gaussian likelihood of pixel
      standard deviation sd (their objective is that of sd^2 = 1/2).
    batch_norm: BatchNorm after each hidden layer (see above).
  """

  image_shape: Sequence[int]
  latent_dim: int = 8
  hidden: Sequence[int] = (512, 256)
  encoder: str = "mlp"
  decoder: str = "mlp"
  beta: float = 1.0
  batch_norm: bool = False

  def setup(self):
    for part in ("encoder", "decoder"):
      if getattr(self, part) not in ABS_ARCHITECTURES:
        raise ValueError(f"{part} must be one of {ABS_ARCHITECTURES}, got {getattr(self, part)!r}")
    if "conv" in (self.encoder, self.decoder) and tuple(self.image_shape[:2]) != (28, 28):
      raise ValueError(f"the conv ABS VAE needs 28 x 28 images, got {tuple(self.image_shape)}")
    if self.encoder == "conv":
      self.enc_layers = [
        nn.Conv(f, (k, k), (s, s), padding="VALID") for f, k, s in ABS_CONV_ENCODER
      ]
      k, s = ABS_CONV_ENCODER_HEAD
      self.head = nn.Conv(2 * self.latent_dim, (k, k), (s, s), padding="VALID")
    else:
      self.enc_layers = [nn.Dense(h) for h in self.hidden]
      self.head = nn.Dense(2 * self.latent_dim)
    if self.decoder == "conv":
      self.dec_layers = [
        nn.ConvTranspose(f, (k, k), (s, s), padding="VALID") for f, k, s in ABS_CONV_DECODER
      ]
      k, s = ABS_CONV_DECODER_OUT
      self.pixels = nn.ConvTranspose(self.image_shape[-1], (k, k), (s, s), padding="VALID")
    else:
      self.dec_layers = [nn.Dense(h) for h in reversed(self.hidden)]
      self.pixels = nn.Dense(math.prod(self.image_shape))
    if self.batch_norm:
      self.enc_norms = [_BatchNorm() for _ in self.enc_layers]
      self.dec_norms = [_BatchNorm() for _ in self.dec_layers]

  def _hidden(self, layers, norms, h: Array, train: bool) -> Array:
    for i, layer in enumerate(layers):
      h = layer(h)
      if self.batch_norm:
        h = norms[i](h, train)
      h = nn.elu(h)
    return h

  def encode(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    """(mean [B, D], logvar [B, D]) of q(z | x) for images x [B, H, W, C]."""
    h = x if self.encoder == "conv" else x.reshape((x.shape[0], -1))
    h = self._hidden(self.enc_layers, getattr(self, "enc_norms", None), h, train)
    h = self.head(h).reshape((x.shape[0], -1))  # conv: [B, 1, 1, 2D] -> [B, 2D]
    return h[:, : self.latent_dim], h[:, self.latent_dim :]

  def decode(self, z: Array, train: bool = False) -> Array:
    """Images [B, H, W, C] in (0, 1) (sigmoid of the pixel logits) for codes z [B, D]."""
    h = z[:, None, None, :] if self.decoder == "conv" else z
    h = self._hidden(self.dec_layers, getattr(self, "dec_norms", None), h, train)
    return jax.nn.sigmoid(self.pixels(h)).reshape((z.shape[0], *self.image_shape))

  def __call__(self, x: Array, key: PRNGKey, train: bool = True) -> tuple[Array, Array, Array]:
    """(image [B, H, W, C], mean [B, D], logvar [B, D]), z sampled by reparameterisation.

    `train`: BatchNorm (if any) with the batch's statistics (training), else the stored ones.
    """
    mean, logvar = self.encode(x, train)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return self.decode(z, train), mean, logvar


class _BatchNorm(nn.Module):
  """BatchNorm over every axis but the last, its statistics held as (untrained) variables.

  With `train` it normalises with the batch's mean and variance and sows them (collection
  "batch_stats", for `population_statistics`); otherwise with its "mean" and "var" variables,
  which training never changes (their gradient is zero) and `population_statistics` sets.
  """

  eps: float = 1e-5  # PyTorch's default, as Schott et al.'s nets

  @nn.compact
  def __call__(self, h: Array, train: bool) -> Array:
    c = h.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    if train:
      axes = tuple(range(h.ndim - 1))
      mean, var = jnp.mean(h, axes), jnp.var(h, axes)
      if not self.is_initializing():  # the variables hold "params" only
        self.sow("batch_stats", "moments", (mean, var))
    else:
      mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    lead = (1,) * (h.ndim - 1)
    factor = (scale * lax.rsqrt(var + self.eps)).reshape(lead + (c,))
    return (h - mean.reshape(lead + (c,))) * factor + bias.reshape(lead + (c,))


def population_statistics(
  vae: ABSVAE, params: Params, x: np.ndarray, key: PRNGKey, *, batch_size: int = 500
) -> Params:
  """`params` of one class VAE with its BatchNorm statistics set from the images x [N, ...].

  Each layer's mean and variance is the average over batches of `batch_size` of the batch's
  statistics in training mode ("precise BN", Wu and Johnson 2021, "Rethinking 'Batch' in
  BatchNorm"): the statistics the layers were trained with, so that the inference (which
  decodes single codes) sees the network training optimised. Without BatchNorm: `params`.
  """
  if not vae.batch_norm:
    return params
  n = (len(x) // batch_size) * batch_size or len(x)
  batches = np.asarray(x[:n]).reshape((-1, min(batch_size, n), *x.shape[1:]))
  keys = jax.random.split(key, len(batches))
  mean_stats = _mean_batch_moments(vae, {"params": params["params"]}, jnp.asarray(batches), keys)
  new = jax.tree.map(lambda a: a, params)  # a copy of the nesting
  for layer, value in mean_stats.items():
    ((m, v),) = value["moments"]
    new["params"][layer] = dict(new["params"][layer], mean=m, var=v)
  return new


def abs_training_loss(
  vae: ABSVAE, params: Params, x: Array, key: PRNGKey, train: bool = True
) -> Array:
  """Mean over the batch of the ABS VAE's training objective: squared error + beta KL.

  Args:
    vae: one class's `ABSVAE`.
    params: its variables.
    x: images [B, H, W, C] of that class.
    key: the reparameterisation noise.
    train: BatchNorm (if any) with the batch's statistics, else with the stored ones.

  Returns:
    [] sum over pixels of (x - G(z))^2 plus `vae.beta` KL(q(z | x) || N(0, I)), averaged over
    the batch.
  """
  rec, mean, logvar = vae.apply(params, x, key, train)
  sq = jnp.sum(jnp.square(x - rec).reshape(x.shape[0], -1), -1)
  kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, -1)
  return jnp.mean(sq + vae.beta * kl)


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
def _mean_batch_moments(vae: ABSVAE, params: Params, batches: Array, keys: Array) -> dict:
  """The BatchNorm layers' batch moments in training mode, averaged over batches [B, N, ...]
  (one compilation per module and shape; the batches run in a `lax.map`)."""

  def moments(args):
    xb, k = args
    _, state = vae.apply(params, xb, k, True, mutable=["batch_stats"])
    return state["batch_stats"]

  return jax.tree.map(lambda a: jnp.mean(a, 0), lax.map(moments, (batches, keys)))


def class_population_statistics(
  vae: ABSVAE, class_params: Params, rows: np.ndarray, key: PRNGKey, *, batch_size: int = 500
) -> Params:
  """`population_statistics` of each class VAE (leading class axis K) from its column of
  `per_class_rows` rows [M, K, ...]."""
  if not vae.batch_norm:
    return class_params
  k = rows.shape[1]
  pick = lambda i: jax.tree.map(lambda a: a[i], class_params)
  keys = jax.random.split(key, k)
  each = [population_statistics(vae, pick(i), rows[:, i], keys[i], batch_size=batch_size)
          for i in range(k)]  # fmt: skip
  return jax.tree.map(lambda *a: jnp.stack(a), *each)


@functools.partial(jax.jit, static_argnums=0)
def _decode_bank(vae: nn.Module, class_params: Params, z: Array) -> Array:
  """Every class's images [K, S, H, W, C] of the codes z [S, D] (one compilation per module)."""
  return per_class(vae, lambda p: vae.apply(p, z, method="decode"), class_params)


def per_class(vae: nn.Module, fn, class_params: Params, *mapped: Array):
  """`jax.vmap(fn)(class_params, *mapped)`: fn over the leading class axis K of the variables
  and of each of `mapped`.

  With a convolutional ABS VAE (`encoder` or `decoder` "conv") the K classes run as K calls
  unrolled in the trace instead: XLA batches a convolution over per-class kernels as one grouped
  convolution, which on this CPU was 2x slower (inference) to 10x slower (training) than K plain
  ones; dense layers batch well and stay vmapped.
  """
  if "conv" not in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)):
    return jax.vmap(fn)(class_params, *mapped)
  k = jax.tree.leaves(class_params)[0].shape[0]
  pick = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
  outs = [fn(pick(class_params, i), *(a[i] for a in mapped)) for i in range(k)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


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
    decode = lambda p, zk: self.vae.apply(p, zk[None], method="decode")[0]
    imgs = per_class(self.vae, decode, vae_params, z)
    return imgs.reshape(z.shape[0], -1)

  def objective(self, vae_params: Params, z: Array, x: Array) -> Array:
    """l_k(x, z_k) [K] for codes z [K, D] and one flat image x [P]."""
    rec = self.decode_all(vae_params, z)
    prior = 0.5 * self.vae.beta * jnp.sum(z * z, -1)
    return (jnp.sum(jnp.square(x[None] - rec), -1) + prior) / x.shape[0]

  def latents(self, params: Params, x: Array) -> Array:
    """The found latent of every class, z [K, D], for a flat image x [P]."""
    if self.gradient not in GRADIENTS:
      raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
    bank_x, bank_z = params["bank_x"], params["bank_z"]
    # ||x - b||^2 for every bank image, without forming x - b: [K, S].
    sq = jnp.sum(bank_x * bank_x, -1) - 2.0 * bank_x @ x + jnp.sum(x * x)
    first = sq + 0.5 * self.vae.beta * jnp.sum(bank_z * bank_z, -1)[None]
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


CVAE_LIKELIHOODS = ("bernoulli", "l2", "gaussian")
CVAE_PRIORS = ("standard", "learned")


class ConditionalVAE(nn.Module):
  """VAE with q(z | x, y), p(z | y) and p(x | z, y): Li et al. (2019)'s GFY.

  Encoder: x through 5x5 stride-2 SAME convolutions with ReLU (one per entry of `features`; none
  by default), flattened, through Dense + ReLU layers (`feature_hidden`): the image features,
  shared by every class; then joined with the one-hot y, Dense + ReLU layers (`hidden`), two
  Dense heads (mean, logvar). Li et al.'s MNIST encoder (deepgenerativeclassifier/DeepBayes,
  models/conv_encoder_mnist.py) is features (64, 64, 64), feature_hidden (500,), hidden (500,).
  Decoder: [z, one-hot y] through Dense + ReLU layers (`decoder_hidden`, reversed `hidden` when
  None), then either a Dense head to the H*W*C pixel logits (`decoder_features` empty) or, as Li
  et al.'s decoder (models/conv_generator_mnist_B.py), a Dense + ReLU layer to an s x s x f_0
  map and one 5x5 stride-2 transposed convolution per entry of `decoder_features` (ReLU between)
  up to the image: the map sizes halve back from the image with rounding up (28 <- 14 <- 7 <- 4
  for three entries), each transposed convolution's doubled output cropped to its size (their
  TensorFlow conv2d_transpose is given the output size instead).
  Prior p(z | y): N(0, I) ("standard", Kingma et al. 2014's M2) or "learned", GFY's
  y -> Dense(`prior_hidden`) + ReLU -> (mean, logvar) (conv_generator_mnist_B.py, `pzy_params`).
  Likelihood of x: "bernoulli" (pixel logits) or "l2", Li et al.'s MNIST choice (vae_mnist.py
  `ll = 'l2'`; alg/lowerbound_functions.py): log p(x | z, y) = -||x - sigmoid(logits)||^2, a
  Gaussian of variance 1/2 without its constant; or "gaussian", N(x; sigmoid(logits),
  `pixel_sd`^2 I) with its constant (a sharper likelihood for colour images, where the l2
  one's variance of 1/2 leaves the classes' bounds a nat or two apart).

  Attributes:
    image_shape: (H, W, C).
    num_classes: K.
    latent_dim: D (64 in Li et al.).
    features: encoder convolution channels.
    feature_hidden: Dense widths after the convolutions, before y joins.
    hidden: Dense widths of q(z | x, y) after y joins.
    decoder_hidden: Dense widths of p(x | z, y); None: reversed `hidden`.
    decoder_features: channels of the decoder's feature maps before the image, coarsest first
      (Li et al.: (64, 64, 64)); empty: a Dense pixel head.
    likelihood: "bernoulli", "l2" or "gaussian".
    pixel_sd: the standard deviation of the "gaussian" likelihood.
    prior: "standard" or "learned".
    prior_hidden: width of the learned prior's hidden layer.
  """

  image_shape: Sequence[int]
  num_classes: int
  latent_dim: int = 64
  features: Sequence[int] = ()
  feature_hidden: Sequence[int] = ()
  hidden: Sequence[int] = (500, 500)
  decoder_hidden: Sequence[int] | None = None
  decoder_features: Sequence[int] = ()
  likelihood: str = "bernoulli"
  pixel_sd: float = 0.1
  prior: str = "standard"
  prior_hidden: int = 500

  def setup(self):
    if self.likelihood not in CVAE_LIKELIHOODS:
      raise ValueError(f"likelihood must be one of {CVAE_LIKELIHOODS}, got {self.likelihood!r}")
    if self.prior not in CVAE_PRIORS:
      raise ValueError(f"prior must be one of {CVAE_PRIORS}, got {self.prior!r}")
    self.convs = [nn.Conv(f, (5, 5), (2, 2), padding="SAME") for f in self.features]
    self.feature_dense = [nn.Dense(h) for h in self.feature_hidden]
    self.enc_dense = [nn.Dense(h) for h in self.hidden]
    self.mean_head = nn.Dense(self.latent_dim)
    self.logvar_head = nn.Dense(self.latent_dim)
    widths = reversed(self.hidden) if self.decoder_hidden is None else self.decoder_hidden
    self.dec_dense = [nn.Dense(h) for h in widths]
    if self.decoder_features:
      h, w, c = self.image_shape
      self.map_sizes = _halvings((h, w), len(self.decoder_features))
      s0 = self.map_sizes[0]
      self.pixel_head = nn.Dense(s0[0] * s0[1] * self.decoder_features[0])
      outs = (*self.decoder_features[1:], c)
      self.deconvs = [nn.ConvTranspose(f, (5, 5), (2, 2), padding="SAME") for f in outs]
    else:
      self.pixel_head = nn.Dense(math.prod(self.image_shape))
    if self.prior == "learned":
      self.prior_layers = (nn.Dense(self.prior_hidden), nn.Dense(2 * self.latent_dim))

  def features_of(self, x: Array) -> Array:
    """The encoder's image features [B, F] of x [B, H, W, C] (shared by every class)."""
    h = x
    for conv in self.convs:
      h = nn.relu(conv(h))
    h = h.reshape((x.shape[0], -1))
    for layer in self.feature_dense:
      h = nn.relu(layer(h))
    return h

  def encode_features(self, f: Array, y_onehot: Array) -> tuple[Array, Array]:
    """(mean [B, D], logvar [B, D]) of q(z | x, y) from features f [B, F] and y [B, K]."""
    h = jnp.concatenate([f, y_onehot], -1)
    for layer in self.enc_dense:
      h = nn.relu(layer(h))
    return self.mean_head(h), self.logvar_head(h)

  def prior_of(self, y_onehot: Array) -> tuple[Array, Array]:
    """(mean [B, D], logvar [B, D]) of p(z | y) for y [B, K]."""
    if self.prior == "standard":
      zeros = jnp.zeros((y_onehot.shape[0], self.latent_dim), y_onehot.dtype)
      return zeros, zeros
    h = self.prior_layers[1](nn.relu(self.prior_layers[0](y_onehot)))
    return h[:, : self.latent_dim], h[:, self.latent_dim :]

  def decode(self, z: Array, y_onehot: Array) -> Array:
    """Pixel logits [B, H, W, C] of p(x | z, y) for z [B, D] and y [B, K]."""
    h = jnp.concatenate([z, y_onehot], -1)
    for layer in self.dec_dense:
      h = nn.relu(layer(h))
    if not self.decoder_features:
      return self.pixel_head(h).reshape((z.shape[0], *self.image_shape))
    (s0h, s0w), *rest = self.map_sizes
    h = nn.relu(self.pixel_head(h)).reshape((z.shape[0], s0h, s0w, self.decoder_features[0]))
    sizes = (*rest, tuple(self.image_shape[:2]))
    for i, (deconv, (sh, sw)) in enumerate(zip(self.deconvs, sizes, strict=True)):
      h = deconv(h)[:, :sh, :sw]
      if i + 1 < len(self.deconvs):
        h = nn.relu(h)
    return h

  def __call__(self, x: Array, y_onehot: Array, key: PRNGKey) -> tuple[Array, ...]:
    """(pixel logits, mean, logvar, prior mean, prior logvar) for x [B, H, W, C], y [B, K]:
    q(z | x, y)'s and p(z | y)'s parameters [B, D], z by reparameterisation."""
    mean, logvar = self.encode_features(self.features_of(x), y_onehot)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (self.decode(z, y_onehot), mean, logvar, *self.prior_of(y_onehot))


def _halvings(size: tuple[int, int], n: int) -> list[tuple[int, int]]:
  """The n map sizes below `size`, coarsest first, each the next one halved and rounded up."""
  sizes = [size]
  for _ in range(n):
    sizes.insert(0, tuple(-(-d // 2) for d in sizes[0]))
  return sizes[:-1]


def _log_normal(z: Array, mean: Array, logvar: Array) -> Array:
  """log N(z; mean, diag(exp(logvar))) summed over the last axis."""
  return -0.5 * jnp.sum(jnp.square(z - mean) * jnp.exp(-logvar) + logvar + jnp.log(2 * jnp.pi), -1)


def cvae_log_likelihood(likelihood: str, pixel_logits: Array, x: Array, pixel_sd: float) -> Array:
  """log p(x | z, y) summed over pixels: [B] for logits [B, ...] and x broadcastable to them.

  "bernoulli": sum x log sigmoid(l) + (1 - x) log sigmoid(-l); "l2": -sum (x - sigmoid(l))^2
  (Li et al.'s MNIST likelihood); "gaussian": sum log N(x; sigmoid(l), pixel_sd^2).
  """
  b = pixel_logits.shape[0]
  x = jnp.broadcast_to(x, pixel_logits.shape)
  if likelihood == "bernoulli":
    per = -optax.sigmoid_binary_cross_entropy(pixel_logits, x)
  elif likelihood == "l2":
    per = -jnp.square(x - jax.nn.sigmoid(pixel_logits))
  elif likelihood == "gaussian":
    per = -0.5 * jnp.square((x - jax.nn.sigmoid(pixel_logits)) / pixel_sd) - (
      math.log(pixel_sd) + 0.5 * math.log(2 * math.pi)
    )
  else:
    raise ValueError(f"likelihood must be one of {CVAE_LIKELIHOODS}, got {likelihood!r}")
  return jnp.sum(per.reshape(b, -1), -1)


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
    loglik = cvae_log_likelihood(
      self.vae.likelihood, logits.reshape(k * s, -1), x.reshape(-1), self.vae.pixel_sd
    )
    prior_mean, prior_logvar = self.vae.apply(params["vae"], eye, method="prior_of")  # [K, D]
    log_w = (
      loglik.reshape(k, s)
      + _log_normal(z, prior_mean[:, None], prior_logvar[:, None])
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
  """Mean negative ELBO of log p(x, y) over a batch (one sample of q(z | x, y)), in nats
  (log p(y) dropped: constant for the uniform p(y)).

  Args:
    vae: the `ConditionalVAE`.
    params: its variables.
    x: [B, H, W, C] images in [0, 1].
    y: int[B] labels.
    key: the reparameterisation noise.

  Returns:
    [] -log p(x | z, y) (the VAE's `likelihood`) + KL(q(z | x, y) || p(z | y)) in closed form,
    averaged. (Li et al. estimate the KL with the one sample, alg/lowerbound_functions.py; the
    closed form has the same expectation and less variance.)
  """
  onehot = jax.nn.one_hot(y, vae.num_classes, dtype=x.dtype)
  logits, mean, logvar, p_mean, p_logvar = vae.apply(params, x, onehot, key)
  nll = -cvae_log_likelihood(vae.likelihood, logits, x, vae.pixel_sd)
  return jnp.mean(nll + gaussian_kl(mean, logvar, p_mean, p_logvar))


def gaussian_kl(mean: Array, logvar: Array, p_mean: Array, p_logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(p_mean, exp(p_logvar))) of diagonal Gaussians, summed over
  the last axis."""
  ratio = (jnp.exp(logvar) + jnp.square(mean - p_mean)) * jnp.exp(-p_logvar)
  return 0.5 * jnp.sum(p_logvar - logvar + ratio - 1.0, -1)
