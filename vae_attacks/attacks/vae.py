"""Attacks on variational autoencoders: Tabacof et al. (2016) and Kos et al. (2017).

The attacker perturbs a source image x so that the VAE's reconstruction of x + d looks like a
chosen target image x_t. Two objectives:

* latent: a divergence between the encoder's posteriors of x + d and of x_t. Tabacof, Tavares
  and Valle, "Adversarial Images for Variational Autoencoders" (NIPS 2016 workshop on
  adversarial training) minimise the KL divergence between the two posteriors plus a penalty
  C on the distortion with L-BFGS-B inside the box; the latent attack of Kos, Fischer and
  Song, "Adversarial Examples for Generative Models" (2017) uses the squared L2 distance
  between the latent means. `divergence` picks one: "l2", ||mean(x + d) - mean(x_t)||_2^2
  (the study's default), or "kl", KL(q(z|x + d) || q(z|x_t)) between the diagonal Gaussian
  posteriors (`gaussian_kl`).
* reconstruction ("L_VAE" attack of Kos et al. 2017): ||reconstruct(x + d) - reconstruct(x_t)||^2,
  the distance between the reconstructions (the decoder applied to the encoder mean).

Each objective comes in two variants, as in Kos et al.:

* FGSM: one signed gradient step of size eps down the objective, clipped to [0, 1];
* L2 optimisation: minimise objective(x + d) + C ||d||_2^2 over x + d in [0, 1] with the
  batched box-constrained L-BFGS `lbfgs.minimise_box`, from d = 0. Here eps is C; a larger C
  allows less distortion.

The third attack of Kos et al. -- a classifier trained on the latent mean, attacked as a
classifier -- needs nothing here: attack `models.latent_classifier_fn(vae, clf)` (params
{"vae": ..., "clf": ...}) with `fgsm.fgsm` / `bim.bim`.

Two layers:

* `latent_attack`, `reconstruction_attack` (L-BFGS, return `lbfgs.LbfgsSolution`) and
  `latent_fgsm`, `reconstruction_fgsm` (return x_adv) only optimise; they see the VAE as the
  pure functions `encode_fn(params, x) -> (mean, logvar)` and `reconstruct_fn(params, x)`.
* `latent_l2`, `latent_fgsm_attack`, `reconstruction_l2` and `reconstruction_fgsm_attack`
  (entries of `registry.ATTACKS`, family "vae") run one of them and judge it: success means
  that a separately trained classifier (the judge) labels the reconstruction of x_adv as the
  target class, and the result is a `base.AttackResult` whose `target_prob` is the judge's
  probability of the target on reconstruct(x_adv). Their common signature, for ONE pair and ONE eps:
    attack(model: VAEModel, params, x[H, W, C], x_target[H, W, C], target[], *, eps, <knobs>)
  with params = {"vae": vae_params, "judge": judge_params}; `jax.vmap` over pairs and eps.
"""

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from vae_attacks import metrics
from vae_attacks.attacks import base, lbfgs
from vae_attacks.types import Array, EncodeFn, LogitsFn, Params, ReconstructFn


class VAEModel(NamedTuple):
  """A VAE and its judge as the judged attacks see them (hashable if its functions are).

  Build it once (e.g. from `models.vae_fns(vae)` and `models.classifier_fns(judge)`) and reuse
  it; a fresh lambda on every call retraces.
  """

  encode: EncodeFn  # (vae_params, x[H, W, C]) -> (mean[D], logvar[D])
  reconstruct: ReconstructFn  # (vae_params, x[H, W, C]) -> decode(mean(x)) [H, W, C]
  judge: LogitsFn  # (judge_params, x[H, W, C]) -> logits[K], trained apart from the VAE


def _sq_norm(v: Array) -> Array:
  return jnp.sum(jnp.square(v))


# --------------------------------------------------------------------------------------------
# Objectives.


DIVERGENCES = ("l2", "kl")


def gaussian_kl(mean_p: Array, logvar_p: Array, mean_q: Array, logvar_q: Array) -> Array:
  """KL(p || q) of two diagonal Gaussians N(mean, exp(logvar)) over [D]: the closed form

  0.5 sum_i [logvar_q - logvar_p + (exp(logvar_p) + (mean_p - mean_q)^2) / exp(logvar_q) - 1].
  """
  chex.assert_equal_shape((mean_p, logvar_p, mean_q, logvar_q))
  ratio = jnp.exp(logvar_p - logvar_q)
  return 0.5 * jnp.sum(
    logvar_q - logvar_p + ratio + jnp.square(mean_p - mean_q) * jnp.exp(-logvar_q) - 1.0
  )


def latent_loss(
  encode_fn: EncodeFn,
  params: Params,
  x_adv: Array,
  z_target: Array,
  logvar_target: Array | None = None,
  *,
  divergence: str = "l2",
) -> Array:
  """The latent attack's loss between the posteriors of x_adv and of the target (Tabacof et
  al. 2016, Kos et al. 2017).

  divergence "l2": ||mean(x_adv) - z_target||_2^2 (the target's log-variance is not used);
  "kl": KL(q(z|x_adv) || q(z|x_t)) = `gaussian_kl(mean(x_adv), logvar(x_adv), z_target,
  logvar_target)`. The direction: the expectation is under the adversarial posterior, so the
  loss is small when the codes the attacked input produces are likely under the target's
  posterior -- what the decoder then sees -- and it is the divergence of the adversarial
  posterior from the target's, as Tabacof et al. state their latent distance.
  """
  mean, logvar = encode_fn(params, x_adv)
  chex.assert_equal_shape((mean, z_target))
  if divergence == "l2":
    return _sq_norm(mean - z_target)
  if divergence == "kl":
    if logvar_target is None:
      raise ValueError("divergence='kl' needs the target's logvar_target")
    return gaussian_kl(mean, logvar, z_target, logvar_target)
  raise ValueError(f"divergence={divergence!r}; allowed: {', '.join(DIVERGENCES)}")


def reconstruction_loss(
  reconstruct_fn: ReconstructFn, params: Params, x_adv: Array, rec_target: Array
) -> Array:
  """||reconstruct(x_adv) - rec_target||_2^2: the L_VAE attack's loss (Kos et al. 2017)."""
  rec = reconstruct_fn(params, x_adv)
  chex.assert_equal_shape((rec, rec_target))
  return _sq_norm(rec - rec_target)


def penalised(loss: Array, x: Array, x_adv: Array, c: Array) -> Array:
  """loss + c ||x_adv - x||_2^2, the L2-optimisation objective."""
  return loss + c * _sq_norm(x_adv - x)


def _latent_objective(encode_fn, params, x, goal, c, x_adv, *, divergence="l2"):
  z_target, logvar_target = goal
  loss = latent_loss(encode_fn, params, x_adv, z_target, logvar_target, divergence=divergence)
  return penalised(loss, x, x_adv, c)


def _reconstruction_objective(reconstruct_fn, params, x, rec_target, c, x_adv):
  return penalised(reconstruction_loss(reconstruct_fn, params, x_adv, rec_target), x, x_adv, c)


# --------------------------------------------------------------------------------------------
# Optimisers (one pair, one eps).


def _check_eps(eps) -> None:
  """Raises ValueError for a concrete negative eps (traced values pass unchecked)."""
  if not isinstance(eps, jax.core.Tracer) and bool(jnp.any(jnp.asarray(eps) < 0)):
    raise ValueError(f"eps={eps!r} must be >= 0")


def _fgsm_step(loss_fn, x: Array, eps) -> Array:
  """x - eps * sign(grad loss(x)), clipped to the box [0, 1]."""
  _check_eps(eps)
  g = jax.grad(loss_fn)(x)
  return jnp.clip(x - jnp.asarray(eps, x.dtype) * jnp.sign(g), 0.0, 1.0)


# L-BFGS settings of the L2 attacks (the keywords of `lbfgs.minimise_box`); a caller's
# `**solver` overrides them.
SOLVER_DEFAULTS = dict(max_iters=50, memory=10, num_trials=1, tol=1e-5, ftol=1e-7)


def _solve(objective_fn, fn, params, x: Array, goal, eps, solver: dict, **loss_knobs):
  """minimise_box of objective_fn(fn, params, x, goal, eps, x_adv) from x_adv = x, in the box."""
  _check_eps(eps)
  objective = functools.partial(objective_fn, fn, params, x, goal, eps, **loss_knobs)
  return lbfgs.minimise_box(objective, x, lower=0.0, upper=1.0, **{**SOLVER_DEFAULTS, **solver})


def latent_attack(
  encode_fn: EncodeFn,
  params: Params,
  x: Array,
  z_target: Array,
  *,
  eps: Array | float,
  divergence: str = "l2",
  logvar_target: Array | None = None,
  **solver,
) -> lbfgs.LbfgsSolution:
  """Latent attack with L2 optimisation (Tabacof et al. 2016; Kos et al. 2017).

  Minimises D(x + d) + C ||d||_2^2 over x + d in [0, 1] with `lbfgs.minimise_box`, starting
  from d = 0, where D is `latent_loss` under `divergence`: ||mean(x + d) - z_target||_2^2
  ("l2") or KL(q(z|x + d) || N(z_target, exp(logvar_target))) ("kl", Tabacof et al.'s).

  Args:
    encode_fn: (params, x[H, W, C]) -> (mean[D], logvar[D]).
    params: the VAE's parameters.
    x: [H, W, C] source image in [0, 1].
    z_target: [D] the latent mean to reach, mean(encode(x_target)).
    eps: [] the penalty C >= 0 on the squared L2 distortion (may be traced: vmap a C grid).
    divergence: "l2" or "kl" (static), see `latent_loss`.
    logvar_target: [D] the target posterior's log-variance (needed by "kl").
    **solver: `lbfgs.minimise_box` knobs over SOLVER_DEFAULTS: max_iters (L-BFGS iterations,
      the length of `value_trace`), memory, num_trials, tol (projected-gradient tolerance),
      ftol (relative-decrease tolerance).

  Returns:
    `lbfgs.LbfgsSolution`: x is x_adv, value the objective there, value_trace per iteration.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence={divergence!r}; allowed: {', '.join(DIVERGENCES)}")
  if divergence == "kl" and logvar_target is None:
    raise ValueError("divergence='kl' needs the target's logvar_target")
  goal = (z_target, logvar_target)
  return _solve(_latent_objective, encode_fn, params, x, goal, eps, solver, divergence=divergence)


def reconstruction_attack(
  reconstruct_fn: ReconstructFn,
  params: Params,
  x: Array,
  rec_target: Array,
  *,
  eps: Array | float,
  **solver,
) -> lbfgs.LbfgsSolution:
  """The L_VAE attack of Kos et al. (2017) with L2 optimisation.

  Minimises ||reconstruct(x + d) - rec_target||_2^2 + C ||d||_2^2 over x + d in [0, 1] with
  `lbfgs.minimise_box`, starting from d = 0.

  Args:
    reconstruct_fn: (params, x[H, W, C]) -> reconstruction [H, W, C].
    params: the VAE's parameters.
    x: [H, W, C] source image in [0, 1].
    rec_target: [H, W, C] the reconstruction to reach, reconstruct(x_target).
    eps: [] the penalty C >= 0 (may be traced).
    **solver: as in `latent_attack`.

  Returns:
    `lbfgs.LbfgsSolution` (x is x_adv).
  """
  return _solve(_reconstruction_objective, reconstruct_fn, params, x, rec_target, eps, solver)


def latent_fgsm(
  encode_fn: EncodeFn, params: Params, x: Array, z_target: Array, *, eps: Array | float
) -> Array:
  """Latent attack, FGSM variant (Kos et al. 2017): one signed step of size eps.

  x_adv = clip(x - eps * sign(grad_x ||mean(x) - z_target||^2), 0, 1), so
  ||x_adv - x||_inf <= eps.

  Args:
    encode_fn: (params, x[H, W, C]) -> (mean[D], logvar[D]).
    params: the VAE's parameters.
    x: [H, W, C] source image in [0, 1].
    z_target: [D] the latent mean to reach.
    eps: [] step size >= 0 (may be traced).

  Returns:
    x_adv [H, W, C].
  """
  return _fgsm_step(lambda xx: latent_loss(encode_fn, params, xx, z_target), x, eps)


def reconstruction_fgsm(
  reconstruct_fn: ReconstructFn, params: Params, x: Array, rec_target: Array, *, eps
) -> Array:
  """The L_VAE attack of Kos et al. (2017), FGSM variant: one signed step of size eps.

  x_adv = clip(x - eps * sign(grad_x ||reconstruct(x) - rec_target||^2), 0, 1).

  Args as in `latent_fgsm`, with reconstruct_fn (params, x[H, W, C]) -> reconstruction
  [H, W, C] and rec_target [H, W, C] the reconstruction to reach; returns x_adv [H, W, C].
  """
  return _fgsm_step(lambda xx: reconstruction_loss(reconstruct_fn, params, xx, rec_target), x, eps)


# --------------------------------------------------------------------------------------------
# Judged attacks: AttackResult from the judge on the reconstruction.


def judge(
  model: VAEModel,
  params: Params,
  x: Array,
  x_adv: Array,
  target: Array,
  *,
  iterations: Array,
  loss_trace: Array,
) -> base.AttackResult:
  """The outcome of a VAE attack: the judge's verdict on reconstruct(x_adv).

  success = (argmax judge(reconstruct(x_adv)) == target); target_prob = the judge's softmax
  probability of `target` there; distortion of x_adv from x.

  Args:
    model: the VAE and its judge.
    params: {"vae": vae_params, "judge": judge_params}.
    x: [H, W, C] source image.
    x_adv: [H, W, C] adversarial image.
    target: [] int target class (the class of x_target).
    iterations: int[] steps the attack took.
    loss_trace: [T] the attack's objective per step.

  Returns:
    base.AttackResult.
  """
  rec = model.reconstruct(params["vae"], x_adv)
  success, prob = base.outcome(model.judge(params["judge"], rec), target, targeted=True)
  return base.AttackResult(
    x_adv=x_adv,
    success=success,
    target_prob=prob,
    distortion=base.distortion(x, x_adv),
    iterations=jnp.asarray(iterations, jnp.int32),
    loss_trace=loss_trace,
  )


def _target_latent(model: VAEModel, params: Params, x_target: Array) -> Array:
  mean, _ = model.encode(params["vae"], x_target)
  return mean


def _target_posterior(model: VAEModel, params: Params, x_target: Array) -> tuple[Array, Array]:
  return model.encode(params["vae"], x_target)


def _judged(model: VAEModel, params: Params, x: Array, target: Array, sol) -> base.AttackResult:
  return judge(
    model, params, x, sol.x, target, iterations=sol.iterations, loss_trace=sol.value_trace
  )


def latent_l2(
  model: VAEModel,
  params: Params,
  x: Array,
  x_target: Array,
  target: Array,
  *,
  eps,
  divergence: str = "l2",
  **solver,
) -> base.AttackResult:
  """`latent_attack` towards the posterior of x_target with penalty C = eps, judged.

  Tabacof et al. (2016)'s latent attack and Kos et al. (2017)'s latent attack with L2
  optimisation, the latent distance chosen by `divergence` ("l2" between the means, or "kl"
  between the posteriors as Tabacof et al.). For ONE pair and ONE C; `loss_trace` is the
  L-BFGS objective per iteration. Args and `**solver` knobs as in `latent_attack`, with params
  {"vae", "judge"}, x_target [H, W, C] and target its class.
  """
  z_target, logvar_target = _target_posterior(model, params, x_target)
  sol = latent_attack(
    model.encode, params["vae"], x, z_target, eps=eps, divergence=divergence,
    logvar_target=logvar_target, **solver,
  )  # fmt: skip
  return _judged(model, params, x, target, sol)


def latent_kl(
  model: VAEModel, params: Params, x: Array, x_target: Array, target: Array, *, eps, **solver
) -> base.AttackResult:
  """`latent_l2` with divergence="kl": Tabacof et al. (2016)'s own latent attack,
  KL(q(z|x + d) || q(z|x_t)) + C ||d||_2^2, judged. A module-level function (the registry's
  entry), so its identity is stable for the runner's compile cache."""
  return latent_l2(model, params, x, x_target, target, eps=eps, divergence="kl", **solver)


def reconstruction_l2(
  model: VAEModel, params: Params, x: Array, x_target: Array, target: Array, *, eps, **solver
) -> base.AttackResult:
  """`reconstruction_attack` towards reconstruct(x_target) with penalty C = eps, judged.

  The L_VAE attack of Kos et al. (2017) with L2 optimisation, for ONE pair and ONE C.
  """
  rec_target = model.reconstruct(params["vae"], x_target)
  sol = reconstruction_attack(model.reconstruct, params["vae"], x, rec_target, eps=eps, **solver)
  return _judged(model, params, x, target, sol)


def latent_fgsm_attack(
  model: VAEModel, params: Params, x: Array, x_target: Array, target: Array, *, eps
) -> base.AttackResult:
  """`latent_fgsm` towards mean(encode(x_target)), judged (Kos et al. 2017).

  `loss_trace` is [1]: the latent loss at x_adv.
  """
  z_target = _target_latent(model, params, x_target)
  x_adv = latent_fgsm(model.encode, params["vae"], x, z_target, eps=eps)
  loss = latent_loss(model.encode, params["vae"], x_adv, z_target)
  return judge(model, params, x, x_adv, target, iterations=1, loss_trace=loss[None])


def reconstruction_fgsm_attack(
  model: VAEModel, params: Params, x: Array, x_target: Array, target: Array, *, eps
) -> base.AttackResult:
  """`reconstruction_fgsm` towards reconstruct(x_target), judged (Kos et al. 2017, L_VAE).

  `loss_trace` is [1]: the reconstruction loss at x_adv.
  """
  rec_target = model.reconstruct(params["vae"], x_target)
  x_adv = reconstruction_fgsm(model.reconstruct, params["vae"], x, rec_target, eps=eps)
  loss = reconstruction_loss(model.reconstruct, params["vae"], x_adv, rec_target)
  return judge(model, params, x, x_adv, target, iterations=1, loss_trace=loss[None])


def quality_point(
  reconstruct_fn: ReconstructFn, params: Params, x: Array, x_target: Array, x_adv: Array
) -> tuple[Array, Array]:
  """The AUDDC curve point (Gondim-Ribeiro et al. 2018) of one attack result.

  Reconstructs x, x_target and x_adv and calls `metrics.quality_curve_point`.

  Args:
    reconstruct_fn: (params, x[H, W, C]) -> reconstruction.
    params: the VAE's parameters.
    x: [H, W, C] source image.
    x_target: [H, W, C] target image.
    x_adv: [H, W, C] adversarial image.

  Returns:
    (x, y) scalars; see `metrics.quality_curve_point`.
  """
  return metrics.quality_curve_point(
    x,
    x_target,
    x_adv - x,
    reconstruct_fn(params, x_adv),
    reconstruct_fn(params, x),
    reconstruct_fn(params, x_target),
  )
