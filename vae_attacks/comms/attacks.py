"""Physical adversarial attacks on an autoencoder communication system (Sadeghi and Larsson 2019).

Sadeghi and Larsson (2019), "Physical Adversarial Attacks Against End-to-End Autoencoder
Communication Systems", IEEE Communications Letters 23(5): the adversary adds a signal p to
the channel, y = x + n + p, with a power budget set by the perturbation-to-signal ratio
PSR = ||p||^2 / ||x||^2 (per block; ||x||^2 = n here, so ||p||^2 = n 10^(PSR/10)). It does not
know which message is sent, so its perturbation must be input-agnostic (universal).

- `jamming`: Gaussian noise of squared norm exactly the budget (the reference of equal power).
- `fgm_table`: the input-specific white-box reference: per message, the best of the M - 1
  targeted fast-gradient directions -grad_y CE(logits(x), c) / ||.|| (Sadeghi and Larsson 2019,
  eq. (1), after their modulation-classification attack) at the full budget.
- `minimal_fgm`: the smallest such perturbation that changes the decision (binary search on
  its scale along each class direction; the class that needs least wins).
- `universal_perturbation`: Algorithm 1: over sampled received blocks, wherever the current
  perturbation still lets the block be decoded correctly, add the minimal FGM perturbation
  that flips it and project the sum onto the L2 ball of the budget (the universal-perturbation
  scheme of Moosavi-Dezfooli et al. 2017 with FGM as the inner step). With `shifts`, each
  sample sees the perturbation cyclically shifted by its own offset and the update is shifted
  back: a perturbation crafted to work whatever the symbol timing (shift-invariant).
- black box: `system.train_receiver` fits a substitute receiver to observed (signal, decision)
  pairs; the universal perturbation is then crafted on the substitute.

Every function is pure and written for one perturbation; `jax.vmap` batches it (over PSR
budgets, messages, samples).
"""

import jax
import jax.numpy as jnp
import optax

from vae_attacks.comms import system as system_lib
from vae_attacks.types import Array, Params, PRNGKey

ATTACKS = (
  "none",  # no attacker
  "jamming",  # Gaussian noise at the budget
  "fgm",  # white-box, input-specific (knows the message), full budget
  "uap",  # white-box universal perturbation, Algorithm 1
  "uap_unsync",  # the white-box UAP received at a random cyclic offset (no timing knowledge)
  "uap_shift",  # white-box shift-invariant UAP (Algorithm 1 over random offsets), random offset
  "substitute",  # black-box: UAP crafted on a substitute receiver, synchronous
  "substitute_shift",  # black-box: shift-invariant UAP on the substitute, random offset
)


def psr_energy(psr_db, signal_energy) -> Array:
  """Perturbation energy ||p||^2 = 10^(PSR/10) ||x||^2 for a PSR in dB."""
  return jnp.asarray(signal_energy, jnp.float32) * 10.0 ** (jnp.asarray(psr_db, jnp.float32) / 10)


def project_l2(p: Array, energy) -> Array:
  """Projection of p[n] onto the ball ||p||^2 <= energy."""
  norm = jnp.sqrt(jnp.sum(p * p))
  return p * jnp.minimum(1.0, jnp.sqrt(energy) / jnp.maximum(norm, 1e-12))


def jamming(key: PRNGKey, n: int, energy) -> Array:
  """Gaussian jamming of squared norm exactly `energy`: [n]."""
  return system_lib.normalize_energy(jax.random.normal(key, (n,)), energy)


def class_directions(receiver, params: Params, y: Array) -> Array:
  """Unit FGM directions -grad_y CE(logits(y), c) / ||.|| toward every class c: [M, n]."""
  logits = receiver.logits(params, y)
  m = logits.shape[-1]

  def one(c):
    g = jax.grad(
      lambda v: optax.softmax_cross_entropy_with_integer_labels(receiver.logits(params, v), c)
    )(y)
    return -g / jnp.maximum(jnp.sqrt(jnp.sum(g * g)), 1e-12)

  return jax.vmap(one)(jnp.arange(m))


def _margin(receiver, params, y, label):
  """max_{c != label} logit_c - logit_label (positive: the label lost)."""
  logits = receiver.logits(params, y)
  other = jnp.max(jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits))
  return other - logits[label]


def fgm(receiver, params: Params, y: Array, label: Array, *, energy) -> Array:
  """Input-specific FGM at the full budget: the best of the M - 1 targeted directions.

  The direction toward class c is d_c = -grad_y CE(logits(y), c) / ||.||; the attack sends
  sqrt(energy) d_c for the c whose perturbed logit margin over the label is largest.

  Args:
    receiver: has `logits(params, y[n]) -> [M]`.
    params: its parameters.
    y: the block the attacker crafts on (the noiseless codeword: it knows the message, not the
      noise) [n].
    label: the message sent.
    energy: the budget ||p||^2.

  Returns:
    p [n] with ||p||^2 = energy.
  """
  dirs = class_directions(receiver, params, y)  # [M, n]
  scale = jnp.sqrt(energy)
  margins = jax.vmap(lambda d: _margin(receiver, params, y + scale * d, label))(dirs)  # [M]
  margins = jnp.where(jnp.arange(dirs.shape[0]) == label, -jnp.inf, margins)
  return scale * dirs[jnp.argmax(margins)]


def minimal_fgm(
  receiver, params: Params, y: Array, label: Array, *, max_scale, search_steps: int = 20
) -> Array:
  """The smallest targeted-FGM perturbation that changes the decision on y (Algorithm 1, step 1).

  Along each class direction d_c (`class_directions`), a binary search of `search_steps`
  halvings on [0, max_scale] finds the smallest scale at which `decide` is no longer the label;
  the class needing the smallest scale wins and r = scale * d_c (the upper end of the search, so
  r does flip the decision). If no direction flips it within max_scale, r = max_scale * d_c for
  the direction with the largest logit margin there.

  Returns:
    r [n].
  """
  dirs = class_directions(receiver, params, y)  # [M, n]
  m = dirs.shape[0]

  def wrong(s, d):
    return receiver.decide(params, y + s * d) != label

  def search(d):
    def body(_, lohi):
      lo, hi = lohi
      mid = 0.5 * (lo + hi)
      flip = wrong(mid, d)
      return jnp.where(flip, lo, mid), jnp.where(flip, mid, hi)

    _, hi = jax.lax.fori_loop(0, search_steps, body, (jnp.zeros(()), jnp.asarray(max_scale)))
    return hi, wrong(max_scale, d)

  scales, flips = jax.vmap(search)(dirs)  # [M], bool[M]
  is_label = jnp.arange(m) == label
  flips = flips & ~is_label
  margins = jax.vmap(lambda d: _margin(receiver, params, y + max_scale * d, label))(dirs)
  margins = jnp.where(is_label, -jnp.inf, margins)
  best_flip = jnp.argmin(jnp.where(flips, scales, jnp.inf))
  c = jnp.where(jnp.any(flips), best_flip, jnp.argmax(margins))
  scale = jnp.where(jnp.any(flips), scales[c], max_scale)
  return scale * dirs[c]


def universal_perturbation(
  receiver,
  params: Params,
  signals: Array,
  labels: Array,
  *,
  energy,
  shifts: Array | None = None,
  passes: int = 1,
  search_steps: int = 20,
) -> Array:
  """A universal adversarial perturbation by Algorithm 1 of Sadeghi and Larsson (2019).

  p = 0; for each sample (y_i, s_i) in turn (`passes` times over the samples): if the receiver
  still decodes y_i + p correctly, r = minimal_fgm(y_i + p) (the smallest FGM perturbation that
  flips it, searched up to ||y_i + p||) and p <- Proj_{||p||^2 <= energy}(p + r). The result is
  scaled onto the sphere ||p||^2 = energy (the attacker spends its whole budget, as the authors'
  evaluation does). With `shifts`, sample i sees roll(p, s_i) and the update is rolled back by
  -s_i, so p is crafted to fool the receiver at any cyclic offset (shift-invariant).

  Args:
    receiver: has `logits` and `decide` (a system, or the attacker's substitute).
    params: its parameters.
    signals: received blocks the attacker crafts on (codewords plus channel noise) [N, n].
    labels: their messages int[N] (for a substitute: the attacked receiver's decisions).
    energy: the budget ||p||^2 (traced: one compilation for every PSR).
    shifts: optional int[N] cyclic offsets in 0..n-1.
    passes: passes over the samples.
    search_steps: halvings of the binary search of the scale.

  Returns:
    p [n] with ||p||^2 = energy; the same vector for every message.
  """
  n_samples, n = signals.shape
  shifts = jnp.zeros((n_samples,), jnp.int32) if shifts is None else shifts

  def step(p, i):
    y, label, s = signals[i], labels[i], shifts[i]
    pv = jnp.roll(p, s)  # the perturbation as this sample receives it
    correct = receiver.decide(params, y + pv) == label
    yp = y + pv
    r = minimal_fgm(
      receiver, params, yp, label, max_scale=jnp.sqrt(jnp.sum(yp * yp)), search_steps=search_steps
    )
    updated = project_l2(pv + r, energy)
    return jnp.roll(jnp.where(correct, updated, pv), -s), correct

  order = jnp.tile(jnp.arange(n_samples), passes)
  p, _ = jax.lax.scan(step, jnp.zeros((n,), jnp.float32), order)
  # p = 0 only if every sample was already wrong: any direction then; take the first axis.
  p = jnp.where(jnp.sum(p * p) > 0, p, jnp.zeros((n,)).at[0].set(1.0))
  return system_lib.normalize_energy(p, energy)
