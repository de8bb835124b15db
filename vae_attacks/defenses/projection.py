"""Projection onto the range of a VAE decoder, the Defense-GAN recipe with the project's VAE.

Samangouei, Kabkab and Chellappa, "Defense-GAN: Protecting Classifiers Against Adversarial
Attacks Using Generative Models" (ICLR 2018): before classifying x, replace it by the closest
point G(z*) of the generator's range, z* found by L steps of gradient descent on
||G(z) - x||_2^2 from R random starts, keeping the best; optionally reject x when the
reconstruction error ||G(z*) - x||^2 is too large. Here G is a VAE decoder
(`models.vae_fns(vae).decode`, pixel probabilities), the R restarts run side by side in the
batch dimension (`jax.vmap`) and the descent is optax's SGD or Adam. Each restart keeps the
best iterate it has visited (its start included), so the returned error never rises with more
steps or more restarts (restart r always starts from `fold_in(key, r)`, so R restarts are the
first R of R + 1).

Adaptive attacks (Athalye, Carlini and Wagner, "Obfuscated Gradients Give a False Sense of
Security", ICML 2018), both through `ProjectedClassifier`:
* BPDA: the projection is the identity on the backward pass (`bpda`), so the gradient of
  classify(project(x)) with respect to x is the classifier's gradient at x_proj;
* unrolled: differentiate through the L optimiser steps (exact, costly).

Everything is written for ONE example; `jax.vmap` batches it.

Public API:
* `project(decode_fn, params, x, key, *, latent_dim, steps, restarts, learning_rate=0.05,
  optimizer="adam", init_scale=1.0) -> Projection(z[D], x_proj[H, W, C], error[])`:
  error = sum of squared differences ||decode(z*) - x||^2 over pixels.
* `restart_starts(key, restarts, latent_dim, init_scale=1.0) -> [R, D]`: the nested starts.
* `bpda(fn, params, x) -> fn(params, x)` on the forward pass, cotangent passed straight to x
  (and zeros to params) on the backward pass. `fn` must be hashable (static).
* `ProjectedClassifier(decode, classify, latent_dim, steps, restarts, learning_rate=0.05,
  optimizer="adam", init_scale=1.0, seed=0, gradient="bpda")`: a frozen dataclass, a
  `LogitsFn` `(params, x[H, W, C]) -> logits[K]` with params {"decoder": decoder variables,
  "clf": classifier variables}; classify(x_proj). `gradient` is "bpda" or "unrolled". Hand it
  to `bim.bim` / `runner.run_attack` like any classifier. Its method
  `project(params, x) -> Projection` gives the projection it classifies (same starts).
* `fit_threshold(errors[N], *, false_rejection_rate) -> []`: the error threshold that rejects
  at most that fraction of the clean `errors` (the closest such rate the sample allows).
* `reject(error, threshold) -> bool`: error > threshold.
* `RejectionAwareLogits(clf, penalty=10.0, margin=0.1)`: the projected classifier with the
  rejection as a (K+1)-th logit, for targeted attacks that must also stay below the threshold.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from vae_attacks.types import Array, DecodeFn, LogitsFn, Params, PRNGKey

OPTIMIZERS = ("sgd", "adam")
GRADIENTS = ("bpda", "unrolled")


class Projection(NamedTuple):
  """The projection of one input onto the decoder's range."""

  z: Array  # [D] best code found
  x_proj: Array  # [H, W, C] decode(z)
  error: Array  # [] ||decode(z) - x||_2^2, summed over pixels


class _Carry(NamedTuple):
  z: Array  # [R, D] current iterates
  opt_state: optax.OptState
  best_z: Array  # [R, D] best iterate of each restart so far
  best_error: Array  # [R]


def _optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def restart_starts(key: PRNGKey, restarts: int, latent_dim: int, init_scale: float = 1.0) -> Array:
  """[R, D] starting codes z_r ~ N(0, init_scale^2 I) from `fold_in(key, r)` (nested in R)."""
  keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(restarts))
  return init_scale * jax.vmap(lambda k: jax.random.normal(k, (latent_dim,)))(keys)


def _sq_error(decode_fn: DecodeFn, params: Params, z: Array, x: Array) -> Array:
  return jnp.sum(jnp.square(decode_fn(params, z) - x))


def project(
  decode_fn: DecodeFn,
  params: Params,
  x: Array,
  key: PRNGKey,
  *,
  latent_dim: int,
  steps: int,
  restarts: int,
  learning_rate: float = 0.05,
  optimizer: str = "adam",
  init_scale: float = 1.0,
) -> Projection:
  """Projects x onto the decoder's range (Samangouei et al. 2018), for ONE example.

  Minimises ||decode(z) - x||_2^2 over z with `steps` optax steps from each of `restarts`
  starts (`restart_starts`), the restarts vmapped side by side; every restart keeps its best
  iterate (start included), and the best restart wins. Differentiable in x and params.

  Args:
    decode_fn: (params, z[D]) -> image [H, W, C] (e.g. `models.vae_fns(vae).decode`).
    params: the decoder's variables.
    x: [H, W, C] input.
    key: randomness of the starts.
    latent_dim: D.
    steps: L >= 0 descent steps per restart (static).
    restarts: R >= 1 (static).
    learning_rate: the optimiser's step size.
    optimizer: "sgd" or "adam".
    init_scale: standard deviation of the starts (1 matches the VAE prior).

  Returns:
    Projection(z [D], x_proj [H, W, C] = decode(z), error [] = ||x_proj - x||^2).
  """
  if restarts < 1 or steps < 0:
    raise ValueError(f"need restarts >= 1 and steps >= 0, got {restarts}, {steps}")
  opt = _optimizer(optimizer, learning_rate)
  value_and_grad = jax.vmap(
    jax.value_and_grad(lambda z: _sq_error(decode_fn, params, z, x)), in_axes=0
  )

  def step(carry: _Carry, _) -> tuple[_Carry, None]:
    error, g = value_and_grad(carry.z)
    better = error <= carry.best_error  # ties: the later iterate
    best_z = jnp.where(better[:, None], carry.z, carry.best_z)
    best_error = jnp.where(better, error, carry.best_error)
    updates, opt_state = opt.update(g, carry.opt_state, carry.z)
    return _Carry(optax.apply_updates(carry.z, updates), opt_state, best_z, best_error), None

  z0 = restart_starts(key, restarts, latent_dim, init_scale).astype(x.dtype)
  inf = jnp.full((restarts,), jnp.inf, x.dtype)
  carry = _Carry(z0, opt.init(z0), z0, inf)
  carry, _ = lax.scan(step, carry, length=steps)
  last_error = jax.vmap(lambda z: _sq_error(decode_fn, params, z, x))(carry.z)
  better = last_error <= carry.best_error
  best_z = jnp.where(better[:, None], carry.z, carry.best_z)
  best_error = jnp.where(better, last_error, carry.best_error)
  r = jnp.argmin(best_error)
  z = best_z[r]
  x_proj = decode_fn(params, z)
  return Projection(z=z, x_proj=x_proj, error=jnp.sum(jnp.square(x_proj - x)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def bpda(fn: Callable[[Params, Array], Array], params: Params, x: Array) -> Array:
  """fn(params, x), seen by autodiff as the identity in x (BPDA, Athalye et al. 2018).

  The backward pass hands the output's cotangent to x unchanged and zeros to params, so
  grad_x g(bpda(fn, params, x)) = grad g at fn(params, x). `fn`'s output has x's shape.
  """
  return fn(params, x)


def _bpda_fwd(fn, params, x):
  return fn(params, x), params


def _bpda_bwd(fn, params, cotangent):
  return jax.tree.map(jnp.zeros_like, params), cotangent


bpda.defvjp(_bpda_fwd, _bpda_bwd)


@dataclasses.dataclass(frozen=True)
class _ProjectX:
  """(params, x) -> x_proj with a fixed start key: the function `bpda` wraps."""

  clf: "ProjectedClassifier"

  def __call__(self, params: Params, x: Array) -> Array:
    return self.clf.project(params, x).x_proj


@dataclasses.dataclass(frozen=True)
class ProjectedClassifier:
  """classify(project(x)) as a per-example `LogitsFn`, the Defense-GAN classifier.

  A frozen (hashable) dataclass: build it once and reuse it. Params are
  {"decoder": decoder variables, "clf": classifier variables}. The starts come from
  `jax.random.key(seed)`, the same for every input, so the defended classifier is a
  deterministic function of x.

  Attributes:
    decode: (decoder params, z[D]) -> image [H, W, C].
    classify: (clf params, x[H, W, C]) -> logits[K] (e.g. `models.classifier_fns(cnn)`).
    latent_dim, steps, restarts, learning_rate, optimizer, init_scale: as in `project`.
    seed: the starts' seed.
    gradient: "bpda" (identity backward through the projection) or "unrolled"
      (differentiate through the optimiser steps).
  """

  decode: DecodeFn
  classify: LogitsFn
  latent_dim: int
  steps: int
  restarts: int
  learning_rate: float = 0.05
  optimizer: str = "adam"
  init_scale: float = 1.0
  seed: int = 0
  gradient: str = "bpda"

  def __post_init__(self):
    if self.gradient not in GRADIENTS:
      raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

  def project(self, params: Params, x: Array) -> Projection:
    """The projection of x that the classifier sees (params {"decoder", "clf"})."""
    return project(
      self.decode,
      params["decoder"],
      x,
      jax.random.key(self.seed),
      latent_dim=self.latent_dim,
      steps=self.steps,
      restarts=self.restarts,
      learning_rate=self.learning_rate,
      optimizer=self.optimizer,
      init_scale=self.init_scale,
    )

  def __call__(self, params: Params, x: Array) -> Array:
    if self.gradient == "bpda":
      x_proj = bpda(_ProjectX(self), params, x)
    else:
      x_proj = self.project(params, x).x_proj
    return self.classify(params["clf"], x_proj)


@dataclasses.dataclass(frozen=True)
class RejectionAwareLogits:
  """The projected classifier with its error rejection as a (K+1)-th "reject" logit.

  For attacks that know both halves of the defence: the projection (BPDA or unrolled, as
  `clf.gradient` says) and the rejection of inputs whose projection error e = ||x - x_proj||^2
  exceeds the threshold t. Class k gets log p_k - P and the reject logit log(1 - exp(-P)),
  with p the projected classifier's softmax and the hinge
    P = penalty * relu(e / t - (1 - margin)),
  so the targeted cross-entropy to class k is CE(p, k) + P: minimising it moves the
  projection's class to k while keeping e a margin below t. The error's gradient is taken
  with the projection's code held fixed, 2 (x - x_proj), which is its exact gradient at the
  optimal code (the envelope theorem) and what BPDA approximates anyway.

  Attributes:
    clf: the deployed `ProjectedClassifier`.
    penalty: weight of the hinge (per unit of threshold-relative excess).
    margin: aim this fraction below the threshold.

  Params: {"defended": the ProjectedClassifier's params, "threshold": [] t}.
  """

  clf: ProjectedClassifier
  penalty: float = 10.0
  margin: float = 0.1

  def __call__(self, params: Params, x: Array) -> Array:
    p = params["defended"]
    proj = self.clf.project(p, x)
    if self.clf.gradient == "bpda":  # identity backward: one projection, not two
      x_proj = x + lax.stop_gradient(proj.x_proj - x)
    else:
      x_proj = proj.x_proj
    log_p = jax.nn.log_softmax(self.clf.classify(p["clf"], x_proj))
    error = jnp.sum(jnp.square(x - lax.stop_gradient(proj.x_proj)))
    hinge = self.penalty * jax.nn.relu(error / params["threshold"] - (1.0 - self.margin))
    reject = jnp.log(-jnp.expm1(-hinge) + jnp.finfo(x.dtype).tiny)
    return jnp.concatenate([log_p - hinge, reject[None]])


def fit_threshold(errors: Array, *, false_rejection_rate: float) -> Array:
  """The reconstruction-error threshold for a chosen false-rejection rate on clean data.

  The ceil((1 - rate) N)-th smallest clean error: `reject` (error > threshold) then rejects
  at most floor(rate N) of the N clean examples (exactly that many when errors are distinct).
  Thresholds set on held-out clean data reject new clean data at about `rate`.

  Args:
    errors: [N] projection errors of clean inputs.
    false_rejection_rate: in [0, 1).

  Returns:
    [] threshold.
  """
  if not 0.0 <= false_rejection_rate < 1.0:
    raise ValueError(f"false_rejection_rate must be in [0, 1), got {false_rejection_rate}")
  n = errors.shape[0]
  n_accept = max(1, math.ceil(round((1.0 - false_rejection_rate) * n, 9)))
  return jnp.sort(errors)[n_accept - 1]


def reject(error: Array, threshold: Array) -> Array:
  """bool: the projection error exceeds the threshold."""
  return error > threshold
