"""APGD (Croce & Hein 2020): ball and box, known minimal budgets on linear models, the paper's
checkpoints, the DLR losses, vmap against a loop, seeds, and APGD against PGD on a trained CNN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fakedata import numpy_init

from vae_attacks import models
from vae_attacks.attacks import apgd, registry, runner

K, N_PIX = 4, 16
SHAPE = (4, 4, 1)


def linear_logits(params, x):
  return params["w"] @ x.ravel() + params["b"]


def linear_model(seed: int, dead=()):
  """A K-class linear model; the classes in `dead` get a bias of -100 (never in play)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(K, N_PIX)).astype(np.float32)
  b = rng.normal(size=K).astype(np.float32)
  b[list(dead)] = -100.0
  return {"w": w, "b": b}


def min_linf_budget(params, x, y, j):
  """The smallest L-inf eps at which x + d (d in the eps-box, x + d in [0, 1]) makes z_j >= z_y.

  Closed form up to a 1-D root: coordinate i can raise (w_j - w_y) . d by |v_i| min(eps, room_i)
  (room: 1 - x_i to move up, x_i down), a monotone piecewise-linear function of eps; inf when even
  eps = 1 cannot close the margin.
  """
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  x = np.asarray(x, np.float64).ravel()
  v = w[j] - w[y]
  margin = (w[y] - w[j]) @ x + b[y] - b[j]
  room = np.where(v > 0, 1.0 - x, x)
  gain = lambda e: np.sum(np.abs(v) * np.minimum(e, room))
  if gain(1.0) < margin:
    return np.inf
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if gain(mid) < margin else (lo, mid)
  return hi


def predictions(params, x):
  return np.argmax(np.asarray(x).reshape(len(x), -1) @ params["w"].T + params["b"], axis=1)


def box_images(n: int, seed: int) -> np.ndarray:
  """Images with pixels on the box's faces (0 and 1), so that the box binds."""
  x = np.random.default_rng(seed).uniform(size=(n, *SHAPE)).astype(np.float32)
  x[:, 0, :2] = 0.0
  x[:, 1, :2] = 1.0
  return x


def vmapped(**static):
  """jit(vmap(apgd)) over (x, target, eps, key) with the linear model; static knobs closed over."""
  one = lambda params, x, t, eps, key: apgd.apgd(
    linear_logits, params, x, t, eps=eps, key=key, **static
  )
  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0)))


def at_both_sides(attack, params, x, target, budget, key):
  """Success at 0.99 and at 1.01 times each pair's budget (one call for both)."""
  n = len(x)
  eps = np.concatenate([0.99 * budget, 1.01 * budget]).astype(np.float32)
  keys = jax.random.split(key, 2 * n)
  res = attack(params, np.concatenate([x, x]), np.concatenate([target, target]), eps, keys)
  ok = np.asarray(res.success)
  return ok[:n], ok[n:], res


# ----------------------------------------------------------------------------------------------
# The schedule and the losses.


def test_checkpoints_are_the_papers():
  """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): at 100 updates the
  checkpoints are 22, 41, 57, 70, 80, 87, 93, 99 (Croce & Hein 2020, Sec. 3.1)."""
  w = apgd.checkpoint_windows(100)
  ends = np.flatnonzero(w) + 1
  np.testing.assert_array_equal(ends, [22, 41, 57, 70, 80, 87, 93, 99])
  np.testing.assert_array_equal(w[ends - 1], np.diff(np.r_[0, ends]))
  assert apgd.checkpoint_windows(1).tolist() == [1]  # windows of at least one update
  assert apgd.gradient_evaluations(39) == 40


def test_dlr_losses_match_their_formulas_and_ignore_shift_and_scale():
  rng = np.random.default_rng(0)
  for _ in range(5):
    z = rng.normal(size=6).astype(np.float32)
    y, t = int(np.argmax(z)), int(np.argsort(z)[-3])
    s = np.sort(z)[::-1]
    untargeted = -(z[y] - s[1]) / (s[0] - s[2])
    targeted = -(z[y] - z[t]) / (s[0] - 0.5 * (s[2] + s[3]))
    other = (y + 1) % 6  # a label that is not the argmax: the max over the others is z_pi1
    for a, c in ((1.0, 0.0), (3.0, -7.0)):
      zz = jnp.asarray(a * z + c)
      np.testing.assert_allclose(apgd._dlr(zz, y), untargeted, rtol=1e-5)
      np.testing.assert_allclose(apgd._dlr_targeted(zz, y, t), targeted, rtol=1e-5)
      np.testing.assert_allclose(
        apgd._dlr(zz, other), -(z[other] - s[0]) / (s[0] - s[2]), rtol=1e-5
      )


def test_ranked_target_is_the_kth_most_likely_other_class():
  z = jnp.asarray([0.5, 3.0, -1.0, 2.0, 1.0])
  label = 1
  assert [int(apgd._ranked_target(z, label, k)) for k in range(1, 5)] == [3, 4, 0, 2]
  # When the label is not the top class, it is still skipped.
  assert [int(apgd._ranked_target(z, 3, k)) for k in range(1, 5)] == [1, 4, 0, 2]


def test_bad_settings_are_refused():
  params, x = linear_model(0), box_images(1, 0)[0]
  call = functools.partial(
    apgd.apgd, linear_logits, params, x, 0, eps=0.1, steps=5, random_start=False
  )
  for bad, match in (
    (dict(norm="l1"), "norm='l1'"),
    (dict(loss="hinge"), "loss='hinge'"),
    (dict(steps=0), "steps=0"),
    (dict(targeted=True, target_rank=1), "target_rank=1 is for targeted=False"),
    (dict(targeted=False, target_rank=K), f"target_rank={K} must be in"),
    (dict(random_start=True), "needs a PRNG key"),
  ):
    with pytest.raises(ValueError, match=match):
      call(**bad)
  with pytest.raises(ValueError, match="needs K >= 3"):
    apgd.apgd(
      lambda p, x: linear_logits(p, x)[:2], params, x, 0, eps=0.1, steps=5, loss="dlr",
      targeted=False, random_start=False,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Known answers on linear models.


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_untargeted_linf_finds_the_minimal_budget_with_the_box(loss, key):
  """A binary linear model (two classes in play, the others' logits at -100): the minimal L-inf
  budget (box included) has a closed form; 1% below it no attack can succeed, 1% above it APGD
  does, on every example. (With more classes in play the untargeted losses may head for a class
  other than the nearest one, so no such guarantee.)"""
  params = linear_model(1, dead=(2, 3))
  x = box_images(24, 1)
  y = predictions(params, x)
  assert set(y.tolist()) <= {0, 1}
  budget = np.array([min_linf_budget(params, x[i], y[i], 1 - y[i]) for i in range(len(x))])
  keep = np.isfinite(budget)
  assert keep.sum() >= 16
  x, y, budget = x[keep], y[keep], budget[keep]
  below, above, res = at_both_sides(
    vmapped(steps=100, loss=loss, targeted=False), params, x, y, budget, key
  )
  assert not below.any()
  assert above.all()
  assert np.all(np.asarray(res.x_adv) >= 0) and np.all(np.asarray(res.x_adv) <= 1)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_targeted_linf_finds_the_minimal_budget(loss, key):
  """With only the source's class and the target in play (the others' logits at -100), reaching
  the target is the binary problem: its closed-form budget (box included) is met within 1%."""
  params = linear_model(2, dead=(2, 3))
  x = box_images(24, 2)
  y = predictions(params, x)
  assert set(y.tolist()) <= {0, 1}
  t = 1 - y
  budget = np.array([min_linf_budget(params, x[i], y[i], t[i]) for i in range(len(x))])
  keep = np.isfinite(budget)
  assert keep.sum() >= 16
  below, above, _ = at_both_sides(
    vmapped(steps=100, loss=loss, targeted=True), params, x[keep], t[keep], budget[keep], key
  )
  assert not below.any()
  assert above.all()


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_untargeted_l2_finds_the_minimal_budget(loss, key):
  """Inside the box the minimal L2 budget of a binary linear model is margin / ||w_y - w_j||_2
  (the examples kept are those whose optimal perturbation stays inside the box)."""
  params = linear_model(3, dead=(2, 3))
  w, b = params["w"].astype(np.float64), params["b"].astype(np.float64)
  x = np.random.default_rng(3).uniform(0.3, 0.7, size=(48, *SHAPE)).astype(np.float32)
  y = predictions(params, x)
  budget, inside = np.zeros(len(x)), np.zeros(len(x), bool)
  for i in range(len(x)):
    flat, j = x[i].ravel().astype(np.float64), 1 - y[i]
    v = w[j] - w[y[i]]
    budget[i] = (v @ -flat + b[y[i]] - b[j]) / np.linalg.norm(v)
    d = budget[i] * 1.01 * v / np.linalg.norm(v)
    inside[i] = np.all((flat + d >= 0) & (flat + d <= 1))
  assert inside.sum() >= 12
  below, above, res = at_both_sides(
    vmapped(steps=100, norm="l2", loss=loss, targeted=False),
    params, x[inside], y[inside], budget[inside], key,
  )  # fmt: skip
  assert not below.any()
  assert above.all()
  eps = np.concatenate([0.99 * budget[inside], 1.01 * budget[inside]])
  assert np.all(np.asarray(res.distortion.l2) <= eps * (1 + 1e-5))


def test_targeted_ce_reaches_the_best_loss_of_the_ball(key):
  """With two classes in play, -CE(target) is monotone in the margin z_t - z_y, whose maximum
  over the box-clipped L-inf ball is at x + clip(eps sign(w_t - w_y)): the attack's best loss
  (minus the trace's last value) is the CE at that vertex."""
  params = linear_model(4, dead=(2, 3))
  x = box_images(8, 4)
  y = predictions(params, x)
  t = 1 - y
  eps = np.full(len(x), 0.05, np.float32)
  res = vmapped(steps=50, loss="ce", targeted=True)(
    params, x, t, eps, jax.random.split(key, len(x))
  )
  w = params["w"]
  for i in range(len(x)):
    vertex = np.clip(x[i] + 0.05 * np.sign(w[t[i]] - w[y[i]]).reshape(SHAPE), 0, 1)
    best = optax.softmax_cross_entropy_with_integer_labels(linear_logits(params, vertex), t[i])
    np.testing.assert_allclose(res.loss_trace[i, -1], best, rtol=1e-4, atol=1e-5)
  assert np.all(np.diff(np.asarray(res.loss_trace), axis=1) <= 0)  # best-so-far: non-increasing


def bowl_logits(params, x):
  """Two classes; class 1's logit -10 ||x - c||^2 peaks at c: the untargeted CE away from class
  0 is maximal at c, an interior point of the ball."""
  return jnp.stack([jnp.zeros(()), -10.0 * jnp.sum((x - params["c"]) ** 2)])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_step_halving_converges_to_an_interior_optimum(norm, key):
  """A fixed step of 2 eps can only land within ~eps of an interior maximiser; APGD's halvings at
  its checkpoints (with the return to the best point) bring it within eps / 16 after 100 updates
  (8 checkpoints: at most 2 eps / 256)."""
  eps = 0.1 if norm == "linf" else 0.4
  rng = np.random.default_rng(8)
  x = rng.uniform(0.3, 0.7, size=SHAPE).astype(np.float32)
  u = rng.uniform(-1, 1, size=SHAPE).astype(np.float32)
  u = u if norm == "linf" else u / np.linalg.norm(u)
  params = {"c": x + 0.5 * eps * u}
  res = apgd.apgd(bowl_logits, params, x, 0, eps=eps, steps=100, norm=norm, targeted=False, key=key)
  err = np.asarray(res.x_adv - params["c"])
  size = np.abs(err).max() if norm == "linf" else np.linalg.norm(err)
  assert size <= eps / 16, size
  assert not res.success


# ----------------------------------------------------------------------------------------------
# Through the runner: ball, box, success, vmap against a loop, seeds.


# Every registry entry once, the norms spread over them.
REGISTRY_RUNS = [
  ("apgd_ce", "untargeted", "linf", {}),
  ("apgd_dlr", "untargeted", "l2", {}),
  ("apgd_t", "untargeted", "linf", {"target_rank": 2}),
  ("apgd_ce", "targeted", "l2", {}),
  ("apgd_dlr", "targeted", "linf", {}),
]
EPS_GRIDS = {"linf": (0.01, 0.3), "l2": (0.05, 2.0)}


@pytest.mark.parametrize("name,kind,norm,extra", REGISTRY_RUNS)
def test_registry_entries_stay_in_ball_and_box_and_report_success(name, kind, norm, extra, key):
  params = linear_model(5)
  x = box_images(6, 5)
  y = predictions(params, x)
  target = (y + 1) % K
  table = registry.UNTARGETED if kind == "untargeted" else registry.ATTACKS
  eps_grid = EPS_GRIDS[norm]
  res = runner.run_attack(
    table[name].run, linear_logits, params, x, y if kind == "untargeted" else target, eps_grid,
    progress=False, norm=norm, steps=10, random_start=True, key=key, **extra,
  )  # fmt: skip
  x_adv = np.asarray(res.x_adv)
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  d = (x_adv - x[None]).reshape(len(eps_grid), len(x), -1)
  size = np.abs(d).max(-1) if norm == "linf" else np.linalg.norm(d, axis=-1)
  assert np.all(size <= np.asarray(eps_grid)[:, None] * (1 + 1e-5) + 1e-6)
  pred = predictions(params, x_adv.reshape(-1, *SHAPE)).reshape(len(eps_grid), len(x))
  want = (pred != y) if kind == "untargeted" else (pred == target)
  np.testing.assert_array_equal(res.success, want)
  assert res.success[-1].sum() > res.success[0].sum()  # the larger budget breaks more


def test_vmap_equals_a_loop_and_seeds_repeat(key):
  params = linear_model(6)
  x = box_images(5, 6)
  y = predictions(params, x)
  knobs = dict(norm="l2", steps=20, target_rank=1)  # L2: the end point depends on the start
  attack = registry.UNTARGETED["apgd_t"].run
  batched = runner.run_attack(
    attack, linear_logits, params, x, y, (1.0,), progress=False, key=key, **knobs
  )
  one = jax.jit(functools.partial(attack, linear_logits, params, eps=1.0, **knobs))
  for i in range(len(x)):
    res = one(x[i], y[i], key=jax.random.fold_in(key, i))
    np.testing.assert_allclose(batched.x_adv[0, i], res.x_adv, atol=1e-6)
    np.testing.assert_allclose(batched.loss_trace[0, i], res.loss_trace, rtol=1e-5, atol=1e-6)
    assert batched.success[0, i] == res.success
  again = runner.run_attack(
    attack, linear_logits, params, x, y, (1.0,), progress=False, key=key, **knobs
  )
  np.testing.assert_array_equal(again.x_adv, batched.x_adv)
  other = runner.run_attack(
    attack, linear_logits, params, x, y, (1.0,), progress=False, key=jax.random.key(7), **knobs
  )
  assert not np.array_equal(other.x_adv, batched.x_adv)


# ----------------------------------------------------------------------------------------------
# APGD against PGD at equal cost on a small trained CNN.

SIDE, CNN_CLASSES = 8, 4


def _cnn_data(n: int, seed: int):
  """Class k: a fixed random pattern at half contrast plus uniform noise (not trivially robust)."""
  rng = np.random.default_rng(seed)
  protos = np.random.default_rng(99).uniform(size=(CNN_CLASSES, SIDE, SIDE, 1)).astype(np.float32)
  y = rng.integers(0, CNN_CLASSES, n).astype(np.int32)
  x = 0.5 * protos[y] + 0.5 * rng.uniform(size=(n, SIDE, SIDE, 1)).astype(np.float32)
  return x, y


CNN = models.CNN(num_classes=CNN_CLASSES, features=(8,), dense=(32,))


def cnn_logits(params, x):
  return CNN.apply(params, x[None])[0]


@pytest.fixture(scope="module")
def trained_cnn():
  x_train, y_train = _cnn_data(2048, 0)
  params = numpy_init(CNN, x_train[:1])
  opt = optax.adam(3e-3)

  @jax.jit
  def step(p, s, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(CNN.apply(p, xb), yb).mean()
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  for i in range(300):
    idx = np.random.default_rng(i).integers(0, len(x_train), 64)
    params, state = step(params, state, x_train[idx], y_train[idx])
  return params


def test_apgd_ce_beats_pgd_at_equal_cost_on_a_trained_cnn(trained_cnn, key):
  """APGD-CE with 39 updates (40 gradients) leaves no more robust accuracy than PGD-40 (40
  gradients: BIM from a random start, step 2.5 eps / 40) at every eps, on the same examples."""
  x, y = _cnn_data(256, 1)
  correct = np.argmax(runner.batched_logits(cnn_logits, trained_cnn, x), 1) == y
  assert correct.mean() > 0.95
  x, y = x[correct][:64], y[correct][:64]
  eps = (0.06, 0.08)
  pgd = runner.run_attack(
    registry.ATTACKS["bim"].run, cnn_logits, trained_cnn, x, y, eps, progress=False,
    norm="linf", steps=40, step_size_rel=2.5 / 40, random_start=True, key=key, targeted=False,
  )  # fmt: skip
  ours = runner.run_attack(
    registry.UNTARGETED["apgd_ce"].run, cnn_logits, trained_cnn, x, y, eps, progress=False,
    norm="linf", steps=39, key=key,
  )  # fmt: skip
  pgd_acc, apgd_acc = 1 - pgd.success.mean(1), 1 - ours.success.mean(1)
  assert 0.1 < pgd_acc[0] < 0.9, pgd_acc  # a budget where the comparison means something
  assert np.all(apgd_acc <= pgd_acc), (apgd_acc, pgd_acc)
