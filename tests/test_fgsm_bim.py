"""FGSM and BIM/PGD/SLIDE on a linear softmax model (exact gradients) and a tiny CNN."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_attacks.attacks.bim import bim, pgd, random_start_point
from vae_attacks.attacks.fgsm import fgsm

K = 4  # classes
SHAPE = (4, 4, 1)  # linear-model image
N = 16
NORMS = ("linf", "l2", "l1")


def linear_logits(params, x):
  return params["w"] @ x.ravel() + params["b"]


def numpy_logits(params, x):
  """The linear model on one image [..] or a batch [B, ..] of images, in float64 numpy."""
  x = np.asarray(x, np.float64)
  flat = x.reshape(-1) if x.shape == SHAPE else x.reshape(len(x), -1)
  return flat @ np.asarray(params["w"], np.float64).T + np.asarray(params["b"], np.float64)


def numpy_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_ce_grad(w, b, x, label):
  """d CE(W x + b, label) / dx = W^T (softmax - onehot), in float64."""
  z = w @ x.ravel() + b
  p = np.exp(z - z.max())
  p /= p.sum()
  return (w.T @ (p - np.eye(K)[label])).reshape(x.shape)


def norm_of(d, norm):
  d = np.asarray(d).ravel()
  return {"linf": np.abs(d).max(), "l2": np.linalg.norm(d), "l1": np.abs(d).sum()}[norm]


@pytest.fixture(scope="module")
def linear():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(K, N)).astype(np.float32)
  params = {"w": w, "b": rng.normal(size=K).astype(np.float32)}
  x = rng.uniform(0.05, 0.95, size=(8, *SHAPE)).astype(np.float32)
  return params, x


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):  # one example [8, 8, 1]
    h = nn.relu(nn.Conv(4, (3, 3))(x[None]))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    return nn.Dense(K)(h.reshape(-1))


@pytest.fixture(scope="module")
def cnn():
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)
  x[:, :2] = 0.0  # MNIST-like: pixels on the box boundary
  x[:, -1] = 1.0
  normal = lambda *shape: jnp.asarray(
    rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32
  )
  # The parameters TinyCNN().init would make, drawn in numpy (no compilation).
  params = {
    "params": {
      "Conv_0": {"kernel": normal(3, 3, 1, 4), "bias": jnp.zeros(4)},
      "Dense_0": {"kernel": normal(64, K), "bias": jnp.zeros(K)},
    }
  }
  return TinyCNN().apply, params, x


# norm -> (eps, pgd knobs)
BALL_CASES = {
  "linf": (0.1, dict(step_size=0.04, steps=3, unroll=1)),
  "l2": (0.5, dict(step_size=0.2, steps=3, unroll=1)),
  "l1": (2.0, dict(step_size=0.8, steps=3, sparsity=0.9, unroll=1)),
}


@pytest.mark.parametrize("norm", NORMS)
def test_fgsm_and_pgd_stay_in_ball_and_box(norm, linear, key):
  params, x = linear
  x = x.copy()
  x[:, 0] = 0.0  # MNIST-like: pixels on the box boundary
  x[:, -1] = 1.0
  eps, knobs = BALL_CASES[norm]
  targets = jnp.arange(x.shape[0]) % K

  @jax.jit
  @jax.vmap
  def attacks(xi, ti, k):
    return (
      fgsm(linear_logits, params, xi, ti, eps=eps, norm=norm),
      pgd(linear_logits, params, xi, ti, eps=eps, norm=norm, key=k, **knobs),
    )

  for res in attacks(jnp.asarray(x), targets, jax.random.split(key, x.shape[0])):
    sizes = [norm_of(d, norm) for d in np.asarray(res.x_adv) - x]
    assert max(sizes) <= eps + 1e-5
    assert np.all(np.asarray(res.x_adv) >= 0.0) and np.all(np.asarray(res.x_adv) <= 1.0)
    np.testing.assert_allclose(getattr(res.distortion, norm), sizes, rtol=1e-5, atol=1e-6)
    logits = numpy_logits(params, res.x_adv)
    np.testing.assert_array_equal(res.success, np.argmax(logits, axis=-1) == targets)
    np.testing.assert_allclose(
      res.target_prob, np.exp(numpy_log_softmax(logits))[np.arange(8), targets], rtol=1e-5
    )


@pytest.mark.parametrize("norm", NORMS)
def test_fgsm_equals_closed_form_on_linear_model(norm, linear):
  params, x = linear
  w, b = params["w"].astype(np.float64), params["b"].astype(np.float64)
  eps = 0.2
  labels = np.arange(x.shape[0]) % K
  attack = functools.partial(fgsm, linear_logits, params, eps=eps, norm=norm)
  both = jax.jit(jax.vmap(lambda xi, li: (attack(xi, li), attack(xi, li, targeted=False))))
  for targeted, res in zip((True, False), both(jnp.asarray(x), labels), strict=True):
    for i in range(x.shape[0]):
      g = numpy_ce_grad(w, b, x[i].astype(np.float64), labels[i])
      g = g if targeted else -g  # the gradient of the loss the attack minimises
      if norm == "linf":
        step = np.sign(g)
      elif norm == "l2":
        step = g / np.linalg.norm(g)
      else:  # x is interior, so every coordinate may move
        j = np.argmax(np.abs(g.ravel()))
        step = (np.arange(N) == j).reshape(g.shape) * np.sign(g.ravel()[j])
      np.testing.assert_allclose(res.x_adv[i], np.clip(x[i] - eps * step, 0, 1), atol=1e-6)


def test_fgsm_l1_and_slide_skip_coordinates_the_box_blocks(linear):
  params, x = linear
  w, b = params["w"].astype(np.float64), params["b"].astype(np.float64)
  attack = jax.jit(functools.partial(fgsm, linear_logits, params, eps=0.2, norm="l1"))
  # One SLIDE step of L1 size eps on the top 1% (= 1 of 16) coordinates is the same step.
  slide = jax.jit(
    functools.partial(bim, linear_logits, params, eps=0.2, step_size=0.2, steps=1, norm="l1")
  )
  blocked_cases = 0
  for i in range(x.shape[0]):
    label = i % K
    xi = x[i].ravel().copy()
    g = numpy_ce_grad(w, b, xi.reshape(SHAPE), label).ravel()
    j = np.argmax(np.abs(g))
    xi[j] = 0.0 if g[j] > 0 else 1.0  # the step -sign(g_j) would leave the box
    xi = xi.reshape(SHAPE).astype(np.float32)
    g = numpy_ce_grad(w, b, xi.astype(np.float64), label).ravel()
    blocked = ((xi.ravel() <= 0) & (g > 0)) | ((xi.ravel() >= 1) & (g < 0))
    k = np.argmax(np.where(blocked, -1.0, np.abs(g)))
    blocked_cases += int(blocked[np.argmax(np.abs(g))])
    expected = xi.ravel().copy()
    expected[k] = np.clip(expected[k] - 0.2 * np.sign(g[k]), 0, 1)
    np.testing.assert_allclose(attack(xi, label).x_adv.ravel(), expected, atol=1e-6)
    np.testing.assert_allclose(slide(xi, label).x_adv.ravel(), expected, atol=1e-6)
  assert blocked_cases > 0  # the largest |g| was blocked at least once


def test_slide_step_equals_closed_form_on_linear_model(linear):
  params, x = linear
  w, b = params["w"].astype(np.float64), params["b"].astype(np.float64)
  # sparsity 0.8 moves the top ceil(0.2 * 16) = 4 coordinates by step / 4 each; eps is large
  # enough and x interior enough that neither the ball nor the box binds.
  slide = jax.jit(
    functools.partial(
      bim, linear_logits, params, eps=5.0, step_size=0.2, steps=1, norm="l1", sparsity=0.8
    )
  )
  for i in range(x.shape[0]):
    g = numpy_ce_grad(w, b, x[i].astype(np.float64), i % K).ravel()
    top = np.argsort(-np.abs(g))[:4]
    expected = x[i].ravel().copy()
    expected[top] -= 0.05 * np.sign(g[top])
    np.testing.assert_allclose(slide(x[i], i % K).x_adv.ravel(), expected, atol=1e-6)


def reachable_problem(norm):
  """A linear model, x and eps where a point x + d of the ball ∩ box makes class 2 win.

  b is chosen so that the logits at x + d give the target a margin m = 2 over every other
  class, while another class (the "source") wins at x. The CE to the target is convex in
  the image, and at x + d it is log(1 + 3 e^-2) < log 2, so its minimum over ball ∩ box
  puts probability > 1/2 on the target: the targeted attack provably can succeed.
  """
  rng = np.random.default_rng(7)
  t = 2
  w = rng.normal(size=(K, N))
  w[t] += 2.0 * rng.choice([-1.0, 1.0], size=N)  # the target has a strong direction
  x = rng.uniform(0.3, 0.7, size=N)
  c = w[t] - w.mean(0)
  if norm == "linf":
    eps, d = 0.1, 0.1 * np.sign(c)
  elif norm == "l2":
    eps, d = 0.5, 0.5 * c / np.linalg.norm(c)
  else:
    eps, d = 1.0, np.zeros(N)
    top = np.argsort(-np.abs(c))[:4]
    d[top] = 0.25 * np.sign(c[top])
  assert norm_of(d, norm) <= eps + 1e-9 and np.all((x + d >= 0) & (x + d <= 1))
  z0 = (w[t][None] - w) @ d - 2.0  # logits at x; then z0 + W d = 2 e_t + const
  z0[t] = 0.0
  source = int(np.argmax(z0))
  assert source != t
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(z0 - w @ x, jnp.float32)}
  return params, jnp.asarray(x.reshape(SHAPE), jnp.float32), t, source, eps


# Rolled loops (unroll=1) compile in a time independent of `steps`; the default full
# unrolling is exercised by test_vmap_over_pairs_equals_a_loop and the ball/box test.
BIM_KNOBS = {
  "linf": dict(step_size=0.02, steps=15, unroll=1),
  "l2": dict(step_size=0.1, steps=15, unroll=1),
  "l1": dict(step_size=0.25, steps=15, sparsity=0.8, unroll=1),
}


@pytest.mark.parametrize("norm", NORMS)
def test_targeted_bim_reaches_a_reachable_target(norm):
  params, x, t, source, eps = reachable_problem(norm)
  assert np.argmax(numpy_logits(params, x)) == source
  start_loss = -numpy_log_softmax(numpy_logits(params, x))[t]
  attack = jax.jit(functools.partial(bim, linear_logits, eps=eps, norm=norm, **BIM_KNOBS[norm]))
  res = attack(params, x, t)
  assert res.success and res.target_prob > 0.5
  assert norm_of(res.x_adv - x, norm) <= eps + 1e-5
  trace = np.asarray(res.loss_trace)
  assert trace.shape == (BIM_KNOBS[norm]["steps"],)
  # trace[t] is the loss AFTER step t: below the start, and at the end that of x_adv.
  assert trace[0] < start_loss - 1e-3 and trace[-1] < np.log(2)
  end_loss = -numpy_log_softmax(numpy_logits(params, res.x_adv))[t]
  np.testing.assert_allclose(trace[-1], end_loss, rtol=1e-4, atol=1e-6)
  assert np.all(np.diff(trace) <= 1e-4)  # the loss goes down on this convex problem
  assert int(res.iterations) == BIM_KNOBS[norm]["steps"]


def test_untargeted_bim_moves_away_from_the_label():
  params, x, _, label, eps = reachable_problem("linf")  # another class can win in the ball
  res = jax.jit(
    functools.partial(bim, linear_logits, eps=eps, targeted=False, **BIM_KNOBS["linf"])
  )(params, x, label)
  ce = lambda xx: -numpy_log_softmax(numpy_logits(params, xx))[label]
  assert res.success and np.argmax(numpy_logits(params, res.x_adv)) != label
  assert ce(res.x_adv) > ce(x) + 0.5
  np.testing.assert_allclose(res.loss_trace[-1], -ce(res.x_adv), rtol=1e-5)  # minimises -CE
  assert np.all(np.diff(np.asarray(res.loss_trace)) <= 1e-4)
  np.testing.assert_allclose(res.target_prob, np.exp(-ce(res.x_adv)), rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_vmap_over_pairs_equals_a_loop(norm, linear):
  params, x = linear
  targets = (jnp.arange(x.shape[0]) + 1) % K
  eps = {"linf": 0.05, "l2": 0.3, "l1": 1.0}[norm]
  knobs = dict(BIM_KNOBS[norm], steps=3, unroll=True)
  attack = functools.partial(bim, linear_logits, params, eps=eps, norm=norm, **knobs)
  batched = jax.jit(jax.vmap(attack))(jnp.asarray(x), targets)
  single = jax.jit(attack)
  for i in range(x.shape[0]):
    one = single(x[i], targets[i])
    assert one.success == batched.success[i]
    np.testing.assert_allclose(one.x_adv, batched.x_adv[i], atol=1e-5)
    np.testing.assert_allclose(one.distortion.l2, batched.distortion.l2[i], atol=1e-5)
    np.testing.assert_allclose(one.loss_trace, batched.loss_trace[i], rtol=1e-4, atol=1e-5)
    assert norm_of(one.x_adv - x[i], norm) <= eps + 1e-5
    assert np.all(np.asarray(one.x_adv) >= 0.0) and np.all(np.asarray(one.x_adv) <= 1.0)


def test_jit_equals_eager_and_no_retrace(cnn):
  apply, params, x = cnn
  eps = 2.0  # l1: the path with the most parts (top-k, bisection)
  knobs = dict(norm="l1", step_size=eps / 4, steps=3, sparsity=0.9, unroll=1)
  eager = bim(apply, params, x[0], 1, eps=eps, **knobs)
  traces = []

  def attack(p, xx, t, e):
    traces.append(1)  # runs once per trace, never when the compiled code runs
    return bim(apply, p, xx, t, eps=e, **knobs)

  jitted = jax.jit(attack)
  fast = jitted(params, x[0], 1, eps)
  np.testing.assert_allclose(fast.x_adv, eager.x_adv, atol=1e-5)
  np.testing.assert_allclose(fast.loss_trace, eager.loss_trace, rtol=1e-4)
  assert fast.success == eager.success
  assert np.abs(np.asarray(fast.x_adv) - x[0]).sum() <= eps + 1e-5
  assert np.all(np.asarray(fast.x_adv) >= 0.0) and np.all(np.asarray(fast.x_adv) <= 1.0)
  # New values of the same shapes (image, target, eps) must not trace again.
  jitted(params, x[1], 2, eps / 2)
  assert len(traces) == 1


def test_eps_grid_vmap_success_is_monotone(linear):
  params, x = linear
  # Targets the model does not already predict, so eps = 0 succeeds nowhere.
  targets = (np.argmax(numpy_logits(params, x), -1) + 1) % K
  grid = jnp.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.4])

  def one(xi, ti, eps):
    return bim(linear_logits, params, xi, ti, eps=eps, step_size=eps / 4, steps=10, unroll=1)

  over_pairs = jax.vmap(one, in_axes=(0, 0, None))
  res = jax.jit(jax.vmap(over_pairs, in_axes=(None, None, 0)))(jnp.asarray(x), targets, grid)
  rate = np.asarray(res.success).mean(axis=1)
  assert rate[0] == 0.0 and rate[-1] > 0.5
  assert np.all(np.diff(rate) >= -1.0 / x.shape[0])  # "monotone-ish": at most one pair flips
  assert np.all(np.asarray(res.distortion.linf) <= grid[:, None] + 1e-6)
  # A traced eps from the grid gives the same result as the same eps passed alone.
  alone = jax.jit(over_pairs)(jnp.asarray(x), targets, 0.05)
  np.testing.assert_allclose(alone.x_adv, res.x_adv[2], atol=1e-6)


def test_early_stop_freezes_the_first_successful_iterate():
  params, x, t, _, eps = reachable_problem("linf")
  run = lambda steps, early_stop: jax.jit(
    functools.partial(
      bim, linear_logits, eps=eps, step_size=0.02, steps=steps, early_stop=early_stop
    )
  )(params, x, t)
  res = run(15, True)
  n = int(res.iterations)
  assert res.success and 0 < n < 15
  assert np.all(np.diff(np.asarray(res.loss_trace)[n - 1 :]) == 0)  # frozen after success
  # Same trajectory without early stop: n steps give that iterate, n - 1 steps fail.
  np.testing.assert_array_equal(run(n, False).x_adv, res.x_adv)
  if n > 1:
    assert not run(n - 1, False).success


def test_random_start_is_key_dependent_in_ball_and_box_and_used_by_pgd(linear, key):
  params, x = linear
  x0 = jnp.asarray(x[0]).at[0].set(0.0)  # a row of pixels on the box boundary
  keys = jax.random.split(key, 16)
  for norm, eps in (("linf", 0.1), ("l2", 0.5), ("l1", 2.0)):
    start = jax.jit(functools.partial(random_start_point, x=x0, eps=eps, norm=norm))
    s = np.stack([np.asarray(start(k)) for k in keys])
    sizes = np.array([norm_of(si - x0, norm) for si in s])
    assert np.all(sizes <= eps + 1e-5)
    assert np.all(s >= 0.0) and np.all(s <= 1.0)
    assert len(np.unique(s.reshape(len(s), -1), axis=0)) == len(s)
    # Uniform in a 16-dimensional ball: most points lie near the rim (before box clipping).
    assert np.median(sizes) > 0.5 * eps
  # PGD with step 0 stays at its random start.
  res = jax.jit(functools.partial(pgd, linear_logits, eps=0.1, step_size=0.0, steps=1, unroll=1))(
    params, x0, 1, key=keys[0]
  )
  np.testing.assert_array_equal(res.x_adv, random_start_point(keys[0], x0, 0.1, "linf"))


def test_bad_input_raises(linear):
  params, x = linear
  call = functools.partial(bim, linear_logits, params, x[0], 1, step_size=0.01)
  with pytest.raises(ValueError, match="norm='l3'.*linf, l2, l1"):
    call(eps=0.1, steps=3, norm="l3")
  with pytest.raises(ValueError, match="norm='L2'"):
    fgsm(linear_logits, params, x[0], 1, eps=0.1, norm="L2")
  with pytest.raises(ValueError, match="steps"):
    call(eps=0.1, steps=0)
  with pytest.raises(ValueError, match="eps"):
    call(eps=-0.1, steps=3)
  with pytest.raises(ValueError, match="step_size"):
    bim(linear_logits, params, x[0], 1, eps=0.1, step_size=-1.0, steps=3)
  with pytest.raises(ValueError, match="eps"):
    fgsm(linear_logits, params, x[0], 1, eps=-1.0)
  with pytest.raises(ValueError, match="key"):
    call(eps=0.1, steps=3, random_start=True)
  with pytest.raises(ValueError, match="sparsity"):
    call(eps=0.1, steps=3, norm="l1", sparsity=1.0)
