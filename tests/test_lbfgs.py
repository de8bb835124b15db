"""Box-constrained L-BFGS against closed forms and scipy's L-BFGS-B; the Szegedy attack."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from vae_attacks.attacks import lbfgs as lb

# ---------------------------------------------------------------- problems (jax and numpy)


def quadratic(x, a, b):
  """0.5 * sum a_i (x_i - b_i)^2: the box minimiser is clip(b, lo, hi)."""
  return 0.5 * jnp.sum(a * (x - b) ** 2)


def rosenbrock(x, n=None):
  """Rosenbrock's function of x[:n]; the coordinates after n sit in (x_i - 0.25)^2."""
  n = x.shape[0] if n is None else n
  i = jnp.arange(x.shape[0])
  chain = 100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2
  return jnp.sum(jnp.where(i[:-1] < n - 1, chain, 0.0)) + jnp.sum(
    jnp.where(i >= n, (x - 0.25) ** 2, 0.0)
  )


def np_rosenbrock(x, n):
  """The same in float64 with its gradient, for scipy."""
  r, e = x[:n], x[n:]
  f = np.sum(100.0 * (r[1:] - r[:-1] ** 2) ** 2 + (1.0 - r[:-1]) ** 2) + np.sum((e - 0.25) ** 2)
  g = np.zeros_like(x)
  g[: n - 1] = -400.0 * r[:-1] * (r[1:] - r[:-1] ** 2) - 2.0 * (1.0 - r[:-1])
  g[1:n] += 200.0 * (r[1:] - r[:-1] ** 2)
  g[n:] = 2.0 * (e - 0.25)
  return f, g


def linear_logits(params, x):
  return params["w"] @ x.ravel() + params["b"]


def np_szegedy(params, x0, target, c, x):
  """c ||x - x0||^2 + CE(W x + b, target) and its gradient, in float64."""
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  z = w @ x + b
  p = np.exp(z - z.max())
  p /= p.sum()
  f = c * np.sum((x - x0) ** 2) - np.log(p[target])
  g = 2.0 * c * (x - x0) + w.T @ (p - np.eye(len(b))[target])
  return f, g


def scipy_min(fun_and_grad, x0, lo, hi):
  res = scipy.optimize.minimize(
    fun_and_grad,
    np.asarray(x0, np.float64).ravel(),
    jac=True,
    method="L-BFGS-B",
    bounds=[(lo, hi)] * np.size(x0),
    options=dict(maxiter=1000, ftol=1e-14, gtol=1e-10),
  )
  return res.fun, res.x


def assert_in_box(x, lo, hi):
  x = np.asarray(x)
  assert np.all(x >= lo) and np.all(x <= hi), (x.min(), x.max())


# ---------------------------------------------------------------- minimise_box
# Few compiles (each costs seconds on CPU): every test shares a handful of jitted solvers.


@functools.partial(jax.jit, static_argnames="num_trials")
def solve_quadratics(h, centre, x0, *, num_trials):
  """vmap over problems 0.5 (x - centre)' H (x - centre) on [0, 1]^n."""
  solve = lambda h, centre, x0: lb.minimise_box(
    lambda x: 0.5 * (x - centre) @ h @ (x - centre),
    x0,
    max_iters=100,
    tol=1e-6,
    num_trials=num_trials,
  )
  return jax.vmap(solve)(h, centre, x0)


@pytest.fixture(scope="module")
def quadratics():
  """A diagonal problem (minimiser clip(b), closed form) and a coupled one, both with the
  box active on some coordinates."""
  rng = np.random.default_rng(0)
  n = 20
  a = rng.uniform(0.5, 20.0, n)  # condition number ~40
  b = rng.uniform(-1.0, 2.0, n)  # about half outside [0, 1]
  m = rng.normal(size=(n, n))
  h = m @ m.T / n + 0.1 * np.eye(n)
  q = rng.normal(size=n) * 2.0
  hs, centres = np.stack([np.diag(a), h]), np.stack([b, np.linalg.solve(h, q)])
  x0 = np.full((2, n), 0.5)
  args = [jnp.asarray(v, jnp.float32) for v in (hs, centres, x0)]
  sols = {t: solve_quadratics(*args, num_trials=t) for t in (1, 4)}
  return (a, b), (h, q), sols


@pytest.mark.parametrize("num_trials", [1, 4])
def test_diagonal_quadratic_reaches_clipped_minimum(quadratics, num_trials):
  (a, b), _, sols = quadratics
  sol = jax.tree.map(lambda v: v[0], sols[num_trials])
  x_star = np.clip(b, 0.0, 1.0)
  f_star = 0.5 * np.sum(a * (x_star - b) ** 2)
  assert np.sum((b < 0) | (b > 1)) >= 5  # constraints really active
  assert_in_box(sol.x, 0.0, 1.0)
  np.testing.assert_allclose(sol.x, x_star, atol=1e-4)
  np.testing.assert_allclose(sol.value, f_star, rtol=1e-5, atol=1e-5)
  assert bool(sol.converged)
  assert float(sol.grad_norm) < 1e-3


@pytest.mark.parametrize("num_trials", [1, 4])
def test_coupled_quadratic_matches_scipy(quadratics, num_trials):
  _, (h, q), sols = quadratics
  sol = jax.tree.map(lambda v: v[1], sols[num_trials])
  c = np.linalg.solve(h, q)
  f_ref, x_ref = scipy_min(
    lambda x: (0.5 * (x - c) @ h @ (x - c), h @ (x - c)), np.full(20, 0.5), 0, 1
  )
  assert 0 < np.sum((x_ref <= 1e-9) | (x_ref >= 1 - 1e-9)) < 20  # some, not all, active
  assert_in_box(sol.x, 0.0, 1.0)
  np.testing.assert_allclose(sol.value, f_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sol.x, x_ref, atol=5e-3)


ROSENBROCK_BOXES = [(-2.0, 2.0), (-2.0, 0.5), (0.0, 0.7)]
ROSENBROCK_DIMS = [2, 5, 10]  # padded to 10 coordinates: one compile for all nine problems
ROSENBROCK_CASES = [(n, lo, hi) for n in ROSENBROCK_DIMS for lo, hi in ROSENBROCK_BOXES]


@pytest.fixture(scope="module")
def rosenbrock_solutions():
  """vmap over (dimension, box): the dimension and the bounds are traced per problem."""
  ns, lo, hi = (jnp.asarray(v) for v in zip(*ROSENBROCK_CASES, strict=True))
  x0 = np.stack([np.full(10, -1.0 if lo < 0 else 0.1) for _, lo, _ in ROSENBROCK_CASES])
  solve = lambda x0, n, lo, hi: lb.minimise_box(
    lambda x: rosenbrock(x, n), x0, lower=lo, upper=hi, max_iters=300
  )
  return x0, jax.jit(jax.vmap(solve))(jnp.asarray(x0, jnp.float32), ns, lo, hi)


@pytest.mark.parametrize("n", ROSENBROCK_DIMS)
def test_rosenbrock_matches_scipy(rosenbrock_solutions, n):
  x0, sols = rosenbrock_solutions
  for i, (n_i, lo, hi) in enumerate(ROSENBROCK_CASES):
    if n_i != n:
      continue
    sol = jax.tree.map(lambda v, i=i: v[i], sols)
    f_ref, _ = scipy_min(lambda x: np_rosenbrock(x, n), x0[i], lo, hi)
    assert_in_box(sol.x, lo, hi)
    np.testing.assert_allclose(sol.value, f_ref, rtol=1e-4, atol=1e-5, err_msg=f"box {lo, hi}")
    assert float(sol.grad_norm) < 1e-3  # near KKT (gradients here reach ~1e3; f ~ 10 in float32)


def test_value_trace_is_monotone_and_padded(rosenbrock_solutions):
  _, sols = rosenbrock_solutions
  i = ROSENBROCK_CASES.index((5, -2.0, 2.0))
  trace, k = np.asarray(sols.value_trace[i]), int(sols.iterations[i])
  assert trace.shape == (300,)
  assert np.all(np.diff(trace) <= 0)  # Armijo: every accepted iteration lowers f
  assert 10 < k < 300
  np.testing.assert_array_equal(trace[k - 1 :], float(sols.value[i]))


@pytest.fixture(scope="module")
def linear_model():
  rng = np.random.default_rng(2)
  k, shape = 4, (6, 6, 1)  # 36 inputs
  params = {
    "w": jnp.asarray(rng.normal(size=(k, 36)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=k), jnp.float32),
  }
  x = rng.uniform(size=(6, *shape)).astype(np.float32)
  x[:, :2] = 0.0  # pixels on the box boundary, as in MNIST
  logits = np.asarray(jax.vmap(lambda z: linear_logits(params, z))(jnp.asarray(x)))
  target = np.argmin(logits, axis=1).astype(np.int32)  # hardest target
  return params, x, target


def test_szegedy_objective_matches_scipy(linear_model):
  params, x, target = linear_model
  c = np.array([0.05, 1.0, 0.05, 1.0, 0.05, 1.0], np.float32)
  solve = jax.jit(
    jax.vmap(
      lambda x0, t, c: lb.minimise_box(
        lambda z: lb.szegedy_objective(linear_logits, params, x0, t, c, z), x0, max_iters=100
      )
    )
  )
  sol = solve(jnp.asarray(x), jnp.asarray(target), jnp.asarray(c))
  assert_in_box(sol.x, 0.0, 1.0)
  for i in range(len(x)):
    x0 = x[i].ravel().astype(np.float64)
    f_ref, _ = scipy_min(lambda z, i=i, x0=x0: np_szegedy(params, x0, target[i], c[i], z), x0, 0, 1)
    np.testing.assert_allclose(sol.value[i], f_ref, rtol=2e-5, atol=2e-5)


TRACES = []  # one entry per trace of the batched objective


def batched_objective(z, shared, per_problem):
  TRACES.append(1)
  del shared
  a, b = per_problem
  return 0.5 * jnp.sum(a * (z - b) ** 2) + 0.25 * jnp.sum(z**4)  # convex: no chaos from rounding


def batch_of_problems(seed):
  rng = np.random.default_rng(seed)
  n, batch = 8, 4
  a = jnp.asarray(rng.uniform(0.5, 50.0, (batch, n)), jnp.float32)
  b = jnp.asarray(rng.uniform(-0.5, 1.5, (batch, n)), jnp.float32)
  x0 = jnp.asarray(rng.uniform(0.0, 1.0, (batch, n)), jnp.float32)
  return x0, a, b


def test_vmap_and_blocks_equal_single_solves():
  x0, a, b = batch_of_problems(3)
  single = jax.jit(lambda x, a, b: lb.minimise_box(lambda z: batched_objective(z, None, (a, b)), x))
  singles = [single(x0[i], a[i], b[i]) for i in range(len(x0))]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *singles)
  assert len(set(np.asarray(stacked.iterations).tolist())) > 1  # they finish at different steps
  chex.assert_trees_all_close(jax.jit(jax.vmap(single))(x0, a, b), stacked, rtol=1e-5, atol=1e-6)

  for compact_below in (None, 0.5):  # 0.5: the last two running problems finish in a batch of 2
    blocks = lb.minimise_box_batched(
      batched_objective, x0, None, (a, b), block_steps=2, compact_below=compact_below
    )
    chex.assert_trees_all_close(blocks, stacked, rtol=1e-5, atol=1e-6)


def test_no_retrace_on_second_call():
  for seed in range(2):
    x0, a, b = batch_of_problems(seed)
    lb.minimise_box_batched(batched_objective, x0, None, (a, b), block_steps=2, compact_below=None)
    if seed == 0:
      traced = len(TRACES)
  assert len(TRACES) == traced


def test_attack_does_not_retrace(hyperplane):
  params, x, _ = hyperplane
  for c in (0.1, 0.2):  # attack_over_c allows one trace in the whole module
    attack_over_c(params, jnp.asarray(x), jnp.int32(1), jnp.full((2,), c, jnp.float32))


def dense_lbfgs_inverse(pairs_s, pairs_y):
  """The L-BFGS inverse approximation H as a dense matrix (float64), pairs oldest first,
  H_0 = gamma I with gamma = s.y / y.y of the newest pair (Nocedal and Wright, eq. 7.20)."""
  s_new, y_new = pairs_s[-1], pairs_y[-1]
  h = np.eye(len(s_new)) * (s_new @ y_new) / (y_new @ y_new)
  for s, y in zip(pairs_s, pairs_y, strict=True):
    rho = 1.0 / (s @ y)
    v = np.eye(len(s)) - rho * np.outer(y, s)
    h = v.T @ h @ v + rho * np.outer(s, s)
  return h


def test_restricted_direction_is_the_free_block_of_the_inverse():
  """kind="restricted": -[H]_FF g_F on the free variables, the bound on the active ones, with
  the kept Gram matrix equal to pairs @ pairs.T after every store (the ring buffer wraps)."""
  rng = np.random.default_rng(7)
  n, m, stores = 12, 3, 5
  a = rng.normal(size=(n, n))
  a = a @ a.T / n + 0.5 * np.eye(n)  # y = A s: every pair has s.y > 0
  x = rng.uniform(0.1, 0.9, n)
  active = np.zeros(n, bool)
  active[[1, 4, 9]] = True
  g = rng.normal(size=n)
  free = lb._FreeSet(
    jnp.asarray(active),
    jnp.where(jnp.asarray(active), 1.0, 0.0),
    jnp.asarray(np.where(active, 0, g), jnp.float32),
  )
  pairs, gram = jnp.zeros((2 * m, n), jnp.float32), jnp.zeros((2 * m, 2 * m), jnp.float32)
  stored = jnp.int32(0)
  history = []
  for _ in range(stores):
    s = rng.normal(size=n)
    y = a @ s
    history.append((s, y))
    d, pairs, gram, stored = lb._lbfgs_direction(
      pairs, gram, stored, jnp.asarray(x, jnp.float32), free, jnp.asarray(s, jnp.float32),
      jnp.asarray(y, jnp.float32), "restricted",
    )  # fmt: skip
    p64 = np.asarray(pairs, np.float64)
    np.testing.assert_allclose(gram, p64 @ p64.T, rtol=1e-5, atol=1e-4)
  assert int(stored) == stores
  last = history[-m:]
  h = dense_lbfgs_inverse([p[0] for p in last], [p[1] for p in last])
  g_free = np.where(active, 0.0, g)
  expected = np.where(active, 1.0 - x, -(h @ g_free))
  np.testing.assert_allclose(d, expected, rtol=2e-4, atol=2e-5)
  # Not the subspace direction (nothing stored: s = y = 0): the two differ once variables are
  # active.
  d_sub, *_ = lb._lbfgs_direction(
    pairs, gram, stored, jnp.asarray(x, jnp.float32), free, jnp.zeros(n), jnp.zeros(n),
    "subspace",
  )  # fmt: skip
  assert np.abs(np.asarray(d_sub) - expected).max() > 1e-3


@functools.partial(jax.jit, static_argnames="direction")
def solve_szegedy(params, x, target, c, *, direction):
  return jax.vmap(
    lambda x0, t, c: lb.minimise_box(
      lambda z: lb.szegedy_objective(linear_logits, params, x0, t, c, z), x0, max_iters=100,
      direction=direction,
    )
  )(x, target, c)  # fmt: skip


def test_restricted_direction_matches_scipy(quadratics, linear_model):
  """The two-metric ("restricted") direction reaches scipy's L-BFGS-B minima too: the
  diagonal and coupled quadratics with active bounds, and the Szegedy objective."""
  (a, b), (h, q), _ = quadratics
  centres = np.stack([b, np.linalg.solve(h, q)])
  hs = np.stack([np.diag(a), h])
  solve = jax.jit(
    jax.vmap(
      lambda h, centre: lb.minimise_box(
        lambda x: 0.5 * (x - centre) @ h @ (x - centre), jnp.full(20, 0.5), max_iters=100,
        tol=1e-6, direction="restricted",
      )
    )
  )  # fmt: skip
  sols = solve(jnp.asarray(hs, jnp.float32), jnp.asarray(centres, jnp.float32))
  assert_in_box(sols.x, 0.0, 1.0)
  np.testing.assert_allclose(sols.x[0], np.clip(b, 0.0, 1.0), atol=1e-4)
  c = centres[1]
  f_ref, x_ref = scipy_min(
    lambda x: (0.5 * (x - c) @ h @ (x - c), h @ (x - c)), np.full(20, 0.5), 0, 1
  )
  np.testing.assert_allclose(sols.value[1], f_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sols.x[1], x_ref, atol=5e-3)

  params, x, target = linear_model
  cs = np.array([0.05, 1.0, 0.05, 1.0, 0.05, 1.0], np.float32)
  sol = solve_szegedy(params, jnp.asarray(x), jnp.asarray(target), jnp.asarray(cs),
                      direction="restricted")  # fmt: skip
  assert_in_box(sol.x, 0.0, 1.0)
  for i in range(len(x)):
    x0 = x[i].ravel().astype(np.float64)
    f_ref, _ = scipy_min(
      lambda z, i=i, x0=x0: np_szegedy(params, x0, target[i], cs[i], z), x0, 0, 1
    )
    np.testing.assert_allclose(sol.value[i], f_ref, rtol=2e-5, atol=2e-5)


def test_bad_knobs_raise():
  with pytest.raises(ValueError, match="num_trials"):
    lb.minimise_box(rosenbrock, jnp.zeros(2), num_trials=0)
  with pytest.raises(ValueError, match="direction must be one of"):
    lb.minimise_box(rosenbrock, jnp.zeros(2), direction="newton")


# ---------------------------------------------------------------- the Szegedy attack


@pytest.fixture(scope="module")
def hyperplane():
  """A 2-class linear model: the smallest L2 perturbation to class 1 is the hyperplane
  distance -margin / ||w||, reached inside the box."""
  rng = np.random.default_rng(4)
  n, steep = 40, 8.0
  u = rng.normal(size=n)
  u /= np.linalg.norm(u)
  x = np.clip(0.5 + 0.05 * rng.normal(size=n), 0.2, 0.8).astype(np.float32)
  dist = 0.6
  beta = -u @ x - dist  # u.x + beta = -dist: class 0 wins by a margin of `dist` along u
  w = np.stack([np.zeros(n), steep * u]).astype(np.float32)
  b = np.array([0.0, steep * beta], np.float32)
  closest = x + dist * u
  assert np.all((closest > 0) & (closest < 1))  # the hyperplane's closest point is in the box
  return {"w": jnp.asarray(w), "b": jnp.asarray(b)}, x.reshape(5, 8, 1), dist


def test_c_search_finds_the_smallest_perturbation(hyperplane):
  params, x, dist = hyperplane
  target = jnp.int32(1)
  assert int(jnp.argmax(linear_logits(params, jnp.asarray(x)))) == 0
  res = jax.jit(
    lambda x: lb.lbfgs_c_search(linear_logits, params, x, target, c_init=100.0, search_steps=12)
  )(jnp.asarray(x))
  assert bool(res.success)
  assert_in_box(res.x_adv, 0.0, 1.0)
  l2 = float(res.distortion.l2)
  assert l2 >= dist * (1 - 1e-4)  # nothing successful is closer than the hyperplane
  assert l2 <= dist * 1.02


@jax.jit
@chex.assert_max_traces(n=1)
def attack_over_c(params, x, target, cs):
  """The L-BFGS attack of one pair, vmapped over a grid of c (as the runner does)."""
  return jax.vmap(lambda c: lb.lbfgs(linear_logits, params, x, target, eps=c))(cs)


def test_lbfgs_attack_succeeds_with_small_c_and_not_with_large_c(hyperplane):
  params, x, dist = hyperplane
  cs = jnp.asarray([0.1, 100.0], jnp.float32)
  res = attack_over_c(params, jnp.asarray(x), jnp.int32(1), cs)
  np.testing.assert_array_equal(res.success, [True, False])
  assert_in_box(res.x_adv, 0.0, 1.0)
  assert res.loss_trace.shape == (2, 50)
  assert np.all(np.diff(np.asarray(res.loss_trace), axis=1) <= 0)
  assert float(res.distortion.l2[1]) < dist < float(res.distortion.l2[0])

  # The host-loop driver runs the same attack.
  pairs = jnp.stack([jnp.asarray(x)] * 2), jnp.ones((2,), jnp.int32)
  batch = lb.lbfgs_batch(linear_logits, params, *pairs, eps=cs, compact_below=None)
  chex.assert_trees_all_close(batch, res, rtol=1e-5, atol=1e-6)


def test_untargeted_lbfgs_leaves_the_label(linear_model):
  params, x, _ = linear_model
  label = jnp.argmax(linear_logits(params, jnp.asarray(x[0])))
  res = jax.jit(
    lambda x: lb.lbfgs(linear_logits, params, x, label, eps=jnp.float32(0.01), targeted=False)
  )(jnp.asarray(x[0]))
  assert bool(res.success)
  assert int(jnp.argmax(linear_logits(params, res.x_adv))) != int(label)
