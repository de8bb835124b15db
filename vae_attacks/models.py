"""The models of the study: a CNN classifier, two VAEs and a classifier on the VAE's code.

Tabacof, Tavares & Valle (2016), "Adversarial Images for Variational Autoencoders", attack a
VAE's latent code; Gondim-Ribeiro, Tabacof & Valle (2018), "Adversarial Attacks on Variational
Autoencoders", compare such attacks with attacks on a plain CNN classifier and on a classifier
that reads the VAE's latent mean. All modules are Flax linen without BatchNorm, so their
variables are a pure `{"params": ...}` pytree. Shapes are read from the inputs (or from the
`image_shape` field of the VAEs); nothing assumes MNIST's 28x28x1.

Attacks never see the modules: they see per-example pure functions built once here with
`classifier_fns`, `vae_fns` and `latent_classifier_fn`. These builders return frozen
dataclasses, so two builds from equal modules compare (and hash) equal and a `jax.jit` that
takes them as static arguments does not retrace.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_attacks.types import Array, DecodeFn, EncodeFn, LogitsFn, Params, PRNGKey, ReconstructFn

# The study's models by name (config `models`, experiments/models.py's MODELS table) and kind:
# a classifier is attacked as it is, a VAE through the latent classifier on its code.
# joint_vae: a ConvVAE trained together with its latent classifier; cnn_matched: a CNN stopped
# at a weaker model's clean accuracy (the study's accuracy-matched control). The generative
# classifiers (vae_attacks.genclf: "abs", Schott et al. 2019; "cvae", Li et al. 2019) are
# attacked as classifiers through their logits, which is all the attacks need.
_BASE_KINDS = {
  "cnn": "classifier",
  "mlp_vae": "vae",
  "conv_vae": "vae",
  "joint_vae": "vae",
  "cnn_matched": "classifier",
  "abs": "classifier",
  "cvae": "classifier",
}
# Variants: another name for a base model, with its own config sections (another recipe) and
# everything else of the base (kind, module, training, wrapping). abs_long: ABS with its class
# VAEs trained longer (configs/study_genclf.py, ABS_LONG_EPOCHS).
MODEL_VARIANTS = {"abs_long": "abs"}
MODEL_KINDS = {**_BASE_KINDS, **{v: _BASE_KINDS[b] for v, b in MODEL_VARIANTS.items()}}
# The classifiers that offer `class_reconstructions` (vae_attacks.genclf): the attacks flagged
# `generative_only` in the registry (ABS's latent descent) run on these alone.
GENERATIVE_CLASSIFIERS = frozenset(
  n for n in MODEL_KINDS if MODEL_VARIANTS.get(n, n) in ("abs", "cvae")
)


def _flatten(x: Array, n_batch: int) -> Array:
  """Keep the first `n_batch` axes and flatten the rest."""
  return x.reshape(x.shape[:n_batch] + (-1,))


def conv_out_size(size: int, stride: int) -> int:
  """Spatial size after a SAME convolution (or pooling) with `stride`: ceil(size / stride)."""
  return -(-size // stride)


class CNN(nn.Module):
  """Convolutional classifier: [3x3 SAME conv, ReLU, 2x2 average pool] per stage, MLP head.

  The defaults are the usual MNIST network conv32-conv64-fc128 (Gondim-Ribeiro et al. 2018).
  Larger images take more stages (`features`), a strided first convolution (`stem_stride`),
  two convolutions per stage (`convs_per_stage`) or global average pooling (`global_pool`).

  Attributes:
    num_classes: number of logits K.
    features: output channels of each stage; each stage halves the spatial size.
    dense: widths of the hidden dense layers after the convolutions.
    stem_stride: stride of the very first convolution (2 halves a large input once more).
    convs_per_stage: 3x3 convolutions (each followed by ReLU) before each pooling.
    global_pool: average over the spatial grid instead of flattening it.
    dropout_rate: dropout before each dense layer, active only with `train=True` (rng
      stream 'dropout').
    standardize: first map each image to zero mean and unit variance over its pixels (no
      parameters; removes global brightness and contrast, which helps on faces).
  """

  num_classes: int
  features: Sequence[int] = (32, 64)
  dense: Sequence[int] = (128,)
  stem_stride: int = 1
  convs_per_stage: int = 1
  global_pool: bool = False
  dropout_rate: float = 0.0
  standardize: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """Logits of a batch.

    Args:
      x: images [B, H, W, C] in [0, 1].
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      logits [B, num_classes].
    """
    if self.standardize:
      mean = jnp.mean(x, axis=(-3, -2, -1), keepdims=True)
      std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=(-3, -2, -1), keepdims=True) + 1e-6)
      x = (x - mean) / std
    for stage, width in enumerate(self.features):
      for i in range(self.convs_per_stage):
        stride = self.stem_stride if stage == 0 and i == 0 else 1
        x = nn.relu(nn.Conv(width, (3, 3), strides=(stride, stride), padding="SAME")(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = jnp.mean(x, axis=(-3, -2)) if self.global_pool else _flatten(x, x.ndim - 3)
    for width in self.dense:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.relu(nn.Dense(width)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def _reparameterise(key: PRNGKey, mean: Array, logvar: Array) -> Array:
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


class MLPVAE(nn.Module):
  """Fully connected VAE with a diagonal Gaussian encoder and a Bernoulli decoder.

  Kingma & Welling (2014), the MNIST model of Tabacof et al. (2016). The encoder is
  flatten -> Dense(h) + ReLU for h in `hidden` -> two Dense heads (mean, logvar); the decoder
  mirrors it and ends in a Dense layer of H*W*C pixel logits.

  Attributes:
    image_shape: (H, W, C) of one example.
    latent_dim: D.
    hidden: encoder widths (the decoder uses them reversed).
  """

  image_shape: Sequence[int]
  latent_dim: int
  hidden: Sequence[int] = (512, 256)

  def setup(self):
    self.encoder_layers = [nn.Dense(h) for h in self.hidden]
    self.mean_head = nn.Dense(self.latent_dim)
    self.logvar_head = nn.Dense(self.latent_dim)
    self.decoder_layers = [nn.Dense(h) for h in reversed(self.hidden)]
    self.pixel_head = nn.Dense(math.prod(self.image_shape))

  def encode(self, x: Array) -> tuple[Array, Array]:
    """(mean [B, D], logvar [B, D]) of q(z | x) for images x [B, H, W, C]."""
    h = _flatten(x, 1)
    for layer in self.encoder_layers:
      h = nn.relu(layer(h))
    return self.mean_head(h), self.logvar_head(h)

  def decode(self, z: Array) -> Array:
    """Bernoulli pixel logits [B, H, W, C] of p(x | z) for codes z [B, D]."""
    h = z
    for layer in self.decoder_layers:
      h = nn.relu(layer(h))
    return self.pixel_head(h).reshape((z.shape[0], *self.image_shape))

  def __call__(self, x: Array, key: PRNGKey) -> tuple[Array, Array, Array]:
    """(pixel logits [B, H, W, C], mean [B, D], logvar [B, D]), z sampled by reparameterisation."""
    mean, logvar = self.encode(x)
    return self.decode(_reparameterise(key, mean, logvar)), mean, logvar


UPSAMPLING = ("subpixel", "transpose")


def depth_to_space(x: Array) -> Array:
  """[B, H, W, 4C] -> [B, 2H, 2W, C]: out[b, 2i + u, 2j + v, c] = x[b, i, j, (2u + v) C + c]."""
  b, h, w, c4 = x.shape
  c = c4 // 4
  x = x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c)


class Upsample2x(nn.Module):
  """Doubles height and width with a learnt 3x3 convolution.

  'subpixel': a SAME convolution to 4x the channels and `depth_to_space` (Shi et al. 2016,
  "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel CNN"); the
  same family of maps as a transposed convolution, and 4-7x faster than XLA's stride-2
  `ConvTranspose` on CPU (measured, fwd + bwd). 'transpose': `nn.ConvTranspose`, stride 2.

  Attributes:
    features: output channels.
    kind: 'subpixel' or 'transpose'.
  """

  features: int
  kind: str = "subpixel"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C_in] -> [B, 2H, 2W, features]."""
    if self.kind == "subpixel":
      return depth_to_space(nn.Conv(4 * self.features, (3, 3), padding="SAME")(x))
    if self.kind == "transpose":
      return nn.ConvTranspose(self.features, (3, 3), strides=(2, 2), padding="SAME")(x)
    raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {self.kind!r}")


class ConvVAE(nn.Module):
  """Convolutional VAE for larger colour images (the LFW model of Tabacof et al. 2016).

  Encoder: per entry of `features` a 3x3 stride-2 SAME convolution + ReLU, flatten, optional
  Dense + ReLU layers (`hidden`), two Dense heads (mean, logvar). Decoder: optional Dense +
  ReLU layers (reversed `hidden`), Dense + ReLU to the encoder's last grid, 2x upsamplings
  (`Upsample2x`) + ReLU back through the reversed `features`, a last 2x upsampling to C
  pixel-logit channels, and a centre crop to `image_shape` (the stride-2 sizes round up, e.g.
  154 -> 77 -> 39 -> 20 -> 10 decodes to 160).

  Attributes:
    image_shape: (H, W, C) of one example.
    latent_dim: D.
    features: encoder channels per stride-2 stage.
    hidden: Dense widths between the flattened grid and the latent heads.
    upsample: the decoder's 2x upsampling, 'subpixel' or 'transpose' (see `Upsample2x`).
  """

  image_shape: Sequence[int]
  latent_dim: int
  features: Sequence[int] = (32, 64)
  hidden: Sequence[int] = ()
  upsample: str = "subpixel"

  def _grid(self) -> tuple[int, int]:
    h, w = self.image_shape[0], self.image_shape[1]
    for _ in self.features:
      h, w = conv_out_size(h, 2), conv_out_size(w, 2)
    return h, w

  def setup(self):
    self.encoder_convs = [nn.Conv(f, (3, 3), strides=(2, 2), padding="SAME") for f in self.features]
    self.encoder_dense = [nn.Dense(h) for h in self.hidden]
    self.mean_head = nn.Dense(self.latent_dim)
    self.logvar_head = nn.Dense(self.latent_dim)
    self.decoder_dense = [nn.Dense(h) for h in reversed(self.hidden)]
    gh, gw = self._grid()
    self.grid_dense = nn.Dense(gh * gw * self.features[-1])
    self.decoder_convs = [Upsample2x(f, self.upsample) for f in reversed(self.features[:-1])]
    self.pixel_conv = Upsample2x(self.image_shape[2], self.upsample)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """(mean [B, D], logvar [B, D]) of q(z | x) for images x [B, H, W, C]."""
    h = x
    for conv in self.encoder_convs:
      h = nn.relu(conv(h))
    h = _flatten(h, 1)
    for layer in self.encoder_dense:
      h = nn.relu(layer(h))
    return self.mean_head(h), self.logvar_head(h)

  def decode(self, z: Array) -> Array:
    """Bernoulli pixel logits [B, H, W, C] of p(x | z) for codes z [B, D]."""
    h = z
    for layer in self.decoder_dense:
      h = nn.relu(layer(h))
    gh, gw = self._grid()
    h = nn.relu(self.grid_dense(h)).reshape((z.shape[0], gh, gw, self.features[-1]))
    for conv in self.decoder_convs:
      h = nn.relu(conv(h))
    h = self.pixel_conv(h)
    height, width = self.image_shape[0], self.image_shape[1]
    top, left = (h.shape[1] - height) // 2, (h.shape[2] - width) // 2
    return h[:, top : top + height, left : left + width, :]

  def __call__(self, x: Array, key: PRNGKey) -> tuple[Array, Array, Array]:
    """(pixel logits [B, H, W, C], mean [B, D], logvar [B, D]), z sampled by reparameterisation."""
    mean, logvar = self.encode(x)
    return self.decode(_reparameterise(key, mean, logvar)), mean, logvar


class LatentClassifier(nn.Module):
  """MLP on the VAE's latent mean: the "VAE as classifier" of Gondim-Ribeiro et al. (2018).

  Attributes:
    num_classes: number of logits K.
    hidden: widths of the hidden Dense + ReLU layers.
    dropout_rate: dropout after each hidden layer, active only with `train=True`.
  """

  num_classes: int
  hidden: Sequence[int] = (128,)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, z: Array, *, train: bool = False) -> Array:
    """Logits [B, K] for latent means z [B, D]; `train` enables dropout."""
    for width in self.hidden:
      z = nn.relu(nn.Dense(width)(z))
      z = nn.Dropout(self.dropout_rate, deterministic=not train)(z)
    return nn.Dense(self.num_classes)(z)


# Per-example pure functions. Frozen dataclasses: equal modules give equal, hashable functions.


@dataclasses.dataclass(frozen=True)
class _ClassifierLogits:
  model: nn.Module

  def __call__(self, params: Params, x: Array) -> Array:
    return self.model.apply(params, x[None])[0]


@dataclasses.dataclass(frozen=True)
class _Encode:
  vae: nn.Module

  def __call__(self, params: Params, x: Array) -> tuple[Array, Array]:
    mean, logvar = self.vae.apply(params, x[None], method="encode")
    return mean[0], logvar[0]


@dataclasses.dataclass(frozen=True)
class _Decode:
  vae: nn.Module

  def __call__(self, params: Params, z: Array) -> Array:
    return jax.nn.sigmoid(self.vae.apply(params, z[None], method="decode")[0])


@dataclasses.dataclass(frozen=True)
class _Reconstruct:
  vae: nn.Module

  def __call__(self, params: Params, x: Array) -> Array:
    mean, _ = _Encode(self.vae)(params, x)
    return _Decode(self.vae)(params, mean)


@dataclasses.dataclass(frozen=True)
class _LatentLogits:
  vae: nn.Module
  clf: nn.Module

  def __call__(self, params: Params, x: Array) -> Array:
    mean, _ = _Encode(self.vae)(params["vae"], x)
    return self.clf.apply(params["clf"], mean[None])[0]


class VAEFns(NamedTuple):
  """A VAE seen by an attack: pure per-example functions of (variables, one input)."""

  encode: EncodeFn  # (params, x[H, W, C]) -> (mean[D], logvar[D])
  decode: DecodeFn  # (params, z[D]) -> x[H, W, C], pixel probabilities in [0, 1]
  reconstruct: ReconstructFn  # (params, x[H, W, C]) -> decode(mean(x))


def classifier_fns(model: nn.Module) -> LogitsFn:
  """The classifier as `logits_fn(params, x[H, W, C]) -> logits[K]` for one example.

  Args:
    model: a classifier module taking [B, H, W, C] (e.g. `CNN`), evaluated with train=False.

  Returns:
    A pure function of (the module's variables, one image); build it once and reuse it.
  """
  return _ClassifierLogits(model)


def vae_fns(vae: nn.Module) -> VAEFns:
  """A VAE's encoder, decoder and mean reconstruction as per-example pure functions.

  The decoder returns pixel probabilities sigmoid(logits) (the Bernoulli mean), the image
  the latent attacks of Tabacof et al. (2016) compare with the target.

  Args:
    vae: an `MLPVAE` or `ConvVAE` (anything with `encode` and `decode` methods).

  Returns:
    `VAEFns(encode, decode, reconstruct)`, each taking the VAE's variables first.
  """
  return VAEFns(encode=_Encode(vae), decode=_Decode(vae), reconstruct=_Reconstruct(vae))


def latent_classifier_fn(vae: nn.Module, clf: nn.Module) -> LogitsFn:
  """The "VAE as classifier": `clf` applied to the VAE's latent mean, for one example.

  Args:
    vae: the (frozen) VAE whose encoder mean feeds the classifier.
    clf: a `LatentClassifier`.

  Returns:
    `logits_fn(params, x[H, W, C]) -> logits[K]` with params `{"vae": ..., "clf": ...}`.
  """
  return _LatentLogits(vae, clf)


def param_count(params: Params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree.leaves(params))
