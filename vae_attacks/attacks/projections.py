"""Euclidean projections onto norm balls (and the [0, 1] image box) for iterative attacks.

Every function takes an array of any shape (it works on the flattened array and returns the
input's shape), is jittable with no data-dependent shapes, and accepts a traced `eps` so that
an attack can be vmapped over an epsilon grid. `eps` is assumed non-negative.
"""

import jax.numpy as jnp
from jax import lax

from vae_attacks.types import Array

# Fixed number of bisection steps in `project_l1_box`: the bracket starts at [0, max|v|] and
# halves each step, so after ~40 steps it is down to float32 resolution; 64 is a safe margin.
L1_BOX_BISECTION_STEPS = 64


def project_linf(delta: Array, eps: Array | float) -> Array:
  """Projection of `delta` onto the L-inf ball {||d||_inf <= eps}: clip to [-eps, eps].

  Args:
    delta: perturbation, any shape.
    eps: radius (may be traced).

  Returns:
    The projection, shaped like `delta`.
  """
  eps = jnp.asarray(eps, delta.dtype)
  return jnp.clip(delta, -eps, eps)


def project_l2(delta: Array, eps: Array | float) -> Array:
  """Projection of `delta` onto the L2 ball {||d||_2 <= eps}: rescale if it lies outside.

  Args:
    delta: perturbation, any shape.
    eps: radius (may be traced).

  Returns:
    The projection, shaped like `delta`; `delta` itself when it is already inside.
  """
  eps = jnp.asarray(eps, delta.dtype)
  norm = jnp.sqrt(jnp.sum(delta * delta))
  # Safe denominator: the scale is only used when norm > eps >= 0.
  scale = eps / jnp.where(norm > eps, norm, 1.0)
  return jnp.where(norm > eps, delta * scale, delta)


def project_l1(delta: Array, eps: Array | float) -> Array:
  """Exact projection of `delta` onto the L1 ball {||d||_1 <= eps}.

  The sort-based O(n log n) algorithm of Duchi, Shalev-Shwartz, Singer and Chandra,
  "Efficient Projections onto the l1-Ball for Learning in High Dimensions" (ICML 2008),
  Fig. 1: the projection is soft-thresholding, sign(v) * max(|v| - theta, 0), with the
  theta that puts the result on the sphere.

  Args:
    delta: perturbation, any shape.
    eps: radius (may be traced).

  Returns:
    The projection, shaped like `delta`; `delta` itself when it is already inside.
  """
  v = jnp.ravel(delta)
  eps = jnp.asarray(eps, v.dtype)
  a = jnp.abs(v)
  u = -jnp.sort(-a)  # descending
  css = jnp.cumsum(u)
  j = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
  # rho = max{j : u_j - (css_j - eps) / j > 0}; the condition holds on a prefix of j.
  rho = jnp.sum(u * j > css - eps)
  idx = jnp.maximum(rho, 1) - 1  # rho == 0 only when eps == 0, where theta = max|v| is right
  theta = (css[idx] - eps) / (idx + 1).astype(v.dtype)
  w = jnp.sign(v) * jnp.maximum(a - theta, 0.0)
  return jnp.where(jnp.sum(a) <= eps, v, w).reshape(delta.shape)


def _soft_threshold_box(v: Array, lam: Array, lo: Array, hi: Array) -> Array:
  """clip(sign(v) * max(|v| - lam, 0), lo, hi)."""
  return jnp.clip(jnp.sign(v) * jnp.maximum(jnp.abs(v) - lam, 0.0), lo, hi)


def project_l1_box(x: Array, delta: Array, eps: Array | float) -> Array:
  """Exact projection of `delta` onto {||d||_1 <= eps} ∩ {0 <= x + d <= 1}.

  The box {-x <= d <= 1 - x} contains 0 and is a product of intervals, so for a multiplier
  lam >= 0 of the L1 constraint the problem separates per coordinate and its solution is
  d(lam) = clip(soft_threshold(delta, lam), -x, 1 - x). ||d(lam)||_1 is continuous and
  non-increasing in lam, zero at lam = max|delta|; the projection is d(0) when that is inside
  the ball, else d(lam*) with ||d(lam*)||_1 = eps, found here by a fixed number of bisection
  steps (jittable; no data-dependent control flow). The returned point uses the upper end of
  the final bracket, so it is always feasible. This is the projection step of SLIDE
  (Tramer & Boneh, "Adversarial Training and Robustness for Multiple Perturbations",
  NeurIPS 2019).

  Args:
    x: the clean image, any shape, with values in [0, 1].
    delta: perturbation, shaped like `x`.
    eps: L1 radius (may be traced).

  Returns:
    The projection, shaped like `delta`.
  """
  v = jnp.ravel(delta)
  lo = -jnp.ravel(x).astype(v.dtype)
  hi = 1.0 + lo
  eps = jnp.asarray(eps, v.dtype)
  l1 = lambda lam: jnp.sum(jnp.abs(_soft_threshold_box(v, lam, lo, hi)))

  def bisect(_, bracket):
    lam_lo, lam_hi = bracket
    mid = 0.5 * (lam_lo + lam_hi)
    inside = l1(mid) <= eps
    return jnp.where(inside, lam_lo, mid), jnp.where(inside, mid, lam_hi)

  zero = jnp.zeros((), v.dtype)
  _, lam = lax.fori_loop(0, L1_BOX_BISECTION_STEPS, bisect, (zero, jnp.max(jnp.abs(v))))
  boxed = jnp.clip(v, lo, hi)
  out = jnp.where(jnp.sum(jnp.abs(boxed)) <= eps, boxed, _soft_threshold_box(v, lam, lo, hi))
  return out.reshape(delta.shape)
