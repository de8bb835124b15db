"""The attacks of the study, one entry each: the one table the configs, validation, the runs
and the report read their attack lists from.

Every entry's `run` is the attack as the runner calls it, for ONE pair and ONE eps:

  run(model_fn, params, x, target, *, eps, **knobs) -> base.AttackResult

(the VAE attacks see x as the pair's source and target image stacked, xx[2, H, W, C]). The
functions are module-level, so their identity is stable and the runner's compile cache hits.

Adding an attack: its module (a pure one-pair function with tests), an `AttackSpec` here, and
its config section in configs/base.py (`SECTION_DEFAULTS` there holds the knobs' defaults).

Targeted and untargeted. Every entry of `ATTACKS` is a study attack and TARGETED: the runner's
`target` per pair is the class to reach, and `success` is reaching it. `UNTARGETED` holds the
attacks that measure robust accuracy (the defences, `vae_attacks.robustness`): there the
runner's `target` per pair is the TRUE LABEL and `success` is misclassification. The same
algorithm may be in both tables under the same name (APGD-CE: `ATTACKS["apgd_ce"]` reaches
the pair's target; `UNTARGETED["apgd_ce"]` moves away from the label).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax

from vae_attacks.attacks import apgd, bim, decision, fgsm, latent_descent, lbfgs, minimal
from vae_attacks.attacks import vae as vae_lib

# Cost passes of the runs (experiments/attacks.py): gradient-step attacks on every model first,
# then the L-BFGS attacks on the classifiers (the cells H0 compares across models), then the
# L-BFGS VAE attacks. An L-BFGS solve per pair and eps (tens of gradients plus the solver's
# algebra on [memory x pixels] arrays) costs 10-50x the others at 154x154x3.
GRADIENT_PASS, CLASSIFIER_SOLVER_PASS, VAE_SOLVER_PASS = 0, 1, 2
NUM_PASSES = 3


class AttackSpec(NamedTuple):
  """What the runs and the report need to know of one attack.

  name: the `attack` field of its result rows.
  run: the runner-callable one-pair attack (see the module docstring).
  norms: the norms its config section may name (`norm`); the rows carry the chosen one. A
    single-norm attack whose section has no `norm` field is run under `norms[0]`.
  eps_kind: "budget" (eps bounds the perturbation's norm: larger is stronger), "weight" (eps
    is a setting in no norm's units, kept as it is on every dataset: latent descent's mixing
    weight; unused by HopSkipJump, a minimal-perturbation attack) or "penalty"
    (eps weighs the distortion in the objective, Szegedy's c / Tabacof's C: larger is weaker).
  family: "classifier" (attacks a model's logits) or "vae" (Tabacof / Kos attacks on a VAE,
    judged by the CNN on the reconstruction).
  cost_pass: when the runs take it (GRADIENT_PASS, ...).
  knobs: fields of its config section passed to `run` as keywords (besides eps); a knob that
    is absent from the section is not passed.
  section: its config section under `attacks` (`attacks.vae.<name>` for the VAE family);
    default: the name itself.
  enabled_by: a bool field of `section` that adds this attack (the c search of L-BFGS), else
    None (enabled by its name in `attacks.enabled` / `attacks.vae.enabled`).
  grid: the eps values it runs, from its section's `eps` (the c search starts from the
    largest c of the L-BFGS grid).
  batched: a batched form for the runner's host-loop strategy (`runner.iter_attack_chunks`,
    `batched=`), used by the runs instead of the compiled vmap of `run`: benchmarks/attacks.py
    measures it faster for the L-BFGS attack at MNIST and LFW sizes (README, "Performance").
  cite: the paper it implements.
  pair_input: True for a classifier attack that starts from a test image of the target class
    (a decision-based attack): the runner gives it the source and that image stacked,
    xx[2, H, W, C], as the VAE attacks get theirs.
  generative_only: True for an attack that needs the model's `class_reconstructions`
    (vae_attacks.genclf); the runs skip it on the other models.
  default_enabled: False for an attack that the configs leave out unless they ask for it
    (`configs.base.add_attacks` adds its section and its name to `enabled`): the base
    config's `enabled` lists the entries with True, and a config without the attack has no
    section for it, so the JSON (and the settings hash) of every earlier config is unchanged.
  """

  name: str
  run: Callable
  norms: tuple[str, ...]
  eps_kind: str
  family: str
  cost_pass: int
  knobs: tuple[str, ...]
  section: str | None = None
  enabled_by: str | None = None
  grid: Callable[[tuple[float, ...]], tuple[float, ...]] = tuple
  batched: Callable | None = None
  cite: str = ""
  default_enabled: bool = True
  pair_input: bool = False
  generative_only: bool = False


def _fgsm(logits_fn, params, x, target, *, eps, norm):
  return fgsm.fgsm(logits_fn, params, x, target, eps=eps, norm=norm)


def _bim(logits_fn, params, x, target, *, eps, norm, steps, step_size_rel, **knobs):
  """BIM / PGD / SLIDE with a step size proportional to eps, so one compile serves the grid."""
  return bim.bim(
    logits_fn,
    params,
    x,
    target,
    eps=eps,
    norm=norm,
    steps=steps,
    step_size=step_size_rel * eps,
    **knobs,
  )


def _bim_min(logits_fn, params, x, target, *, eps, norm, steps, step_size_rel, **knobs):
  """The minimal BIM budget of one pair by bisection over [0, eps] (`minimal.bim_min_eps`)."""
  return minimal.bim_min_eps(
    logits_fn, params, x, target, eps=eps, norm=norm, steps=steps, step_size_rel=step_size_rel,
    **knobs,
  )  # fmt: skip


def _lbfgs(logits_fn, params, x, target, *, eps, max_iters, **solver):
  return lbfgs.lbfgs(logits_fn, params, x, target, eps=eps, max_iters=max_iters, **solver)


def _lbfgs_search(logits_fn, params, x, target, *, eps, max_iters, search_steps, **solver):
  return lbfgs.lbfgs_c_search(
    logits_fn,
    params,
    x,
    target,
    c_init=eps,
    max_iters=max_iters,
    search_steps=search_steps,
    **solver,
  )


def _apgd_run(loss: str, targeted: bool) -> Callable:
  """`apgd.apgd` in the runner's form, its loss and the meaning of `target` fixed (the pair's
  target, or the true label when untargeted); by default a random start when given a key (the
  study's `knobs_of` gives one with `random_start=True`); `target_rank` for APGD-T."""

  def run(
    logits_fn,
    params,
    x,
    target,
    *,
    eps,
    norm,
    steps,
    key=None,
    random_start=None,
    target_rank=0,
    unroll=1,
  ):
    return apgd.apgd(
      logits_fn, params, x, target, eps=eps, norm=norm, steps=steps, loss=loss,
      targeted=targeted, target_rank=target_rank, key=key, unroll=unroll,
      random_start=key is not None if random_start is None else random_start,
    )  # fmt: skip

  run.__name__ = f"apgd_{loss}_{'targeted' if targeted else 'untargeted'}"
  return run


_APGD_CE, _APGD_DLR = _apgd_run("ce", True), _apgd_run("dlr", True)
_APGD_CE_UNTARGETED, _APGD_DLR_UNTARGETED = _apgd_run("ce", False), _apgd_run("dlr", False)


def _latent_descent(logits_fn, params, x, target, *, eps, steps, bisect_steps):
  """Latent descent with mixing weight eps per step (Schott et al. 2019); generative models."""
  return latent_descent.latent_descent(
    logits_fn, params, x, target, steps=steps, step_size=eps, bisect_steps=bisect_steps
  )


def _hop_skip_jump(
  logits_fn, params, xx, target, *, eps, key, iterations, num_evals, bisect_steps, random_start
):
  """HopSkipJump from the pair's target image xx[1] (eps unused: a minimal-perturbation
  attack; its rows carry the L2 of the boundary point it ends at). Its section's
  random_start=True is what hands it a key (`knobs_of`): its gradient estimates are random."""
  del eps, random_start
  return decision.hop_skip_jump(
    logits_fn, params, xx[0], target, x_init=xx[1], key=key, iterations=iterations,
    num_evals=num_evals, bisect_steps=bisect_steps,
  )  # fmt: skip


def _pairwise(attack):
  """A VAE attack (model, params, x, x_target, target) seen by the runner: the pair's source and
  target images travel stacked as one input xx[2, H, W, C]."""

  def run_pair(model, params, xx, target, *, eps, **knobs):
    return attack(model, params, xx[0], xx[1], target, eps=eps, **knobs)

  run_pair.__name__ = attack.__name__
  return run_pair


_BIM_KNOBS = ("norm", "steps", "step_size_rel", "random_start", "sparsity")
_BIM_MIN_KNOBS = (*_BIM_KNOBS, "bisect_steps")
_SOLVER_KNOBS = ("max_iters", "memory", "num_trials", "tol", "ftol")
# `direction` (lbfgs.DIRECTIONS) is in no shipped config: the studies' rows were computed with
# the default "subspace" direction, and a section without the field keeps their settings hash.
_LBFGS_KNOBS = ("max_iters", "direction")
_APGD_KNOBS = ("norm", "steps", "random_start")
_CROCE = "Croce and Hein 2020 (APGD, AutoAttack)"
_KURAKIN = "Kurakin, Goodfellow and Bengio 2016 (BIM); Madry et al. 2018 (PGD)"
_SZEGEDY = "Szegedy et al. 2014 (box-constrained L-BFGS)"
_TABACOF = "Tabacof, Tavares and Valle 2016"
_KOS = "Kos, Fischer and Song 2017"

ATTACKS: dict[str, AttackSpec] = {
  s.name: s
  for s in (
    AttackSpec(
      "fgsm", _fgsm, ("linf", "l2", "l1"), "budget", "classifier", GRADIENT_PASS, ("norm",),
      cite="Goodfellow, Shlens and Szegedy 2015",
    ),
    AttackSpec(
      "bim", _bim, ("linf", "l2"), "budget", "classifier", GRADIENT_PASS, _BIM_KNOBS, cite=_KURAKIN
    ),
    AttackSpec(
      "bim_l1", _bim, ("l1",), "budget", "classifier", GRADIENT_PASS, _BIM_KNOBS,
      cite="Tramer and Boneh 2019 (SLIDE, the L1 basic iterative attack)",
    ),
    AttackSpec(
      "pgd_l2", _bim, ("l2", "linf"), "budget", "classifier", GRADIENT_PASS, _BIM_KNOBS,
      cite=_KURAKIN,
    ),
    AttackSpec(
      "bim_min", _bim_min, ("linf", "l2"), "budget", "classifier", GRADIENT_PASS, _BIM_MIN_KNOBS,
      cite=_KURAKIN + "; the minimal budget per pair by bisection over eps",
      default_enabled=False,
    ),
    AttackSpec(
      "bim_l1_min", _bim_min, ("l1",), "budget", "classifier", GRADIENT_PASS, _BIM_MIN_KNOBS,
      cite="Tramer and Boneh 2019 (SLIDE); the minimal budget per pair by bisection over eps",
      default_enabled=False,
    ),
    AttackSpec(
      "apgd_ce", _APGD_CE, ("linf", "l2"), "budget", "classifier", GRADIENT_PASS, _APGD_KNOBS,
      cite=_CROCE + ", cross-entropy loss, targeted", default_enabled=False,
    ),
    AttackSpec(
      "apgd_dlr", _APGD_DLR, ("linf", "l2"), "budget", "classifier", GRADIENT_PASS, _APGD_KNOBS,
      cite=_CROCE + ", targeted DLR loss", default_enabled=False,
    ),
    AttackSpec(
      "lbfgs", _lbfgs, ("l2",), "penalty", "classifier", CLASSIFIER_SOLVER_PASS, _LBFGS_KNOBS,
      batched=lbfgs.lbfgs_batch, cite=_SZEGEDY,
    ),
    AttackSpec(
      "lbfgs_c_search", _lbfgs_search, ("l2",), "penalty", "classifier", CLASSIFIER_SOLVER_PASS,
      (*_LBFGS_KNOBS, "search_steps"), section="lbfgs", enabled_by="c_search",
      grid=lambda eps: (max(eps),), cite=_SZEGEDY + ", with its line search over c",
    ),
    AttackSpec(
      "latent_descent", _latent_descent, ("l2",), "weight", "classifier", GRADIENT_PASS,
      ("steps", "bisect_steps"), default_enabled=False, generative_only=True,
      cite="Schott, Rauber, Bethge and Brendel 2019 (latent descent), targeted",
    ),
    AttackSpec(
      "hop_skip_jump", _hop_skip_jump, ("l2",), "weight", "classifier", CLASSIFIER_SOLVER_PASS,
      ("iterations", "num_evals", "bisect_steps", "random_start"), default_enabled=False,
      pair_input=True, cite="Chen, Jordan and Wainwright 2020 (HopSkipJump), targeted L2",
    ),
    AttackSpec(
      "latent_l2", _pairwise(vae_lib.latent_l2), ("l2",), "penalty", "vae", VAE_SOLVER_PASS,
      _SOLVER_KNOBS, cite=f"{_TABACOF}; {_KOS} (latent attack)",
    ),
    AttackSpec(
      "latent_kl", _pairwise(vae_lib.latent_kl), ("l2",), "penalty", "vae", VAE_SOLVER_PASS,
      _SOLVER_KNOBS, cite=f"{_TABACOF} (latent attack, KL between the posteriors)",
      default_enabled=False,
    ),
    AttackSpec(
      "latent_fgsm", _pairwise(vae_lib.latent_fgsm_attack), ("linf",), "budget", "vae",
      GRADIENT_PASS, (), cite=f"{_KOS} (latent attack, FGSM)",
    ),
    AttackSpec(
      "reconstruction_l2", _pairwise(vae_lib.reconstruction_l2), ("l2",), "penalty", "vae",
      VAE_SOLVER_PASS, _SOLVER_KNOBS, cite=f"{_KOS} (L_VAE attack)",
    ),
    AttackSpec(
      "reconstruction_fgsm", _pairwise(vae_lib.reconstruction_fgsm_attack), ("linf",), "budget",
      "vae", GRADIENT_PASS, (), cite=f"{_KOS} (L_VAE attack, FGSM)",
    ),
  )
}  # fmt: skip

# The untargeted attacks of robust accuracy (see the module docstring): the runner's `target`
# is the true label. `run(logits_fn, params, x, label, *, eps, key, **knobs)`; `knobs` as above.
# AutoAttack's APGD part (Croce & Hein 2020, `vae_attacks.robustness.autoattack_apgd`):
# apgd_ce, then apgd_t with target_rank 1..9, an example robust when none breaks it.
UNTARGETED: dict[str, AttackSpec] = {
  s.name: s
  for s in (
    AttackSpec(
      "apgd_ce", _APGD_CE_UNTARGETED, ("linf", "l2"), "budget", "classifier", GRADIENT_PASS,
      _APGD_KNOBS, cite=_CROCE + ", cross-entropy loss",
    ),
    AttackSpec(
      "apgd_dlr", _APGD_DLR_UNTARGETED, ("linf", "l2"), "budget", "classifier", GRADIENT_PASS,
      _APGD_KNOBS, cite=_CROCE + ", DLR loss",
    ),
    AttackSpec(
      "apgd_t", _APGD_DLR_UNTARGETED, ("linf", "l2"), "budget", "classifier", GRADIENT_PASS,
      (*_APGD_KNOBS, "target_rank"), cite=_CROCE + ", targeted DLR loss over the top classes",
    ),
  )
}  # fmt: skip


def of_family(family: str) -> tuple[str, ...]:
  """The names of the attacks of one family, in the table's order."""
  return tuple(n for n, s in ATTACKS.items() if s.family == family)


def configurable(family: str) -> tuple[str, ...]:
  """The attacks of a family that may have a config section and an entry in `enabled`."""
  return tuple(n for n in of_family(family) if ATTACKS[n].enabled_by is None)


def enabled_by_default(family: str) -> tuple[str, ...]:
  """The configurable attacks of a family that the base config enables (and has sections
  for); the others are added by `configs.base.add_attacks`."""
  return tuple(n for n in configurable(family) if ATTACKS[n].default_enabled)


def auddc_attacks() -> tuple[str, ...]:
  """The VAE attacks whose rows carry an AUDDC over their C grid (Gondim-Ribeiro et al.
  2018): the latent L-BFGS attacks, one per latent divergence."""
  return ("latent_l2", "latent_kl")


def is_penalty(name: str) -> bool:
  """True when the attack's eps weighs the distortion (smaller is stronger), not a budget."""
  spec = ATTACKS.get(str(name))
  return spec is not None and spec.eps_kind == "penalty"


def section_of(spec: AttackSpec, attacks_cfg):
  """The config section of `spec` inside a run config's `attacks` section."""
  sections = attacks_cfg.vae if spec.family == "vae" else attacks_cfg
  return sections[spec.section or spec.name]


def num_pairs_of(spec: AttackSpec, attacks_cfg) -> int:
  """How many pairs `spec` attacks: its section's `num_pairs` where one is set (the first that
  many of its family's pairs; a VAE attack too costly for them all), else its family's
  (`attacks.vae.num_pairs` or `attacks.num_pairs`)."""
  family = attacks_cfg.vae if spec.family == "vae" else attacks_cfg
  return int(section_of(spec, attacks_cfg).get("num_pairs", None) or family.num_pairs)


def norm_of(spec: AttackSpec, section) -> str:
  """The norm the attack runs under: its section's `norm`, else its only norm."""
  return section["norm"] if "norm" in section else spec.norms[0]


def enabled(attacks_cfg) -> list[AttackSpec]:
  """The enabled attacks of a run's `attacks` section, in the config's order (a c search
  right after its L-BFGS)."""
  out = []
  for family, names in (("classifier", attacks_cfg.enabled), ("vae", attacks_cfg.vae.enabled)):
    for name in names:
      spec = ATTACKS[name]
      out.append(spec)
      for extra in of_family(family):
        other = ATTACKS[extra]
        if other.section == name and section_of(other, attacks_cfg).get(other.enabled_by, False):
          out.append(other)
  return out


def eps_grid(spec: AttackSpec, section) -> tuple[float, ...]:
  """The eps values of `spec`'s rows under its config section."""
  return tuple(spec.grid(tuple(float(e) for e in section["eps"])))


def knobs_of(spec: AttackSpec, section, key: jax.Array | None = None) -> dict:
  """The keyword arguments of `spec.run` from its config section (eps excluded); `key` feeds an
  attack with a random start."""
  knobs = {k: section[k] for k in spec.knobs if k in section}
  if "norm" in spec.knobs:
    knobs["norm"] = norm_of(spec, section)
  for k in ("step_size_rel", "sparsity"):
    if k in knobs:
      knobs[k] = float(knobs[k])
  if knobs.pop("random_start", False):
    knobs.update(random_start=True, key=key)
  return knobs
