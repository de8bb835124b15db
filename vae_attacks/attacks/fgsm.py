"""Fast Gradient (Sign) Method: one gradient step of size eps (Goodfellow et al. 2015)."""

import jax
import jax.numpy as jnp
import numpy as np

from vae_attacks.attacks import base
from vae_attacks.types import Array, LogitsFn, Params


def check_nonnegative(name: str, value) -> None:
  """Raises ValueError if a concrete `value` is negative; traced values pass unchecked."""
  if isinstance(value, jax.core.Tracer):
    return
  if np.any(np.asarray(value) < 0):
    raise ValueError(f"{name}={value!r} must be >= 0")


def movable(x: Array, direction: Array) -> Array:
  """bool mask of coordinates where a step along `direction` is not blocked by the [0, 1] box."""
  return ~(((x <= 0.0) & (direction < 0)) | ((x >= 1.0) & (direction > 0)))


def fgsm(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  eps: Array | float,
  norm: str = "linf",
  targeted: bool = True,
) -> base.AttackResult:
  """Fast Gradient Method, one step of size `eps` down the attack loss.

  Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples",
  ICLR 2015 (the L-inf sign step), with the usual steepest-descent steps for other norms:
  with g the gradient of the loss the attack minimises (`base.attack_loss`: cross-entropy
  to `target` when targeted, minus cross-entropy to the true label otherwise),
    linf: x - eps * sign(g);
    l2:   x - eps * g / ||g||_2;
    l1:   x - eps * sign(g_i) e_i on the coordinate i of largest |g_i| among those the
          [0, 1] box lets move in that direction (a pixel already at 0 cannot go darker).
  The result is clipped to [0, 1], which only shrinks the perturbation, so it stays in the
  eps-ball. Note that for l1 one pixel moves by at most 1, so eps > 1 is wasted.

  Args:
    logits_fn: (params, x[H, W, C]) -> logits[K].
    params: the classifier's parameters.
    x: clean image [H, W, C] in [0, 1].
    target: int[] target class (targeted) or true label (untargeted).
    eps: step size = radius of the ball in `norm` (may be traced; >= 0).
    norm: "linf", "l2" or "l1" (static).
    targeted: step towards `target` (True) or away from it (False).

  Returns:
    AttackResult with iterations = 1 and loss_trace[1] = the attack loss at x_adv.
  """
  base.check_norm(norm)
  check_nonnegative("eps", eps)
  eps = jnp.asarray(eps, x.dtype)

  loss_fn = lambda xx: base.attack_loss(logits_fn(params, xx), target, targeted=targeted)
  g = jax.grad(loss_fn)(x)
  if norm == "linf":
    step = jnp.sign(g)
  elif norm == "l2":
    g_norm = jnp.sqrt(jnp.sum(g * g))
    step = g / jnp.where(g_norm > 0, g_norm, 1.0)
  else:  # l1
    score = jnp.where(movable(x, -g), jnp.abs(g), -1.0).ravel()
    i = jnp.argmax(score)
    step = jnp.zeros_like(score).at[i].set(jnp.sign(g.ravel()[i])).reshape(x.shape)
  x_adv = jnp.clip(x - eps * step, 0.0, 1.0)

  logits = logits_fn(params, x_adv)
  success, prob = base.outcome(logits, target, targeted=targeted)
  return base.AttackResult(
    x_adv=x_adv,
    success=success,
    target_prob=prob,
    distortion=base.distortion(x, x_adv),
    iterations=jnp.ones((), jnp.int32),
    loss_trace=base.attack_loss(logits, target, targeted=targeted)[None],
  )
