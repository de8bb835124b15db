"""Projections onto norm balls: closed forms, a QP solver reference, ball/box membership."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from vae_attacks.attacks import projections

# Jitted once per shape, so the many small eager calls below do not recompile the loops.
project_linf = jax.jit(projections.project_linf)
project_l2 = jax.jit(projections.project_l2)
project_l1 = jax.jit(projections.project_l1)
project_l1_box = jax.jit(projections.project_l1_box)


def qp_l1_box(v, eps, lo, hi):
  """argmin ||d - v||^2 s.t. ||d||_1 <= eps, lo <= d <= hi, by SLSQP on d = p - m, p, m >= 0."""
  n = v.shape[0]
  split = lambda z: z[:n] - z[n:]
  res = scipy.optimize.minimize(
    lambda z: 0.5 * np.sum((split(z) - v) ** 2),
    np.zeros(2 * n),
    jac=lambda z: np.concatenate([split(z) - v, v - split(z)]),
    bounds=[(0.0, h) for h in np.maximum(hi, 0)] + [(0.0, -lo_) for lo_ in np.minimum(lo, 0)],
    constraints=[
      {"type": "ineq", "fun": lambda z: eps - np.sum(z), "jac": lambda z: -np.ones(2 * n)}
    ],
    method="SLSQP",
    options={"ftol": 1e-14, "maxiter": 1000},
  )
  assert res.success, res.message
  return split(res.x)


def bisection_l1(v, eps):
  """Projection onto the L1 ball by float64 bisection on the soft threshold."""
  a = np.abs(v)
  if a.sum() <= eps:
    return v
  lo, hi = 0.0, a.max()
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if np.maximum(a - mid, 0).sum() <= eps else (mid, hi)
  return np.sign(v) * np.maximum(a - hi, 0)


def box_of(x):
  return -x.ravel(), 1.0 - x.ravel()


def test_linf_and_l2_equal_closed_form():
  rng = np.random.default_rng(0)
  for eps in (0.0, 0.05, 0.3, 10.0):
    d = rng.normal(size=(3, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(project_linf(jnp.asarray(d), eps), np.clip(d, -eps, eps))
    norm = np.linalg.norm(d)
    expected = d * min(1.0, eps / norm)
    np.testing.assert_allclose(project_l2(jnp.asarray(d), eps), expected, rtol=1e-6, atol=1e-7)


def test_l1_equals_qp_solution_on_small_vectors():
  rng = np.random.default_rng(1)
  for _ in range(20):
    v = rng.normal(size=5)
    eps = rng.uniform(0.0, 1.2 * np.abs(v).sum())
    got = np.asarray(project_l1(jnp.asarray(v, jnp.float32), eps))
    big = np.full(5, np.inf)
    np.testing.assert_allclose(got, qp_l1_box(v, eps, -big, big), atol=2e-5)


def test_l1_equals_bisection_reference_in_high_dimension():
  rng = np.random.default_rng(2)
  v = rng.normal(size=(7, 9, 3)) * rng.uniform(size=(7, 9, 3)) ** 4  # many small entries
  for eps in (0.0, 0.5, 3.0, 30.0):
    got = np.asarray(project_l1(jnp.asarray(v, jnp.float32), eps))
    assert got.shape == v.shape
    np.testing.assert_allclose(got.ravel(), bisection_l1(v.ravel(), eps), atol=1e-5)


def test_l1_box_equals_qp_solution_on_small_vectors():
  rng = np.random.default_rng(3)
  for i in range(20):
    x = rng.uniform(size=6)
    x[: i % 3] = 0.0  # pixels on the box boundary, as in MNIST
    x[-(i % 2) :] = 1.0 if i % 2 else x[-1]
    v = rng.normal(size=6)
    eps = rng.uniform(0.0, 4.0)
    got = np.asarray(project_l1_box(jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32), eps))
    np.testing.assert_allclose(got, qp_l1_box(v, eps, *box_of(x)), atol=2e-5)


def test_l1_box_with_inactive_box_equals_l1_ball():
  rng = np.random.default_rng(4)
  x = jnp.full((50,), 0.5)
  v = jnp.asarray(rng.normal(size=50) * 0.1, jnp.float32)  # |v| < 0.5: box never binds
  np.testing.assert_allclose(project_l1_box(x, v, 1.0), project_l1(v, 1.0), atol=1e-6)


PROJECTIONS = {
  "linf": (lambda x, d, eps: project_linf(d, eps), lambda d: np.abs(d).max()),
  "l2": (lambda x, d, eps: project_l2(d, eps), lambda d: np.linalg.norm(d)),
  "l1": (lambda x, d, eps: project_l1(d, eps), lambda d: np.abs(d).sum()),
  "l1_box": (project_l1_box, lambda d: np.abs(d).sum()),
}


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_inside_ball_idempotent_and_fixed_inside(name):
  project, norm = PROJECTIONS[name]
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.uniform(size=(6, 6, 2)) * (rng.uniform(size=(6, 6, 2)) > 0.3), jnp.float32)
  for eps in (0.0, 0.1, 1.0, 5.0):
    d = jnp.asarray(rng.normal(size=(6, 6, 2)), jnp.float32)
    p = project(x, d, eps)
    assert p.shape == d.shape
    assert norm(np.asarray(p)) <= eps * (1 + 1e-6) + 1e-6
    if name == "l1_box":
      assert np.all(np.asarray(x + p) >= -1e-7) and np.all(np.asarray(x + p) <= 1 + 1e-7)
    np.testing.assert_allclose(project(x, p, eps), p, atol=1e-6)
  # A point strictly inside (ball and box) is returned unchanged.
  d = jnp.asarray(rng.uniform(-1, 1, size=(6, 6, 2)), jnp.float32) * 0.1 / 72
  d = jnp.where(x + d < 0, -d, d)  # stay inside the box
  np.testing.assert_array_equal(project(x, d, 0.2), d)


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_traced_eps_under_jit_and_vmap(name):
  project, _ = PROJECTIONS[name]
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.uniform(size=(4, 5)), jnp.float32)
  d = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  grid = jnp.array([0.0, 0.2, 1.0, 3.0])
  batched = jax.jit(jax.vmap(project, in_axes=(None, None, 0)))(x, d, grid)
  for i, eps in enumerate(grid.tolist()):
    np.testing.assert_allclose(batched[i], project(x, d, eps), atol=1e-6)
  np.testing.assert_array_equal(batched[0], np.zeros((4, 5)))
