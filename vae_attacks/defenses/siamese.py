"""A siamese embedding network that identifies faces by their nearest class centre.

The study's open question: is a metric-learning face identifier more robust than the CNN and
the VAE on the same people? The network maps a face to an L2-normalised embedding (a small
CNN, `models.CNN` with an embedding head), trained with the triplet loss of Schroff,
Kalenichenko and Philbin, "FaceNet" (CVPR 2015) on triplets drawn inside each minibatch
(random, or the batch-hard mining of Hermans, Beyer and Leibe, "In Defense of the Triplet Loss
for Person Re-Identification", 2017), or with the contrastive loss of Hadsell, Chopra and
LeCun (CVPR 2006). A face is identified by the class centre (the normalised mean training
embedding of each person) nearest to its embedding.

The impersonation attack (Sharif et al. 2016 call targeted attacks on face recognition
"impersonation") moves the embedding of x + d to the target person's centre. The identifier
is exposed as a classifier, `identification_logits_fn`: logits_k = -||f(x) - c_k||^2 / (2 T),
so every existing attack (`bim.bim`, `fgsm.fgsm`, `lbfgs`, `runner.run_attack`) applies
unchanged; the targeted cross-entropy pulls f(x + d) towards c_target and away from the
other centres, and success (argmax == target) is exactly "the nearest centre is the target's".

Public API (per example and jit / vmap friendly unless said otherwise):
* `EmbeddingNet(embedding_dim=64, features=(32, 64), dense=(128,), stem_stride=1,
  convs_per_stage=1, global_pool=False, dropout_rate=0.0, standardize=True)`: Flax module,
  x[B, H, W, C] -> unit-norm embeddings [B, E].
* `triplet_loss(anchor[E], positive[E], negative[E], *, margin=0.2) -> []`:
  max(0, ||a - p||^2 - ||a - n||^2 + margin).
* `contrastive_loss(e1[E], e2[E], same bool[], *, margin=1.0) -> []`:
  1/2 d^2 if same else 1/2 max(0, margin - d)^2, d = ||e1 - e2||.
* `sample_triplets(key, labels int[B], *, embeddings=None, mining="random") ->
  Triplets(positive int[B], negative int[B], valid bool[B])`: for each anchor i of a batch,
  the batch index of a positive (same label, not i) and of a negative (another label);
  "random" draws them uniformly, "hard" takes the farthest positive and the closest negative
  (needs `embeddings` [B, E]); valid is False where the batch holds no positive or no negative.
* `batch_triplet_loss(embeddings[B, E], labels[B], key, *, margin=0.2, mining="random") ->
  (loss [], valid fraction [])`: the mean triplet loss over valid anchors.
* `train_siamese(model, data, *, key, settings: train.TrainSettings, margin=0.2,
  mining="random", checkpoint_dir=None, init_params=None) -> (variables, metrics)`:
  `train.fit` (Adam, orbax checkpoints, progress lines); each epoch evaluates test_accuracy
  by nearest centre (centres from the training embeddings).
* `embed(model, params, x[N, H, W, C], *, batch_size=256) -> [N, E]` (`runner.batched_map`).
* `class_centres(embeddings[N, E], labels[N], num_classes) -> [K, E]`: normalised means.
* `identify(embedding[E], centres[K, E]) -> int[]`: the nearest centre.
* `identification_logits_fn(model, *, temperature=0.1) -> LogitsFn`: (params, x[H, W, C]) ->
  logits[K] = -||f(x) - c_k||^2 / (2 temperature), params {"net": variables,
  "centres": [K, E]}. The temperature changes the probabilities, never the argmax.
* `impersonation_attack(logits_fn, params, x, target, **bim_knobs) -> AttackResult`: targeted
  `bim.bim` on an `identification_logits_fn` (runner-compatible signature).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_attacks import models, train
from vae_attacks.attacks import base, bim, runner
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey

MINING = ("random", "hard")


class EmbeddingNet(nn.Module):
  """`models.CNN` with an `embedding_dim` head, its output scaled to unit L2 norm.

  Attributes: as `models.CNN` (`num_classes` becomes `embedding_dim`); `standardize` is on by
  default (removes global brightness and contrast, which helps on faces).
  """

  embedding_dim: int = 64
  features: Sequence[int] = (32, 64)
  dense: Sequence[int] = (128,)
  stem_stride: int = 1
  convs_per_stage: int = 1
  global_pool: bool = False
  dropout_rate: float = 0.0
  standardize: bool = True

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """Unit-norm embeddings [B, E] of images x [B, H, W, C] in [0, 1]."""
    e = models.CNN(
      num_classes=self.embedding_dim,
      features=self.features,
      dense=self.dense,
      stem_stride=self.stem_stride,
      convs_per_stage=self.convs_per_stage,
      global_pool=self.global_pool,
      dropout_rate=self.dropout_rate,
      standardize=self.standardize,
    )(x, train=train)
    return e * jax.lax.rsqrt(jnp.sum(jnp.square(e), axis=-1, keepdims=True) + 1e-12)


def _sq_dist(a: Array, b: Array) -> Array:
  return jnp.sum(jnp.square(a - b), axis=-1)


def triplet_loss(anchor: Array, positive: Array, negative: Array, *, margin: float = 0.2) -> Array:
  """FaceNet's triplet loss (Schroff et al. 2015) of one triplet of embeddings [E].

  Returns:
    [] max(0, ||anchor - positive||^2 - ||anchor - negative||^2 + margin).
  """
  return jax.nn.relu(_sq_dist(anchor, positive) - _sq_dist(anchor, negative) + margin)


def contrastive_loss(e1: Array, e2: Array, same: Array, *, margin: float = 1.0) -> Array:
  """The contrastive loss (Hadsell, Chopra and LeCun 2006) of one pair of embeddings [E].

  Returns:
    [] d^2 / 2 for a same-person pair, max(0, margin - d)^2 / 2 otherwise; d = ||e1 - e2||_2.
  """
  d = jnp.sqrt(_sq_dist(e1, e2) + 1e-12)
  return 0.5 * jnp.where(same, jnp.square(d), jnp.square(jax.nn.relu(margin - d)))


class Triplets(NamedTuple):
  """Batch indices of a positive and a negative for each anchor of a batch."""

  positive: Array  # int[B]
  negative: Array  # int[B]
  valid: Array  # bool[B]: the batch holds a positive and a negative for this anchor


def sample_triplets(
  key: PRNGKey, labels: Array, *, embeddings: Array | None = None, mining: str = "random"
) -> Triplets:
  """One triplet per anchor, from inside a batch (jit-friendly: [B, B] masks, no loops).

  Args:
    key: randomness ("random" mining).
    labels: int[B] the batch's labels.
    embeddings: [B, E], needed by "hard" mining.
    mining: "random" (a uniform positive and negative) or "hard" (batch-hard: the farthest
      positive and the closest negative, Hermans et al. 2017).

  Returns:
    Triplets(positive, negative, valid); where not valid the indices are arbitrary.
  """
  if mining not in MINING:
    raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
  b = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  pos_mask = same & ~jnp.eye(b, dtype=bool)
  neg_mask = ~same
  valid = jnp.any(pos_mask, axis=1) & jnp.any(neg_mask, axis=1)
  if mining == "random":
    k_pos, k_neg = jax.random.split(key)
    # Gumbel-max over the allowed indices: a uniform draw per row.
    pos = jnp.argmax(jnp.where(pos_mask, jax.random.gumbel(k_pos, (b, b)), -jnp.inf), axis=1)
    neg = jnp.argmax(jnp.where(neg_mask, jax.random.gumbel(k_neg, (b, b)), -jnp.inf), axis=1)
  else:
    if embeddings is None:
      raise ValueError("mining='hard' needs the batch's embeddings")
    d = jax.lax.stop_gradient(_sq_dist(embeddings[:, None, :], embeddings[None, :, :]))
    pos = jnp.argmax(jnp.where(pos_mask, d, -jnp.inf), axis=1)
    neg = jnp.argmin(jnp.where(neg_mask, d, jnp.inf), axis=1)
  return Triplets(positive=pos, negative=neg, valid=valid)


def batch_triplet_loss(
  embeddings: Array,
  labels: Array,
  key: PRNGKey,
  *,
  margin: float = 0.2,
  mining: str = "random",
) -> tuple[Array, Array]:
  """Mean triplet loss over a batch's valid anchors, triplets from `sample_triplets`.

  Args:
    embeddings: [B, E].
    labels: int[B].
    key: randomness of the triplets.
    margin: the triplet margin.
    mining: "random" or "hard".

  Returns:
    (loss [], fraction of valid anchors []); the loss is 0 when no anchor is valid.
  """
  t = sample_triplets(key, labels, embeddings=embeddings, mining=mining)
  per_anchor = jax.vmap(lambda a, p, n: triplet_loss(a, p, n, margin=margin))(
    embeddings, embeddings[t.positive], embeddings[t.negative]
  )
  n_valid = jnp.sum(t.valid)
  loss = jnp.sum(jnp.where(t.valid, per_anchor, 0.0)) / jnp.maximum(n_valid, 1)
  return loss, n_valid / labels.shape[0]


def class_centres(embeddings: Array, labels: Array, num_classes: int) -> Array:
  """[K, E] each class's mean embedding, scaled to unit norm (zero for an absent class)."""
  sums = jax.ops.segment_sum(embeddings, labels, num_segments=num_classes)
  norm = jnp.sqrt(jnp.sum(jnp.square(sums), axis=-1, keepdims=True))
  return sums / jnp.where(norm > 0, norm, 1.0)


def identify(embedding: Array, centres: Array) -> Array:
  """int[]: the index of the centre [K, E] nearest to `embedding` [E]."""
  return jnp.argmin(_sq_dist(embedding[None, :], centres))


def embed(model: EmbeddingNet, params: Params, x: Array, *, batch_size: int = 256) -> Array:
  """Embeddings [N, E] of images x [N, H, W, C] (`runner.batched_map`; host numpy)."""
  # classifier_fns is the module applied to one image: here its output is the embedding.
  return runner.batched_map(models.classifier_fns(model), params, x, batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class _IdentificationLogits:
  model: EmbeddingNet
  temperature: float

  def __call__(self, params: Params, x: Array) -> Array:
    e = self.model.apply(params["net"], x[None])[0]
    return -_sq_dist(e[None, :], params["centres"]) / (2.0 * self.temperature)


def identification_logits_fn(model: EmbeddingNet, *, temperature: float = 0.1) -> LogitsFn:
  """The nearest-centre identifier as a classifier, for ONE image (hashable; build once).

  Args:
    model: the embedding network.
    temperature: T in logits_k = -||f(x) - c_k||^2 / (2 T); it scales the probabilities and
      the cross-entropy, not the argmax (the nearest centre).

  Returns:
    `logits_fn(params, x[H, W, C]) -> logits[K]`, params {"net": variables, "centres": [K, E]}.
  """
  return _IdentificationLogits(model, float(temperature))


def impersonation_attack(
  logits_fn: LogitsFn, params: Params, x: Array, target: Array, **bim_knobs: Any
) -> base.AttackResult:
  """Impersonation: move f(x + d) to the target person's centre, for ONE pair and ONE eps.

  Targeted `bim.bim` (eps, step_size, steps, norm "linf" / "l2" / "l1", random_start, key,
  early_stop, ...) on an `identification_logits_fn`: the cross-entropy to the target pulls
  the embedding towards c_target and away from the other centres. Success: the nearest
  centre of f(x_adv) is the target's.

  Args:
    logits_fn: `identification_logits_fn(model, ...)`.
    params: {"net": variables, "centres": [K, E]}.
    x: [H, W, C] the attacker's face in [0, 1].
    target: int[] the person to impersonate.
    **bim_knobs: keyword knobs of `bim.bim` (not `targeted`).

  Returns:
    base.AttackResult (x_adv in the eps-ball and the box).
  """
  return bim.bim(logits_fn, params, x, target, targeted=True, **bim_knobs)


def train_siamese(
  model: EmbeddingNet,
  data: Any,
  *,
  key: PRNGKey,
  settings: train.TrainSettings,
  margin: float = 0.2,
  mining: str = "random",
  checkpoint_dir: str | None = None,
  init_params: Params | None = None,
) -> tuple[Params, dict]:
  """Trains the embedding network with the batch triplet loss and Adam (`train.fit`).

  Triplets are drawn inside each shuffled minibatch (`sample_triplets`), so a batch should
  hold several images per person (a batch of 64 does on LFW's 7 people). After each epoch
  the class centres of the training embeddings identify the test images.

  Args:
    model: the `EmbeddingNet`.
    data: has x_train [N, H, W, C] in [0, 1], y_train int [N], x_test, y_test.
    key: randomness of the whole run (init, shuffles, triplets, dropout, augmentation).
    settings, checkpoint_dir, init_params: as in `train.train_classifier`.
    margin: the triplet margin.
    mining: "random" or "hard" (batch-hard).

  Returns:
    (variables, metrics) with test_accuracy (nearest training centre), train_loss and the
    rest of `train.fit`'s; `class_centres(embed(...), y_train, K)` gives the centres to attack.
  """
  if mining not in MINING:
    raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
  init_key, run_key = jax.random.split(key)
  num_classes = int(max(np.max(data.y_train), np.max(data.y_test))) + 1

  def batch_loss(params, x, y, key):
    dropout_key, triplet_key = jax.random.split(key)
    e = model.apply(params, x, train=True, rngs={"dropout": dropout_key})
    loss, valid = batch_triplet_loss(e, y, triplet_key, margin=margin, mining=mining)
    return loss, {"valid": valid}

  y_train, y_test = jnp.asarray(data.y_train), jnp.asarray(data.y_test)
  x_train, x_test = jnp.asarray(data.x_train), jnp.asarray(data.x_test)
  b = settings.eval_batch_size

  def evaluate(params):
    centres = class_centres(embed(model, params, x_train, batch_size=b), y_train, num_classes)
    e_test = embed(model, params, x_test, batch_size=b)
    pred = jax.vmap(identify, in_axes=(0, None))(e_test, centres)
    return {"test_accuracy": float(jnp.mean(pred == y_test))}

  return train.fit(
    batch_loss,
    data.x_train,
    y_train.astype(jnp.int32),
    name="siamese",
    init=train.initialiser(init_params, model.init, init_key, data.x_train[:1]),
    evaluate=evaluate,
    key=run_key,
    settings=settings,
    hparams={"model": repr(model), "margin": margin, "mining": mining},
    checkpoint_dir=checkpoint_dir,
  )
