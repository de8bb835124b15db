"""VAE attacks (Tabacof et al. 2016, Kos et al. 2017) on a tiny linear 'VAE': closed forms,
scipy's L-BFGS-B, the box, the penalty trade-off, the judge, and vmap against a loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from vae_attacks.attacks import base, vae

SHAPE = (4, 4, 1)
N = 16  # pixels
D = 3  # latent size


# A linear-Gaussian encoder (mean = W x + b) and a sigmoid-affine decoder.
def encode(params, x):
  mean = params["W"] @ x.reshape(-1) + params["b"]
  return mean, jnp.zeros_like(mean)


def decode(params, z):
  return jax.nn.sigmoid(params["V"] @ z + params["c"]).reshape(SHAPE)


def reconstruct(params, x):
  return decode(params, encode(params, x)[0])


# The judge: nearest template, logits_k = -scale * ||x - template_k||^2.
def judge_logits(params, x):
  d = params["templates"] - x.reshape(-1)[None, :]
  return -params["scale"] * jnp.sum(d * d, axis=1)


MODEL = vae.VAEModel(encode=encode, reconstruct=reconstruct, judge=judge_logits)
ITERS = 100  # one L-BFGS length everywhere, so each jitted function compiles once


# Jitted once at import (the model functions are static), so repeated calls do not recompile.
def _knobs(name):
  return {"max_iters": ITERS} if name.endswith("l2") else {}


def _jit(fn, name="l2"):
  return jax.jit(fn, static_argnums=0, static_argnames=tuple(_knobs(name)))


latent_attack = _jit(vae.latent_attack)
reconstruction_attack = _jit(vae.reconstruction_attack)
# The judged one-pair functions of the registry's VAE family.
VAE_FNS = {
  "latent_l2": vae.latent_l2,
  "latent_fgsm": vae.latent_fgsm_attack,
  "reconstruction_l2": vae.reconstruction_l2,
  "reconstruction_fgsm": vae.reconstruction_fgsm_attack,
}
ATTACKS = {name: _jit(fn, name) for name, fn in VAE_FNS.items()}


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  vae_params = {
    "W": jnp.asarray(rng.normal(size=(D, N)) / np.sqrt(N), jnp.float32),
    "b": jnp.asarray(0.1 * rng.normal(size=D), jnp.float32),
    "V": jnp.asarray(2.0 * rng.normal(size=(N, D)), jnp.float32),
    "c": jnp.asarray(0.1 * rng.normal(size=N), jnp.float32),
  }
  x = jnp.asarray(rng.uniform(0.1, 0.9, size=(5, *SHAPE)), jnp.float32)
  # Judge templates: the reconstructions of the five images, so image i's class is i.
  templates = jax.vmap(reconstruct, in_axes=(None, 0))(vae_params, x).reshape(5, N)
  params = {"vae": vae_params, "judge": {"templates": templates, "scale": jnp.float32(50.0)}}
  return params, x


def _np(params):
  return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _latent_objective_np(p, x0, z, c, xf):
  r = p["W"] @ xf + p["b"] - z
  f = r @ r + c * np.sum((xf - x0) ** 2)
  g = 2 * p["W"].T @ r + 2 * c * (xf - x0)
  return f, g


def _reconstruction_objective_np(p, x0, rec_t, c, xf):
  s = 1 / (1 + np.exp(-(p["V"] @ (p["W"] @ xf + p["b"]) + p["c"])))
  r = s - rec_t
  f = r @ r + c * np.sum((xf - x0) ** 2)
  g = p["W"].T @ (p["V"].T @ (2 * r * s * (1 - s))) + 2 * c * (xf - x0)
  return f, g


def _scipy(fun, x0):
  res = scipy.optimize.minimize(
    fun,
    x0,
    jac=True,
    method="L-BFGS-B",
    bounds=[(0.0, 1.0)] * x0.size,
    options=dict(maxiter=1000, ftol=1e-15, gtol=1e-12),
  )
  return res.fun, res.x


# ------------------------------------------------------------------------------------------
# L2-optimisation variants.


def test_latent_attack_reaches_closed_form_minimum_inside_box(setup):
  params, xs = setup
  p = _np(params["vae"])
  x0 = np.full(N, 0.5)
  z_t = p["W"] @ (x0 + 0.1 * np.sign(np.arange(N) - 7.5)) + p["b"]
  c = 0.1
  # Unconstrained minimiser of ||W x + b - z||^2 + c ||x - x0||^2.
  want = x0 + np.linalg.solve(
    p["W"].T @ p["W"] + c * np.eye(N), p["W"].T @ (z_t - p["b"] - p["W"] @ x0)
  )
  assert np.all((want > 0.01) & (want < 0.99))  # the box is inactive: the closed form applies
  sol = latent_attack(
    encode,
    params["vae"],
    jnp.asarray(x0.reshape(SHAPE), jnp.float32),
    jnp.asarray(z_t, jnp.float32),
    eps=c,
    max_iters=ITERS,
  )
  np.testing.assert_allclose(np.asarray(sol.x).ravel(), want, atol=2e-4)
  assert bool(sol.converged)


@pytest.mark.parametrize("c", [1e-3, 0.1])
def test_latent_attack_matches_scipy_with_active_box(setup, c):
  params, xs = setup
  p = _np(params["vae"])
  x0 = np.asarray(xs[0], np.float64).ravel()
  z_t = 3.0 * np.asarray(encode(params["vae"], xs[1])[0], np.float64)  # far: the box binds
  sol = latent_attack(
    encode, params["vae"], xs[0], jnp.asarray(z_t, jnp.float32), eps=c, max_iters=ITERS
  )
  f_ref, x_ref = _scipy(lambda xf: _latent_objective_np(p, x0, z_t, c, xf), x0)
  assert np.any((x_ref < 1e-6) | (x_ref > 1 - 1e-6))  # some pixel sits on the box
  f, _ = _latent_objective_np(p, x0, z_t, c, np.asarray(sol.x, np.float64).ravel())
  assert f == pytest.approx(f_ref, rel=1e-4, abs=1e-6)
  np.testing.assert_allclose(np.asarray(sol.x).ravel(), x_ref, atol=5e-3)
  assert np.all((np.asarray(sol.x) >= 0) & (np.asarray(sol.x) <= 1))


def test_reconstruction_attack_decreases_objective_and_matches_scipy(setup):
  params, xs = setup
  p = _np(params["vae"])
  c = 0.01
  x0 = np.asarray(xs[0], np.float64).ravel()
  rec_t = np.asarray(reconstruct(params["vae"], xs[2]), np.float64).ravel()
  sol = reconstruction_attack(
    reconstruct,
    params["vae"],
    xs[0],
    jnp.asarray(rec_t.reshape(SHAPE), jnp.float32),
    eps=c,
    max_iters=ITERS,
  )
  fun = lambda xf: _reconstruction_objective_np(p, x0, rec_t, c, xf)
  f0, _ = fun(x0)
  f_ref, _ = _scipy(fun, x0)
  f, _ = fun(np.asarray(sol.x, np.float64).ravel())
  assert f < 0.5 * f0
  assert f == pytest.approx(f_ref, rel=2e-3, abs=1e-5)
  trace = np.asarray(sol.value_trace)
  assert np.all(np.diff(trace) <= 1e-6 * np.maximum(1.0, np.abs(trace[:-1])))


def test_penalty_trades_distortion_for_latent_distance(setup):
  params, xs = setup
  z_t = encode(params["vae"], xs[3])[0]
  grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
  sols = [latent_attack(encode, params["vae"], xs[0], z_t, eps=c, max_iters=ITERS) for c in grid]
  sols = jax.tree.map(lambda *a: jnp.stack(a), *sols)
  dist = np.sqrt(np.sum((np.asarray(sols.x) - np.asarray(xs[0])[None]) ** 2, axis=(1, 2, 3)))
  loss = np.array([float(vae.latent_loss(encode, params["vae"], s, z_t)) for s in sols.x])
  assert np.all(np.diff(dist) < 0), dist  # larger C, less distortion
  assert np.all(np.diff(loss) > 0), loss  # ... and a latent code farther from the target
  assert loss[0] < 1e-3 * loss[-1]


# ------------------------------------------------------------------------------------------
# FGSM variants.


def test_latent_fgsm_is_the_signed_gradient_step(setup):
  params, xs = setup
  p = _np(params["vae"])
  z_t = np.asarray(encode(params["vae"], xs[1])[0], np.float64)
  x0 = np.asarray(xs[0], np.float64).ravel()
  g = 2 * p["W"].T @ (p["W"] @ x0 + p["b"] - z_t)
  for eps in (0.01, 0.3):
    x_adv = vae.latent_fgsm(encode, params["vae"], xs[0], jnp.asarray(z_t, jnp.float32), eps=eps)
    want = np.clip(x0 - eps * np.sign(g), 0, 1)
    np.testing.assert_allclose(np.asarray(x_adv).ravel(), want, atol=1e-6)
    assert float(jnp.max(jnp.abs(x_adv - xs[0]))) <= eps + 1e-6


def test_reconstruction_fgsm_steps_against_the_analytic_gradient(setup):
  params, xs = setup
  p = _np(params["vae"])
  rec_t = np.asarray(reconstruct(params["vae"], xs[1]), np.float64).ravel()
  x0 = np.asarray(xs[0], np.float64).ravel()
  _, g = _reconstruction_objective_np(p, x0, rec_t, 0.0, x0)
  eps = 0.02
  x_adv = vae.reconstruction_fgsm(
    reconstruct, params["vae"], xs[0], jnp.asarray(rec_t.reshape(SHAPE), jnp.float32), eps=eps
  )
  step = (np.asarray(x_adv, np.float64).ravel() - x0) / eps
  clear = np.abs(g) > 1e-4 * np.abs(g).max()
  np.testing.assert_allclose(step[clear], -np.sign(g[clear]), atol=1e-4)


@pytest.mark.parametrize("which", ["latent", "reconstruction"])
def test_fgsm_lowers_the_loss_for_a_small_step(setup, which):
  params, xs = setup
  if which == "latent":
    tgt = encode(params["vae"], xs[4])[0]
    step = functools.partial(vae.latent_fgsm, encode, params["vae"])
    loss = functools.partial(vae.latent_loss, encode, params["vae"])
  else:
    tgt = reconstruct(params["vae"], xs[4])
    step = functools.partial(vae.reconstruction_fgsm, reconstruct, params["vae"])
    loss = functools.partial(vae.reconstruction_loss, reconstruct, params["vae"])
  for x in xs[:4]:
    x_adv = step(x, tgt, eps=1e-3)
    assert float(loss(x_adv, tgt)) < float(loss(x, tgt))


def test_negative_eps_raises(setup):
  params, xs = setup
  z_t = encode(params["vae"], xs[1])[0]
  with pytest.raises(ValueError):
    vae.latent_fgsm(encode, params["vae"], xs[0], z_t, eps=-0.1)
  with pytest.raises(ValueError):
    vae.latent_attack(encode, params["vae"], xs[0], z_t, eps=-1.0, max_iters=1)


# ------------------------------------------------------------------------------------------
# Judged attacks.


@pytest.mark.parametrize("name", sorted(VAE_FNS))
def test_judged_result_is_the_judge_on_the_reconstruction(setup, name):
  params, xs = setup
  eps = 1e-2 if name.endswith("l2") else 0.1
  r = ATTACKS[name](MODEL, params, xs[0], xs[1], jnp.int32(1), eps=eps, **_knobs(name))
  x_adv = np.asarray(r.x_adv)
  assert np.all((x_adv >= 0) & (x_adv <= 1))
  logits = judge_logits(params["judge"], reconstruct(params["vae"], r.x_adv))
  probs = np.asarray(jax.nn.softmax(logits))
  assert float(r.target_prob) == pytest.approx(probs[1], rel=1e-5, abs=1e-7)
  assert bool(r.success) == (int(np.argmax(probs)) == 1)
  np.testing.assert_allclose(
    np.asarray(r.distortion), np.asarray(base.distortion(xs[0], r.x_adv)), rtol=1e-6
  )
  assert r.loss_trace.shape == ((ITERS,) if name.endswith("l2") else (1,))


@pytest.mark.parametrize("name", ["latent_l2", "reconstruction_l2"])
def test_l2_attacks_succeed_with_small_c_and_fail_with_large_c(setup, name):
  params, xs = setup
  attack = functools.partial(ATTACKS[name], MODEL, params, max_iters=ITERS)
  for src, tgt in [(0, 1), (2, 4), (3, 0)]:
    weak = attack(xs[src], xs[tgt], jnp.int32(tgt), eps=1e3)
    strong = attack(xs[src], xs[tgt], jnp.int32(tgt), eps=1e-4)
    assert not bool(weak.success) and float(weak.distortion.l2) < 0.05
    assert bool(strong.success), (src, tgt, float(strong.target_prob))
    assert float(strong.target_prob) > 0.9


# latent_l2 is left out to save a compilation: it wraps minimise_box like reconstruction_l2.
@pytest.mark.parametrize("name", ["latent_fgsm", "reconstruction_fgsm", "reconstruction_l2"])
def test_vmap_over_pairs_and_eps_equals_loop(setup, name):
  params, xs = setup
  attack = functools.partial(VAE_FNS[name], MODEL, params, **_knobs(name))
  src, tgt = jnp.array([0, 2, 3]), jnp.array([1, 4, 0])
  grid = jnp.asarray([0.01, 0.1, 1.0])
  over_eps = jax.vmap(lambda x, xt, t, e: attack(x, xt, t, eps=e), in_axes=(None, None, None, 0))
  batched = jax.jit(jax.vmap(over_eps, in_axes=(0, 0, 0, None)))(xs[src], xs[tgt], tgt, grid)
  single = functools.partial(ATTACKS[name], MODEL, params, **_knobs(name))
  for i in range(3):
    for j in range(3):
      one = single(xs[src[i]], xs[tgt[i]], tgt[i], eps=float(grid[j]))
      # Converged L-BFGS runs agree to the solver's tolerance, not to the last bit.
      np.testing.assert_allclose(batched.x_adv[i, j], one.x_adv, atol=2e-4)
      # The judge (scale 50) magnifies those differences in its probabilities.
      assert float(batched.target_prob[i, j]) == pytest.approx(float(one.target_prob), abs=1e-3)


def test_quality_point_of_no_attack_and_of_the_target(setup):
  _, xs = setup
  # A good autoencoder (reconstruction close to the input), so the curve's y is defined.
  rec = lambda params, x: params * x + 0.05
  a = jnp.float32(0.9)
  x, y = vae.quality_point(rec, a, xs[0], xs[1], xs[0])
  assert float(x) == 0.0 and float(y) == pytest.approx(1.0, abs=1e-6)
  x, y = vae.quality_point(rec, a, xs[0], xs[1], xs[1])
  assert float(x) == pytest.approx(1.0, abs=1e-6) and float(y) == pytest.approx(0.0, abs=1e-5)
  x, y = vae.quality_point(rec, a, xs[0], xs[1], 0.5 * (xs[0] + xs[1]))
  assert float(x) == pytest.approx(0.5, abs=1e-6) and 0.0 < float(y) < 1.0


# ------------------------------------------------------------------------------------------
# Tabacof et al.'s divergence between the posteriors (divergence="kl").


def encode_var(params, x):
  """A linear-Gaussian encoder whose log-variance also depends on x: (W x + b, U x + e)."""
  xf = x.reshape(-1)
  return params["W"] @ xf + params["b"], params["U"] @ xf + params["e"]


def _var_params(params):
  rng = np.random.default_rng(1)
  u = jnp.asarray(rng.normal(size=(D, N)) / np.sqrt(N), jnp.float32)
  return dict(params["vae"], U=u, e=jnp.asarray(0.2 * rng.normal(size=D), jnp.float32))


def test_gaussian_kl_is_zero_for_identical_posteriors_and_matches_the_closed_form():
  rng = np.random.default_rng(0)
  m, lv = rng.normal(size=(2, 5)), rng.normal(size=(2, 5)) * 0.5
  same = vae.gaussian_kl(*(jnp.asarray(a, jnp.float32) for a in (m[0], lv[0], m[0], lv[0])))
  assert abs(float(same)) < 1e-6
  kl = float(vae.gaussian_kl(*(jnp.asarray(a, jnp.float32) for a in (m[0], lv[0], m[1], lv[1]))))
  # KL(p || q) = sum log(s_q / s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2, per dimension.
  sp, sq = np.exp(0.5 * lv[0]), np.exp(0.5 * lv[1])
  closed = np.sum(np.log(sq / sp) + (sp**2 + (m[0] - m[1]) ** 2) / (2 * sq**2) - 0.5)
  assert kl == pytest.approx(closed, rel=1e-5)
  # And a Monte Carlo estimate E_p[log p - log q] from samples of p agrees.
  z = m[0] + sp * rng.normal(size=(200_000, 5))
  logp = scipy.stats.norm.logpdf(z, m[0], sp).sum(-1)
  logq = scipy.stats.norm.logpdf(z, m[1], sq).sum(-1)
  assert kl == pytest.approx(np.mean(logp - logq), rel=0.02)
  assert kl >= 0


def test_kl_latent_loss_is_zero_at_the_target_and_the_attack_lowers_it(setup):
  params, xs = setup
  p = _var_params(params)
  z_t, lv_t = encode_var(p, xs[1])
  kl_at = lambda x: float(vae.latent_loss(encode_var, p, x, z_t, lv_t, divergence="kl"))
  assert abs(kl_at(xs[1])) < 1e-5
  assert kl_at(xs[0]) > 0.01
  attack = jax.jit(
    functools.partial(vae.latent_attack, encode_var, divergence="kl", max_iters=ITERS)
  )
  sol = attack(p, xs[0], z_t, eps=1e-4, logvar_target=lv_t)
  x_adv = np.asarray(sol.x)
  assert np.all((x_adv >= 0) & (x_adv <= 1))
  assert kl_at(sol.x) < 0.1 * kl_at(xs[0])
  # The L2 loss ignores the variances; the KL one does not.
  l2 = float(vae.latent_loss(encode_var, p, xs[0], z_t, lv_t, divergence="l2"))
  assert l2 == pytest.approx(float(np.sum((np.asarray(encode_var(p, xs[0])[0]) - z_t) ** 2)))
  with pytest.raises(ValueError, match="divergence"):
    vae.latent_loss(encode_var, p, xs[0], z_t, lv_t, divergence="js")
  with pytest.raises(ValueError, match="logvar_target"):
    vae.latent_attack(encode_var, p, xs[0], z_t, eps=1.0, divergence="kl")


def test_latent_kl_registry_entry_is_judged_and_vmaps(setup):
  from vae_attacks.attacks import registry

  params, xs = setup
  spec = registry.ATTACKS["latent_kl"]
  assert spec.family == "vae" and spec.eps_kind == "penalty" and not spec.default_enabled
  assert "latent_kl" in registry.auddc_attacks()
  # The test VAE's log-variance is 0 everywhere, where KL = ||mean - z_t||^2 / 2: the KL
  # attack's objective at C is half the L2 attack's at 2C, so it has the same minimiser.
  xx = jnp.stack([xs[:3], xs[jnp.array([1, 4, 0])]], axis=1)  # [3, 2, H, W, C]
  tgt = jnp.array([1, 4, 0])
  run = jax.jit(
    jax.vmap(lambda x2, t: spec.run(MODEL, params, x2, t, eps=jnp.float32(1e-3), max_iters=ITERS))
  )
  r = run(xx, tgt)
  assert r.budget is None and r.success.shape == (3,)
  l2 = jax.jit(
    jax.vmap(
      lambda x2, t: registry.ATTACKS["latent_l2"].run(
        MODEL, params, x2, t, eps=jnp.float32(2e-3), max_iters=ITERS
      )
    )
  )(xx, tgt)
  np.testing.assert_allclose(np.asarray(r.x_adv), np.asarray(l2.x_adv), atol=2e-3)
