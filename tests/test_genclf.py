"""Generative classifiers (vae_attacks.genclf) and the attacks that know them: the class scores
equal a direct computation, inference is deterministic given its key, gradients through the
inference match finite differences, and the decision-based attack finds a linear model's
boundary."""

import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from vae_attacks import genclf, train
from vae_attacks.attacks import decision, latent_descent, registry

SHAPE = (4, 4, 1)
K = 3


def _abs(key, *, steps=3, n_samples=32, gradient="envelope", radius=5.0, beta=1.0):
  vae = genclf.ABSVAE(image_shape=SHAPE, latent_dim=2, hidden=(8,), beta=beta)
  x = jnp.zeros((1, *SHAPE))
  per_class = jax.vmap(lambda k: vae.init(k, x, k))(jax.random.split(key, K))
  params = genclf.abs_params(vae, per_class, jax.random.fold_in(key, 1), n_samples=n_samples)
  fn = genclf.abs_logits_fn(vae, steps=steps, lr=0.05, radius=radius, gradient=gradient)
  return vae, fn, params


def _cvae(key, num_samples=4, **kw):
  vae = genclf.ConditionalVAE(image_shape=SHAPE, num_classes=K, latent_dim=2, hidden=(8,), **kw)
  p = vae.init(key, jnp.zeros((1, *SHAPE)), jnp.zeros((1, K)), key)
  params = genclf.cvae_params(p, jax.random.fold_in(key, 1), num_samples=num_samples, latent_dim=2)
  return vae, genclf.cvae_logits_fn(vae), params


def _image(key):
  return jax.random.uniform(key, SHAPE)


@pytest.mark.parametrize("beta", [1.0, 0.02])
def test_abs_scores_equal_direct_objective(key, beta):
  vae, fn, params = _abs(key, beta=beta)
  x = _image(jax.random.fold_in(key, 2))
  logits = fn(params, x)
  _, z = fn.inference(params, x)
  for k in range(K):
    pk = jax.tree.map(lambda a, k=k: a[k], params["vae"])
    rec = vae.apply(pk, z[k][None], method="decode")[0]
    sq = np.sum((np.asarray(x) - np.asarray(rec)) ** 2)
    direct = sq + 0.5 * beta * np.sum(np.asarray(z[k]) ** 2)
    np.testing.assert_allclose(logits[k], -440.0 * direct / x.size, rtol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.02])
def test_abs_bank_pick_is_the_best_sample_and_steps_improve_it(key, beta):
  _, fn0, params = _abs(key, steps=0, beta=beta)
  _, fn20, _ = _abs(key, steps=20, beta=beta)
  x = _image(jax.random.fold_in(key, 2))
  # steps=0: the bank's best sample, i.e. the max over the bank of the direct objective.
  flat = x.reshape(-1)
  direct = (
    np.sum((np.asarray(params["bank_x"]) - np.asarray(flat)) ** 2, -1)
    + 0.5 * beta * np.sum(np.asarray(params["bank_z"]) ** 2, -1)
  ) / flat.size
  np.testing.assert_allclose(fn0(params, x), -440.0 * direct.min(-1), rtol=1e-5)
  # Adam from there lowers each class's objective (raises its score).
  assert np.all(np.asarray(fn20(params, x)) >= np.asarray(fn0(params, x)) - 1e-4)


def test_abs_latent_stays_in_ball(key):
  _, fn, params = _abs(key, steps=20, radius=0.3)
  _, z = fn.inference(params, _image(jax.random.fold_in(key, 2)))
  assert np.all(np.linalg.norm(np.asarray(z), axis=-1) <= 0.3 + 1e-5)


def test_inference_deterministic_given_key(key):
  x = _image(jax.random.fold_in(key, 2))
  _, fn_a, pa = _abs(key)
  _, fn_b, pb = _abs(key)
  np.testing.assert_array_equal(fn_a(pa, x), fn_b(pb, x))
  _, fn_c, pc = _abs(jax.random.fold_in(key, 9))
  assert not np.allclose(fn_a(pa, x), fn_c(pc, x))
  _, g, q = _cvae(key)
  _, g2, q2 = _cvae(key)
  np.testing.assert_array_equal(g(q, x), g2(q2, x))


def _np_prior(params, y, vae):
  """p(z | y)'s (mean, logvar) from the variables, in numpy (GFY's learned prior or N(0, I))."""
  if vae.prior == "standard":
    return np.zeros(vae.latent_dim), np.zeros(vae.latent_dim)
  p0, p1 = params["params"]["prior_layers_0"], params["params"]["prior_layers_1"]
  h = np.maximum(y @ np.asarray(p0["kernel"]) + np.asarray(p0["bias"]), 0.0)
  out = (h @ np.asarray(p1["kernel"]) + np.asarray(p1["bias"]))[0].astype(np.float64)
  return out[: vae.latent_dim], out[vae.latent_dim :]


@pytest.mark.parametrize(
  "likelihood,prior,decoder_features",
  [
    ("bernoulli", "standard", ()),
    ("l2", "learned", ()),
    ("l2", "learned", (3, 2)),
    ("gaussian", "learned", ()),
  ],
)
def test_cvae_scores_equal_direct_importance_weighted_bound(key, likelihood, prior,
                                                            decoder_features):  # fmt: skip
  vae, fn, params = _cvae(
    key, num_samples=4, likelihood=likelihood, prior=prior, decoder_features=decoder_features
  )
  x = _image(jax.random.fold_in(key, 2))
  logits = np.asarray(fn(params, x), np.float64)
  eye = np.eye(K, dtype=np.float32)
  for k in range(K):
    y = eye[k][None]
    mean, logvar = vae.apply(
      params["vae"], vae.apply(params["vae"], x[None], method="features_of"), y,
      method="encode_features",
    )  # fmt: skip
    mean, logvar = np.asarray(mean[0], np.float64), np.asarray(logvar[0], np.float64)
    ws = []
    for eps in np.asarray(params["noise"], np.float64):
      z = mean + np.exp(0.5 * logvar) * eps
      pl = np.asarray(vae.apply(params["vae"], z[None].astype(np.float32), y, method="decode"))
      mean_x = 1.0 / (1.0 + np.exp(-pl[0].astype(np.float64)))
      if likelihood == "bernoulli":
        per_pixel = np.asarray(optax.sigmoid_binary_cross_entropy(pl[0], x))
      elif likelihood == "gaussian":  # -log N(x; mean, pixel_sd^2), scipy's density
        per_pixel = -scipy.stats.norm.logpdf(np.asarray(x, np.float64), mean_x, vae.pixel_sd)
      else:
        per_pixel = (np.asarray(x, np.float64) - mean_x) ** 2
      loglik = -np.sum(per_pixel, dtype=np.float64)
      pm, plv = _np_prior(params["vae"], y, vae)
      log_prior = -0.5 * np.sum((z - pm) ** 2 * np.exp(-plv) + plv + np.log(2 * np.pi))
      log_q = -0.5 * np.sum(eps**2 + logvar + np.log(2 * np.pi))
      ws.append(loglik + log_prior - log_q)
    ws = np.array(ws)
    direct = np.log(np.mean(np.exp(ws - ws.max()))) + ws.max()
    np.testing.assert_allclose(logits[k], direct, rtol=1e-4, atol=1e-3)


def _fd_grad(f, x, h=1e-3):
  f = jax.jit(f)
  flat = np.asarray(x, np.float64).ravel()
  out = np.zeros_like(flat)
  for i in range(flat.size):
    e = np.zeros_like(flat)
    e[i] = h
    up = float(f(jnp.asarray((flat + e).reshape(x.shape), jnp.float32)))
    down = float(f(jnp.asarray((flat - e).reshape(x.shape), jnp.float32)))
    out[i] = (up - down) / (2 * h)
  return out.reshape(x.shape)


@pytest.mark.parametrize("gradient,steps", [("envelope", 0), ("unrolled", 3)])
def test_gradient_through_inference_equals_finite_differences(key, gradient, steps):
  """Unrolled: the exact derivative of the computed logits. Envelope: equal to it when the
  latent does not move with x (steps=0: the bank's pick is locally constant)."""
  _, fn, params = _abs(key, steps=steps, gradient=gradient)
  x = _image(jax.random.fold_in(key, 2)) * 0.8 + 0.1
  f = lambda x: fn(params, x)[1] / 440.0
  with jax.default_matmul_precision("highest"):
    g = np.asarray(jax.grad(f)(x))
    fd = _fd_grad(f, x)
  np.testing.assert_allclose(g, fd, rtol=2e-2, atol=2e-3)


def test_cvae_gradient_equals_finite_differences(key):
  _, fn, params = _cvae(key)
  x = _image(jax.random.fold_in(key, 2)) * 0.8 + 0.1
  f = lambda x: fn(params, x)[0] - fn(params, x)[1]
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), _fd_grad(f, x), rtol=2e-2, atol=5e-3)


def _linear(key, d=16):
  """A 2-class linear model on [d] 'images' [4, 4, 1] and its closed-form minimal L2 step."""
  w = jax.random.normal(key, (2, d))
  b = jnp.zeros(2)
  fn = lambda p, x: p["w"] @ x.reshape(-1) + p["b"]
  return fn, {"w": w, "b": b}


def test_hop_skip_jump_matches_closed_form_on_linear_model(key):
  fn, p = _linear(key)
  x = jnp.full(SHAPE, 0.5) + 0.05 * jax.random.normal(jax.random.fold_in(key, 1), SHAPE)
  logits = fn(p, x)
  target = jnp.int32(1 - int(jnp.argmax(logits)))
  wd = p["w"][target] - p["w"][1 - target]
  margin = float(-(wd @ x.reshape(-1)))  # > 0: the distance to the boundary is margin / |wd|
  closed = margin / float(jnp.linalg.norm(wd))
  # A start on the target side, off the shortest path: x moved past the boundary along wd plus
  # a random direction (the first boundary point is then ~sqrt(2) times the minimum away).
  side = jax.random.normal(jax.random.fold_in(key, 5), SHAPE)
  side = side - (side.reshape(-1) @ wd) * wd.reshape(SHAPE) / (wd @ wd)
  side = side / jnp.linalg.norm(side)
  normal = (wd / jnp.linalg.norm(wd)).reshape(SHAPE)
  x_init = jnp.clip(x + 2 * closed * normal + 2 * closed * side, 0.0, 1.0)
  assert int(jnp.argmax(fn(p, x_init))) == int(target)
  r = decision.hop_skip_jump(
    fn, p, x, target, x_init=x_init, key=key, iterations=15, num_evals=100, bisect_steps=20
  )
  assert bool(r.success)
  assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
  trace = np.asarray(r.loss_trace)
  first = float(
    jnp.linalg.norm(decision.boundary_bisection(fn, p, x, x_init, target, steps=20)[0] - x)
  )
  assert first > 1.2 * closed
  assert np.all(np.diff(trace) <= 1e-6) and trace[-1] < trace[0] <= first
  assert closed * (1 - 1e-3) <= float(r.distortion.l2) <= 1.1 * closed


def test_hop_skip_jump_vmap_equals_loop(key):
  _, fn, params = _abs(key, steps=0)
  xs = jax.random.uniform(jax.random.fold_in(key, 3), (3, *SHAPE))
  preds = np.argmax(np.asarray(jax.vmap(fn, (None, 0))(params, xs)), -1)
  targets = jnp.asarray((preds + 1) % K, jnp.int32)
  # Starts: each target class's own bank image with the best score (classified as it).
  starts = jnp.stack([params["bank_x"][int(t), 0].reshape(SHAPE) for t in targets])
  run = lambda x, t, s: decision.hop_skip_jump(
    fn, params, x, t, x_init=s, key=key, iterations=3, num_evals=16, bisect_steps=8
  )
  batched = jax.jit(jax.vmap(run))(xs, targets, starts)
  for i in range(3):
    one = run(xs[i], targets[i], starts[i])
    np.testing.assert_allclose(batched.x_adv[i], one.x_adv, atol=1e-5)
    assert bool(batched.success[i]) == bool(one.success)


def test_latent_descent_reaches_target_in_box(key):
  _, fn, params = _cvae(key)
  x = _image(jax.random.fold_in(key, 2))
  target = jnp.int32((int(jnp.argmax(fn(params, x))) + 1) % K)
  r = latent_descent.latent_descent(fn, params, x, target, steps=30, step_size=0.3)
  assert bool(r.success)
  assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
  # The bisection leaves it nearer than the first successful descent point.
  assert float(r.distortion.l2) > 0.0


def test_registry_runs_the_new_attacks_through_their_knobs(key):
  spec = registry.ATTACKS["hop_skip_jump"]
  assert spec.family == "classifier" and spec.norms == ("l2",)
  assert registry.ATTACKS["latent_descent"].family == "classifier"


@pytest.mark.parametrize("beta", [1.0, 0.02])
def test_abs_training_loss_is_squared_error_plus_beta_kl(key, beta):
  vae = genclf.ABSVAE(image_shape=SHAPE, latent_dim=2, hidden=(8,), beta=beta)
  x = jax.random.uniform(jax.random.fold_in(key, 2), (5, *SHAPE))
  p = vae.init(key, x[:1], key)
  k = jax.random.fold_in(key, 3)
  rec, mean, logvar = (np.asarray(a, np.float64) for a in vae.apply(p, x, k))
  sq = np.sum((np.asarray(x, np.float64) - rec) ** 2, axis=(1, 2, 3))
  kl = 0.5 * np.sum(np.exp(logvar) + mean**2 - 1.0 - logvar, -1)  # KL(N(m, v) || N(0, I))
  loss = float(genclf.abs_training_loss(vae, p, x, k))
  np.testing.assert_allclose(loss, np.mean(sq + beta * kl), rtol=1e-5)


def test_train_abs_learns_each_class(key):
  """Two well-separated 'classes' (dark and bright images): the bank-only ABS separates them
  after a short training."""
  rng = np.random.default_rng(0)
  n = 64
  x = np.concatenate([rng.uniform(0, 0.2, (n, *SHAPE)), rng.uniform(0.8, 1.0, (n, *SHAPE))])
  y = np.repeat([0, 1], n)
  data = types.SimpleNamespace(
    x_train=x.astype(np.float32), y_train=y, x_test=x.astype(np.float32), y_test=y,
    class_names=("dark", "bright"),
  )  # fmt: skip
  vae = genclf.ABSVAE(image_shape=SHAPE, latent_dim=2, hidden=(8,))
  params, m = train.train_abs(
    vae, data, key=key, settings=train.TrainSettings(epochs=3, batch_size=16, learning_rate=3e-3),
    eval_examples=2 * n, eval_bank=32,
  )  # fmt: skip
  assert jax.tree.leaves(params)[0].shape[0] == 2
  assert m["test_accuracy_bank_only"] == 1.0


def test_minimal_perturbation_is_the_min_over_successful_attacks():
  from experiments.report import study  # noqa: PLC0415

  src, tgt = np.array([0, 1, 2]), np.array([3, 4, 5])

  def rec(success, l2):
    l2 = np.asarray(l2, float)
    return dict(source_index=src, target=tgt, success=np.asarray(success), l2=l2, linf=l2 / 10,
                l1=l2 * 10, l0=l2 * 100)  # fmt: skip

  records = {
    "a": rec([True, False, True], [1.0, 0.5, 3.0]),
    "b": rec([True, True, False], [2.0, 4.0, 0.1]),
    "c": rec([False, False, False], [0.01, 0.01, 0.01]),
  }
  rows = [dict(model="abs", attack=k, key=k) for k in records]
  d = study.StudyData("mnist", rows, {}, {})
  d.record = lambda r: records[r["key"]]
  best, s = study.minimal_perturbations(d, "abs")
  np.testing.assert_array_equal(s, src)
  np.testing.assert_allclose(best["l2"], [1.0, 4.0, 3.0])
  np.testing.assert_allclose(best["linf"], [0.1, 0.4, 0.3])
  # A record on other pairs is left out of the minimum and of the attack set it reports.
  records["d"] = dict(rec([True] * 3, [0.001] * 3), source_index=np.array([7, 8, 9]))
  rows.append(dict(model="abs", attack="d", key="d"))
  best, _ = study.minimal_perturbations(d, "abs")
  np.testing.assert_allclose(best["l2"], [1.0, 4.0, 3.0])
  assert study.minimal_perturbation_attacks(d, "abs") == ["a", "b", "c"]
  # The table says where a model's set differs from the CNN's.
  # (importlib: the package's `study_markdown` attribute is the function of that name)
  study_markdown = importlib.import_module("experiments.report.study_markdown")
  assert study_markdown._attack_set(["a", "b", "c"], ["a", "b", "c"]) == "3"
  assert study_markdown._attack_set(["a", "c", "e"], ["a", "b", "c"]) == "3 (+e; without b)"
  # The registered H0 family stays the latent-probe VAEs; "cvae" is not one of them.
  assert study.is_vae("mlp_vae") and not study.is_vae("cvae") and not study.is_vae("abs")


def test_abs_conv_vae_shapes_and_parameter_count(key):
  """Schott et al.'s layer shapes (abs_models/models.py get_VAE): 28 -> 24 -> 11 -> 5 -> 1 and
  back 1 -> 4 -> 11 -> 25 -> 28; their conv weights and biases (BatchNorm left out) per class."""
  x = jax.random.uniform(key, (3, 28, 28, 1))
  counts = {}
  for enc, dec in [("conv", "conv"), ("conv", "mlp"), ("mlp", "conv")]:
    vae = genclf.ABSVAE(
      image_shape=(28, 28, 1), latent_dim=8, hidden=(16,), encoder=enc, decoder=dec
    )
    p = vae.init(key, x, key)
    mean, logvar = vae.apply(p, x, method="encode")
    assert mean.shape == logvar.shape == (3, 8)
    img = vae.apply(p, mean, method="decode")
    assert img.shape == (3, 28, 28, 1) and float(img.min()) > 0.0 and float(img.max()) < 1.0
    counts[enc, dec] = sum(a.size for a in jax.tree.leaves(p))
  conv_enc = (
    (5 * 5 * 32 + 32) + (4 * 4 * 32 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (5 * 5 * 64 * 16 + 16)
  )
  conv_dec = (
    (4 * 4 * 8 * 32 + 32) + (5 * 5 * 32 * 16 + 16) + (5 * 5 * 16 * 16 + 16) + (4 * 4 * 16 + 1)
  )
  mlp_enc, mlp_dec = (784 * 16 + 16) + (16 * 16 + 16), (8 * 16 + 16) + (16 * 784 + 784)
  assert counts["conv", "conv"] == conv_enc + conv_dec == 84977
  assert counts["conv", "mlp"] == conv_enc + mlp_dec
  assert counts["mlp", "conv"] == mlp_enc + conv_dec
  with pytest.raises(ValueError, match="decoder must be one of"):
    genclf.ABSVAE(image_shape=(28, 28, 1), decoder="deconv").init(key, x, key)


def test_abs_conv_scores_equal_direct_objective_and_vmap_equals_loop(key):
  shape = (28, 28, 1)
  vae = genclf.ABSVAE(image_shape=shape, latent_dim=8, encoder="conv", decoder="conv")
  per_class = jax.vmap(lambda k: vae.init(k, jnp.zeros((1, *shape)), k))(jax.random.split(key, K))
  params = genclf.abs_params(vae, per_class, jax.random.fold_in(key, 1), n_samples=16)
  fn = genclf.abs_logits_fn(vae, steps=2)
  xs = jax.random.uniform(jax.random.fold_in(key, 2), (2, *shape))
  batched = np.asarray(jax.jit(jax.vmap(fn, in_axes=(None, 0)))(params, xs))
  for i, x in enumerate(xs):
    np.testing.assert_allclose(batched[i], np.asarray(fn(params, x)), rtol=1e-5, atol=1e-5)
    _, z = fn.inference(params, x)
    for k in range(K):
      pk = jax.tree.map(lambda a, k=k: a[k], params["vae"])
      rec = np.asarray(vae.apply(pk, z[k][None], method="decode")[0], np.float64)
      direct = np.sum((np.asarray(x, np.float64) - rec) ** 2) + 0.5 * np.sum(np.asarray(z[k]) ** 2)
      np.testing.assert_allclose(batched[i, k], -440.0 * direct / x.size, rtol=1e-4)


def test_cvae_conv_features_shapes(key):
  """Li et al.'s encoder: 5x5 stride-2 SAME convolutions (28 -> 14 -> 7 -> 4), then Dense layers
  shared by the classes before y joins."""
  x = jax.random.uniform(key, (2, 28, 28, 1))
  y = jnp.eye(K)[:2]
  for feature_hidden, width in [((), 4 * 4 * 5), ((6,), 6)]:
    vae = genclf.ConditionalVAE(
      image_shape=(28, 28, 1), num_classes=K, latent_dim=3, features=(4, 4, 5),
      feature_hidden=feature_hidden, hidden=(7,), decoder_hidden=(9, 11),
    )  # fmt: skip
    p = vae.init(key, x, y, key)
    assert vae.apply(p, x, method="features_of").shape == (2, width)
    out = vae.apply(p, x, y, key)
    assert [a.shape for a in out] == [(2, 28, 28, 1)] + [(2, 3)] * 4
    assert p["params"]["dec_dense_1"]["kernel"].shape == (9, 11)


@pytest.mark.parametrize("shape", [(28, 28, 1), (27, 30, 3)])
def test_cvae_transposed_conv_decoder_shapes_and_parameter_count(key, shape):
  """Li et al.'s decoder (conv_generator_mnist_B.py): Dense 500, Dense to a 4 x 4 x 64 map, then
  5x5 stride-2 transposed convolutions 4 -> 7 -> 14 -> 28 (other sizes: halved, rounded up)."""
  d, h = 64, 500
  vae = genclf.ConditionalVAE(
    image_shape=shape, num_classes=10, latent_dim=d, hidden=(5,), decoder_hidden=(h,),
    decoder_features=(64, 64, 64), prior="standard",
  )  # fmt: skip
  x = jax.random.uniform(key, (2, *shape))
  p = vae.init(key, x, jnp.eye(10)[:2], key)
  z = jax.random.normal(key, (3, d))
  assert vae.apply(p, z, jnp.eye(10)[:3], method="decode").shape == (3, *shape)
  s = [-(-shape[0] // 8), -(-shape[1] // 8)]
  dec = p["params"]
  count = sum(a.size for n, v in dec.items() if n.startswith(("dec_", "pixel", "deconv"))
              for a in jax.tree_util.tree_leaves(v))  # fmt: skip
  c = shape[-1]
  expected = (
    (d + 10 + 1) * h + (h + 1) * s[0] * s[1] * 64 + 2 * (25 * 64 * 64 + 64) + 25 * 64 * c + c
  )
  assert count == expected
  assert genclf._halvings((28, 28), 3) == [(4, 4), (7, 7), (14, 14)]


def test_cvae_training_loss_is_likelihood_plus_closed_form_kl(key):
  vae, _, params = _cvae(key, likelihood="l2", prior="learned")
  p = params["vae"]
  x = jax.random.uniform(jax.random.fold_in(key, 2), (5, *SHAPE))
  y = jnp.array([0, 1, 2, 1, 0])
  loss = float(genclf.cvae_training_loss(vae, p, x, y, jax.random.fold_in(key, 3)))
  onehot = np.eye(K, dtype=np.float32)[np.asarray(y)]
  logits, mean, logvar, pm, plv = (
    np.asarray(a, np.float64) for a in vae.apply(p, x, onehot, jax.random.fold_in(key, 3))
  )
  sq = np.sum((np.asarray(x, np.float64) - 1.0 / (1.0 + np.exp(-logits))) ** 2, axis=(1, 2, 3))
  # The closed-form KL against a Monte Carlo estimate of E_q[log q - log p].
  eps = np.asarray(jax.random.normal(jax.random.fold_in(key, 4), (200_000, 1, 2)), np.float64)
  z = mean + np.exp(0.5 * logvar) * eps
  log_n = lambda z, m, lv: -0.5 * np.sum((z - m) ** 2 * np.exp(-lv) + lv, -1)
  kl_mc = np.mean(log_n(z, mean, logvar) - log_n(z, pm, plv), 0)
  kl = np.asarray(genclf.gaussian_kl(mean, logvar, pm, plv))
  np.testing.assert_allclose(kl, kl_mc, rtol=0.05, atol=0.01)
  np.testing.assert_allclose(loss, np.mean(sq + kl), rtol=1e-5)


def test_per_class_loop_equals_vmap_for_conv_vae(key):
  """The conv ABS VAE's classes run as an unrolled loop (genclf.per_class): same as vmap."""
  vae = genclf.ABSVAE(image_shape=(28, 28, 1), latent_dim=8, encoder="conv", decoder="conv")
  per_class = jax.vmap(lambda k: vae.init(k, jnp.zeros((1, 28, 28, 1)), k))(
    jax.random.split(key, K)
  )
  z = jax.random.normal(key, (K, 8))
  decode = lambda p, zk: vae.apply(p, zk[None], method="decode")[0]
  np.testing.assert_allclose(
    np.asarray(genclf.per_class(vae, decode, per_class, z)),
    np.asarray(jax.vmap(decode)(per_class, z)),
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_abs_batch_norm_population_statistics_reproduce_the_training_batch(key, arch):
  """With the population statistics of one batch (`population_statistics`, one batch of all
  the images), the inference mode (stored statistics) gives exactly what training mode (the
  batch's statistics) gives on that batch; before them (mean 0, var 1) it does not."""
  shape = (28, 28, 1)
  vae = genclf.ABSVAE(
    image_shape=shape, latent_dim=4, hidden=(12, 6), encoder=arch, decoder=arch, batch_norm=True
  )
  x = jax.random.uniform(key, (6, *shape))
  p = vae.init(key, x, key)
  # the untrained BN's learned scale 1 and bias 0 are made generic so the check sees them
  p = jax.tree_util.tree_map_with_path(
    lambda path, a: a + 0.3 * jax.random.normal(jax.random.fold_in(key, len(str(path))), a.shape)
    if "scale" in str(path) or "bias" in str(path) else a, p
  )  # fmt: skip
  stats_key = jax.random.fold_in(key, 7)
  fitted = genclf.population_statistics(vae, p, np.asarray(x), stats_key, batch_size=6)
  (batch_key,) = jax.random.split(stats_key, 1)
  train_mode = vae.apply(p, x, batch_key, True)
  eval_mode = vae.apply(fitted, x, batch_key, False)
  for a, b in zip(train_mode, eval_mode, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  unfitted = vae.apply(p, x, batch_key, False)
  assert float(jnp.max(jnp.abs(unfitted[0] - train_mode[0]))) > 1e-3
  # the stored statistics are those of the first layer's pre-activations, by direct computation
  if arch == "mlp":
    first = x.reshape(6, -1) @ p["params"]["enc_layers_0"]["kernel"]
    first = first + p["params"]["enc_layers_0"]["bias"][None]
    bn = fitted["params"]["enc_norms_0"]
    np.testing.assert_allclose(bn["mean"], np.mean(first, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn["var"], np.var(first, 0), rtol=1e-3, atol=1e-6)


def test_abs_batch_norm_statistics_are_untouched_by_training(key):
  """The stored statistics get no gradient from the training objective (batch statistics)."""
  shape = (28, 28, 1)
  vae = genclf.ABSVAE(image_shape=shape, latent_dim=4, hidden=(8,), batch_norm=True)
  x = jax.random.uniform(key, (5, *shape))
  p = vae.init(key, x, key)
  g = jax.grad(lambda q: genclf.abs_training_loss(vae, q, x, key))(p)["params"]
  for layer in ("enc_norms_0", "dec_norms_0"):
    assert float(jnp.max(jnp.abs(g[layer]["mean"]))) == 0.0
    assert float(jnp.max(jnp.abs(g[layer]["var"]))) == 0.0
    assert float(jnp.max(jnp.abs(g[layer]["scale"]))) > 0.0


def test_pytorch_abs_decoder_conversion_matches_direct_evaluation(key):
  """benchmarks/abs_reference.py: a PyTorch-layout ABS decoder (transposed convolutions with
  BatchNorm in evaluation mode, Schott et al.'s shapes), converted to `ABSVAE` variables (BN
  folded, kernels flipped), decodes as a direct NumPy evaluation of the PyTorch layers does."""
  from benchmarks import abs_reference

  rng = np.random.default_rng(0)
  sd = {}
  enc = [(32, 1, 5), (32, 32, 4), (64, 32, 3), (16, 64, 5)]  # [out, in, k] of Conv2d
  dec = [(8, 32, 4), (32, 16, 5), (16, 16, 5), (16, 1, 4)]  # [in, out, k] of ConvTranspose2d
  for part, layers in (("Encoder", enc), ("Decoder", dec)):
    for i, (a, b, k) in enumerate(layers):
      sd[f"{part}.conv_{i}.weight"] = rng.normal(0, 0.3, (a, b, k, k)).astype(np.float32)
      out = a if part == "Encoder" else b
      sd[f"{part}.conv_{i}.bias"] = rng.normal(0, 0.1, out).astype(np.float32)
      if i < 3:
        sd[f"{part}.bn_{i}.weight"] = rng.uniform(0.5, 1.5, out).astype(np.float32)
        sd[f"{part}.bn_{i}.bias"] = rng.normal(0, 0.2, out).astype(np.float32)
        sd[f"{part}.bn_{i}.running_mean"] = rng.normal(0, 0.5, out).astype(np.float32)
        sd[f"{part}.bn_{i}.running_var"] = rng.uniform(0.5, 3.0, out).astype(np.float32)
  vae = genclf.ABSVAE(image_shape=(28, 28, 1), latent_dim=8, encoder="conv", decoder="conv")
  params = jax.tree.map(jnp.asarray, abs_reference.convert(sd))
  for z in rng.normal(size=(3, 8)).astype(np.float32):
    ours = np.asarray(vae.apply(params, jnp.asarray(z)[None], method="decode"))[0]
    np.testing.assert_allclose(ours, abs_reference.reference_decode(sd, z), atol=1e-5)
  # the converted encoder is a valid ABSVAE encoder of the right shapes (mean, logvar heads)
  mean, logvar = vae.apply(params, jnp.zeros((1, 28, 28, 1)), method="encode")
  assert mean.shape == logvar.shape == (1, 8)
