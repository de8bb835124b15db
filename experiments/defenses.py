"""The defences run: train defended models, attack each with attacks that know the defence.

  python -m experiments.main --config=configs/mnist_defenses.py[:quick|:gpu] [--workdir=DIR]
  python -m experiments.main --config=configs/lfw_defenses.py[:quick] [--workdir=DIR]

`experiments.run.run` hands a config with `experiment == "defenses"` to `run` here. Each entry
of `config.defenses.enabled` names a defence of `DEFENSES` (name -> `DefenseSpec`: its builder,
its random stream, the config sections it trains from, whether it crafts transfer examples, its
figure; validation and the report read the same table), whose builder trains (or reuses the
checkpoints of) what the defence needs and returns a `Defended`:
the deployed classifier, an optional rejection rule, and the attacks to run on it, each
marked adaptive or not. Every (defence, attack, eps) point is one row of `defenses.jsonl`
(`store.ResultsLog`: appended atomically as it finishes, skipped on a rerun), as is every
(source, target) entry of the black-box transfer matrix. `summary.md` gets the defence table
(experiments/report/), and a defence with a `figure_data` function writes the arrays of its
figure to `defense_examples/<defence>.npz` (the projection: clean, adversarial and projected
images; the GMVAE: latent codes of clean and adversarial inputs), which the report draws.

Measures (all over the same first `defenses.num_examples` test images, with 95% Wilson
intervals): clean accuracy (correct and, for a rejecting defence, accepted); robust accuracy
(the adversarial input is classified correctly and accepted; an example counts as broken when
any of the attack's random restarts breaks it); for a rejecting defence also the detection
rate (rejected among the adversarial inputs the classifier gets wrong), the false-rejection
rate (rejected among clean inputs) and the defended rate (correct or rejected); for the
impersonation attack also the impersonation rate (identified as the person impersonated).
"""

import functools
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from experiments import cluster, keys, progress, store
from experiments import models as models_lib
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from vae_attacks import metrics, models, train
from vae_attacks.attacks import fgsm, runner
from vae_attacks.defenses import adversarial, distillation, transfer
from vae_attacks.types import LogitsFn, Params

RESULT_KEY = keys.DEFENSE_KEY
RESULTS_FILE = "defenses.jsonl"
EXAMPLES_DIR = "defense_examples"
FIGURE_EXAMPLES = 8  # rows of the projection figure
# The random stream of a model several defences share (the projection's generator and the VAE
# as classifier's encoder); each defence's own stream is its spec's `key_index` (DEFENSES).
SHARED_KEY_INDEX = {"vae": 14}


def _fgsm(logits_fn, params, x, label, *, eps, key):
  """Untargeted FGSM in the runner's form (`key` unused: it has no random start)."""
  del key
  return fgsm.fgsm(logits_fn, params, x, label, eps=eps, norm="linf", targeted=False)


class AttackSpec(NamedTuple):
  """One attack on a defence: what it differentiates and how."""

  name: str  # e.g. "pgd", "pgd_adaptive"
  adaptive: bool  # the attack targets the defence's mechanism (or the defence is only weights)
  logits_fn: LogitsFn  # the model the attack differentiates
  params: Params
  fn: Callable  # runner attack (logits_fn, params, x, label, *, eps, key, **knobs)
  knobs: dict
  restarts: int
  note: str  # one line for the report


class Defended(NamedTuple):
  """A defence as the evaluation sees it."""

  name: str
  logits_fn: LogitsFn  # the deployed classifier
  params: Params
  reject: Callable[[np.ndarray], np.ndarray] | None  # host: x [N, ...] -> bool[N] rejected
  attacks: list  # [AttackSpec]
  metrics: dict  # training metrics, for train_metrics.json
  transfer_spec: AttackSpec | None = None  # how to craft transfer examples on this model
  max_examples: int | None = None  # evaluate on fewer examples (a costly defence)
  # (x [N, ...], y [N], {(attack, eps): x_adv [N, ...]}) -> arrays of the defence's figure
  figure_data: Callable[[np.ndarray, np.ndarray, dict], dict] | None = None


class _Trained(dict):
  """The models trained so far, name -> (module, params, kept metrics). In a multi-process run
  each process trains them (replicated) and keeps process 0's parameters, so that every process
  attacks the same weights (`cluster.same_as_writer`)."""

  def __setitem__(self, name: str, trained: tuple) -> None:
    module, params, *rest = trained
    super().__setitem__(name, (module, cluster.same_as_writer(params), *rest))


class Context:
  """What builders share: config, data, workdir, and the models trained so far (by name)."""

  def __init__(self, config, data, workdir: pathlib.Path):
    self.config, self.data, self.workdir = config, data, workdir
    self.root = jax.random.key(config.seed)
    self.num_classes = len(data.class_names)
    self.trained: dict[str, Any] = _Trained()
    self.study: dict[str, models_lib.Trained] = {}  # the study's models, by name (study_model)
    # The record of the study's trained models (configs' `import_params`), or None: train them.
    imports = config.get("import_params", "")
    self.import_dir = models_lib.import_folder(workdir, imports) if imports else None

  def key(self, name: str):
    """The training key of defence `name` (or of a shared model, SHARED_KEY_INDEX)."""
    index = DEFENSES[name].key_index if name in DEFENSES else SHARED_KEY_INDEX[name]
    return jax.random.fold_in(self.root, index)

  def checkpoint(self, name: str) -> str | None:
    """The checkpoint folder of `name`; None (no checkpoints) on processes other than 0."""
    return str((self.workdir / "checkpoints" / name).resolve()) if cluster.writes() else None

  def classifier(self, name: str, model_cfg: dict, train_cfg: dict, **extra):
    """A CNN trained with `train_cfg` (cached per name): (module, params, kept metrics)."""
    if name not in self.trained:
      self.trained[name] = models_lib.train_cnn(
        name,
        model_cfg,
        train_cfg,
        self.data,
        key=self.key(name),
        checkpoint_dir=self.checkpoint(name),
      )
    return self.trained[name]

  def baseline(self):
    """The undefended CNN (model.cnn): (module, params, kept metrics); the study's `cnn`
    imported from the record `import_params` names when set (`study_model`), else trained."""
    c = self.config
    if self.import_dir is None:
      return self.classifier("none", c.model.cnn, c.train.cnn)
    if "none" not in self.trained:
      model = self.study_model("cnn")
      cnn = models_lib.MODELS["cnn"].build(c.model.cnn, self.data)
      self.trained["none"] = (cnn, model.params, model.metrics)
    return self.trained["none"]

  def study_model(self, name: str) -> models_lib.Trained:
    """The study's model `name` of experiments/models.py `MODELS` (cached): imported from the
    record `import_params` names and checked against its recorded accuracy
    (`models_lib.import_committed`: an error when absent, never trained in its place); with no
    `import_params`, fitted here as the study fits it, on defence `name`'s random stream."""
    if name not in self.study:
      c, spec = self.config, models_lib.MODELS[name]
      if self.import_dir is not None:
        model = models_lib.import_committed(name, c, self.data, self.import_dir)
      else:
        ckpt = pathlib.Path(self.checkpoint(name)) if cluster.writes() else None
        params, metrics = spec.fit(name, c, self.data, self.key(name), ckpt, {})
        model = spec.wrap(name, c, self.data, cluster.same_as_writer(params), metrics)
      self.study[name] = model
    return self.study[name]

  def vae(self):
    """The MLP VAE of the study (configs' model.mlp_vae, train.vae): (module, params, metrics)."""
    if "vae" not in self.trained:
      self.trained["vae"] = models_lib.train_vae(
        "mlp_vae",
        self.config,
        self.data,
        key=self.key("vae"),
        checkpoint_dir=self.checkpoint("mlp_vae/vae"),
      )
    return self.trained["vae"]


def _pgd_specs(config, logits_fn, params, *, name="pgd", adaptive=True, note=""):
  a = config.defenses.attacks
  knobs = dict(steps=a.pgd_steps, step_size_rel=float(a.pgd_step_size_rel))
  return AttackSpec(
    name, adaptive, logits_fn, params, adversarial.pgd_linf, knobs, a.restarts, note
  )


def _fgsm_spec(logits_fn, params, *, name="fgsm", adaptive=True, note=""):
  return AttackSpec(name, adaptive, logits_fn, params, _fgsm, {}, 1, note)


def _apgd_ensemble(logits_fn, params, x, labels, *, eps, key, is_broken, steps, target_ranks,
                   restarts, **runner_kwargs) -> dict:  # fmt: skip
  """The APGD part of AutoAttack (Croce & Hein 2020) on a defence: APGD-CE, then APGD-T with
  the targeted DLR loss towards each of the `target_ranks` most likely other classes
  (`robustness.autoattack_apgd`), each example attacked until a run breaks it as the deployed
  defence judges (`is_broken`): attack name -> broken flags bool[N]."""
  from vae_attacks import robustness  # noqa: PLC0415

  return robustness.autoattack_apgd(
    logits_fn, params, x, labels, eps=eps, key=key, steps=steps, target_ranks=target_ranks,
    restarts=restarts, is_broken=is_broken, **runner_kwargs,
  )  # fmt: skip


def _apgd_enabled(config) -> bool:
  return "apgd" in config.defenses and bool(config.defenses.apgd.enabled)


def _apgd_spec(config, logits_fn, params, *, what: str, steps: int | None = None,
               adaptive: bool = True) -> AttackSpec:  # fmt: skip
  """The APGD ensemble (`defenses.apgd`: steps, target_ranks, restarts) on `logits_fn`;
  `steps` overrides the section's (a costly defence's gradient)."""
  g = config.defenses.apgd
  knobs = dict(steps=int(steps or g.steps), target_ranks=int(g.target_ranks))
  note = (f"APGD-CE, then APGD-T (targeted DLR) towards the {g.target_ranks} most likely other "
          f"classes, on {what} (Croce & Hein 2020)")  # fmt: skip
  return AttackSpec(
    "apgd", adaptive, logits_fn, params, _apgd_ensemble, knobs, int(g.restarts), note
  )


def _closest_other(logits, label):
  """The class of highest logit other than `label` (the most similar other class)."""
  others = jax.numpy.where(jax.numpy.arange(logits.shape[0]) == label, -jax.numpy.inf, logits)
  return jax.numpy.argmax(others)


def _impersonation(logits_fn, params, x, label, *, eps, key, steps, step_size_rel):
  """Impersonation (Sharif et al. 2016) in the runner's untargeted form: targeted L-inf BIM
  with a random start towards the most similar other person (the highest other logit; for
  the siamese identifier the nearest other class centre), fixed across restarts."""
  target = _closest_other(logits_fn(params, x), label)
  return adversarial.pgd_linf(
    logits_fn, params, x, target, eps=eps, key=key, steps=steps, step_size_rel=step_size_rel,
    targeted=True,
  )  # fmt: skip


def _white_box(config, logits_fn, params, what: str) -> list:
  """FGSM, PGD with restarts and (when configured) impersonation on a defence that is nothing
  but its weights; the last is the one that crafts transfer examples."""
  note = f"white-box on {what}: the attack knows every weight"
  a = config.defenses.attacks
  specs = [_pgd_specs(config, logits_fn, params, note=note)]
  if _apgd_enabled(config):
    specs.insert(-1, _apgd_spec(config, logits_fn, params, what=what))
  if a.fgsm:
    specs.insert(0, _fgsm_spec(logits_fn, params, note=note))
  if a.get("impersonation", False):
    knobs = dict(steps=a.pgd_steps, step_size_rel=float(a.pgd_step_size_rel))
    imp = f"targeted BIM (L-inf) to the most similar other person, white-box on {what}"
    specs.insert(-1, AttackSpec("impersonation", True, logits_fn, params, _impersonation, knobs,
                                a.restarts, imp))  # fmt: skip
  return specs


def build_none(ctx: Context) -> Defended:
  """No defence: the study's CNN, the baseline every defence is compared with."""
  cnn, params, m = ctx.baseline()
  fn = models.classifier_fns(cnn)
  specs = _white_box(ctx.config, fn, params, "the undefended CNN")
  return Defended("none", fn, params, None, specs, m, specs[-1])


def build_substitute(ctx: Context) -> Defended:
  """Another architecture trained on the same data: the black-box attacker's own model."""
  c = ctx.config
  cnn, params, m = ctx.classifier("substitute", c.model.substitute, c.train.substitute)
  fn = models.classifier_fns(cnn)
  specs = _white_box(c, fn, params, "the substitute")
  return Defended("substitute", fn, params, None, specs, m, specs[-1])


def build_distillation(ctx: Context) -> Defended:
  """Defensive distillation at T; attacked naively (softmax at T = 1) and on logits / T."""
  c = ctx.config
  t = float(c.defenses.distillation.temperature)
  if "distillation" not in ctx.trained:
    teacher = models_lib.MODELS["cnn"].build(c.model.cnn, ctx.data)
    _, params, m = distillation.train_distilled(
      teacher,
      teacher,
      ctx.data,
      key=ctx.key("distillation"),
      temperature=t,
      settings=train.TrainSettings.from_config(c.train.distillation),
      checkpoint_dir=ctx.checkpoint("distillation"),
    )
    kept = {k: models_lib.kept_metrics(v, params, "classifier") for k, v in m.items()}
    kept["test_accuracy"] = kept["student"]["test_accuracy"]
    kept["train_seconds"] = kept["teacher"]["train_seconds"] + kept["student"]["train_seconds"]
    ctx.trained["distillation"] = (teacher, params, kept)
  cnn, params, kept = ctx.trained["distillation"]
  fn = models.classifier_fns(cnn)
  scaled = distillation.TemperatureScaled(fn, t)
  naive = "cross-entropy of the deployed softmax (T = 1), which saturates"
  adaptive = f"cross-entropy of softmax(logits / {t:g}) (Carlini & Wagner 2016)"
  specs = [
    _pgd_specs(c, fn, params, name="pgd", adaptive=False, note=naive),
    _pgd_specs(c, scaled, params, name="pgd_adaptive", adaptive=True, note=adaptive),
  ]
  if c.defenses.attacks.fgsm:
    specs.insert(0, _fgsm_spec(fn, params, adaptive=False, note=naive))
    specs.insert(2, _fgsm_spec(scaled, params, name="fgsm_adaptive", note=adaptive))
  transfer_spec = specs[-1]
  if _apgd_enabled(c):  # on logits / T (the DLR loss is blind to the temperature anyway)
    specs.append(_apgd_spec(c, scaled, params, what=f"softmax(logits / {t:g})"))
  return Defended("distillation", fn, params, None, specs, kept, transfer_spec)


def _robustly_trained(ctx: Context, name: str, what: str, fit) -> Defended:
  """A CNN (`config.model.<name>`, `config.train.<name>`) trained by `fit(model, data, *, key,
  settings, checkpoint_dir)`, attacked white-box like the undefended one."""
  c = ctx.config
  if name not in ctx.trained:
    cnn = models_lib.MODELS["cnn"].build(c.model[name], ctx.data)
    params, m = fit(
      cnn,
      ctx.data,
      key=ctx.key(name),
      settings=train.TrainSettings.from_config(c.train[name]),
      checkpoint_dir=ctx.checkpoint(name),
    )
    ctx.trained[name] = (cnn, params, models_lib.kept_metrics(m, params, "classifier"))
    logging.info("%s: clean test accuracy %.4f", name, m["test_accuracy"])
  cnn, params, kept = ctx.trained[name]
  fn = models.classifier_fns(cnn)
  specs = _white_box(c, fn, params, what)
  return Defended(name, fn, params, None, specs, kept, specs[-1])


def build_adversarial(ctx: Context) -> Defended:
  """Adversarial training (Madry et al. 2018) with the config's PGD; attacked white-box."""
  a = ctx.config.defenses.adversarial
  fit = functools.partial(
    adversarial.train_adversarial,
    eps=float(a.eps),
    steps=int(a.steps),
    step_size_rel=float(a.step_size_rel),
    random_start=bool(a.random_start),
    ramp_epochs=float(a.ramp_epochs),
  )
  return _robustly_trained(ctx, "adversarial", "the adversarially trained CNN", fit)


def build_trades(ctx: Context) -> Defended:
  """TRADES (Zhang et al. 2019) with the config's inner maximisation and beta; white-box."""
  t = ctx.config.defenses.trades
  fit = functools.partial(
    adversarial.train_trades,
    eps=float(t.eps),
    steps=int(t.steps),
    step_size_rel=float(t.step_size_rel),
    beta=float(t.beta),
  )
  return _robustly_trained(ctx, "trades", "the TRADES-trained CNN", fit)


def build_projection(ctx: Context) -> Defended:
  """Defense-GAN projection onto the MLP VAE's range before the baseline CNN; BPDA attack."""
  from vae_attacks.defenses import projection  # noqa: PLC0415

  c, p = ctx.config, ctx.config.defenses.projection
  cnn, cnn_params, cnn_m = ctx.baseline()
  vae, vae_params, vae_m = ctx.vae()
  classify = models.classifier_fns(cnn)
  deployed = projection.ProjectedClassifier(
    decode=models.vae_fns(vae).decode,
    classify=classify,
    latent_dim=int(c.model.mlp_vae.latent_dim),
    steps=int(p.steps),
    restarts=int(p.restarts),
    learning_rate=float(p.learning_rate),
    seed=int(c.seed),
    gradient="bpda",
  )
  params = {"decoder": vae_params, "clf": cnn_params}
  reject = None
  m = {"vae": vae_m, "classifier": cnn_m, "test_accuracy": cnn_m["test_accuracy"]}
  # The CNN never saw decoder outputs: near chance here means the VAE is too weak for the
  # defence to mean anything (its clean accuracy will be near chance too).
  held = slice(-int(p.threshold_examples), None)
  recon = runner.batched_logits(models.vae_fns(vae).reconstruct, vae_params, ctx.data.x_test[held])
  recon_pred = np.argmax(runner.batched_logits(classify, cnn_params, recon), axis=-1)
  m["classifier_on_reconstructions"] = float(np.mean(recon_pred == ctx.data.y_test[held]))
  logging.info("projection: CNN accuracy on VAE reconstructions %.4f",
               m["classifier_on_reconstructions"])  # fmt: skip
  if p.false_rejection_rate > 0:
    held_out = ctx.data.x_test[-int(p.threshold_examples) :]
    errors = _projection_errors(deployed, params, held_out)
    threshold = float(
      projection.fit_threshold(errors, false_rejection_rate=float(p.false_rejection_rate))
    )
    m["error_threshold"] = threshold

    def reject(x):
      return _projection_errors(deployed, params, x) > threshold

  steps, restarts = int(p.attack_steps), int(p.attack_restarts)
  knobs = dict(steps=steps, step_size_rel=2.5 / steps)
  specs = [
    AttackSpec(
      "pgd",
      False,
      classify,
      cnn_params,
      adversarial.pgd_linf,
      knobs,
      restarts,
      "PGD on the bare CNN, blind to the projection",
    ),
    AttackSpec(
      "pgd_bpda",
      True,
      deployed,
      params,
      adversarial.pgd_linf,
      knobs,
      restarts,
      "PGD through the projection with BPDA (Athalye et al. 2018)",
    ),
  ]
  if _apgd_enabled(c):
    specs.append(_apgd_spec(c, deployed, params, steps=steps,
                            what="the projected classifier with BPDA"))  # fmt: skip
  if reject is not None:  # an attack that also knows the rejection
    aware = projection.RejectionAwareLogits(
      deployed, penalty=float(p.penalty), margin=float(p.margin)
    )
    specs.append(
      AttackSpec(
        "pgd_bpda_reject",
        True,
        aware,
        {"defended": params, "threshold": jax.numpy.float32(threshold)},
        _targeted_closest_accepted,
        knobs,
        restarts,
        "targeted PGD with BPDA to the closest other class, with a penalty keeping the "
        "projection error below the rejection threshold (projection.RejectionAwareLogits)",
      )
    )

  def figure_data(x, y, adv):
    """Clean inputs, the BPDA attack's inputs at the largest eps, and their projections."""
    eps = max(e for a, e in adv if a == "pgd_bpda")
    n = min(FIGURE_EXAMPLES, len(y))
    x_adv = adv[("pgd_bpda", eps)][:n]
    x_proj = runner.batched_map(deployed.project, params, x_adv).x_proj
    return dict(
      x=x[:n],
      x_adv=x_adv,
      x_proj=x_proj,
      label=y[:n],
      pred_adv=np.argmax(runner.batched_logits(classify, cnn_params, x_proj), axis=-1),
      eps=np.float64(eps),
    )

  return Defended(
    "projection", deployed, params, reject, specs, m, None, int(p.num_examples), figure_data
  )


def _projection_errors(deployed, params, x) -> np.ndarray:
  """Projection errors [N] of the deployed `ProjectedClassifier`."""
  return runner.batched_map(deployed.project, params, x, batch_size=64).error


def _targeted_closest_accepted(logits_fn, params, x, label, *, eps, key, steps, step_size_rel):
  """Targeted L-inf BIM with a random start on a (K+1)-logit rejection-aware model (the last
  logit is "reject") towards the closest other class among the K class logits."""
  target = _closest_other(logits_fn(params, x)[:-1], label)
  return adversarial.pgd_linf(
    logits_fn, params, x, target, eps=eps, key=key, steps=steps, step_size_rel=step_size_rel,
    targeted=True,
  )  # fmt: skip


def _gmvae_adaptive(logits_fn, params, x, label, *, eps, key, steps, step_size_rel):
  """Untargeted adaptive attack on the GMVAE: `gmvae.adaptive_bim` (a loss that also keeps the
  input inside both rejection thresholds) towards the closest other class component."""
  from vae_attacks.defenses import gmvae  # noqa: PLC0415

  logits = logits_fn(params, x)[:-1]  # the K penalised class logits; the last one is "reject"
  target = _closest_other(logits, label)
  knobs = dict(eps=eps, step_size=step_size_rel * eps, steps=steps, norm="linf", key=key)
  return gmvae.adaptive_bim(logits_fn, params, x, target, random_start=True, **knobs)


def build_gmvae(ctx: Context) -> Defended:
  """Gaussian-mixture VAE (Ghosh et al. 2018) rejecting far or badly reconstructed inputs."""
  from vae_attacks.defenses import gmvae  # noqa: PLC0415

  c, g = ctx.config, ctx.config.defenses.gmvae
  vae = models_lib.MODELS[g.architecture].build(c.model.gmvae, ctx.data)
  model = gmvae.GMVAE(vae=vae, num_classes=ctx.num_classes, mean_scale=float(g.mean_scale))
  if "gmvae" not in ctx.trained:
    params, m = gmvae.train_gmvae(
      model,
      ctx.data,
      key=ctx.key("gmvae"),
      settings=train.TrainSettings.from_config(c.train.gmvae),
      checkpoint_dir=ctx.checkpoint("gmvae"),
    )
    ctx.trained["gmvae"] = (model, params, models_lib.kept_metrics(m, params, "gmvae"))
    logging.info("gmvae: closest-component test accuracy %.4f", m["test_accuracy"])
  _, params, kept = ctx.trained["gmvae"]
  held_out = ctx.data.x_test[-int(g.threshold_examples) :]
  s = gmvae.batch_scores(model, params, held_out)
  thresholds = gmvae.fit_thresholds(
    s.latent_distance, s.reconstruction_error, false_rejection_rate=float(g.false_rejection_rate)
  )
  kept = dict(kept, thresholds=[float(thresholds.latent), float(thresholds.reconstruction)])

  def reject(x):
    return np.asarray(gmvae.rejected(gmvae.batch_scores(model, params, x), thresholds))

  fn = gmvae.logits_fn(model)
  a = c.defenses.attacks
  knobs = dict(steps=a.pgd_steps, step_size_rel=float(a.pgd_step_size_rel))
  adaptive_fn = gmvae.adaptive_logits_fn(model, penalty=float(g.penalty), margin=float(g.margin))
  specs = [
    AttackSpec("pgd", False, fn, params, adversarial.pgd_linf, knobs, a.restarts,
               "PGD on the closest-component logits, blind to the rejection"),
    AttackSpec("pgd_adaptive", True, adaptive_fn, {"gmvae": params, "thresholds": thresholds},
               _gmvae_adaptive, knobs, a.restarts,
               "targeted PGD to the closest other class with a penalty keeping the input "
               "inside both rejection thresholds (gmvae.adaptive_bim)"),
  ]  # fmt: skip
  if _apgd_enabled(c):
    what = "the closest-component logits, blind to the rejection"
    specs.insert(1, _apgd_spec(c, fn, params, what=what, adaptive=False))

  def figure_data(x, y, adv):
    """Latent means of clean inputs and of both attacks' inputs at the largest eps."""
    eps = max(e for a, e in adv if a == "pgd")
    encode = models.vae_fns(model).encode
    code = lambda v: runner.batched_map(encode, params, v)[0]  # noqa: E731
    out = dict(z=code(x), label=y, means=np.asarray(gmvae.components(model, params)[0]))
    for attack in ("pgd", "pgd_adaptive"):
      if (attack, eps) in adv:
        out[f"z_{attack}"] = code(adv[(attack, eps)])
        out[f"rejected_{attack}"] = reject(adv[(attack, eps)])
    return dict(out, eps=np.float64(eps))

  return Defended("gmvae", fn, params, reject, specs, kept, None, None, figure_data)


def build_siamese(ctx: Context) -> Defended:
  """A siamese embedding network (triplet loss, FaceNet) identifying by the nearest class
  centre, as a classifier (`siamese.identification_logits_fn`); attacked white-box."""
  from vae_attacks.defenses import siamese  # noqa: PLC0415

  c = ctx.config
  net = siamese.EmbeddingNet(**c.model.siamese)
  if "siamese" not in ctx.trained:
    t = c.train.siamese
    variables, m = siamese.train_siamese(
      net,
      ctx.data,
      key=ctx.key("siamese"),
      settings=train.TrainSettings.from_config(t, extra=("margin", "mining")),
      margin=t.get("margin", 0.2),
      mining=t.get("mining", "random"),
      checkpoint_dir=ctx.checkpoint("siamese"),
    )
    train_embeddings = siamese.embed(net, variables, ctx.data.x_train)
    labels = jax.numpy.asarray(ctx.data.y_train, jax.numpy.int32)
    centres = siamese.class_centres(train_embeddings, labels, ctx.num_classes)
    params = {"net": variables, "centres": centres}
    ctx.trained["siamese"] = (net, params, models_lib.kept_metrics(m, variables, "classifier"))
    logging.info("siamese: nearest-centre test accuracy %.4f", m["test_accuracy"])
  _, params, kept = ctx.trained["siamese"]
  fn = siamese.identification_logits_fn(net, temperature=float(c.defenses.siamese.temperature))
  specs = _white_box(c, fn, params, "the siamese identifier (its weights and class centres)")
  return Defended("siamese", fn, params, None, specs, kept, specs[-1])


def build_vae_classifier(ctx: Context) -> Defended:
  """The study's "VAE as classifier" (Gondim-Ribeiro et al. 2018): the MLP VAE (`ctx.vae()`)
  and a `LatentClassifier` on its latent mean, trained and checkpointed as experiments/models.py
  trains the study's (`train.train_latent_classifier`, `mlp_vae/latent_classifier`), deployed as
  `models.latent_classifier_fn`; attacked white-box through the encoder."""
  c = ctx.config
  vae, vae_params, vae_m = ctx.vae()
  if "vae_classifier" not in ctx.trained:
    clf, params, clf_kept = models_lib.train_latent_classifier(
      c,
      ctx.data,
      vae,
      vae_params,
      key=ctx.key("vae_classifier"),
      checkpoint_dir=ctx.checkpoint("mlp_vae/latent_classifier"),
    )
    kept = models_lib.vae_classifier_metrics(vae_m, clf_kept)
    ctx.trained["vae_classifier"] = (clf, params, kept)
    logging.info("vae_classifier: test -ELBO %.2f nats, latent classifier accuracy %.4f",
                 kept["test_neg_elbo_nats"], kept["test_accuracy"])  # fmt: skip
  clf, params, kept = ctx.trained["vae_classifier"]
  fn = models.latent_classifier_fn(vae, clf)
  specs = _white_box(c, fn, params, "the VAE as classifier (its encoder and latent classifier)")
  return Defended("vae_classifier", fn, params, None, specs, kept, specs[-1])


def _study_vae_classifier(name: str, what: str) -> Callable[[Context], Defended]:
  """The builder of defence `name`, which deploys the study's VAE classifier of its spec's
  `study_model` (`Context.study_model`) as it is, attacked white-box through its encoder;
  `what` says which VAE classifier it is in the report's notes."""

  def build(ctx: Context) -> Defended:
    model = ctx.study_model(DEFENSES[name].study_model)
    specs = _white_box(ctx.config, model.logits_fn, model.params, what)
    return Defended(name, model.logits_fn, model.params, None, specs, model.metrics, specs[-1])

  build.__doc__ = f"The study's {name}: {what}; attacked white-box."
  return build


class DefenseSpec(NamedTuple):
  """One defence: how it is built, its random stream, the config sections it trains from."""

  build: Callable[[Context], Defended]
  # fold_in(root, key_index) trains it and fold_in(attack root, key_index) attacks it: fixed
  # forever, so that a defence's results never depend on which others run ("none" is the CNN
  # of configs/mnist_cnn.py, index 0 there).
  key_index: int
  sections: tuple[tuple[str, str], ...]  # the (config.model, config.train) sections it needs
  transfer_source: bool  # a plain classifier whose `transfer_spec` crafts transfer examples
  # The figure the report draws from defense_examples/<name>.npz (`Defended.figure_data`):
  # "projection" (clean / adversarial / projected images) or "gmvae_latent" (latent codes).
  figure: str | None = None
  # The study's model (experiments/models.py MODELS) it deploys, imported instead of trained
  # when the config names a record (`import_params`, `Context.study_model`).
  study_model: str | None = None


DEFENSES: dict[str, DefenseSpec] = {
  "none": DefenseSpec(build_none, 0, (("cnn", "cnn"),), True, study_model="cnn"),
  "substitute": DefenseSpec(build_substitute, 11, (("substitute", "substitute"),), True),
  "distillation": DefenseSpec(build_distillation, 12, (("cnn", "distillation"),), True),
  "adversarial": DefenseSpec(build_adversarial, 13, (("adversarial", "adversarial"),), True),
  "trades": DefenseSpec(build_trades, 21, (("trades", "trades"),), True),
  # The CNN classifies the projection onto the MLP VAE's range.
  "projection": DefenseSpec(
    build_projection, 15, (("cnn", "cnn"), ("mlp_vae", "vae")), False, "projection"
  ),
  "gmvae": DefenseSpec(build_gmvae, 16, (("gmvae", "gmvae"),), False, "gmvae_latent"),
  "siamese": DefenseSpec(build_siamese, 17, (("siamese", "siamese"),), True),
  # The latent classifier's stream (the VAE itself trains under SHARED_KEY_INDEX["vae"]).
  "vae_classifier": DefenseSpec(
    build_vae_classifier,
    18,
    (("mlp_vae", "vae"), ("latent_classifier", "latent_classifier")),
    True,
  ),
  # The study's VAE classifiers (experiments/models.py), imported on LFW (configs' import_params).
  "conv_vae": DefenseSpec(
    _study_vae_classifier(
      "conv_vae", "the conv VAE with a probe (a latent classifier on its frozen latent mean)"
    ),
    19,
    (("conv_vae", "vae"), ("latent_classifier", "latent_classifier")),
    True,
    study_model="conv_vae",
  ),
  # (Its latent classifier's section, model.latent_classifier, is in every base config.)
  "joint_vae": DefenseSpec(
    _study_vae_classifier(
      "joint_vae", "the conv VAE trained jointly with its latent classifier (Kingma et al. 2014)"
    ),
    20,
    (("joint_vae", "joint_vae"),),
    True,
    study_model="joint_vae",
  ),
}
TRANSFER_SOURCES = tuple(name for name, spec in DEFENSES.items() if spec.transfer_source)


# --------------------------------------------------------------------------------------------
# Evaluation.


class _Judge:
  """The deployed defence's verdict on inputs: predictions and rejections (host numpy)."""

  def __init__(self, defended: Defended, labels: np.ndarray):
    self.d, self.labels = defended, labels

  def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.argmax(runner.batched_logits(self.d.logits_fn, self.d.params, x), axis=-1)
    rejected = np.zeros(len(x), bool) if self.d.reject is None else np.asarray(self.d.reject(x))
    return pred, rejected

  def broken(self, x: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """Misclassified and accepted: x [M, ...] are the examples `index` (default all)."""
    pred, rejected = self(x)
    labels = self.labels if index is None else self.labels[index]
    return (pred != labels) & ~rejected


def _clean_rates(clean: tuple, y: np.ndarray, rejecting: bool) -> dict:
  """The clean-input rates of a row: accuracy (correct and accepted); for a rejecting defence
  also the false-rejection rate and the accuracy with the rejection set aside (the deployed
  classifier's own, what Defense-GAN and Ghosh et al. call clean accuracy)."""
  pred, rejected = clean
  out = _rate("clean_accuracy", (pred == y) & ~rejected)
  if rejecting:
    out.update(_rate("false_rejection_rate", rejected))
    out.update(_rate("clean_accuracy_without_rejection", pred == y))
  return out


def _rate(name: str, mask: np.ndarray) -> dict:
  rate, lo, hi = metrics.success_rate(mask)
  return {
    name: _finite(rate),
    f"{name}_ci": [_finite(lo), _finite(hi)],
    f"n_{name}": int(mask.size),
  }


def _finite(v):
  return v if v is None or np.isfinite(v) else None


def evaluate(
  defended: Defended, spec: AttackSpec, eps: float, x, y, *, key, clean, runner_kwargs
) -> tuple[dict, np.ndarray]:
  """(row, x_adv [N, ...]): the defence under `spec` at `eps` on examples x [N], labels y."""
  judge = _Judge(defended, y)
  if spec.fn is _apgd_ensemble:
    return _evaluate_ensemble(defended, spec, eps, x, y, key=key, clean=clean, judge=judge,
                              runner_kwargs=runner_kwargs), None  # fmt: skip
  t0 = time.perf_counter()
  res = adversarial.attack_with_restarts(
    spec.fn,
    spec.logits_fn,
    spec.params,
    x,
    y,
    eps=eps,
    restarts=spec.restarts,
    key=key,
    is_broken=judge.broken,
    **runner_kwargs,
    **spec.knobs,
  )
  pred, rejected = judge(res.x_adv)
  seconds = time.perf_counter() - t0
  row = dict(
    adaptive=spec.adaptive,
    note=spec.note,
    restarts=spec.restarts,
    steps=spec.knobs.get("steps", 1),
    n=int(len(y)),
    seconds=seconds,
    max_linf=float(np.max(np.abs(res.x_adv - x))),
    # Examples no restart among the first r + 1 broke, per r: the check that more restarts
    # change little (Carlini et al. 2019); for a rejecting defence, the defended rate.
    unbroken_by_restart=[float(np.mean(~b)) for b in res.broken_after],
  )
  row.update(_clean_rates(clean, y, defended.reject is not None))
  robust = (pred == y) & ~rejected
  row.update(_rate("robust_accuracy", robust))
  # Which examples this attack broke: the report's per-example worst case over every attack
  # (an example is robust only if no attack broke it) is computed from these, also on resume.
  row["not_robust_examples"] = np.flatnonzero(~robust).tolist()
  if spec.fn is _impersonation:  # reached the person impersonated (the attack's own target)
    logits = runner.batched_logits(spec.logits_fn, spec.params, x)
    logits[np.arange(len(y)), y] = -np.inf
    row.update(_rate("impersonation_rate", (pred == np.argmax(logits, -1)) & ~rejected))
  if defended.reject is not None:
    # Fooled: misclassified and accepted (what the attack aims for); the per-example worst
    # case of the defended rate is computed from these.
    row["broken_examples"] = np.flatnonzero((pred != y) & ~rejected).tolist()
    row.update(_rate("detection_rate", rejected[pred != y]))
    row.update(_rate("defended_rate", (pred == y) | rejected))
  return row, res.x_adv


def _evaluate_ensemble(defended, spec, eps, x, y, *, key, clean, judge, runner_kwargs) -> dict:
  """The row of the APGD ensemble (`_apgd_ensemble`): an example is broken when some run's
  input is misclassified and accepted by the deployed defence (`_Judge.broken`); robust when
  it is correct and accepted clean and no run broke it. (For a rejecting defence a run's
  rejected input thus counts as defended, as in the defended rate; the other attacks' rows
  count it as a loss of robust accuracy.)"""
  t0 = time.perf_counter()
  flags = _apgd_ensemble(spec.logits_fn, spec.params, x, y, eps=eps, key=key,
                         is_broken=judge.broken, restarts=spec.restarts, **runner_kwargs,
                         **spec.knobs)  # fmt: skip
  broken = np.any(np.stack(list(flags.values())), axis=0)
  clean_pred, clean_rejected = clean
  clean_ok = (clean_pred == y) & ~clean_rejected
  row = dict(
    adaptive=spec.adaptive,
    note=spec.note,
    restarts=spec.restarts,
    steps=spec.knobs["steps"],
    n=int(len(y)),
    seconds=time.perf_counter() - t0,
    broken_by={k: int(v.sum()) for k, v in flags.items()},  # first breakers (runs skip broken)
  )
  row.update(_clean_rates(clean, y, defended.reject is not None))
  robust = clean_ok & ~broken
  row.update(_rate("robust_accuracy", robust))
  row["not_robust_examples"] = np.flatnonzero(~robust).tolist()
  if defended.reject is not None:
    row["broken_examples"] = np.flatnonzero(broken).tolist()
    row.update(_rate("defended_rate", ~broken))
  return row


def defense_settings(config, name: str) -> str:
  """The settings hash of defence `name`'s rows under `config` (`keys.defense_settings`)."""
  return keys.defense_settings(config.defenses, config.attacks, name)


def run(config, workdir: str) -> dict:
  """Trains every enabled defence, attacks it, and writes defenses.jsonl and summary.md.

  Call it holding the workdir's lock (`experiments.run.run` takes it)."""
  workdir = pathlib.Path(workdir)
  data = workdir_lib.open_run(config, workdir)
  d = config.defenses
  n = min(int(d.num_examples), len(data.y_test))
  x, y = np.asarray(data.x_test[:n]), np.asarray(data.y_test[:n], np.int32)
  ctx = Context(config, data, workdir)
  # Transfer rows depend on every model; a defence's rows only on its own section.
  settings = keys.transfer_settings(config)
  log = cluster.from_writer(
    lambda: store.ResultsLog(workdir / RESULTS_FILE, RESULT_KEY, store.DEFENSES_KINDS)
  )
  mesh = runner.pairs_mesh() if config.attacks.shard and jax.local_device_count() > 1 else None
  runner_kwargs = dict(
    chunk_size=config.attacks.chunk_size or None,
    memory_budget_bytes=int(config.attacks.memory_budget_mb * 2**20),
    mesh=mesh,
  )
  attack_root = jax.random.fold_in(ctx.root, 2_000_003)
  extra_sources = [s for s in d.transfer.sources if s not in d.enabled]
  imported = {}
  if ctx.import_dir is not None:
    imported = {k: f"{v.study_model} from {ctx.import_dir}" for k, v in DEFENSES.items()
                if v.study_model}  # fmt: skip
    # Every imported model read and checked first: an incomplete record stops the run before
    # the siamese net has trained for half an hour.
    for name in (*d.enabled, *extra_sources):
      if name in imported:
        ctx.study_model(DEFENSES[name].study_model)
  job = progress.Job(
    progress.defense_plan(
      config,
      len(data.x_train),
      n,
      {k: v.sections for k, v in DEFENSES.items()},
      extra_sources,
      imported,
    ),
    timings_path=workdir / progress.TIMINGS_FILE,
  )
  job.show_plan(f"{config.name} in {workdir}")

  built: dict[str, Defended] = {}
  only = tuple(d.get("only_attacks", ()))  # () runs every attack of each defence
  offered: set[str] = set()  # every enabled defence's attack names
  for name in d.enabled:
    defended = _build(name, ctx, job)
    built[name] = defended
    store.write_json_atomic(
      workdir / "train_metrics.json", {k: v.metrics for k, v in built.items()}
    )
    clean, adv = None, {}
    n_def = min(n, defended.max_examples or n)
    xd, yd = x[:n_def], y[:n_def]

    def row_base(spec, eps, name=name):
      return dict(
        kind="defense",
        dataset=config.data.name,
        defense=name,
        attack=spec.name,
        eps=eps,
        source=None,
        target=None,
        settings=defense_settings(config, name),
      )

    all_eps = [float(e) for e in d.attacks.eps]
    offered.update(spec.name for spec in defended.attacks)
    # The wanted attacks (by index in `defended.attacks`, which keys their randomness), the
    # APGD ensemble's last (AutoAttack's own order is cheap to costly): through a projection
    # each of its steps is a whole projection, and a run stopped early keeps the cheaper
    # attacks' rows, the defence-aware ones included. The order changes no number.
    order = sorted(
      ((i, spec) for i, spec in enumerate(defended.attacks) if not only or spec.name in only),
      key=lambda t: t[1].fn is _apgd_ensemble,
    )
    if all(log.has(row_base(spec, eps)) for _, spec in order for eps in all_eps):
      job.skip("attack", name)
    else:
      job.start("attack", name, detail=", ".join(spec.name for _, spec in order))
    for a_index, spec in order:
      for eps in all_eps:
        base = row_base(spec, eps)
        if log.has(base):
          continue
        if clean is None:
          clean = _Judge(defended, yd)(xd)
        stream = jax.random.fold_in(attack_root, DEFENSES[name].key_index)
        key = jax.random.fold_in(stream, a_index)
        row, adv[(spec.name, eps)] = evaluate(
          defended, spec, eps, xd, yd, key=key, clean=clean, runner_kwargs=runner_kwargs
        )
        log.append(dict(base, **row))
        logging.info(
          "%s %s eps=%g: clean %.4f robust %.4f (n=%d, %d restarts, %.0f s)",
          name,
          spec.name,
          eps,
          row["clean_accuracy"],
          row["robust_accuracy"],
          row["n"],
          spec.restarts,
          row["seconds"],
        )
    job.finish()  # (nothing when the stage was skipped)
    # Only when this run attacked it at every point (a resumed run keeps the old file).
    if defended.figure_data is not None and len(adv) == len(defended.attacks) * len(d.attacks.eps):
      figure = defended.figure_data(xd, yd, adv)
      figure["figure_kind"] = np.asarray(DEFENSES[name].figure or "")
      store.save_npz_atomic(workdir / EXAMPLES_DIR / f"{name}.npz", **figure)
  unknown = sorted(set(only) - offered)
  if unknown:  # after the rows of the names that exist: nothing computed is lost
    raise UserError(
      f"defenses.only_attacks names {', '.join(unknown)}, which no enabled defence runs; "
      f"allowed: {', '.join(sorted(offered))}"
    )
  if d.transfer.enabled:
    _run_transfer(config, ctx, built, x, y, log, settings, attack_root, runner_kwargs, job)
  if cluster.writes():
    from experiments import report  # noqa: PLC0415

    report.write_report(workdir)
    job.last_line(workdir, results=RESULTS_FILE)
  return {"train": {k: v.metrics for k, v in built.items()}, "results": log.rows}


def _build(name: str, ctx, job) -> Defended:
  """DEFENSES[name].build(ctx), a stage of `job`, its failures as one line: a full disk names
  the checkpoint folder; another config's checkpoint or NaN in training names the defence."""
  job.start("train", name)
  try:
    with models_lib.checkpoint_space((ctx.workdir / "checkpoints").resolve()):
      defended = DEFENSES[name].build(ctx)
  except (ValueError, FloatingPointError) as e:
    raise UserError(f"defence {name}: {e}") from None
  job.finish()
  return defended


def _run_transfer(config, ctx, built, x, y, log, settings, attack_root, runner_kwargs, job) -> None:
  """The black-box transfer matrix: rows (source, target) at `defenses.transfer.eps`."""
  t = config.defenses.transfer
  eps = float(t.eps)
  for name in t.sources:
    if name not in built:
      built[name] = _build(name, ctx, job)
  targets = {k: transfer.Classifier(v.logits_fn, v.params) for k, v in built.items()}
  base = dict(kind="transfer", dataset=config.data.name, attack="pgd", eps=eps, settings=settings)
  row_of = lambda s, tg: dict(base, defense=tg, source=s, target=tg)  # noqa: E731
  todo = [s for s in t.sources if not all(log.has(row_of(s, tg)) for tg in targets)]
  if not todo:
    job.skip("transfer", "")
    return
  job.start("transfer", "")
  x_adv = {}
  for s in todo:
    spec = built[s].transfer_spec
    res = adversarial.attack_with_restarts(
      spec.fn,
      spec.logits_fn,
      spec.params,
      x,
      y,
      eps=eps,
      restarts=int(t.restarts),
      key=jax.random.fold_in(jax.random.fold_in(attack_root, 99), DEFENSES[s].key_index),
      **runner_kwargs,
      **spec.knobs,
    )
    x_adv[s] = res.x_adv
  matrix = transfer.transfer_matrix(targets, x_adv, y)
  for i, s in enumerate(matrix.sources):
    for j, tg in enumerate(matrix.targets):
      row = row_of(s, tg)
      if log.has(row):
        continue
      row.update(_rate("robust_accuracy", matrix.correct[i, j]), n=int(len(y)))
      row.update(white_box=s == tg, crafted_with=built[s].transfer_spec.name)
      log.append(row)
      logging.info("transfer %s -> %s: accuracy %.4f", s, tg, row["robust_accuracy"])
  job.finish()
