"""Defences: distillation's soft targets and adaptive attack, adversarial training, transfer."""

import types

import fakedata
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from vae_attacks import losses, models, train
from vae_attacks.attacks import fgsm, runner
from vae_attacks.defenses import adversarial, distillation, transfer

DATA = fakedata.toy_data(n_train=192, n_test=64)
CNN = models.CNN(3, features=(4,), dense=(16,))
LOGITS = models.classifier_fns(CNN)
INIT = fakedata.numpy_init(CNN, DATA.x_train[:1])
TRAIN = dict(
  settings=train.TrainSettings(epochs=1, batch_size=32, learning_rate=1e-2), init_params=INIT
)


@pytest.fixture(scope="module")
def plain():
  """The toy CNN trained normally for one epoch (shared by several tests)."""
  return train.train_classifier(CNN, DATA, key=jax.random.key(0), **TRAIN)[0]


# ----------------------------------------------------------------------------------------------
# Distillation.


def test_softened_targets_are_the_tempered_softmax_and_flatten_with_temperature():
  logits = jnp.asarray([[4.0, 1.0, -2.0], [0.5, 3.0, 0.0]])
  previous_max, previous_entropy = None, None
  for t in (1.0, 2.0, 10.0, 100.0):
    p = np.asarray(distillation.softened_targets(logits, t))
    e = np.exp(np.asarray(logits, np.float64) / t)
    np.testing.assert_allclose(p, e / e.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    entropy = -(p * np.log(p)).sum(-1)
    if previous_max is not None:  # flatter: the top class loses mass, entropy grows
      assert np.all(p.max(-1) < previous_max) and np.all(entropy > previous_entropy)
    previous_max, previous_entropy = p.max(-1), entropy
  assert np.all(previous_max - 1 / 3 < 0.02)  # T = 100: nearly uniform
  with pytest.raises(ValueError, match="temperature"):
    distillation.softened_targets(logits, 0.0)


def test_one_hot_soft_targets_train_exactly_as_class_ids(plain):
  soft = types.SimpleNamespace(**vars(DATA))
  soft.y_train = np.eye(3, dtype=np.float32)[DATA.y_train]
  soft_params, _ = train.train_classifier(CNN, soft, key=jax.random.key(0), **TRAIN)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, soft_params)


def _saturated_linear(params, x):
  """A 2-class linear model with huge logits, as a distilled network deployed at T = 1."""
  z = jnp.sum(params["w"] * x)
  return 1e4 * jnp.stack([z, -z])


def test_adaptive_attack_on_logits_over_t_breaks_what_the_saturated_softmax_hides():
  sign = np.where(np.arange(16) < 8, 1.0, -1.0).reshape(4, 4, 1)
  params = {"w": jnp.asarray(sign, jnp.float32)}
  x = jnp.asarray(0.5 + 0.005 * (sign > 0), jnp.float32)  # z = 0.04: class 0 by a hair
  label = jnp.asarray(0)
  logits = _saturated_linear(params, x)
  assert int(jnp.argmax(logits)) == 0 and float(logits[0] - logits[1]) > 200  # saturated
  knobs = dict(eps=0.05, steps=5, step_size_rel=0.5, key=jax.random.key(1), random_start=False)
  naive = adversarial.pgd_linf(_saturated_linear, params, x, label, **knobs)
  scaled = distillation.TemperatureScaled(_saturated_linear, 1e4)
  adaptive = adversarial.pgd_linf(scaled, params, x, label, **knobs)
  assert not bool(naive.success)
  np.testing.assert_array_equal(naive.x_adv, x)  # a zero gradient: the attack never moved
  assert bool(adaptive.success)
  assert int(jnp.argmax(_saturated_linear(params, adaptive.x_adv))) == 1  # judged undistilled
  assert float(jnp.max(jnp.abs(adaptive.x_adv - x))) <= 0.05 + 1e-6


# ----------------------------------------------------------------------------------------------
# Adversarial training.


def test_one_step_perturb_without_random_start_is_untargeted_fgsm(key):
  x, y = DATA.x_test[:8], DATA.y_test[:8]
  perturb = adversarial.PGDPerturb(LOGITS, eps=0.2, steps=1, step_size_rel=1.0, random_start=False)
  got = perturb(INIT, key, x, y, jnp.asarray(0))
  want = jax.vmap(lambda a, b: fgsm.fgsm(LOGITS, INIT, a, b, eps=0.2, targeted=False).x_adv)(x, y)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_perturb_stays_in_ball_and_box_and_ramps_eps(key):
  x, y = DATA.x_test[:8], DATA.y_test[:8]
  perturb = adversarial.PGDPerturb(LOGITS, eps=0.3, steps=3, step_size_rel=0.5, ramp_steps=10)
  np.testing.assert_allclose(perturb.eps_at(jnp.asarray(0)), 0.03, rtol=1e-6)
  np.testing.assert_allclose(perturb.eps_at(jnp.asarray(4)), 0.15, rtol=1e-6)
  np.testing.assert_allclose(perturb.eps_at(jnp.asarray(50)), 0.3, rtol=1e-6)
  for step, eps in ((0, 0.03), (100, 0.3)):
    x_adv = np.asarray(perturb(INIT, key, x, y, jnp.asarray(step)))
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert np.abs(x_adv - x).max() > 0.5 * eps  # it did move
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_adversarial_training_trains_on_the_perturbed_batches(plain, tmp_path):
  # eps = 0: PGD returns the clean batch, so the run is the plain one ...
  same, _ = adversarial.train_adversarial(
    CNN, DATA, key=jax.random.key(0), eps=0.0, steps=2, step_size_rel=0.5, **TRAIN
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), plain, same)
  # ... and eps > 0 trains on other inputs; its checkpoint records the attack, so a run with
  # another attack is not resumed from it.
  kw = dict(key=jax.random.key(0), steps=1, step_size_rel=1.25, checkpoint_dir=str(tmp_path))
  moved, _ = adversarial.train_adversarial(CNN, DATA, eps=0.2, **kw, **TRAIN)
  gaps = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), plain, moved)
  assert max(jax.tree.leaves(gaps)) > 1e-3
  with pytest.raises(ValueError, match="another model or training \\(differs in: perturb"):
    adversarial.train_adversarial(CNN, DATA, eps=0.1, **kw, **TRAIN)


def test_trades_inner_maximisation_stays_in_ball_and_box_and_raises_the_kl(plain, key):
  x = DATA.x_test[:8]
  log_p = jax.nn.log_softmax(jax.vmap(lambda a: LOGITS(plain, a))(x))

  def kl_at(xa):
    log_q = jax.nn.log_softmax(jax.vmap(lambda a: LOGITS(plain, a))(xa))
    return np.asarray(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))

  def attack(steps, k):
    one = lambda xi, ki: adversarial.kl_pgd_linf(
      LOGITS, plain, xi, eps=0.2, steps=steps, step_size=0.05, key=ki
    )
    return np.asarray(jax.vmap(one)(x, jax.random.split(k, 8)))

  x_adv = attack(10, key)
  assert np.abs(x_adv - x).max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
  np.testing.assert_array_equal(x_adv, attack(10, key))  # deterministic given its key
  # Ten ascent steps end with a larger KL than the start and than random points of the ball.
  start = np.clip(attack(0, key), 0, 1)
  noise = np.clip(x + jax.random.uniform(key, x.shape, minval=-0.2, maxval=0.2), 0, 1)
  assert np.all(kl_at(x_adv) > kl_at(start)) and np.all(kl_at(x_adv) > kl_at(noise))
  # The KL against scipy's (relative entropy of the softmaxes).
  q = jax.nn.softmax(jax.vmap(lambda a: LOGITS(plain, a))(x_adv))
  pairs = zip(np.asarray(log_p), np.asarray(q), strict=True)
  want = [scipy.stats.entropy(np.exp(a), b) for a, b in pairs]
  np.testing.assert_allclose(kl_at(x_adv), want, rtol=1e-4, atol=1e-7)


def test_trades_at_eps_zero_is_plain_training_and_its_checkpoint_records_the_loss(plain, tmp_path):
  # eps = 0: x' = x, the KL term and its gradient vanish, whatever beta.
  x, y = DATA.x_train[:16], DATA.y_train[:16]
  loss = adversarial.TradesLoss(CNN, eps=0.0, steps=3, step_size_rel=0.5, beta=6.0)
  value, aux = loss(plain, x, y, jax.random.key(1))
  ce = jnp.mean(losses.batch_cross_entropy(CNN.apply(plain, x, train=True), y))
  np.testing.assert_allclose(value, ce, rtol=1e-6)
  assert float(aux["kl"]) == pytest.approx(0.0, abs=1e-7)
  same, _ = adversarial.train_trades(
    CNN, DATA, key=jax.random.key(0), eps=0.0, steps=2, step_size_rel=0.5, beta=6.0, **TRAIN
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), plain, same)
  kw = dict(key=jax.random.key(0), eps=0.2, steps=2, step_size_rel=0.5,
            checkpoint_dir=str(tmp_path))  # fmt: skip
  moved, _ = adversarial.train_trades(CNN, DATA, beta=1.0, **kw, **TRAIN)
  gaps = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), plain, moved)
  assert max(jax.tree.leaves(gaps)) > 1e-3
  with pytest.raises(ValueError, match="another model or training \\(differs in: loss"):
    adversarial.train_trades(CNN, DATA, beta=6.0, **kw, **TRAIN)


def test_restarts_break_a_superset_and_keep_a_breaking_image(plain):
  params = plain
  x, y = DATA.x_test, DATA.y_test
  kw = dict(eps=0.15, key=jax.random.key(5), steps=2, step_size_rel=0.5)
  one = adversarial.attack_with_restarts(
    adversarial.pgd_linf, LOGITS, params, x, y, restarts=1, **kw
  )
  three = adversarial.attack_with_restarts(
    adversarial.pgd_linf, LOGITS, params, x, y, restarts=3, **kw
  )
  assert np.all(three.broken >= one.broken)
  # The worst case after each restart: the first is the one-restart run's, it only grows, and
  # the last is the run's.
  assert three.broken_after.shape == (3, len(y))
  np.testing.assert_array_equal(three.broken_after[0], one.broken)
  assert np.all(np.diff(three.broken_after.astype(int), axis=0) >= 0)
  np.testing.assert_array_equal(three.broken_after[-1], three.broken)
  pred = np.argmax(runner.batched_logits(LOGITS, params, three.x_adv), -1)
  np.testing.assert_array_equal(pred != y, three.broken)  # the kept image is the breaking one
  assert np.abs(three.x_adv - x).max() <= 0.15 + 1e-6
  with pytest.raises(ValueError, match="restarts"):
    adversarial.attack_with_restarts(adversarial.pgd_linf, LOGITS, params, x, y, restarts=0, **kw)


# ----------------------------------------------------------------------------------------------
# Transfer.


def test_transfer_matrix_diagonal_is_the_white_box_result(plain, key):
  other = models.CNN(3, features=(6,), dense=(8,))
  p1 = plain
  p2, _ = train.train_classifier(other, DATA, key=key, settings=train.TrainSettings(1, 32))
  nets = {
    "a": transfer.Classifier(LOGITS, p1),
    "b": transfer.Classifier(models.classifier_fns(other), p2),
  }
  x, y = DATA.x_test, DATA.y_test
  white = {
    name: adversarial.attack_with_restarts(
      adversarial.pgd_linf,
      m.logits_fn,
      m.params,
      x,
      y,
      eps=0.2,
      restarts=2,
      key=jax.random.key(7),
      steps=3,
      step_size_rel=0.5,
    )  # fmt: skip
    for name, m in nets.items()
  }
  matrix = transfer.transfer_matrix(nets, {n: r.x_adv for n, r in white.items()}, y)
  assert matrix.sources == matrix.targets == ("a", "b")
  for i, name in enumerate(matrix.sources):
    np.testing.assert_array_equal(matrix.correct[i, i], ~white[name].broken)
    assert matrix.accuracy[i, i] == pytest.approx(1.0 - white[name].broken.mean())
  np.testing.assert_allclose(matrix.success, 1.0 - matrix.accuracy)
  # Off the diagonal: target b's accuracy on a's examples, computed independently.
  pred = np.argmax(runner.batched_logits(nets["b"].logits_fn, p2, white["a"].x_adv), -1)
  assert matrix.accuracy[0, 1] == pytest.approx(np.mean(pred == y))
  with pytest.raises(ValueError, match="not one of the models"):
    transfer.transfer_matrix({"a": nets["a"]}, {"b": white["b"].x_adv}, y)
