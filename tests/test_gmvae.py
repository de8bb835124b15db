"""GMVAE with rejection (Ghosh et al. 2018): loss, closest-component classification, the
false-rejection rate of the thresholds, and the adaptive attack on a constructed model."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vae_attacks import losses, models, train
from vae_attacks.attacks import bim
from vae_attacks.defenses import gmvae

SIZE = 8


def _toy(n, seed, classes=3, noise=0.1):
  """Class k: a bright 3x3 block at corner k on noise (as tests/test_train.py)."""
  rng = np.random.default_rng(seed)
  corners = [(0, 0), (0, SIZE - 3), (SIZE - 3, 0)][:classes]
  y = rng.integers(0, classes, n).astype(np.int32)
  x = np.clip(0.2 + noise * rng.normal(size=(n, SIZE, SIZE, 1)), 0, 1).astype(np.float32)
  for i, k in enumerate(y):
    r, c = corners[k]
    x[i, r : r + 3, c : c + 3, 0] = 0.9
  return x, y


@pytest.mark.parametrize("class_var", [1.0, 2.5])
def test_loss_is_elbo_with_class_prior(class_var):
  rng = np.random.default_rng(0)
  logits, x = rng.normal(size=(4, 4, 1)), rng.uniform(size=(4, 4, 1))
  mean, logvar, mu = rng.normal(size=3), 0.3 * rng.normal(size=3), rng.normal(size=3)
  var = np.exp(logvar)
  # KL(N(mean, var) || N(mu, s2)) = 1/2 sum(var / s2 + (mean - mu)^2 / s2 - 1 - log var + log s2)
  kl = 0.5 * np.sum(var / class_var + (mean - mu) ** 2 / class_var - 1 - logvar + np.log(class_var))
  expected = float(losses.bernoulli_nll(jnp.asarray(logits), jnp.asarray(x))) + kl
  args = (jnp.asarray(a, jnp.float32) for a in (logits, x, mean, logvar, mu))
  got = gmvae.gmvae_loss(*args, class_log_var=jnp.log(jnp.float32(class_var)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  if class_var == 1.0:  # the default is the unit-variance prior
    args = (jnp.asarray(a, jnp.float32) for a in (logits, x, mean, logvar, mu))
    np.testing.assert_allclose(gmvae.gmvae_loss(*args), expected, rtol=1e-5)


# The MLP VAE, and the convolutional VAE with a dense hidden layer between its convolutions
# and the latent heads (the MNIST GMVAE of configs/mnist_defenses.py, in miniature).
TOY_VAES = {
  "mlp": lambda: models.MLPVAE((SIZE, SIZE, 1), 3, hidden=(32,)),
  "conv_dense": lambda: models.ConvVAE((SIZE, SIZE, 1), 3, features=(8,), hidden=(32,)),
}


@pytest.fixture(scope="module", params=sorted(TOY_VAES))
def trained(request):
  x_train, y_train = _toy(192, 0)
  x_test, y_test = _toy(64, 1)
  data = types.SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  model = gmvae.GMVAE(TOY_VAES[request.param](), num_classes=3)
  params, metrics = gmvae.train_gmvae(
    model,
    data,
    key=jax.random.key(0),
    settings=train.TrainSettings(epochs=4, batch_size=32, learning_rate=3e-3),
  )
  return model, params, metrics


def test_training_separates_classes(trained):
  model, params, metrics = trained
  first, last = metrics["history"][0], metrics["history"][-1]
  assert last["train_loss"] < first["train_loss"]
  assert metrics["test_accuracy"] > 0.9  # chance is 1/3
  means = model.apply(params, method="class_means")
  np.testing.assert_allclose(means, 3.0 * np.eye(3), atol=0)  # fixed means: not trained


@pytest.mark.parametrize("log_vars", [(0.0, 0.0, 0.0), (0.5, -0.3, 0.1)])
def test_closest_component_is_argmax_and_softmax_is_posterior(trained, log_vars):
  model, params, _ = trained
  params = jax.tree.map(lambda a: a, params)  # a copy whose log-variances we may set
  params["params"]["log_vars"] = jnp.asarray(log_vars, jnp.float32)
  var = np.exp(np.asarray(log_vars))
  x, _ = _toy(32, 2)
  s = gmvae.batch_scores(model, params, x)
  fn_logits = jax.vmap(gmvae.logits_fn(model), in_axes=(None, 0))(params, jnp.asarray(x))
  # Batched and per-example convolutions round differently (float32): an absolute floor.
  np.testing.assert_allclose(s.logits, fn_logits, rtol=1e-6, atol=1e-5)
  z = np.asarray(jax.vmap(lambda xi: model.apply(params, xi[None], method="encode")[0][0])(x))
  mu = np.asarray(model.apply(params, method="class_means"))
  dist = np.linalg.norm(z[:, None, :] - mu[None], axis=-1)  # [N, K]
  np.testing.assert_array_equal(s.pred, np.argmax(fn_logits, axis=1))
  if np.all(var == 1.0):  # unit variances: the most probable component is the closest
    np.testing.assert_array_equal(s.pred, np.argmin(dist, axis=1))
  pred = np.asarray(s.pred)
  np.testing.assert_allclose(
    s.latent_distance, dist[np.arange(32), pred] / np.sqrt(var[pred]), rtol=1e-5
  )
  # Equal weights: p(k | z) = N(z; mu_k, s_k^2 I) / sum_j N(z; mu_j, s_j^2 I).
  dens = np.stack(
    [stats.multivariate_normal(m, v * np.eye(3)).pdf(z) for m, v in zip(mu, var, strict=True)],
    axis=1,
  )
  np.testing.assert_allclose(
    jax.nn.softmax(fn_logits), dens / dens.sum(1, keepdims=True), rtol=1e-4, atol=1e-7
  )


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_thresholds_give_false_rejection_rate_on_held_out_data(trained, rate):
  model, params, _ = trained
  n = 600
  calib = gmvae.batch_scores(model, params, _toy(n, 3)[0])
  held_out = gmvae.batch_scores(model, params, _toy(n, 4)[0])
  t = gmvae.fit_thresholds(
    calib.latent_distance, calib.reconstruction_error, false_rejection_rate=rate
  )
  calib_rate = np.mean(np.asarray(gmvae.rejected(calib, t)))
  assert calib_rate <= rate and calib_rate > rate - 0.02  # at most the rate, and close
  # Both criteria do reject: neither threshold is the maximum of its score.
  assert float(jnp.mean(calib.latent_distance > t.latent)) > 0
  assert float(jnp.mean(calib.reconstruction_error > t.reconstruction)) > 0
  # Held out: binomial sd of the held-out rate plus that of the calibration quantile.
  sd = np.sqrt(rate * (1 - rate) * (2 / n))
  held_rate = np.mean(np.asarray(gmvae.rejected(held_out, t)))
  assert abs(held_rate - rate) < 3 * sd, (held_rate, rate, 3 * sd)
  # detect agrees with the scores.
  pred, rej = jax.vmap(gmvae.detect, in_axes=(None, None, None, 0))(
    model, params, t, jnp.asarray(_toy(n, 4)[0][:50])
  )
  np.testing.assert_array_equal(pred, held_out.pred[:50])
  np.testing.assert_array_equal(rej, gmvae.rejected(held_out, t)[:50])


# A constructed linear GMVAE on 4x4 images where the rejection provably bites: codes
# z1 = 6 (mean(left) - mean(right)), z2 = 6 (mean(top) - mean(bottom)); class means (+-3, 0);
# class 0 is left 0.75 / right 0.25, class 1 the mirror; the decoder inverts z1 exactly at
# the class means. A minimal attack (the plain BIM with early stop) stops at the decision
# boundary z1 ~ 0, 3 away from both means, far beyond the clean latent distances (~0.3).

LEFT = np.zeros((4, 4, 1), np.float32)
LEFT[:, :2] = 1.0
TOP = np.zeros((4, 4, 1), np.float32)
TOP[:2] = 1.0


def _linear_gmvae():
  model = gmvae.GMVAE(models.MLPVAE((4, 4, 1), 2, hidden=()), num_classes=2)
  left, top = LEFT.ravel(), TOP.ravel()
  enc = np.stack([6 * (2 * left - 1) / 8, 6 * (2 * top - 1) / 8], axis=1)  # [16, 2]
  a = np.log(3.0) / 3.0  # sigmoid(3a) = 0.75
  dec = np.stack([a * (2 * left - 1), np.zeros(16)], axis=0)  # [2, 16]
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  params = {
    "params": {
      "vae": {
        "mean_head": {"kernel": f32(enc), "bias": f32(np.zeros(2))},
        "logvar_head": {"kernel": f32(np.zeros((16, 2))), "bias": f32(np.zeros(2))},
        "pixel_head": {"kernel": f32(dec), "bias": f32(np.zeros(16))},
      },
      "means": f32([[3.0, 0.0], [-3.0, 0.0]]),
      "log_vars": f32([0.0, 0.0]),
    }
  }
  # The hand-made variables have the module's structure.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  return model, params


def _linear_data(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  proto = np.where(y[:, None, None, None] == 0, 0.25 + 0.5 * LEFT, 0.75 - 0.5 * LEFT)
  x = np.clip(proto + 0.1 * rng.normal(size=(n, 4, 4, 1)), 0, 1).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y, jnp.int32)


def test_adaptive_attack_evades_rejection_where_plain_attack_is_rejected():
  model, params = _linear_gmvae()
  x_cal, y_cal = _linear_data(400, 0)
  calib = gmvae.batch_scores(model, params, x_cal)
  assert float(jnp.mean(calib.pred == y_cal)) == 1.0
  t = gmvae.fit_thresholds(
    calib.latent_distance, calib.reconstruction_error, false_rejection_rate=0.05
  )
  x, y = _linear_data(16, 1)
  target = 1 - y
  knobs = dict(eps=1.0, step_size=0.02, steps=50, norm="linf", early_stop=True, unroll=1)

  plain_fn = gmvae.logits_fn(model)
  plain = jax.jit(jax.vmap(lambda xi, ti: bim.bim(plain_fn, params, xi, ti, **knobs)))(x, target)
  pred, rej = jax.vmap(gmvae.detect, in_axes=(None, None, None, 0))(model, params, t, plain.x_adv)
  assert bool(jnp.all(pred == target))  # the plain attack fools the classifier ...
  assert float(jnp.mean(rej)) == 1.0  # ... and is always rejected

  adaptive_fn = gmvae.adaptive_logits_fn(model, penalty=10.0, margin=0.1)
  both = {"gmvae": params, "thresholds": t}
  adaptive = jax.jit(
    jax.vmap(lambda xi, ti: gmvae.adaptive_bim(adaptive_fn, both, xi, ti, **knobs))
  )(x, target)
  pred, rej = jax.vmap(gmvae.detect, in_axes=(None, None, None, 0))(
    model, params, t, adaptive.x_adv
  )
  np.testing.assert_array_equal(adaptive.success, (pred == target) & ~rej)
  assert float(jnp.mean(adaptive.success)) >= 0.9  # classified as the target AND accepted
  assert float(jnp.mean(rej)) <= 0.1
  # In the box; and, at a budget that binds (eps 0.05, not the 1.0 above, which every image in
  # [0, 1] meets), in the ball.
  assert float(jnp.min(adaptive.x_adv)) >= 0.0 and float(jnp.max(adaptive.x_adv)) <= 1.0
  small = dict(knobs, eps=0.05, steps=10, step_size=0.01)
  tight = jax.jit(jax.vmap(lambda xi, ti: gmvae.adaptive_bim(adaptive_fn, both, xi, ti, **small)))(
    x, target
  )
  assert 0.04 <= float(jnp.max(jnp.abs(tight.x_adv - x))) <= 0.05 + 1e-6
  assert float(jnp.min(tight.x_adv)) >= 0.0 and float(jnp.max(tight.x_adv)) <= 1.0


def test_adaptive_logits_add_exactly_each_class_penalty():
  model, params = _linear_gmvae()
  x, _ = _linear_data(8, 2)
  x = x.at[:4].set(0.5)  # on the decision boundary: far from both components
  t = gmvae.Thresholds(latent=jnp.float32(0.5), reconstruction=jnp.float32(0.02))
  fn = gmvae.adaptive_logits_fn(model, penalty=10.0, margin=0.1)
  aug = jax.vmap(fn, in_axes=(None, 0))({"gmvae": params, "thresholds": t}, x)
  assert aug.shape == (8, 3)
  s = gmvae.batch_scores(model, params, x)
  z = np.asarray(model.apply(params, x, method="encode")[0])
  mu = np.asarray(model.apply(params, method="class_means"))
  dist = np.linalg.norm(z[:, None] - mu[None], axis=-1)  # [N, K]
  err = np.asarray(s.reconstruction_error)[:, None]
  p = 10.0 * (np.maximum(dist / 0.5 - 0.9, 0) + np.maximum(err / 0.02 - 0.9, 0))
  assert np.any(p > 1) and np.any(p == 0)
  ce = lambda logits, k: -jax.nn.log_softmax(logits)[..., k]
  for k in range(2):
    np.testing.assert_allclose(ce(aug, k), ce(s.logits, k) + p[:, k], rtol=1e-4, atol=1e-5)


def test_model_functions_are_hashable_values_and_vae_params_fit():
  build = lambda: gmvae.GMVAE(models.MLPVAE((4, 4, 1), 4, hidden=(8,)), num_classes=3)
  assert gmvae.logits_fn(build()) == gmvae.logits_fn(build())
  assert hash(gmvae.adaptive_logits_fn(build())) == hash(gmvae.adaptive_logits_fn(build()))
  assert gmvae.adaptive_logits_fn(build(), margin=0.2) != gmvae.adaptive_logits_fn(build())
  # A trained VAE's variables start a GMVAE: same structure as the GMVAE's own init.
  model, x, k = build(), jnp.zeros((1, 4, 4, 1)), jax.random.key(0)
  vae_vars = jax.eval_shape(model.vae.init, k, x, k)
  vae_vars = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), vae_vars)
  started = gmvae.with_vae_params(model, vae_vars, k)
  assert jax.tree.structure(started) == jax.tree.structure(jax.eval_shape(model.init, k, x, k))
  np.testing.assert_allclose(started["params"]["means"], 3.0 * np.eye(3, 4))  # K <= D: 3 e_k
  # K > D: K means on the circle of radius mean_scale, spread to nearly even angles (the
  # best possible minimum gap is 2 pi / K).
  means = np.asarray(gmvae.class_means_init(3.0)(k, (10, 2)))
  np.testing.assert_allclose(np.linalg.norm(means, axis=1), 3.0, rtol=1e-5)
  angles = np.sort(np.arctan2(means[:, 1], means[:, 0]))
  gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi]))
  assert gaps.min() > 0.8 * 2 * np.pi / 10, gaps


@pytest.mark.parametrize("learn", [False, True])
def test_means_and_variances_train_only_when_asked(learn):
  model, params = _linear_gmvae()
  model = model.clone(learn_means=learn, learn_variance=learn)
  x, y = _linear_data(8, 3)

  def loss(p):
    pixel_logits, mean, logvar = model.apply(p, x, jax.random.key(0))
    mu = model.apply(p, method="class_means")[y]
    log_var = model.apply(p, method="class_log_vars")[y]
    return jnp.mean(jax.vmap(gmvae.gmvae_loss)(pixel_logits, x, mean, logvar, mu, log_var))

  g = jax.grad(loss)(params)["params"]
  for name in ("means", "log_vars"):
    assert bool(jnp.any(g[name] != 0)) == learn, name
  assert bool(jnp.any(g["vae"]["mean_head"]["kernel"] != 0))  # the VAE always trains


def test_mnist_config_builds_the_papers_latent_size_and_a_dense_layer():
  """configs/mnist_defenses.py's GMVAE: the conv VAE with one dense hidden layer each way and
  D = 10 (Ghosh et al. 2019's MNIST latent size), class means mean_scale * e_k."""
  from configs import mnist_defenses  # noqa: PLC0415
  from experiments import models as models_lib  # noqa: PLC0415

  c = mnist_defenses.get_config()
  g = c.defenses.gmvae
  data = types.SimpleNamespace(x_train=np.zeros((1, 28, 28, 1), np.float32))
  model = gmvae.GMVAE(
    models_lib.MODELS[g.architecture].build(c.model.gmvae, data), 10, float(g.mean_scale)
  )
  k, x = jax.random.key(0), jnp.zeros((1, 28, 28, 1))
  p = jax.eval_shape(model.init, k, x, k)["params"]
  v = p["vae"]
  shapes = {"/".join(k.key for k in path[:-1]): a.shape for path, a in
            jax.tree_util.tree_leaves_with_path(v) if path[-1].key == "kernel"}  # fmt: skip
  hidden = c.model.gmvae["hidden"][0]
  assert shapes == {
    "encoder_convs_0": (3, 3, 1, 32),
    "encoder_convs_1": (3, 3, 32, 64),
    "encoder_dense_0": (7 * 7 * 64, hidden),
    "mean_head": (hidden, 10),
    "logvar_head": (hidden, 10),
    "decoder_dense_0": (10, hidden),
    "grid_dense": (hidden, 7 * 7 * 64),
    "decoder_convs_0/Conv_0": (3, 3, 64, 4 * 32),  # sub-pixel 2x upsampling: 4 x channels
    "pixel_conv/Conv_0": (3, 3, 32, 4 * 1),
  }
  assert p["means"].shape == (10, 10)
  means = model.apply(model.init(k, x, k), method="class_means")
  np.testing.assert_allclose(means, g.mean_scale * np.eye(10))
