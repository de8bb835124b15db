"""ABS's latent-descent attack (Schott et al. 2019), targeted, for generative classifiers.

An attack that uses what the model is: a generative classifier explains x by each class's
model, so moving x towards the target class's own reconstruction of it is a direction the
model cannot ignore. Schott et al. (2019, "Latent Descent attack") iterate
x <- (1 - step) x + step r(x), r(x) the reconstruction of the best other class at the current
point, until the decision flips, then bisect between the clean input and the first adversarial
point. Here r is the TARGET class's reconstruction (the study's attacks are targeted).

The model must offer `class_reconstructions(params, x) -> [K, H, W, C]` besides its logits
(vae_attacks.genclf's `abs_logits_fn` and `cvae_logits_fn` do).
"""

import jax
import jax.numpy as jnp
from jax import lax

from vae_attacks.attacks import base
from vae_attacks.attacks.decision import boundary_bisection
from vae_attacks.types import Array, LogitsFn, Params


def latent_descent(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  *,
  steps: int = 10,
  step_size: float = 0.2,
  bisect_steps: int = 10,
) -> base.AttackResult:
  """Targeted latent descent towards the target class's reconstruction, for ONE pair.

  Args:
    logits_fn: the generative classifier, with a `class_reconstructions` attribute.
    params: its parameters.
    x: [H, W, C] source image in [0, 1].
    target: [] int target class.
    steps: descent steps (static); each x_i = (1 - step_size) x_{i-1} + step_size r_t(x_{i-1}).
    step_size: the mixing weight of a step.
    bisect_steps: bisection of the segment from x to the first x_i classified as `target`.

  Returns:
    `base.AttackResult`: x_adv the bisection's target-side point (or the last x_i when none
    succeeded, success False), loss_trace [steps] the target's probability at each x_i.
  """
  recon = getattr(logits_fn, "class_reconstructions", None)
  if recon is None:
    raise ValueError("latent_descent needs a model with class_reconstructions (a generative one)")

  def step(carry, _):
    xi, first, found = carry
    r = recon(params, xi)[target]
    xn = jnp.clip((1.0 - step_size) * xi + step_size * r, 0.0, 1.0)
    logits = logits_fn(params, xn)
    ok = jnp.argmax(logits) == target
    first = jnp.where(ok & ~found, xn, first)
    return (xn, first, found | ok), jax.nn.softmax(logits)[target]

  (last, first, found), trace = lax.scan(step, (x, x, False), None, length=int(steps))
  point, _ = boundary_bisection(logits_fn, params, x, first, target, steps=bisect_steps)
  x_adv = jnp.where(found, point, last)
  return base.finish(
    logits_fn, params, x, x_adv, target, targeted=True,
    iterations=jnp.int32(steps), loss_trace=trace,
  )  # fmt: skip
