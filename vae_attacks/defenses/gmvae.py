"""A Gaussian-mixture VAE that classifies by its closest class component and rejects outliers.

Ghosh, Losalka and Black, "Resisting Adversarial Attacks Using Gaussian Mixture Variational
Autoencoders" (AAAI 2019; arXiv 2018): the latent prior is a mixture of one Gaussian per class,
p(z) = sum_k pi_k N(z; mu_k, sigma_k^2 I) (sigma_k = 1 unless learned). Training on labelled
data minimises the negative ELBO with the labelled class's component as the prior,
  -log p(x | z) + KL(q(z | x) || N(mu_y, sigma_y^2 I)),
so each class's codes gather around its mean. A test input is classified by the component
closest to its latent mean (with equal weights pi_k the posterior is
p(k | z) = softmax_k(-||z - mu_k||^2 / (2 sigma_k^2) - D log sigma_k), which with unit
variances is the closest mean; these are the logits), and rejected when its latent mean is
too far from the chosen component (distance in units of sigma_k) or its reconstruction error
is too high; both thresholds are set on clean data for a chosen false-rejection rate.

The model reuses the project's VAEs: `GMVAE(vae=MLPVAE(...) or ConvVAE(...), num_classes=K)`
wraps the VAE's encoder and decoder (its variables live under "vae", so a trained VAE's
variables can start it) and adds the class means [K, D] (fixed, well separated, or learned)
and log-variances [K] (0, or learned).

The adaptive attack (Athalye, Carlini and Wagner 2018: attack the defence, not only the
classifier) is BIM on `adaptive_logits_fn`: the GMVAE's K logits plus a (K+1)-th "reject"
logit built so that the cross-entropy to any class k equals the cross-entropy of the plain
logits plus a hinge penalty P_k >= 0 that is zero while the distance to class k's component
and the reconstruction error stay below (1 - margin) times their thresholds. `bim.bim`
minimises that cross-entropy unchanged, and so does `runner.run_attack`.

Public API (all per example and jit / vmap friendly unless said otherwise):
* `GMVAE(vae, num_classes, mean_scale=3.0, learn_means=False, learn_variance=False)`: Flax
  module; methods `encode(x[B, H, W, C]) -> (mean[B, D], logvar[B, D])`, `decode(z[B, D]) ->
  pixel logits[B, H, W, C]`, `class_means() -> [K, D]`, `class_log_vars() -> [K]` (log
  sigma_k^2), `__call__(x, key) -> (pixel_logits, mean, logvar)`. Variables
  {"params": {"vae": <the VAE's params>, "means": [K, D], "log_vars": [K]}}.
* `class_means_init(scale, repulsion_steps=200) -> init(key, (K, D)) -> [K, D]`: the fixed
  means: scale * e_k when K <= D, else K points spread over the sphere of radius `scale`.
* `with_vae_params(model, vae_params, key) -> variables`: a GMVAE's variables from a trained
  VAE's variables and fresh class means.
* `gmvae_loss(pixel_logits[H, W, C], x[H, W, C], mean[D], logvar[D], class_mean[D],
  class_log_var=0.0) -> []`: Bernoulli reconstruction NLL + KL(N(mean, exp(logvar)) ||
  N(class_mean, exp(class_log_var) I)), nats.
* `logits_fn(model) -> LogitsFn`: (params, x[H, W, C]) -> logits[K], the log-posterior up to a
  constant; -||mean(x) - mu_k||^2 / 2 with unit variances.
* `scores(model, params, x[H, W, C]) -> Scores(logits[K], pred[], latent_distance[],
  reconstruction_error[])`: latent_distance = ||mean(x) - mu_pred||_2 / sigma_pred,
  reconstruction_error = mean over pixels of (sigmoid(decode(mean(x))) - x)^2.
* `components(model, params) -> (means [K, D], log_vars [K])`: the mixture's components.
* `batch_scores(model, params, x[N, H, W, C], *, batch_size=256) -> Scores` with [N] leading
  axes, host numpy (`runner.batched_map`).
* `fit_thresholds(latent_distance[N], reconstruction_error[N], *, false_rejection_rate) ->
  Thresholds(latent[], reconstruction[])`: both thresholds at one marginal quantile level,
  chosen so that the union rule rejects at most `false_rejection_rate` of these examples.
* `rejected(s: Scores, thresholds) -> bool[...]`: latent_distance > latent or
  reconstruction_error > reconstruction.
* `detect(model, params, thresholds, x[H, W, C]) -> (pred int[], rejected bool[])`.
* `train_gmvae(model, data, *, key, settings: train.TrainSettings, checkpoint_dir=None,
  init_params=None) -> (variables, metrics)`: `train.fit` (Adam, orbax checkpoints, progress
  lines); metrics
  include test_accuracy (closest component), test_neg_elbo_nats, test_recon_nats, test_kl_nats.
* `adaptive_logits_fn(model, *, penalty=10.0, margin=0.1) -> LogitsFn`: (params, x) ->
  logits[K + 1] with params {"gmvae": variables, "thresholds": Thresholds}.
* `adaptive_bim(logits_fn, params, x, target, *, eps, step_size, steps, norm="linf", ...) ->
  AttackResult`: `bim.bim` on an `adaptive_logits_fn` (same knobs, runner-compatible), judged
  as the defence judges: success = (closest component == target) and not rejected;
  target_prob = the GMVAE's K-class softmax probability of the target.
  The plain attack is `bim.bim(logits_fn(model), gmvae_variables, ...)`; count its rejections
  with `detect` on `x_adv`.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_attacks import losses, train
from vae_attacks.attacks import base, bim, runner
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey

# Each class's penalty carries + _PENALTY_FLOOR so that log(1 - exp(-P)) is finite: P = 0 raises
# the cross-entropy by 1e-6 instead of giving the reject logit a -inf term.
_PENALTY_FLOOR = 1e-6


def class_means_init(scale: float, repulsion_steps: int = 200):
  """Initialiser of well-separated class means [K, D].

  K <= D: scale * e_k (pairwise distance scale * sqrt(2)). K > D: K points on the sphere of
  radius `scale`, random directions spread apart by `repulsion_steps` steps of Coulomb
  repulsion (the Thomson problem; on a circle this approaches evenly spaced angles).
  """

  def init(key: PRNGKey, shape: tuple[int, int]) -> Array:
    k, d = shape
    if k <= d:
      return scale * jnp.eye(k, d)
    u = jax.random.normal(key, shape)
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)

    def repel(t, u):
      diff = u[:, None, :] - u[None, :, :]  # [K, K, D]
      dist2 = jnp.sum(jnp.square(diff), axis=-1) + jnp.eye(k)  # no self-force
      force = jnp.sum(diff / dist2[..., None] ** 1.5, axis=1)
      force = force - jnp.sum(force * u, axis=-1, keepdims=True) * u  # along the sphere
      # Unit-length moves of a decaying size: no jumps when two points start close.
      size = 0.1 * (1.0 - t / repulsion_steps) + 1e-3
      u = u + size * force / (jnp.linalg.norm(force, axis=-1, keepdims=True) + 1e-12)
      return u / jnp.linalg.norm(u, axis=-1, keepdims=True)

    return scale * jax.lax.fori_loop(0, repulsion_steps, repel, u)

  return init


class GMVAE(nn.Module):
  """VAE with a Gaussian-mixture prior, one unit-variance component per class (Ghosh 2018).

  Attributes:
    vae: the encoder / decoder, an `MLPVAE` or `ConvVAE` (its `latent_dim` is D).
    num_classes: K components.
    mean_scale: the class means' initial scale (see `class_means_init`); with unit-variance
      components, pick it so that neighbouring means are several units apart.
    learn_means: train the means (True) or keep them at their initial values (False).
    learn_variance: train one log-variance per class (True) or keep unit variances (False).
  """

  vae: nn.Module
  num_classes: int
  mean_scale: float = 3.0
  learn_means: bool = False
  learn_variance: bool = False

  def setup(self):
    self.means = self.param(
      "means", class_means_init(self.mean_scale), (self.num_classes, self.vae.latent_dim)
    )
    self.log_vars = self.param("log_vars", nn.initializers.zeros, (self.num_classes,))

  def encode(self, x: Array) -> tuple[Array, Array]:
    """(mean [B, D], logvar [B, D]) of q(z | x) for images x [B, H, W, C]."""
    return self.vae.encode(x)

  def decode(self, z: Array) -> Array:
    """Bernoulli pixel logits [B, H, W, C] for codes z [B, D]."""
    return self.vae.decode(z)

  def class_means(self) -> Array:
    """[K, D] the components' means (gradient-free unless `learn_means`)."""
    return self.means if self.learn_means else jax.lax.stop_gradient(self.means)

  def class_log_vars(self) -> Array:
    """[K] the components' log-variances log sigma_k^2 (gradient-free unless learned)."""
    return self.log_vars if self.learn_variance else jax.lax.stop_gradient(self.log_vars)

  def __call__(self, x: Array, key: PRNGKey) -> tuple[Array, Array, Array]:
    """(pixel logits [B, H, W, C], mean [B, D], logvar [B, D]); z sampled from q(z | x)."""
    pixel_logits, mean, logvar = self.vae(x, key)
    self.class_means(), self.class_log_vars()  # creates them at init
    return pixel_logits, mean, logvar


def with_vae_params(model: GMVAE, vae_params: Params, key: PRNGKey) -> Params:
  """GMVAE variables from a trained VAE's variables {"params": ...} and fresh class means."""
  means = class_means_init(model.mean_scale)(key, (model.num_classes, model.vae.latent_dim))
  log_vars = jnp.zeros((model.num_classes,), means.dtype)
  return {"params": {"vae": vae_params["params"], "means": means, "log_vars": log_vars}}


def gmvae_loss(
  pixel_logits: Array,
  x: Array,
  mean: Array,
  logvar: Array,
  class_mean: Array,
  class_log_var: Array | float = 0.0,
) -> Array:
  """Negative ELBO of one labelled example under its class's component, in nats.

  -log p(x | z) (Bernoulli, one sample) + KL(N(mean, diag(exp(logvar))) || N(mu, s^2 I)) with
  KL = 1/2 sum_d (exp(logvar_d) / s^2 + (mean_d - mu_d)^2 / s^2 - 1 - logvar_d + log s^2);
  for s = 1 this is `losses.gaussian_kl` of the shifted mean.

  Args:
    pixel_logits: [H, W, C] decoder logits for z ~ q(z | x).
    x: [H, W, C] image in [0, 1].
    mean: [D] encoder mean.
    logvar: [D] encoder log-variance.
    class_mean: [D] mu_y of the example's class.
    class_log_var: [] log s^2 of the class's component (0: unit variance).

  Returns:
    [] the loss.
  """
  return losses.bernoulli_nll(pixel_logits, x) + _class_kl(mean, logvar, class_mean, class_log_var)


def _class_kl(mean: Array, logvar: Array, class_mean: Array, class_log_var: Array) -> Array:
  """KL(N(mean, diag(exp(logvar))) || N(class_mean, exp(class_log_var) I)) in nats."""
  inv = jnp.exp(-class_log_var)
  return 0.5 * jnp.sum(
    jnp.exp(logvar) * inv + jnp.square(mean - class_mean) * inv - 1.0 - logvar + class_log_var
  )


def components(model: GMVAE, params: Params) -> tuple[Array, Array]:
  """(means [K, D], log-variances [K] log sigma_k^2) of the mixture."""
  return (
    model.apply(params, method="class_means"),
    model.apply(params, method="class_log_vars"),
  )


def _scaled_distances(z: Array, means: Array, log_vars: Array) -> Array:
  """[K] ||z - mu_k||_2 / sigma_k."""
  return jnp.sqrt(jnp.sum(jnp.square(z[None, :] - means), axis=-1) * jnp.exp(-log_vars))


def _logits_from_code(z: Array, means: Array, log_vars: Array) -> Array:
  """[K] log N(z; mu_k, sigma_k^2 I) up to a shared constant: the log-posterior (equal pi)."""
  sq = jnp.sum(jnp.square(z[None, :] - means), axis=-1)
  return -0.5 * (sq * jnp.exp(-log_vars) + z.shape[-1] * log_vars)


class Thresholds(NamedTuple):
  """Rejection thresholds, set on clean data by `fit_thresholds`."""

  latent: Array  # [] on ||mean(x) - mu_pred||_2 / sigma_pred
  reconstruction: Array  # [] on the mean squared reconstruction error per pixel


class Scores(NamedTuple):
  """What the defence computes for one input (leading axes when batched)."""

  logits: Array  # [K] log-posterior up to a constant; -||mean(x) - mu_k||^2 / 2 (unit var.)
  pred: Array  # int[] the most probable component (the closest, with equal variances)
  latent_distance: Array  # [] ||mean(x) - mu_pred||_2 / sigma_pred
  reconstruction_error: Array  # [] mean over pixels of (sigmoid(decode(mean(x))) - x)^2


def _latent_code(model: GMVAE, params: Params, x: Array) -> tuple[Array, Array, Array, Array]:
  """(mean(x) [D], class means [K, D], log-variances [K], reconstruction error []) of x."""
  mean, _ = model.apply(params, x[None], method="encode")
  rec = jax.nn.sigmoid(model.apply(params, mean, method="decode")[0])
  means, log_vars = components(model, params)
  return mean[0], means, log_vars, jnp.mean(jnp.square(rec - x))


def scores(model: GMVAE, params: Params, x: Array) -> Scores:
  """The defence's view of one input x [H, W, C]: logits, class, and both rejection scores."""
  z, means, log_vars, error = _latent_code(model, params, x)
  logits = _logits_from_code(z, means, log_vars)
  pred = jnp.argmax(logits)
  return Scores(
    logits=logits,
    pred=pred,
    latent_distance=_scaled_distances(z, means, log_vars)[pred],
    reconstruction_error=error,
  )


@dataclasses.dataclass(frozen=True)
class _Scores:
  model: GMVAE

  def __call__(self, params: Params, x: Array) -> Scores:
    return scores(self.model, params, x)


def batch_scores(model: GMVAE, params: Params, x: Array, *, batch_size: int = 256) -> Scores:
  """`scores` of every image of x [N, H, W, C] (`runner.batched_map`); fields [N, ...], numpy."""
  return runner.batched_map(_Scores(model), params, x, batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class _Logits:
  model: GMVAE

  def __call__(self, params: Params, x: Array) -> Array:
    return scores(self.model, params, x).logits


def logits_fn(model: GMVAE) -> LogitsFn:
  """The GMVAE classifier as `logits_fn(params, x[H, W, C]) -> logits[K]` (hashable).

  logits_k = -||mean(x) - mu_k||^2 / (2 sigma_k^2) - D log sigma_k, so softmax is the
  posterior p(k | mean(x)) under equal mixture weights, and with unit variances (the
  default) argmax is the closest component.
  """
  return _Logits(model)


def fit_thresholds(
  latent_distance: Array, reconstruction_error: Array, *, false_rejection_rate: float
) -> Thresholds:
  """Thresholds that reject a chosen fraction of clean data (Ghosh et al. 2018).

  An input is rejected when either score exceeds its threshold. Both thresholds are the
  m-th smallest value of their score (the same marginal quantile level m / N), m the smallest
  rank at which the union rule rejects at most floor(rate * N) of these N examples (fewer
  only when several examples share the largest of their two ranks). Set on held-out clean
  data, they reject new clean data at about `false_rejection_rate` (binomial error).

  Args:
    latent_distance: [N] clean inputs' `Scores.latent_distance`.
    reconstruction_error: [N] their `Scores.reconstruction_error`.
    false_rejection_rate: in [0, 1).

  Returns:
    Thresholds(latent, reconstruction).
  """
  if not 0.0 <= false_rejection_rate < 1.0:
    raise ValueError(f"false_rejection_rate must be in [0, 1), got {false_rejection_rate}")
  n = latent_distance.shape[0]
  n_accept = max(1, math.ceil(round((1.0 - false_rejection_rate) * n, 9)))

  def rank(v):  # 1-based position in sorted order
    return jnp.zeros(n, jnp.int32).at[jnp.argsort(v)].set(jnp.arange(1, n + 1, dtype=jnp.int32))

  # Accepted at level m iff both ranks <= m: the n_accept-th smallest max-rank is the least m
  # accepting n_accept examples.
  m = jnp.sort(jnp.maximum(rank(latent_distance), rank(reconstruction_error)))[n_accept - 1]
  return Thresholds(
    latent=jnp.sort(latent_distance)[m - 1], reconstruction=jnp.sort(reconstruction_error)[m - 1]
  )


def rejected(s: Scores, thresholds: Thresholds) -> Array:
  """bool: latent distance or reconstruction error above its threshold."""
  return (s.latent_distance > thresholds.latent) | (
    s.reconstruction_error > thresholds.reconstruction
  )


def detect(model: GMVAE, params: Params, thresholds: Thresholds, x: Array) -> tuple[Array, Array]:
  """(predicted class int[], rejected bool[]) of one input x [H, W, C]."""
  s = scores(model, params, x)
  return s.pred, rejected(s, thresholds)


@dataclasses.dataclass(frozen=True)
class _AdaptiveLogits:
  model: GMVAE
  penalty: float
  margin: float

  def __call__(self, params: Params, x: Array) -> Array:
    z, means, log_vars, error = _latent_code(self.model, params["gmvae"], x)
    t = params["thresholds"]
    slack = 1.0 - self.margin
    distance = _scaled_distances(z, means, log_vars)  # [K]
    p = self.penalty * (
      jax.nn.relu(distance / t.latent - slack) + jax.nn.relu(error / t.reconstruction - slack)
    )
    p = p + _PENALTY_FLOOR  # [K]
    logits = _logits_from_code(z, means, log_vars)
    # Class k's logit drops by P_k; the reject logit takes the mass removed, so the log-sum-exp
    # is unchanged and CE to each k grows by exactly P_k: r = LSE_k(l_k + log(1 - exp(-P_k))).
    reject = jax.nn.logsumexp(logits + jnp.log(-jnp.expm1(-p)))
    return jnp.concatenate([logits - p, reject[None]])


def adaptive_logits_fn(model: GMVAE, *, penalty: float = 10.0, margin: float = 0.1) -> LogitsFn:
  """The GMVAE with its rejection as a (K+1)-th "reject" logit, for attacks that know it.

  CE(adaptive logits, k) = CE(GMVAE logits, k) + P_k for every class k, with the hinge
    P_k = penalty * (relu(d_k / t_latent - (1 - margin)) + relu(e / t_rec - (1 - margin))),
  d_k = ||mean(x) - mu_k||_2 / sigma_k the distance to class k's component, e the reconstruction
  error. So minimising the targeted cross-entropy (`bim.bim`, `lbfgs`) pulls the code to the
  TARGET's component and keeps x inside both thresholds with a safety margin. (A penalty on
  the distance to the closest component instead would wall the attack in: between two
  components every code is far from both.) Softmax of the adaptive logits: class k has
  p_k exp(-P_k) ("class k and accepted"), the reject class the rest, sum_k p_k (1 - exp(-P_k)),
  with p the GMVAE's posterior.

  Args:
    model: the GMVAE.
    penalty: weight of the hinge (per unit of threshold-relative excess).
    margin: aim this fraction below each threshold.

  Returns:
    `logits_fn(params, x[H, W, C]) -> logits[K + 1]`, params {"gmvae": variables,
    "thresholds": Thresholds}; a hashable value, build it once.
  """
  return _AdaptiveLogits(model, float(penalty), float(margin))


def adaptive_bim(
  logits_fn: LogitsFn, params: Params, x: Array, target: Array, **bim_knobs: Any
) -> base.AttackResult:
  """Targeted BIM against the GMVAE and its rejection, judged as the defence judges it.

  Runs `bim.bim(logits_fn, params, x, target, **bim_knobs)` on an `adaptive_logits_fn`
  (eps, step_size, steps, norm, random_start, key, ... as in `bim.bim`; targeted only), then
  scores the final x_adv with the GMVAE: success = (closest component == target) and not
  rejected; target_prob = the K-class posterior of the target; loss_trace is bim's (the
  penalised cross-entropy). With `early_stop=True` and penalty * margin > log 2, bim stops
  at the first iterate whose target logit beats the reject logit, where P_target < log 2:
  both scores are below their thresholds, so the input is accepted.

  Args:
    logits_fn: `adaptive_logits_fn(model, ...)`.
    params: {"gmvae": variables, "thresholds": Thresholds}.
    x: [H, W, C] clean image in [0, 1].
    target: int[] the class to impersonate.
    **bim_knobs: keyword knobs of `bim.bim`.

  Returns:
    base.AttackResult for ONE pair (vmap for a batch; `runner.run_attack` compatible).
  """
  if not isinstance(logits_fn, _AdaptiveLogits):
    raise TypeError("adaptive_bim needs a logits_fn from adaptive_logits_fn(model, ...)")
  if not bim_knobs.get("targeted", True):
    raise ValueError("adaptive_bim is a targeted attack")
  result = bim.bim(logits_fn, params, x, target, **bim_knobs)
  s = scores(logits_fn.model, params["gmvae"], result.x_adv)
  ok = (s.pred == target) & ~rejected(s, params["thresholds"])
  return result._replace(success=ok, target_prob=jax.nn.softmax(s.logits)[target])


def train_gmvae(
  model: GMVAE,
  data: Any,
  *,
  key: PRNGKey,
  settings: train.TrainSettings,
  checkpoint_dir: str | None = None,
  init_params: Params | None = None,
) -> tuple[Params, dict]:
  """Trains a GMVAE on labelled data: `gmvae_loss` with the label's component, Adam.

  One reparameterised sample per example and step, through `train.fit` (shuffles, jitted
  steps, per-epoch test evaluation, orbax checkpoints, progress lines) as `train.train_vae`.

  Args:
    model: the GMVAE.
    data: has x_train [N, H, W, C] in [0, 1], y_train int [N], x_test, y_test.
    key: randomness of the whole run (init, shuffles, latent samples, evaluation).
    settings, checkpoint_dir, init_params: as in `train.train_vae` (`with_vae_params` starts
      from a trained VAE).

  Returns:
    (variables, metrics) with test_accuracy (closest component), test_neg_elbo_nats,
    test_recon_nats, test_kl_nats (against the true class's component), train_loss and the
    rest of `train.fit`'s.
  """
  init_key, sample_key, eval_key, run_key = jax.random.split(key, 4)

  def terms(params, x, y, key):
    pixel_logits, mean, logvar = model.apply(params, x, key)
    means, log_vars = components(model, params)
    recon = jax.vmap(losses.bernoulli_nll)(pixel_logits, x)
    kl = jax.vmap(_class_kl)(mean, logvar, means[y], log_vars[y])
    logits = jax.vmap(_logits_from_code, in_axes=(0, None, None))(mean, means, log_vars)
    return recon, kl, jnp.argmax(logits, -1) == y

  def batch_loss(params, x, y, key):
    recon, kl, _ = terms(params, x, y, key)
    return jnp.mean(recon + kl), {}

  @jax.jit
  def batch_sums(params, x, y, key):
    recon, kl, correct = terms(params, x, y, key)
    return jnp.sum(recon), jnp.sum(kl), jnp.sum(correct)

  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

  def evaluate(params):
    sums = train.sum_over_batches(
      batch_sums, params, x_test, y_test, key=eval_key, batch_size=settings.eval_batch_size
    )
    recon, kl, correct = sums / x_test.shape[0]
    return {
      "test_accuracy": correct,
      "test_neg_elbo_nats": recon + kl,
      "test_recon_nats": recon,
      "test_kl_nats": kl,
    }

  return train.fit(
    batch_loss,
    data.x_train,
    jnp.asarray(data.y_train, jnp.int32),
    name="gmvae",
    init=train.initialiser(init_params, model.init, init_key, data.x_train[:1], sample_key),
    evaluate=evaluate,
    key=run_key,
    settings=settings,
    hparams={"model": repr(model)},
    checkpoint_dir=checkpoint_dir,
  )
