"""Checks every config field before any work starts; one clear line per problem.

Two layers: per-field checks (`validate`: allowed names, ranges, integer types), and a walk over
every number of the config (`numbers`), nested sections and tuples included, that rejects NaN,
inf and negative values. The walk catches what a per-field check forgets (`nan <= 0` is False,
so `x <= 0` alone lets NaN through) and fields no per-field check names (model widths, strides);
no field of our configs means anything when negative.
"""

import math
from collections.abc import Iterator, Mapping

import ml_collections

from configs import base

ATTACK_NORMS = {
  "fgsm": ("linf", "l2", "l1"),
  "bim": ("linf", "l2"),
  "bim_l1": ("l1",),
  "pgd_l2": ("l2", "linf"),
  "lbfgs": ("l2",),
}
VAE_ATTACKS = ("latent_l2", "latent_fgsm", "reconstruction_l2", "reconstruction_fgsm")
STRATEGIES = ("random", "next", "least_likely", "all", "fixed")
SOURCES = ("auto", "tfds", "local")


class ConfigError(ValueError):
  """A config field holds a value that is not allowed."""


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field and what is allowed."""
  _validate_fields(c)
  numbers(c)


def numbers(c: Mapping, prefix: str = "") -> None:
  """Raises ConfigError naming the first number of `c` (at any depth, in tuples too) that is
  NaN, infinite or negative."""
  for field, value in _numeric_leaves(c, prefix):
    if not math.isfinite(value) or value < 0:
      raise ConfigError(f"{field}={value!r}; allowed: a finite number >= 0")


def _numeric_leaves(c: Mapping, prefix: str) -> Iterator[tuple[str, float]]:
  """(dotted name, number) for every int/float leaf of `c`; tuple items as name[i]."""
  for key, value in c.items():
    field = f"{prefix}{key}"
    if isinstance(value, Mapping) or hasattr(value, "items"):
      yield from _numeric_leaves(value, f"{field}.")
    elif isinstance(value, (tuple, list)):
      for i, item in enumerate(value):
        if _is_number(item):
          yield f"{field}[{i}]", item
    elif _is_number(value):
      yield field, value


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_fields(c: ml_collections.ConfigDict) -> None:
  """The per-field checks of `validate`."""
  _one_of("data.name", c.data.name, base.DATASETS)
  _one_of("data.source", c.data.source, SOURCES)
  for m in c.models:
    _one_of("models[]", m, base.MODELS)
  if not c.models:
    raise ConfigError(f"models is empty; allowed: a tuple of {base.MODELS}")
  _int_at_least("seed", c.seed, 0)
  if not isinstance(c.get("distributed", False), bool):
    raise ConfigError(f"distributed={c.distributed!r}; allowed: True or False")
  _int_at_least("data.image_size", c.data.image_size, 8)
  if c.data.name == "mnist" and c.data.image_size != 28:
    raise ConfigError(f"data.image_size={c.data.image_size}: MNIST images are 28x28; allowed: 28")
  if c.data.name == "lfw":
    _int_at_least("data.crop_size", c.data.crop_size, 8)
    if c.data.crop_size > 250 or c.data.image_size > c.data.crop_size:
      raise ConfigError(
        f"data.crop_size={c.data.crop_size}, data.image_size={c.data.image_size}: "
        "allowed: image_size <= crop_size <= 250"
      )
    _int_at_least("data.min_faces_per_person", c.data.min_faces_per_person, 1)
  _open_unit("data.test_fraction", c.data.test_fraction)
  _int_at_least("data.max_train", c.data.max_train, 0)
  _int_at_least("data.max_test", c.data.max_test, 0)
  for name, t in c.train.items():
    _int_at_least(f"train.{name}.epochs", t.epochs, 1)
    _int_at_least(f"train.{name}.batch_size", t.batch_size, 1)
    _positive(f"train.{name}.learning_rate", t.learning_rate)
  a = c.attacks
  for name in a.enabled:
    _one_of("attacks.enabled[]", name, tuple(ATTACK_NORMS))
    sec = a[name]
    _one_of(f"attacks.{name}.norm", sec.norm, ATTACK_NORMS[name])
    _eps_grid(f"attacks.{name}.eps", sec.eps)
    if "steps" in sec:
      _int_at_least(f"attacks.{name}.steps", sec.steps, 1)
    if "max_iters" in sec:
      _int_at_least(f"attacks.{name}.max_iters", sec.max_iters, 1)
    if "step_size_rel" in sec:
      _positive(f"attacks.{name}.step_size_rel", sec.step_size_rel)
    if "sparsity" in sec:
      _open_unit(f"attacks.{name}.sparsity", sec.sparsity, closed_low=True)
  for name in a.vae.enabled:
    _one_of("attacks.vae.enabled[]", name, VAE_ATTACKS)
    _eps_grid(f"attacks.vae.{name}.eps", a.vae[name].eps)
    if "max_iters" in a.vae[name]:
      _int_at_least(f"attacks.vae.{name}.max_iters", a.vae[name].max_iters, 1)
  _int_at_least("attacks.vae.num_pairs", a.vae.num_pairs, 1)
  _int_at_least("attacks.num_pairs", a.num_pairs, 1)
  _one_of("attacks.target_strategy", a.target_strategy, STRATEGIES)
  if a.target_strategy == "fixed" and not a.fixed_targets:
    raise ConfigError("attacks.target_strategy='fixed' needs attacks.fixed_targets (class ids)")
  _int_at_least("attacks.chunk_size", a.chunk_size, 0)
  _positive("attacks.memory_budget_mb", a.memory_budget_mb)
  for f in ("confidence_min", "ssim_min"):
    v = c.eval[f]
    if not 0.0 <= v <= 1.0:
      raise ConfigError(f"eval.{f}={v!r}; allowed: a number in [0, 1]")
  for f in ("linf_max", "l2_max"):
    if c.eval[f] < 0:
      raise ConfigError(f"eval.{f}={c.eval[f]!r}; allowed: >= 0 (0 = no bound)")
  if "defenses" in c:
    _defenses(c)


# The builders of experiments/defenses.py (DEFENSES), named here so validation imports no jax.
DEFENSES = (
  "none", "substitute", "distillation", "adversarial", "projection", "gmvae", "siamese",
  "vae_classifier",
)  # fmt: skip
# Plain classifiers (a transfer_spec to craft with).
TRANSFER_SOURCES = (
  "none", "substitute", "distillation", "adversarial", "siamese", "vae_classifier",
)  # fmt: skip
# The (model, train) sections each defence trains from; a defence not here needs its own name's.
DEFENSE_SECTIONS = {
  "none": (("cnn", "cnn"),),
  "distillation": (("cnn", "distillation"),),  # the cnn architecture
  "projection": (("cnn", "cnn"), ("mlp_vae", "vae")),  # the CNN classifies the projection
  "vae_classifier": (("mlp_vae", "vae"), ("latent_classifier", "latent_classifier")),
}


def _defenses(c) -> None:
  """The `defenses` section of configs/mnist_defenses.py and configs/lfw_defenses.py."""
  d = c.defenses
  if not d.enabled:
    raise ConfigError(f"defenses.enabled is empty; allowed: a tuple of {DEFENSES}")
  for name in d.enabled:
    _one_of("defenses.enabled[]", name, DEFENSES)
    for keys in DEFENSE_SECTIONS.get(name, ((name, name),)):
      for section, key in zip(("model", "train"), keys, strict=True):
        if key not in c[section]:
          raise ConfigError(f"defence {name!r} needs {section}.{key}; the config has none")
  _int_at_least("defenses.num_examples", d.num_examples, 1)
  if "distillation" in d.enabled:
    _positive("defenses.distillation.temperature", d.distillation.temperature)
  if "adversarial" in d.enabled:
    adv = d.adversarial
    if not isinstance(adv.eps, (int, float)) or not 0 <= adv.eps <= 1:
      raise ConfigError(f"defenses.adversarial.eps={adv.eps!r}; allowed: a number in [0, 1]")
    _int_at_least("defenses.adversarial.steps", adv.steps, 1)
    _positive("defenses.adversarial.step_size_rel", adv.step_size_rel)
    _bool("defenses.adversarial.random_start", adv.random_start)
    if not isinstance(adv.ramp_epochs, (int, float)) or adv.ramp_epochs < 0:
      raise ConfigError(f"defenses.adversarial.ramp_epochs={adv.ramp_epochs!r}; allowed: >= 0")
  a = d.attacks
  _eps_grid("defenses.attacks.eps", a.eps)
  _bool("defenses.attacks.fgsm", a.fgsm)
  if "impersonation" in a:
    _bool("defenses.attacks.impersonation", a.impersonation)
  _int_at_least("defenses.attacks.pgd_steps", a.pgd_steps, 1)
  _positive("defenses.attacks.pgd_step_size_rel", a.pgd_step_size_rel)
  _int_at_least("defenses.attacks.restarts", a.restarts, 1)
  if "projection" in d.enabled:
    p = d.projection
    for f in ("steps", "restarts", "attack_steps", "threshold_examples", "num_examples"):
      _int_at_least(f"defenses.projection.{f}", p[f], 1)
    _positive("defenses.projection.learning_rate", p.learning_rate)
    _open_unit("defenses.projection.false_rejection_rate", p.false_rejection_rate, closed_low=True)
    _positive("defenses.projection.penalty", p.penalty)
    _open_unit("defenses.projection.margin", p.margin, closed_low=True)
  if "siamese" in d.enabled:
    _positive("defenses.siamese.temperature", d.siamese.temperature)
  if "gmvae" in d.enabled:
    g = d.gmvae
    _positive("defenses.gmvae.mean_scale", g.mean_scale)
    _open_unit("defenses.gmvae.false_rejection_rate", g.false_rejection_rate, closed_low=True)
    _int_at_least("defenses.gmvae.threshold_examples", g.threshold_examples, 1)
    _positive("defenses.gmvae.penalty", g.penalty)
    _open_unit("defenses.gmvae.margin", g.margin, closed_low=True)
  t = d.transfer
  _bool("defenses.transfer.enabled", t.enabled)
  if t.enabled:
    _eps_grid("defenses.transfer.eps", (t.eps,))
    _int_at_least("defenses.transfer.restarts", t.restarts, 1)
    if not t.sources:
      raise ConfigError("defenses.transfer.sources is empty; allowed: defences to craft on")
    for name in t.sources:
      _one_of("defenses.transfer.sources[]", name, TRANSFER_SOURCES)


def _bool(field, value):
  if not isinstance(value, bool):
    raise ConfigError(f"{field}={value!r}; allowed: True or False")


def _eps_grid(field, eps):
  eps = tuple(eps) if isinstance(eps, (tuple, list)) else (eps,)
  if not eps:
    raise ConfigError(f"{field} is empty; allowed: a tuple of numbers >= 0")
  for e in eps:
    if not _is_number(e) or not math.isfinite(e) or e < 0:
      raise ConfigError(f"{field} contains {e!r}; allowed: finite numbers >= 0")


def _one_of(field, value, allowed):
  if value not in allowed:
    raise ConfigError(f"{field}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def _int_at_least(field, value, low):
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ConfigError(f"{field}={value!r}; allowed: an integer >= {low}")


def _positive(field, value):
  if not _is_number(value) or not math.isfinite(value) or value <= 0:
    raise ConfigError(f"{field}={value!r}; allowed: a finite number > 0")


def _open_unit(field, value, closed_low=False):
  ok = isinstance(value, (int, float)) and (0 <= value if closed_low else 0 < value) and value < 1
  if not ok:
    raise ConfigError(f"{field}={value!r}; allowed: a number in {'[' if closed_low else '('}0, 1)")


def diff(a: Mapping, b: Mapping, prefix="") -> list[str]:
  """Dotted names of the fields where two config dicts differ (NaN equals NaN here)."""
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      out += diff(va, vb, f"{prefix}{k}.")
    elif not same(va, vb):
      out.append(f"{prefix}{k}")
  return out


def same(a, b) -> bool:
  """a == b, except that NaN equals NaN, also inside lists and tuples: a config.json written
  with NaN in it must not make the identical command a "different config"."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
  return a == b
