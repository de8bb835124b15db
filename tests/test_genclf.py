"""Generative classifiers (vae_attacks.genclf) and the attacks that know them: the class scores
equal a direct computation, inference is deterministic given its key, gradients through the
inference match finite differences, and the decision-based attack finds a linear model's
boundary."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_attacks import genclf, train
from vae_attacks.attacks import decision, latent_descent, registry

SHAPE = (4, 4, 1)
K = 3


def _abs(key, *, steps=3, n_samples=32, gradient="envelope", radius=5.0):
  vae = genclf.ABSVAE(image_shape=SHAPE, latent_dim=2, hidden=(8,))
  x = jnp.zeros((1, *SHAPE))
  per_class = jax.vmap(lambda k: vae.init(k, x, k))(jax.random.split(key, K))
  params = genclf.abs_params(vae, per_class, jax.random.fold_in(key, 1), n_samples=n_samples)
  fn = genclf.abs_logits_fn(vae, steps=steps, lr=0.05, radius=radius, gradient=gradient)
  return vae, fn, params


def _cvae(key, num_samples=4):
  vae = genclf.ConditionalVAE(image_shape=SHAPE, num_classes=K, latent_dim=2, hidden=(8,))
  p = vae.init(key, jnp.zeros((1, *SHAPE)), jnp.zeros((1, K)), key)
  params = genclf.cvae_params(p, jax.random.fold_in(key, 1), num_samples=num_samples, latent_dim=2)
  return vae, genclf.cvae_logits_fn(vae), params


def _image(key):
  return jax.random.uniform(key, SHAPE)


def test_abs_scores_equal_direct_objective(key):
  vae, fn, params = _abs(key)
  x = _image(jax.random.fold_in(key, 2))
  logits = fn(params, x)
  _, z = fn.inference(params, x)
  for k in range(K):
    pk = jax.tree.map(lambda a, k=k: a[k], params["vae"])
    rec = vae.apply(pk, z[k][None], method="decode")[0]
    direct = np.sum((np.asarray(x) - np.asarray(rec)) ** 2) + 0.5 * np.sum(np.asarray(z[k]) ** 2)
    np.testing.assert_allclose(logits[k], -440.0 * direct / x.size, rtol=1e-5)


def test_abs_bank_pick_is_the_best_sample_and_steps_improve_it(key):
  _, fn0, params = _abs(key, steps=0)
  _, fn20, _ = _abs(key, steps=20)
  x = _image(jax.random.fold_in(key, 2))
  # steps=0: the bank's best sample, i.e. the max over the bank of the direct objective.
  flat = x.reshape(-1)
  direct = (
    np.sum((np.asarray(params["bank_x"]) - np.asarray(flat)) ** 2, -1)
    + 0.5 * np.sum(np.asarray(params["bank_z"]) ** 2, -1)
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


def test_cvae_scores_equal_direct_importance_weighted_bound(key):
  vae, fn, params = _cvae(key, num_samples=4)
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
      loglik = -np.sum(np.asarray(optax.sigmoid_binary_cross_entropy(pl[0], x)), dtype=np.float64)
      log_prior = -0.5 * np.sum(z**2 + np.log(2 * np.pi))
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
  # The registered H0 family stays the latent-probe VAEs; "cvae" is not one of them.
  assert study.is_vae("mlp_vae") and not study.is_vae("cvae") and not study.is_vae("abs")
