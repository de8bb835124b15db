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
from experiments import defenses as defenses_lib  # the defences' table (imports jax)
from vae_attacks import data as data_lib
from vae_attacks import genclf
from vae_attacks import models as base_models
from vae_attacks.attacks import lbfgs, registry, runner


class ConfigError(ValueError):
  """A config field holds a value that is not allowed."""


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field and what is allowed."""
  _validate_fields(c)
  numbers(c)


def numbers(c: Mapping, prefix: str = "", *, negative: bool = False) -> None:
  """Raises ConfigError naming the first number of `c` (at any depth, in tuples too) that is
  NaN, infinite or (unless `negative`: the comm experiment's dB settings) negative."""
  for field, value in _numeric_leaves(c, prefix):
    if not math.isfinite(value) or (value < 0 and not negative):
      allowed = "a finite number" if negative else "a finite number >= 0"
      raise ConfigError(f"{field}={value!r}; allowed: {allowed}")


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


def _generative_fields(section, name: str) -> None:
  """The class-conditional VAE's likelihood (a name) and the Gaussian one's pixel sd (> 0: a
  zero divides)."""
  if section is None:
    return
  if "likelihood" in section:
    _one_of(f"model.{name}.likelihood", section["likelihood"], genclf.CVAE_LIKELIHOODS)
  sd = section.get("pixel_sd")
  if _is_number(sd) and not sd > 0:
    raise ConfigError(f"model.{name}.pixel_sd={sd!r}; allowed: a number > 0")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_fields(c: ml_collections.ConfigDict) -> None:
  """The per-field checks of `validate`."""
  _one_of("data.name", c.data.name, base.DATASETS)
  _one_of("data.source", c.data.source, data_lib.SOURCES)
  for m in c.models:
    _one_of("models[]", m, base.MODELS)
  if not c.models:
    raise ConfigError(f"models is empty; allowed: a tuple of {base.MODELS}")
  for i, m in enumerate(c.models):
    # (a defences config trains what its defences need: `_defenses` checks those sections)
    if m not in c.model and "defenses" not in c:
      raise ConfigError(f"models names {m!r}, which has no section model.{m}")
    match_to = c.train[m].get("match_to", "") if m in c.train else ""
    if match_to and match_to not in c.models[:i]:
      raise ConfigError(
        f"train.{m}.match_to={match_to!r}; allowed: a model trained before it, one of "
        f"{tuple(c.models[:i])}"
      )
    _generative_fields(c.model.get(m) if "model" in c else None, m)
  for m in c.attacks.get("pair_models", ()):
    _one_of("attacks.pair_models[]", m, tuple(c.models))
  for m in c.attacks.get("only_models", ()):
    _one_of("attacks.only_models[]", m, tuple(c.models))
  if "joint_vae" in c.models:
    if "joint_vae" not in c.train:
      raise ConfigError("models names 'joint_vae', which has no section train.joint_vae")
    _positive("train.joint_vae.ce_weight_per_pixel", c.train.joint_vae.get("ce_weight_per_pixel"))
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
    _int_at_least(f"train.{name}.epoch_examples", t.get("epoch_examples", 0), 0)
  a = c.attacks
  for family, where, names in (
    ("classifier", "attacks", a.enabled),
    ("vae", "attacks.vae", a.vae.enabled),
  ):
    sections = a.vae if family == "vae" else a
    for name in names:
      _one_of(f"{where}.enabled[]", name, registry.configurable(family))
      spec = registry.ATTACKS[name]
      if (spec.section or name) not in sections:
        raise ConfigError(
          f"{where}.enabled names {name!r}, which has no section {where}.{spec.section or name}; "
          f"a config adds it with configs.base.add_attacks(config, {name!r})"
        )
      _attack_section(
        f"{where}.{name}", registry.ATTACKS[name], registry.section_of(registry.ATTACKS[name], a)
      )
  _int_at_least("attacks.vae.num_pairs", a.vae.num_pairs, 1)
  _int_at_least("attacks.num_pairs", a.num_pairs, 1)
  for name in a.vae.enabled:  # a VAE attack on the first n of the VAE pairs
    sec = registry.section_of(registry.ATTACKS[name], a)
    if sec.get("num_pairs", None) is not None:
      _int_at_least(f"attacks.vae.{name}.num_pairs", sec.num_pairs, 1)
      if sec.num_pairs > a.vae.num_pairs:
        raise ConfigError(
          f"attacks.vae.{name}.num_pairs={sec.num_pairs} exceeds attacks.vae.num_pairs="
          f"{a.vae.num_pairs}; allowed: 1 to attacks.vae.num_pairs (the first n of its pairs)"
        )
  _one_of("attacks.target_strategy", a.target_strategy, runner.STRATEGIES)
  if a.target_strategy == "fixed" and not a.fixed_targets:
    raise ConfigError("attacks.target_strategy='fixed' needs attacks.fixed_targets (class ids)")
  _int_at_least("attacks.chunk_size", a.chunk_size, 0)
  _positive("attacks.memory_budget_mb", a.memory_budget_mb)
  for f in ("confidence_min", "ssim_min"):
    v = c.eval[f]
    if not 0.0 <= v <= 1.0:
      raise ConfigError(f"eval.{f}={v!r}; allowed: a number in [0, 1]")
  if "psnr_min" in c.eval:
    _positive("eval.psnr_min", c.eval.psnr_min)
  if "common_size" in c.eval:
    _int_at_least("eval.common_size", c.eval.common_size, 8)
  _bool("attacks.shared_pairs", c.attacks.get("shared_pairs", False))
  for f in ("linf_max", "l2_max"):
    if c.eval[f] < 0:
      raise ConfigError(f"eval.{f}={c.eval[f]!r}; allowed: >= 0 (0 = no bound)")
  if "defenses" in c:
    _defenses(c)


def _defenses(c) -> None:
  """The `defenses` section of configs/mnist_defenses.py and configs/lfw_defenses.py."""
  d = c.defenses
  specs = defenses_lib.DEFENSES  # read here, not at import: defenses imports us (by workdir)
  if not d.enabled:
    raise ConfigError(f"defenses.enabled is empty; allowed: a tuple of {tuple(specs)}")
  for name in d.enabled:
    _one_of("defenses.enabled[]", name, tuple(specs))
    for keys in specs[name].sections:
      for section, key in zip(("model", "train"), keys, strict=True):
        if key not in c[section]:
          raise ConfigError(f"defence {name!r} needs {section}.{key}; the config has none")
  _int_at_least("defenses.num_examples", d.num_examples, 1)
  only = d.get("only_attacks", ())
  if not isinstance(only, tuple | list) or not all(isinstance(n, str) and n for n in only):
    raise ConfigError(
      f"defenses.only_attacks={only!r}; allowed: a tuple of attack names, () for all"
    )
  if "distillation" in d.enabled:
    _positive("defenses.distillation.temperature", d.distillation.temperature)
  for name in ("adversarial", "trades"):  # the inner attack of robust training
    if name in d.enabled:
      sec = d[name]
      if not isinstance(sec.eps, (int, float)) or not 0 <= sec.eps <= 1:
        raise ConfigError(f"defenses.{name}.eps={sec.eps!r}; allowed: a number in [0, 1]")
      _int_at_least(f"defenses.{name}.steps", sec.steps, 1)
      _positive(f"defenses.{name}.step_size_rel", sec.step_size_rel)
  if "adversarial" in d.enabled:
    adv = d.adversarial
    _bool("defenses.adversarial.random_start", adv.random_start)
    if not isinstance(adv.ramp_epochs, (int, float)) or adv.ramp_epochs < 0:
      raise ConfigError(f"defenses.adversarial.ramp_epochs={adv.ramp_epochs!r}; allowed: >= 0")
  if "trades" in d.enabled:
    _positive("defenses.trades.beta", d.trades.beta)
  a = d.attacks
  _eps_grid("defenses.attacks.eps", a.eps)
  _bool("defenses.attacks.fgsm", a.fgsm)
  if "impersonation" in a:
    _bool("defenses.attacks.impersonation", a.impersonation)
  _int_at_least("defenses.attacks.pgd_steps", a.pgd_steps, 1)
  _positive("defenses.attacks.pgd_step_size_rel", a.pgd_step_size_rel)
  _int_at_least("defenses.attacks.restarts", a.restarts, 1)
  if "apgd" in d:
    _bool("defenses.apgd.enabled", d.apgd.enabled)
    for f in ("steps", "target_ranks", "restarts"):
      _int_at_least(f"defenses.apgd.{f}", d.apgd[f], 1)
  if "projection" in d.enabled:
    p = d.projection
    for f in ("steps", "restarts", "attack_steps", "attack_restarts", "threshold_examples",
              "num_examples"):  # fmt: skip
      _int_at_least(f"defenses.projection.{f}", p[f], 1)
    _positive("defenses.projection.learning_rate", p.learning_rate)
    _open_unit("defenses.projection.false_rejection_rate", p.false_rejection_rate, closed_low=True)
    _positive("defenses.projection.penalty", p.penalty)
    _open_unit("defenses.projection.margin", p.margin, closed_low=True)
  if "siamese" in d.enabled:
    _positive("defenses.siamese.temperature", d.siamese.temperature)
  if "gmvae" in d.enabled:
    g = d.gmvae
    vaes = tuple(n for n, kind in base_models.MODEL_KINDS.items() if kind == "vae")
    if g.architecture not in vaes:
      raise ConfigError(f"defenses.gmvae.architecture={g.architecture!r}; allowed: {vaes}")
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
      _one_of("defenses.transfer.sources[]", name, defenses_lib.TRANSFER_SOURCES)


# Knobs an attack section may hold, with their check (the registry says which attack takes which).
_KNOB_CHECKS = {
  "steps": lambda f, v: _int_at_least(f, v, 1),
  "max_iters": lambda f, v: _int_at_least(f, v, 1),
  "search_steps": lambda f, v: _int_at_least(f, v, 1),
  "bisect_steps": lambda f, v: _int_at_least(f, v, 0),
  "memory": lambda f, v: _int_at_least(f, v, 1),
  "num_trials": lambda f, v: _int_at_least(f, v, 1),
  "step_size_rel": lambda f, v: _positive(f, v),
  "tol": lambda f, v: _positive(f, v),
  "ftol": lambda f, v: _positive(f, v),
  "sparsity": lambda f, v: _open_unit(f, v, closed_low=True),
  "random_start": lambda f, v: _bool(f, v),
  "c_search": lambda f, v: _bool(f, v),
  "direction": lambda f, v: _one_of(f, v, lbfgs.DIRECTIONS),
}


def _attack_section(where: str, spec: registry.AttackSpec, sec) -> None:
  """One attack's config section: its norm, eps grid and knobs."""
  if "norm" in sec:
    _one_of(f"{where}.norm", sec.norm, spec.norms)
  _eps_grid(f"{where}.eps", sec["eps"])
  for knob, check in _KNOB_CHECKS.items():
    if knob in sec:
      check(f"{where}.{knob}", sec[knob])


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
