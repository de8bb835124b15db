"""Siamese identification: losses by hand, the triplet sampler, nearest-centre identification,
training on toy faces, and the impersonation attack (ball, box, reaching the target)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_attacks import train
from vae_attacks.defenses import siamese

SIZE = 8
K = 3


def _toy(n, seed, noise=0.1):
  """Person k: a bright 3x3 block at corner k on noise (as tests/test_train.py)."""
  rng = np.random.default_rng(seed)
  corners = [(0, 0), (0, SIZE - 3), (SIZE - 3, 0)]
  y = (np.arange(n) % K).astype(np.int32)
  rng.shuffle(y)
  x = np.clip(0.2 + noise * rng.normal(size=(n, SIZE, SIZE, 1)), 0, 1).astype(np.float32)
  for i, k in enumerate(y):
    r, c = corners[k]
    x[i, r : r + 3, c : c + 3, 0] = 0.9
  return x, y


def test_triplet_loss_by_hand():
  a, p, n = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), jnp.array([0.6, 0.8])
  # ||a - p||^2 = 2, ||a - n||^2 = 0.4^2 + 0.8^2 = 0.8: 2 - 0.8 + 0.2 = 1.4.
  np.testing.assert_allclose(siamese.triplet_loss(a, p, n, margin=0.2), 1.4, rtol=1e-6)
  # Swapped, the negative is far enough: 0.8 - 2 + 0.2 < 0 gives 0.
  assert float(siamese.triplet_loss(a, n, p, margin=0.2)) == 0.0
  # Inside the margin: 0.8 - 2 + 1.5 = 0.3.
  np.testing.assert_allclose(siamese.triplet_loss(a, n, p, margin=1.5), 0.3, rtol=1e-5)


def test_contrastive_loss_by_hand():
  e1, e2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])  # d = sqrt(2)
  np.testing.assert_allclose(siamese.contrastive_loss(e1, e2, True), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
    siamese.contrastive_loss(e1, e2, False, margin=2.0), 0.5 * (2 - np.sqrt(2)) ** 2, rtol=1e-5
  )
  assert float(siamese.contrastive_loss(e1, e2, False, margin=1.0)) == 0.0


def test_sampler_and_batch_loss_match_a_loop(key):
  labels = jnp.array([0, 1, 0, 2, 1, 0, 3, 1], jnp.int32)  # class 2 and 3: no positive
  e = jax.random.normal(key, (8, 4))
  e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
  lab, emb = np.asarray(labels), np.asarray(e)
  valid = np.array([np.sum(lab == lab[i]) > 1 for i in range(8)])
  sample = jax.jit(siamese.sample_triplets, static_argnames="mining")
  for mining in ("random", "hard"):
    seen_pos = set()
    for s in range(20):
      t = sample(jax.random.fold_in(key, s), labels, embeddings=e, mining=mining)
      np.testing.assert_array_equal(t.valid, valid)
      pos, neg = np.asarray(t.positive), np.asarray(t.negative)
      for i in np.flatnonzero(valid):
        assert lab[pos[i]] == lab[i] and pos[i] != i
        assert lab[neg[i]] != lab[i]
        seen_pos.add((i, pos[i]))
      if mining == "hard":
        d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
        for i in np.flatnonzero(valid):
          same = np.flatnonzero((lab == lab[i]) & (np.arange(8) != i))
          other = np.flatnonzero(lab != lab[i])
          assert d[i, pos[i]] == pytest.approx(d[i, same].max(), rel=1e-5)
          assert d[i, neg[i]] == pytest.approx(d[i, other].min(), rel=1e-5)
    if mining == "random":  # every (anchor, positive) pair of the batch gets drawn
      pairs = {(i, j) for i in range(8) for j in range(8) if i != j and lab[i] == lab[j]}
      assert seen_pos == pairs
    loss, frac = siamese.batch_triplet_loss(e, labels, key, margin=0.5, mining=mining)
    t = siamese.sample_triplets(key, labels, embeddings=e, mining=mining)
    pos, neg = np.asarray(t.positive), np.asarray(t.negative)
    by_hand = [
      max(0.0, ((emb[i] - emb[pos[i]]) ** 2).sum() - ((emb[i] - emb[neg[i]]) ** 2).sum() + 0.5)
      for i in np.flatnonzero(valid)
    ]
    np.testing.assert_allclose(loss, np.mean(by_hand), rtol=1e-5)
    np.testing.assert_allclose(frac, valid.mean())


def test_nearest_centre_on_separable_embeddings():
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(4, 16))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  labels = np.repeat(np.arange(4), 25)
  e = directions[labels] + 0.1 * rng.normal(size=(100, 16))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  centres = siamese.class_centres(jnp.asarray(e), jnp.asarray(labels), 4)
  means = np.stack([e[labels == k].mean(0) for k in range(4)])
  np.testing.assert_allclose(centres, means / np.linalg.norm(means, axis=1, keepdims=True), 1e-5)
  pred = jax.vmap(siamese.identify, in_axes=(0, None))(jnp.asarray(e), centres)
  np.testing.assert_array_equal(pred, labels)
  # The logits view agrees: argmax of -||e - c_k||^2 is the nearest centre.
  logits = -((e[:, None] - np.asarray(centres)[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.argmax(logits, 1), labels)


@pytest.fixture(scope="module")
def trained():
  x_train, y_train = _toy(96, 0)
  x_test, y_test = _toy(48, 1)
  data = types.SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  model = siamese.EmbeddingNet(embedding_dim=8, features=(4,), dense=(16,))
  params, metrics = siamese.train_siamese(
    model,
    data,
    key=jax.random.key(0),
    settings=train.TrainSettings(epochs=4, batch_size=24, learning_rate=1e-2),
  )
  centres = siamese.class_centres(siamese.embed(model, params, x_train), jnp.asarray(y_train), K)
  return model, params, centres, data, metrics


def test_training_lowers_loss_and_identifies(trained):
  model, params, centres, data, metrics = trained
  assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
  assert metrics["test_accuracy"] > 0.9  # chance is 1/3
  e = siamese.embed(model, params, data.x_test[:5])
  np.testing.assert_allclose(jnp.linalg.norm(e, axis=1), 1.0, rtol=1e-5)  # unit embeddings
  fn = siamese.identification_logits_fn(model, temperature=0.1)
  logits = jax.vmap(fn, in_axes=(None, 0))({"net": params, "centres": centres}, data.x_test)
  assert float(jnp.mean(jnp.argmax(logits, 1) == data.y_test)) == metrics["test_accuracy"]


@pytest.mark.parametrize("norm,eps,step", [("linf", 1.0, 0.05), ("l2", 3.0, 0.3)])
def test_impersonation_stays_in_ball_and_box_and_reaches_target(trained, norm, eps, step):
  model, params, centres, data, _ = trained
  fn = siamese.identification_logits_fn(model)
  both = {"net": params, "centres": centres}
  x = jnp.asarray(data.x_test[:12])
  target = (jnp.asarray(data.y_test[:12]) + 1) % K

  def attack(e):
    return jax.jit(
      jax.vmap(
        lambda xi, ti: siamese.impersonation_attack(
          fn, both, xi, ti, eps=e, step_size=step, steps=30, norm=norm, unroll=1
        )
      )
    )(x, target)

  result = attack(eps)
  d = np.asarray(result.x_adv - x).reshape(12, -1)
  size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
  assert np.all(size <= eps * (1 + 1e-5))
  assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
  # A large ball holds the target person's own images, so the target is reachable.
  assert float(jnp.mean(result.success)) >= 0.9
  e_adv = siamese.embed(model, params, result.x_adv)
  nearest = jax.vmap(siamese.identify, in_axes=(0, None))(e_adv, centres)
  np.testing.assert_array_equal(nearest == target, result.success)
  # The embedding moved towards the target's centre.
  e_x = siamese.embed(model, params, x)
  before = jnp.linalg.norm(e_x - centres[target], axis=1)
  after = jnp.linalg.norm(e_adv - centres[target], axis=1)
  assert bool(jnp.all(after < before))


def test_identification_logits_fn_is_a_hashable_value():
  build = lambda: siamese.EmbeddingNet(embedding_dim=8, features=(4,), dense=(16,))
  assert siamese.identification_logits_fn(build()) == siamese.identification_logits_fn(build())
  assert hash(siamese.identification_logits_fn(build())) == hash(
    siamese.identification_logits_fn(build())
  )
  assert siamese.identification_logits_fn(build(), temperature=1.0) != (
    siamese.identification_logits_fn(build())
  )
