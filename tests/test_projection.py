"""Projection onto a decoder's range (Defense-GAN): monotone in steps and restarts, least
squares on a linear decoder, BPDA and unrolled gradients, vmap equals a loop, rejection rate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_attacks.defenses import projection

D = 3  # latent
SHAPE = (4, 4, 1)
P = 16  # pixels
K = 3  # classes
# A batch of R + 1 restarts may round differently from one of R (XLA picks kernels by shape):
# "never rises" holds up to a few float32 ulps.
ROUNDING = 1e-6


def mlp_decode(params, z):
  """A small non-linear decoder with sigmoid pixels (non-convex projection problem)."""
  h = jnp.tanh(params["w1"] @ z + params["b1"])
  return jax.nn.sigmoid(params["w2"] @ h + params["b2"]).reshape(SHAPE)


def linear_decode(params, z):
  return (params["w"] @ z + params["b"]).reshape(SHAPE)


def linear_classify(params, x):
  return params["w"] @ x.ravel() + params["b"]


@pytest.fixture(scope="module")
def mlp():
  rng = np.random.default_rng(0)
  params = {
    "w1": jnp.asarray(rng.normal(size=(8, D)), jnp.float32),
    "b1": jnp.asarray(rng.normal(size=8), jnp.float32),
    "w2": jnp.asarray(2 * rng.normal(size=(P, 8)), jnp.float32),
    "b2": jnp.zeros(P, jnp.float32),
  }
  x = jnp.asarray(rng.uniform(size=(4, *SHAPE)), jnp.float32)
  return params, x


@pytest.fixture(scope="module")
def clf():
  rng = np.random.default_rng(1)
  return {
    "w": jnp.asarray(rng.normal(size=(K, P)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=K), jnp.float32),
  }


@functools.partial(jax.jit, static_argnames=("steps", "restarts", "optimizer"))
def _errors(params, x, key, *, steps, restarts, optimizer="adam"):
  project = lambda xi: projection.project(
    mlp_decode,
    params,
    xi,
    key,
    latent_dim=D,
    steps=steps,
    restarts=restarts,
    learning_rate=0.1,
    optimizer=optimizer,
  )
  return jax.vmap(project)(x).error


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_error_never_rises_with_steps(mlp, key, optimizer):
  params, x = mlp
  errors = np.stack(
    [_errors(params, x, key, steps=s, restarts=2, optimizer=optimizer) for s in (0, 1, 3, 20)]
  )
  assert np.all(np.diff(errors, axis=0) <= ROUNDING * errors[:-1]), errors
  assert np.all(errors[-1] < errors[0])  # and the descent does make progress


def test_error_never_rises_with_restarts(mlp, key):
  params, x = mlp
  starts = [projection.restart_starts(key, r, D) for r in (1, 2, 5)]
  np.testing.assert_array_equal(starts[1][:1], starts[0])  # nested starts
  np.testing.assert_array_equal(starts[2][:2], starts[1])
  errors = np.stack([_errors(params, x, key, steps=5, restarts=r) for r in (1, 2, 5, 8)])
  assert np.all(np.diff(errors, axis=0) <= ROUNDING * errors[:-1]), errors
  assert np.any(errors[-1] < errors[0])


def test_linear_decoder_matches_least_squares(key):
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(P, D)))
  w = q * np.array([1.0, 0.8, 0.6])  # condition number 5/3: plain SGD converges fast
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(rng.normal(size=P), jnp.float32)}
  # Off the range, but not far: float32 errors still resolve the last steps.
  x = (w @ rng.normal(size=D) + np.asarray(params["b"]) + 0.1 * rng.normal(size=P)).reshape(SHAPE)
  x = x.astype(np.float32)
  res = projection.project(
    linear_decode,
    params,
    jnp.asarray(x),
    key,
    latent_dim=D,
    steps=100,
    restarts=2,
    learning_rate=0.4,  # 1 / L with L = 2 sigma_max^2 = 2 would be 0.5
    optimizer="sgd",
  )
  z_star, *_ = np.linalg.lstsq(w, x.ravel() - np.asarray(params["b"]), rcond=None)
  np.testing.assert_allclose(res.z, z_star, atol=1e-4)
  x_star = w @ z_star + np.asarray(params["b"])
  np.testing.assert_allclose(res.x_proj.ravel(), x_star, atol=1e-4)
  np.testing.assert_allclose(res.error, np.sum((x_star - x.ravel()) ** 2), rtol=1e-4)


def test_vmap_equals_loop(mlp, key):
  params, x = mlp
  project = functools.partial(
    projection.project, mlp_decode, params, key=key, latent_dim=D, steps=4, restarts=3
  )
  batched = jax.jit(jax.vmap(project))(x)
  looped = [jax.jit(project)(xi) for xi in x]
  for field in projection.Projection._fields:
    np.testing.assert_allclose(
      getattr(batched, field),
      np.stack([getattr(r, field) for r in looped]),
      rtol=1e-5,
      atol=1e-6,
    )


def _defended(gradient, optimizer="adam"):
  return projection.ProjectedClassifier(
    decode=mlp_decode,
    classify=linear_classify,
    latent_dim=D,
    steps=10,
    restarts=2,
    learning_rate=0.1,
    optimizer=optimizer,
    gradient=gradient,
  )


def test_bpda_gradient_is_classifier_gradient_at_projection(mlp, clf):
  params, x = mlp
  model = _defended("bpda")
  both = {"decoder": params, "clf": clf}
  loss = lambda p, xi: jax.nn.log_softmax(model(p, xi))[1]
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(None, 0)))(both, x)
  x_proj = jax.vmap(model.project, in_axes=(None, 0))(both, x).x_proj
  at_proj = jax.vmap(
    jax.grad(lambda xi: jax.nn.log_softmax(linear_classify(clf, xi))[1]),
  )(x_proj)
  assert np.all(np.abs(np.asarray(grads)).sum(axis=(1, 2, 3)) > 1e-3)  # gradients flow
  np.testing.assert_allclose(grads, at_proj, rtol=1e-5, atol=1e-6)
  # The forward pass is the defended classifier: logits of the projection.
  np.testing.assert_allclose(
    jax.vmap(model, in_axes=(None, 0))(both, x),
    jax.vmap(linear_classify, in_axes=(None, 0))(clf, x_proj),
    rtol=1e-5,
  )


def test_unrolled_gradient_matches_finite_differences(mlp, clf):
  params, x = mlp
  model = _defended("unrolled", optimizer="sgd")  # Adam's sign-like steps: rougher in x
  both = {"decoder": params, "clf": clf}
  xi = x[0]
  loss = jax.jit(lambda xx: jax.nn.log_softmax(model(both, xx))[1])
  g = jax.jit(jax.grad(lambda xx: jax.nn.log_softmax(model(both, xx))[1]))(xi)
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 1e-4
  direction = jnp.asarray(np.random.default_rng(3).normal(size=SHAPE), jnp.float32)
  h = 1e-3
  fd = (loss(xi + h * direction) - loss(xi - h * direction)) / (2 * h)
  np.testing.assert_allclose(jnp.vdot(g, direction), fd, rtol=1e-2)


def test_threshold_gives_false_rejection_rate():
  rng = np.random.default_rng(4)
  calib = rng.gamma(2.0, size=4000).astype(np.float32)
  held_out = rng.gamma(2.0, size=4000).astype(np.float32)
  rate = 0.1
  t = projection.fit_threshold(jnp.asarray(calib), false_rejection_rate=rate)
  assert np.mean(projection.reject(jnp.asarray(calib), t)) == pytest.approx(rate, abs=1 / 4000)
  # Held-out rate: binomial sd of the held-out sample plus that of the calibration quantile.
  sd = np.sqrt(rate * (1 - rate) * (1 / calib.size + 1 / held_out.size))
  assert abs(np.mean(projection.reject(jnp.asarray(held_out), t)) - rate) < 3 * sd


def test_defended_classifier_is_a_hashable_value():
  """Equal builds compare and hash equal, so the runner's compile cache hits across builds."""
  assert _defended("bpda") == _defended("bpda")
  assert hash(_defended("bpda")) == hash(_defended("bpda"))
  assert _defended("bpda") != _defended("unrolled")
  with pytest.raises(ValueError, match="gradient"):
    _defended("straight-through")


def test_rejection_aware_logits_add_the_error_hinge_with_its_envelope_gradient(mlp, clf):
  """Class logits are the defended log-probabilities minus the hinge P on the projection error;
  d CE(k)/dx = the BPDA classifier gradient + penalty / t * 2 (x - x_proj) once e > (1 - m) t."""
  params, x = mlp
  model = _defended("bpda")
  both = {"decoder": params, "clf": clf}
  aware = projection.RejectionAwareLogits(model, penalty=3.0, margin=0.1)
  errors = jax.vmap(model.project, in_axes=(None, 0))(both, x).error
  x_proj = jax.vmap(model.project, in_axes=(None, 0))(both, x).x_proj
  # Far above every error: no penalty, the reject logit vanishes.
  loose = {"defended": both, "threshold": jnp.float32(10 * float(errors.max()))}
  out = jax.vmap(aware, in_axes=(None, 0))(loose, x)
  assert out.shape == (x.shape[0], K + 1)
  np.testing.assert_allclose(
    out[:, :K], jax.nn.log_softmax(jax.vmap(model, in_axes=(None, 0))(both, x)), rtol=1e-5
  )
  assert np.all(np.asarray(out[:, K]) < -80)  # log(1 - e^0) + tiny
  # Below every error: a positive hinge, the same for every class, and its gradient.
  t = jnp.float32(0.5 * float(errors.min()))
  tight = {"defended": both, "threshold": t}
  hinge = 3.0 * (errors / t - 0.9)
  out = jax.vmap(aware, in_axes=(None, 0))(tight, x)
  defended = jax.nn.log_softmax(jax.vmap(model, in_axes=(None, 0))(both, x))
  np.testing.assert_allclose(out[:, :K], defended - hinge[:, None], rtol=1e-4)
  ce = lambda p, xi: -aware(p, xi)[1]
  grads = jax.vmap(jax.grad(ce, argnums=1), in_axes=(None, 0))(tight, x)
  bpda = jax.vmap(jax.grad(lambda xp: -jax.nn.log_softmax(linear_classify(clf, xp))[1]))(x_proj)
  np.testing.assert_allclose(grads, bpda + 3.0 / t * 2 * (x - x_proj), rtol=1e-4, atol=1e-5)
