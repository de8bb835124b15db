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
  model = TinyCNN()
  x = np.random.default_rng(1).uniform(size=(4, 8, 8, 1)).astype(np.float32)
  x[:, :2] = 0.0  # MNIST-like: pixels on the box boundary
  x[:, -1] = 1.0
  params = jax.jit(model.init)(jax.random.key(1), jnp.asarray(x[0]))
  return model.apply, params, x


# (attack name, norm) -> (attack, eps, knobs); pgd = bim from a random start.
ATTACKS = {
  ("fgsm", "linf"): (fgsm, 0.1, {}),
  ("fgsm", "l2"): (fgsm, 0.5, {}),
  ("fgsm", "l1"): (fgsm, 0.8, {}),
  ("pgd", "linf"): (pgd, 0.1, dict(step_size=0.04, steps=3)),
  ("pgd", "l2"): (pgd, 0.5, dict(step_size=0.2, steps=3)),
  ("pgd", "l1"): (pgd, 2.0, dict(step_size=0.8, steps=3, sparsity=0.9)),
}


@pytest.mark.parametrize(("name", "norm"), sorted(ATTACKS))
def test_stays_in_ball_and_box(name, norm, cnn, key):
  attack, eps, knobs = ATTACKS[(name, norm)]
  fn, params, x = cnn

  def one(xi, ti, k):
    extra = {"key": k} if name == "pgd" else {}
    return attack(fn, params, xi, ti, eps=eps, norm=norm, **knobs, **extra)

  targets = jnp.arange(x.shape[0]) % K
  res = jax.jit(jax.vmap(one))(jnp.asarray(x), targets, jax.random.split(key, x.shape[0]))
  sizes = [norm_of(d, norm) for d in np.asarray(res.x_adv) - x]
  assert max(sizes) <= eps + 1e-5
  assert np.all(np.asarray(res.x_adv) >= 0.0) and np.all(np.asarray(res.x_adv) <= 1.0)
  np.testing.assert_allclose(getattr(res.distortion, norm), sizes, rtol=1e-5, atol=1e-6)
  logits = jax.vmap(fn, in_axes=(None, 0))(params, res.x_adv)
  np.testing.assert_array_equal(res.success, np.argmax(logits, axis=-1) == targets)


@pytest.mark.parametrize("norm", NORMS)
def test_fgsm_equals_closed_form_on_linear_model(norm, linear):
  params, x = linear
  w, b = params["w"].astype(np.float64), params["b"].astype(np.float64)
  eps = 0.2
  labels = np.arange(x.shape[0]) % K
  for targeted in (True, False):
    attack = functools.partial(fgsm, linear_logits, params, eps=eps, norm=norm, targeted=targeted)
    res = jax.jit(jax.vmap(attack))(jnp.asarray(x), labels)
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
# unrolling is exercised by test_vmap_over_pairs_equals_a_loop and test_stays_in_ball_and_box.
BIM_KNOBS = {
  "linf": dict(step_size=0.02, steps=15, unroll=1),
  "l2": dict(step_size=0.1, steps=15, unroll=1),
  "l1": dict(step_size=0.25, steps=15, sparsity=0.8, unroll=1),
}


@pytest.mark.parametrize("norm", NORMS)
def test_targeted_bim_reaches_a_reachable_target(norm):
  params, x, t, source, eps = reachable_problem(norm)
  assert jnp.argmax(linear_logits(params, x)) == source
  start_loss = -jax.nn.log_softmax(linear_logits(params, x))[t]
  attack = jax.jit(functools.partial(bim, linear_logits, eps=eps, norm=norm, **BIM_KNOBS[norm]))
  res = attack(params, x, t)
  assert res.success and res.target_prob > 0.5
  assert norm_of(res.x_adv - x, norm) <= eps + 1e-5
  trace = np.asarray(res.loss_trace)
  assert trace.shape == (BIM_KNOBS[norm]["steps"],)
  assert trace[0] < start_loss and trace[-1] < np.log(2)
  assert np.all(np.diff(trace) <= 1e-4)  # the loss goes down on this convex problem
  assert int(res.iterations) == BIM_KNOBS[norm]["steps"]


def test_untargeted_bim_moves_away_from_the_label():
  params, x, _, label, eps = reachable_problem("linf")  # another class can win in the ball
  res = jax.jit(
    functools.partial(bim, linear_logits, eps=eps, targeted=False, **BIM_KNOBS["linf"])
  )(params, x, label)
  ce = lambda xx: -jax.nn.log_softmax(linear_logits(params, xx))[label]
  assert res.success and jnp.argmax(linear_logits(params, res.x_adv)) != label
  assert ce(res.x_adv) > ce(x) + 0.5
  np.testing.assert_allclose(res.loss_trace[-1], -ce(res.x_adv), rtol=1e-5)  # minimises -CE
  assert np.all(np.diff(np.asarray(res.loss_trace)) <= 1e-4)
  np.testing.assert_allclose(res.target_prob, jnp.exp(-ce(res.x_adv)), rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_vmap_over_pairs_equals_a_loop(norm, linear):
  params, x = linear
  targets = (jnp.arange(x.shape[0]) + 1) % K
  eps = {"linf": 0.05, "l2": 0.3, "l1": 1.0}[norm]
  knobs = dict(BIM_KNOBS[norm], steps=4, unroll=True)
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
  # New values of the same shapes (image, target, eps) must not trace again.
  jitted(params, x[1], 2, eps / 2)
  assert len(traces) == 1


def test_eps_grid_vmap_success_is_monotone(linear):
  params, x = linear
  # Targets the model does not already predict, so eps = 0 succeeds nowhere.
  targets = (jnp.argmax(jax.vmap(linear_logits, in_axes=(None, 0))(params, x), -1) + 1) % K
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
  radii = {"linf": 0.1, "l2": 0.5, "l1": 2.0}

  @jax.jit
  def starts_and_pgd(keys):
    starts = {
      norm: jax.vmap(random_start_point, in_axes=(0, None, None, None))(keys, x0, eps, norm)
      for norm, eps in radii.items()
    }
    # PGD with step 0 stays at its random start.
    res = pgd(linear_logits, params, x0, 1, eps=2.0, step_size=0.0, steps=1, norm="l1", key=keys[0])
    return starts, res.x_adv

  starts, pgd_x = starts_and_pgd(jax.random.split(key, 32))
  for norm, eps in radii.items():
    s = np.asarray(starts[norm])
    sizes = np.array([norm_of(si - x0, norm) for si in s])
    assert np.all(sizes <= eps + 1e-5)
    assert np.all(s >= 0.0) and np.all(s <= 1.0)
    assert len(np.unique(s.reshape(len(s), -1), axis=0)) == len(s)
    # Uniform in a 16-dimensional ball: most points lie near the rim (before box clipping).
    assert np.median(sizes) > 0.5 * eps
  np.testing.assert_array_equal(pgd_x, starts["l1"][0])


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
