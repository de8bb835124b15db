"""The minimal adversarial budget per pair (issue 13): the BIM bisection over eps against the
closed-form minimal budget of a linear two-class model, +inf for an unbroken pair, vmap against
a loop, the ball and the box, Szegedy's c search's budget, and the registry entries through the
runner with `budget` [E, P]."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as base_config
from vae_attacks import metrics
from vae_attacks.attacks import lbfgs, minimal, registry, runner

SHAPE = (4, 4, 1)
N = 16  # pixels
STEPS = 10
STEP_REL = 2.5 / STEPS  # enough steps for every coordinate to reach its bound
BISECT = 6
EPS_MAX = 0.5


def linear_logits(params, x):
  """A linear softmax classifier on one example: logits = W^T vec(x) + b (as test_runner's)."""
  return jnp.ravel(x) @ params["w"] + params["b"]


def two_class_problem(n_pairs=6, seed=0):
  """A linear 2-class model and sources, each targeted at the class it is not given."""
  rng = np.random.default_rng(seed)
  params = {
    "w": jnp.asarray(rng.normal(size=(N, 2)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=2) * 0.1, jnp.float32),
  }
  x = rng.uniform(0.2, 0.8, size=(n_pairs, *SHAPE)).astype(np.float32)
  pred = np.argmax(np.asarray(jax.vmap(linear_logits, in_axes=(None, 0))(params, x)), -1)
  return params, x, (1 - pred).astype(np.int32)


def _margin_parts(params, x, target):
  """a, c, room of the target's margin a . (x + d) + c, and how far each pixel may move up a."""
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  a = w[:, target] - w[:, 1 - target]
  c = b[target] - b[1 - target]
  xf = np.asarray(x, np.float64).ravel()
  room = np.where(a > 0, 1.0 - xf, xf)
  return a, a @ xf + c, room


def minimal_linf(params, x, target) -> float:
  """The smallest eps with a point of the L-inf eps-ball in the box classified as `target`:
  the margin with each pixel moved min(eps, room) along sign(a) is increasing in eps."""
  a, m0, room = _margin_parts(params, x, target)
  margin = lambda e: m0 + np.sum(np.abs(a) * np.minimum(e, room))
  if margin(np.inf) <= 0:
    return np.inf
  lo, hi = 0.0, 1.0
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if margin(mid) > 0 else (mid, hi)
  return hi


def minimal_l1(params, x, target) -> float:
  """The smallest L1 budget to the target: move the pixels of largest |a| first (greedy is
  optimal for one linear constraint in a box)."""
  a, m0, room = _margin_parts(params, x, target)
  need, total = -m0, 0.0
  for i in np.argsort(-np.abs(a)):
    gain = abs(a[i]) * room[i]
    if gain >= need:
      return total + need / abs(a[i])
    need, total = need - gain, total + room[i]
  return np.inf


@functools.cache
def _search(norm: str, sparsity: float = 0.99):
  fn = functools.partial(
    minimal.bim_min_eps, linear_logits, steps=STEPS, step_size_rel=STEP_REL, norm=norm,
    bisect_steps=BISECT, sparsity=sparsity,
  )  # fmt: skip
  one = lambda params, x, target, eps: fn(params, x, target, eps=eps)
  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, None)))


def test_linf_budget_is_within_the_resolution_of_the_closed_form_and_never_below():
  params, x, target = two_class_problem()
  truth = np.array([minimal_linf(params, xi, t) for xi, t in zip(x, target, strict=True)])
  assert np.all(truth < EPS_MAX), truth  # every pair breakable within the range
  r = _search("linf")(params, x, target, EPS_MAX)
  budget = np.asarray(r.budget)
  resolution = EPS_MAX / 2**BISECT
  assert np.all(budget >= truth - 1e-5), (budget, truth)
  assert np.all(budget <= truth + resolution + 1e-5), (budget, truth)
  assert np.asarray(r.success).all()
  # x_adv inside the ball of its budget and the box.
  d = np.abs(np.asarray(r.x_adv) - x).reshape(len(x), -1).max(-1)
  assert np.all(d <= budget + 1e-6)
  assert np.asarray(r.x_adv).min() >= 0.0 and np.asarray(r.x_adv).max() <= 1.0
  assert np.all(np.asarray(r.iterations) == STEPS * (BISECT + 1))


def test_pair_not_broken_within_range_gives_inf_and_the_upper_probe():
  params, x, target = two_class_problem()
  truth = np.array([minimal_linf(params, xi, t) for xi, t in zip(x, target, strict=True)])
  eps = 0.5 * float(truth.min())  # below every pair's minimal budget
  r = _search("linf")(params, x, target, eps)
  assert np.all(np.isinf(np.asarray(r.budget)))
  assert not np.asarray(r.success).any()
  d = np.abs(np.asarray(r.x_adv) - x).reshape(len(x), -1).max(-1)
  np.testing.assert_allclose(d, eps, rtol=1e-5)  # the result of the probe at eps


def test_vmap_over_pairs_equals_a_loop():
  params, x, target = two_class_problem(n_pairs=3, seed=1)
  batched = _search("linf")(params, x, target, EPS_MAX)
  one = jax.jit(
    functools.partial(
      minimal.bim_min_eps, linear_logits, steps=STEPS, step_size_rel=STEP_REL, norm="linf",
      bisect_steps=BISECT,
    )
  )  # fmt: skip
  for i in range(len(x)):
    r = one(params, x[i], target[i], eps=EPS_MAX)
    jax.tree.map(
      lambda a, b, i=i: np.testing.assert_allclose(np.asarray(a)[i], b, rtol=1e-6, atol=1e-6),
      batched,
      r,
    )


def test_l1_budget_is_never_below_the_closed_form_and_bounds_its_perturbation():
  params, x, target = two_class_problem(seed=2)
  truth = np.array([minimal_l1(params, xi, t) for xi, t in zip(x, target, strict=True)])
  eps = float(2.0 * truth.max())
  r = _search("l1", 0.9)(params, x, target, eps)
  budget = np.asarray(r.budget)
  broken = np.isfinite(budget)
  assert broken.any()
  assert np.all(budget[broken] >= truth[broken] - 1e-4), (budget, truth)
  l1 = np.abs(np.asarray(r.x_adv) - x).reshape(len(x), -1).sum(-1)
  assert np.all(l1[broken] <= budget[broken] * (1 + 1e-5) + 1e-5)
  assert np.all(np.asarray(r.success)[broken])


def test_bad_bisect_steps_raise():
  params, x, target = two_class_problem(n_pairs=1)
  with pytest.raises(ValueError, match="bisect_steps"):
    minimal.bim_min_eps(
      linear_logits, params, x[0], target[0], eps=0.1, steps=1, step_size_rel=1.0,
      bisect_steps=-1,
    )  # fmt: skip


def test_c_search_budget_is_its_smallest_successful_l2_or_inf():
  params, x, target = two_class_problem(n_pairs=4, seed=3)
  search = jax.jit(
    jax.vmap(
      functools.partial(lbfgs.lbfgs_c_search, linear_logits, max_iters=10, search_steps=3),
      in_axes=(None, 0, 0),
    )
  )
  r = search(params, x, target)
  budget, ok = np.asarray(r.budget), np.asarray(r.success)
  np.testing.assert_allclose(budget[ok], np.asarray(r.distortion.l2)[ok], rtol=1e-6)
  assert np.all(np.isinf(budget[~ok]))
  assert ok.any()


@pytest.mark.parametrize("name", ["bim_min", "bim_l1_min"])
def test_registry_entries_run_through_the_runner_with_budget_per_pair(name):
  spec = registry.ATTACKS[name]
  assert spec.eps_kind == "budget" and spec.family == "classifier"
  assert not spec.default_enabled and name in registry.configurable("classifier")
  assert name not in registry.enabled_by_default("classifier")
  section = dict(base_config.OPTIONAL_SECTIONS[name], steps=4, step_size_rel=2.5 / 4)
  section["bisect_steps"] = 3
  knobs = registry.knobs_of(spec, section)
  params, x, target = two_class_problem(n_pairs=5, seed=4)
  grid = (0.5,) if name == "bim_min" else (4.0,)
  chunks = list(
    runner.iter_measured_chunks(
      spec.run, linear_logits, params, x, target, grid, measure=_Measure(), chunk_size=2,
      progress=False, **knobs,
    )
  )  # fmt: skip
  res = jax.tree.map(lambda *p: np.concatenate(p, axis=1), *[r for _, r, _ in chunks])
  m = jax.tree.map(lambda *p: np.concatenate(p, axis=1), *[q for _, _, q in chunks])
  assert res.budget.shape == (1, 5) and m.budget.shape == (1, 5)
  np.testing.assert_array_equal(m.budget, res.budget)
  whole = runner.run_attack(
    spec.run, linear_logits, params, x, target, grid, chunk_size=5, progress=False, **knobs
  )
  assert whole.budget.shape == (1, 5)
  np.testing.assert_allclose(whole.budget, res.budget, rtol=1e-6)
  stats = metrics.row_stats(jax.tree.map(lambda a: a[0], m))
  assert "median_budget" in stats and 0.0 <= stats["unbroken_rate"] <= 1.0


def test_attacks_without_a_budget_carry_none_and_measure_nan():
  params, x, target = two_class_problem(n_pairs=3)
  spec = registry.ATTACKS["bim"]
  knobs = registry.knobs_of(spec, dict(norm="linf", eps=(0.1,), steps=2, step_size_rel=0.5))
  res = runner.run_attack(
    spec.run, linear_logits, params, x, target, (0.1, 0.2), chunk_size=2, progress=False, **knobs
  )
  assert res.budget is None
  (_, _, m), *_ = runner.iter_measured_chunks(
    spec.run, linear_logits, params, x, target, (0.1, 0.2), measure=_Measure(), chunk_size=3,
    progress=False, **knobs,
  )  # fmt: skip
  assert m.budget.shape == (2, 3) and np.isnan(m.budget).all()
  assert "median_budget" not in metrics.row_stats(jax.tree.map(lambda a: a[0], m))


SETTINGS = metrics.EvalSettings.from_config(
  dict(confidence_min=0.5, ssim_min=0.8, linf_max=0.3, l2_max=0.0)
)


class _Measure:
  """metrics.pair_measures under fixed settings, hashable (one compile)."""

  def __hash__(self):
    return 0

  def __eq__(self, other):
    return isinstance(other, _Measure)

  def __call__(self, params, x, result):
    return metrics.pair_measures(x, result, SETTINGS)


def test_configs_add_the_optional_sections_and_validation_names_a_missing_one():
  from configs import lfw_vae, mnist_vae
  from experiments import validate

  c = mnist_vae.get_config("quick")
  assert "bim_min" not in c.attacks and "latent_kl" not in c.attacks.vae
  c.attacks.enabled = (*c.attacks.enabled, "bim_min")
  with pytest.raises(validate.ConfigError, match="add_attacks"):
    validate.validate(c)
  for get in (mnist_vae.get_config, lfw_vae.get_config):
    c = base_config.add_attacks(get("quick"), "bim_min", "bim_l1_min", "latent_kl")
    validate.validate(c)
    assert c.attacks.enabled[-2:] == ("bim_min", "bim_l1_min")
    assert c.attacks.vae.enabled[-1] == "latent_kl"
  assert c.attacks.bim_l1_min.eps[0] > 20.0  # the L1 range carried to LFW's pixels
  assert c.attacks.vae.latent_kl.eps[0] < 1e-4  # and the penalty grid
