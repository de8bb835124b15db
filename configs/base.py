"""The common base every config starts from.

A config is a small program (the big_vision habit): `get_config("quick")` shrinks data,
models, epochs and attack sweeps so that a whole run takes about a minute on a 2-core CPU.
Sections: data, model, train, attacks, eval, output.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from vae_attacks import data as data_lib
from vae_attacks import models as models_lib
from vae_attacks.attacks import registry

ARGS = ("", "quick")
DATASETS = tuple(data_lib.DATASETS)
MODELS = tuple(models_lib.MODEL_KINDS)


def parse_arg(arg):
  """`None` / '' -> full run, 'quick' -> shrunken run; anything else is an error."""
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"config argument {arg!r} is not known; allowed: '' (full run) or 'quick'")
  return arg == "quick"


def cluster_config() -> ml_collections.ConfigDict:
  """How the processes of a distributed run find each other. An unset field (None) is taken
  from the environment JAX detects: SLURM, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS."""
  return ml_collections.ConfigDict(
    dict(
      coordinator_address=placeholder(str),  # host:port of process 0's coordinator
      num_processes=placeholder(int),
      process_id=placeholder(int),  # 0 .. num_processes - 1; process 0 writes
      # A process that hears nothing from another for this long ends the run (JAX's heartbeat).
      heartbeat_timeout_s=100,
    )
  )


def get_config(*, dataset: str, models: tuple[str, ...], quick: bool) -> ml_collections.ConfigDict:
  """Base config for `dataset` training `models` (a VAE also gets a latent classifier)."""
  c = ml_collections.ConfigDict()
  c.name = f"{dataset}_{'vae' if any(m.endswith('vae') for m in models) else 'cnn'}"
  c.seed = 0
  c.quick = quick
  c.models = models
  # True: a run of several processes (experiments/cluster.py): jax.distributed.initialize()
  # before any device is used; process 0 writes, the processes share the attack sweeps out.
  c.distributed = False
  c.cluster = cluster_config()

  # --- data ---------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = dataset
  c.data.source = "auto"  # auto | tfds | local
  c.data.dir = ""  # local folder of the original files; '' -> $VAE_ATTACKS_DATA_DIR, else TFDS
  c.data.tfds_data_dir = ""
  c.data.download = True  # TFDS may download when the data are not prepared (fails fast offline)
  c.data.min_faces_per_person = 70
  c.data.crop_size = 154
  c.data.image_size = 154 if dataset == "lfw" else 28
  c.data.test_fraction = 0.25
  c.data.split_seed = 0
  c.data.max_train = 0  # 0 = all
  c.data.max_test = 0

  # --- models (fields are the Flax modules' attributes) -------------------------------
  c.model = ml_collections.ConfigDict()
  cnn = dict(
    features=(32, 64),
    dense=(128,),
    stem_stride=1,
    convs_per_stage=1,
    global_pool=False,
    dropout_rate=0.0,
  )
  if dataset == "mnist":
    c.model.cnn = cnn
    c.model.mlp_vae = dict(latent_dim=32, hidden=(512, 256))
    c.model.conv_vae = dict(latent_dim=32, features=(32, 64), hidden=())
  else:
    c.model.cnn = dict(cnn, features=(32, 64, 128, 128), stem_stride=2, dropout_rate=0.3)
    c.model.mlp_vae = dict(latent_dim=64, hidden=(1024, 512))
    # Five stride-2 stages (154 -> 5x5x64): 0.8 M parameters (3.2 MB, small enough to commit)
    # and 62 training examples/s on the 2-core CPU, against 3.7 M and 23/s for the four-stage
    # (32, 64, 128, 128) net used until 2026-12-05 (measured, batch 32, fwd + bwd).
    c.model.conv_vae = dict(latent_dim=64, features=(16, 32, 64, 64, 64), hidden=())
  c.model.latent_classifier = dict(hidden=(256, 128), dropout_rate=0.0)

  # --- training (fields are those of vae_attacks.train.TrainSettings) -----------------
  c.train = ml_collections.ConfigDict()
  mnist = dataset == "mnist"
  if mnist:  # measured with benchmarks/train_real.py on the real data
    c.train.cnn = dict(
      epochs=6,
      batch_size=64,
      learning_rate=2e-3,
      weight_decay=0.0,
      lr_schedule="cosine",
      augment_flip=False,
      augment_shift=2,
    )
  else:
    c.train.cnn = dict(
      epochs=60,
      batch_size=32,
      learning_rate=1e-3,
      weight_decay=1e-4,
      lr_schedule="cosine",
      augment_flip=True,
      augment_shift=8,
    )
  c.train.vae = dict(
    epochs=20 if mnist else 40,
    batch_size=128 if mnist else 32,
    learning_rate=1e-3,
    lr_schedule="cosine",
  )
  c.train.latent_classifier = dict(
    epochs=30 if mnist else 60,
    batch_size=128 if mnist else 32,
    learning_rate=1e-3,
    weight_decay=0.0,
    lr_schedule="cosine",
  )

  # --- attacks (one row of results per model x attack x epsilon) -----------------------
  # step_size_rel: step size / eps; 2.5 / steps lets a walk reach the ball's edge and move
  # along it (Madry et al. 2018).
  c.attacks = ml_collections.ConfigDict()
  c.attacks.enabled = registry.enabled_by_default("classifier")
  c.attacks.num_pairs = 500
  c.attacks.target_strategy = "random"  # random | next | least_likely | all | fixed
  c.attacks.fixed_targets = ()
  c.attacks.only_correct = True
  # True: every model of the run is attacked on the same pairs (sources every model classifies
  # correctly, targets drawn once); False: each model draws its own pairs (before 2026-12-05).
  c.attacks.shared_pairs = True
  # The models this invocation attacks, () for all: picks rows, changes no number (each
  # model's key is its place in `models`), e.g. to run a cheap model's attacks before a costly
  # one's; a later run without it makes the rest.
  c.attacks.only_models = ()
  c.attacks.chunk_size = 0  # 0 = chosen from memory_budget_mb
  c.attacks.memory_budget_mb = 2048
  c.attacks.shard = True  # shard pairs over all local devices
  c.attacks.fgsm = ml_collections.ConfigDict(dict(norm="linf", eps=(0.05, 0.1, 0.2, 0.3)))
  c.attacks.bim = ml_collections.ConfigDict(
    dict(
      norm="linf", eps=(0.05, 0.1, 0.2, 0.3), steps=40, step_size_rel=2.5 / 40, random_start=False
    )
  )
  c.attacks.bim_l1 = ml_collections.ConfigDict(
    dict(norm="l1", eps=(5.0, 10.0, 20.0), steps=40, step_size_rel=2.5 / 40, sparsity=0.99)
  )
  c.attacks.pgd_l2 = ml_collections.ConfigDict(
    dict(norm="l2", eps=(1.0, 2.0, 3.0), steps=40, step_size_rel=2.5 / 40, random_start=True)
  )
  c.attacks.lbfgs = ml_collections.ConfigDict(
    dict(norm="l2", eps=(0.01, 0.1, 1.0), max_iters=50, c_search=True, search_steps=6)
  )
  # VAE attacks (Tabacof et al. 2016; Kos et al. 2017), judged by the CNN on the reconstruction.
  # For the L2-optimisation variants eps is the penalty C on ||d||^2 (larger C, smaller d); the
  # latent_l2 grid is log-spaced so that its AUDDC curve spans the trade-off.
  c.attacks.vae = ml_collections.ConfigDict()
  c.attacks.vae.enabled = registry.enabled_by_default("vae")
  c.attacks.vae.num_pairs = 500
  c.attacks.vae.latent_l2 = dict(eps=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0), max_iters=50)
  c.attacks.vae.latent_fgsm = dict(eps=(0.05, 0.1, 0.2, 0.3))
  c.attacks.vae.reconstruction_l2 = dict(eps=(0.01, 0.1, 1.0), max_iters=50)
  c.attacks.vae.reconstruction_fgsm = dict(eps=(0.05, 0.1, 0.2, 0.3))
  if dataset == "lfw":
    _scale_to_pixels(c.attacks, data_lib.DATASETS["lfw"].pixels / data_lib.DATASETS["mnist"].pixels)
    cpu_attack_budget(c)
    c.train.vae.epochs = 30

  # --- evaluation of attacks (the study's confidence / validity / effectiveness) -------
  c.eval = ml_collections.ConfigDict()
  c.eval.confidence_min = 0.5
  c.eval.ssim_min = 0.8
  c.eval.linf_max = 0.3
  c.eval.l2_max = 0.0  # 0 = no bound
  # Validity that does not depend on the number of pixels (metrics.EvalSettings): PSNR >= this
  # (dB), and SSIM of the luminances resized to common_size x common_size.
  c.eval.psnr_min = 30.0
  c.eval.common_size = 28

  c.output = ml_collections.ConfigDict()
  c.output.figures = True
  c.output.num_examples = 8

  if quick:
    c.data.max_train = 2000 if dataset == "mnist" else 400
    c.data.max_test = 500 if dataset == "mnist" else 200
    if dataset == "lfw":
      c.data.image_size = 32
      c.model.cnn.features = (16, 32)
      c.model.cnn.stem_stride = 1
      c.model.cnn.dropout_rate = 0.0
      c.model.conv_vae.features = (16, 32)
    c.model.cnn.dense = (64,)
    c.model.mlp_vae.hidden = (128,)
    c.model.mlp_vae.latent_dim = 8
    c.model.conv_vae.latent_dim = 8
    c.model.latent_classifier.hidden = (32,)
    for t in c.train.values():
      t.epochs = 2
      t.batch_size = 64
    # The latent classifier trains in well under a second per epoch on the codes; with 2 epochs
    # it stayed at chance (0.09 on MNIST), and no source was classified correctly by every model.
    c.train.latent_classifier.epochs = 30
    c.train.latent_classifier.learning_rate = 3e-3
    c.attacks.num_pairs = 16
    c.attacks.vae.num_pairs = 8
    c.attacks.vae.latent_l2.eps = (0.01, 0.1, 1.0)
    c.attacks.vae.latent_l2.max_iters = 10
    c.attacks.vae.reconstruction_l2.max_iters = 10
    for name in ("bim", "bim_l1", "pgd_l2"):
      c.attacks[name].steps = 5
      c.attacks[name].step_size_rel = 2.5 / 5
    c.attacks.lbfgs.max_iters = 10
    c.attacks.lbfgs.search_steps = 2
    c.output.num_examples = 4
  add_model_sections(c, models)
  return c


def add_model_sections(c: ml_collections.ConfigDict, models) -> None:
  """The model and train sections of the optional models among `models`, in place.

  Sections only where a config trains these models (the others' config.json stay as before).
  The VAE trained jointly with its latent classifier (train.train_joint_vae) has the conv
  VAE's architecture, the CNN's schedule and augmentation; -ELBO + alpha * cross-entropy
  (Kingma et al. 2014's alpha): the -ELBO is a sum over pixels, so alpha is set per pixel (0.1
  nats of -ELBO per pixel per nat of cross-entropy) and keeps the two terms' balance at every
  resolution. The accuracy-matched control: the CNN's architecture and training, stopped
  after the first epoch whose test accuracy reaches `match_to`'s (an earlier model of `models`).
  """
  if "joint_vae" in models and "joint_vae" not in c.model:
    c.model.joint_vae = dict(c.model.conv_vae)
    c.train.joint_vae = dict(c.train.cnn, ce_weight_per_pixel=0.1)
  if "cnn_matched" in models and "cnn_matched" not in c.model:
    c.model.cnn_matched = dict(c.model.cnn)
    c.train.cnn_matched = dict(c.train.cnn, match_to="conv_vae")


# Sections of the attacks a config asks for by name (`add_attacks`), absent otherwise, so the
# configs without them are as before (registry.AttackSpec.default_enabled). MNIST values;
# `add_attacks` carries them to LFW as `_scale_to_pixels` does every other grid.
# - bim_min, bim_l1_min (issue 13: the grid-independent endpoint): eps is the upper end of the
#   bisection's range, so one row per model; 8 probes after the first give a resolution of
#   eps / 256 (L-inf 0.3: 0.0012). Each probe is a full BIM, so a pair costs 9 BIM attacks.
# - latent_kl: Tabacof et al.'s KL divergence between the posteriors; a C grid from near 0
#   (the latent loss dominates: the attack reaches the target) to past 1 (the penalty
#   dominates: d stays near 0), so the AUDDC curve spans the trade-off; iterations up to 200,
#   the solves stopping on ftol (their convergence) well before on most pairs.
# - apgd_ce, apgd_dlr (issue 18): APGD (Croce & Hein 2020) towards the pair's target, with the
#   BIM grid; 100 updates from a random start, the authors' default.
OPTIONAL_SECTIONS = {
  "bim_min": dict(
    norm="linf", eps=(0.3,), steps=40, step_size_rel=2.5 / 40, random_start=False, bisect_steps=8
  ),
  "bim_l1_min": dict(
    norm="l1", eps=(20.0,), steps=40, step_size_rel=2.5 / 40, sparsity=0.99, bisect_steps=8
  ),
  "apgd_ce": dict(norm="linf", eps=(0.05, 0.1, 0.2, 0.3), steps=100, random_start=True),
  "apgd_dlr": dict(norm="linf", eps=(0.05, 0.1, 0.2, 0.3), steps=100, random_start=True),
  "latent_kl": dict(
    eps=(1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    max_iters=200,
    ftol=1e-7,
  ),
  # eps: the mixing weight of a descent step (Schott et al. 2019).
  "latent_descent": dict(eps=(0.2,), steps=10, bisect_steps=10),
  # eps is unused (one row: the boundary point's L2); random_start=True hands it its key.
  "hop_skip_jump": dict(
    eps=(0.0,), iterations=20, num_evals=100, bisect_steps=16, random_start=True
  ),
}


def add_attacks(c: ml_collections.ConfigDict, *names: str) -> ml_collections.ConfigDict:
  """Enables the attacks `names` of `OPTIONAL_SECTIONS` in config `c`, in place; returns `c`.

  Adds each one's section (under `attacks`, or `attacks.vae` for a VAE attack; the LFW grid
  scaled as `_scale_to_pixels` scales the others) and appends its name to the family's
  `enabled`. Configs call it; an attack already present is left as it is.
  """
  for name in names:
    if name not in OPTIONAL_SECTIONS:
      raise ValueError(f"{name!r} is not an optional attack; allowed: {tuple(OPTIONAL_SECTIONS)}")
    spec = registry.ATTACKS[name]
    sections = c.attacks.vae if spec.family == "vae" else c.attacks
    if name in sections:
      continue
    with sections.unlocked():
      sections[name] = ml_collections.ConfigDict(OPTIONAL_SECTIONS[name])
    if c.data.name != "mnist":
      ratio = data_lib.DATASETS[c.data.name].pixels / data_lib.DATASETS["mnist"].pixels
      scale_section(name, spec, sections[name], ratio)
    sections.enabled = (*sections.enabled, name)
  return c


# L-inf grids of the classifier attacks at 154x154x3, chosen so that their adversarial inputs
# stay mostly valid (SSIM falls faster with the budget at this size); every other grid is scaled.
# (The VAE FGSM variants kept MNIST's 0.05-0.3 on LFW until 2026-12-05, where every one of their
# adversarial inputs was invalid.)
_LFW_LINF = (0.01, 0.02, 0.05, 0.1)
LFW_LINF_EPS = {
  "fgsm": _LFW_LINF,
  "bim": _LFW_LINF,
  "latent_fgsm": _LFW_LINF,
  "reconstruction_fgsm": _LFW_LINF,
}


def _scale_to_pixels(attacks: ml_collections.ConfigDict, ratio: float) -> None:
  """The MNIST eps grids carried to images with `ratio` times the pixels, in place.

  Pixel density: the same per-pixel budget gives an L2 ball sqrt(ratio) and an L1 ball ratio
  times as large; a penalty on ||d||_2^2 (L-BFGS's c, the VAE attacks' C) keeps the same
  per-pixel trade-off divided by the ratio (154*154*3 / 784 = 90.75). The L-inf grids of
  `LFW_LINF_EPS` are set as they are; other L-inf budgets are per pixel and stay.
  """
  for name, spec in registry.ATTACKS.items():
    sections = attacks.vae if spec.family == "vae" else attacks
    if spec.enabled_by is None and (spec.section or name) in sections:
      scale_section(name, spec, registry.section_of(spec, attacks), ratio)


def scale_section(name: str, spec, sec, ratio: float) -> None:
  """One attack's eps grid carried to `ratio` times the pixels, in place (`_scale_to_pixels`)."""
  norm = registry.norm_of(spec, sec)
  if spec.eps_kind == "weight":  # in no norm's units: the same on every dataset
    return
  if name in LFW_LINF_EPS:
    sec.eps = LFW_LINF_EPS[name]
  elif spec.eps_kind == "penalty":
    sec.eps = tuple(float(f"{e / ratio:.3g}") for e in sec.eps)
  elif norm == "l2":
    sec.eps = tuple(round(e * ratio**0.5, 2) for e in sec.eps)
  elif norm == "l1":
    scale = ratio**0.5  # (sqrt r)^2, not r: the grid as first published (453.7, not 453.8)
    sec.eps = tuple(round(e * scale * scale, 1) for e in sec.eps)


def cpu_attack_budget(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The attack sweep that fits a 2-core CPU at 154x154x3, in place; returns `c`.

  Measured there: the LFW CNN's input gradient runs at ~130 examples/s, the conv VAE's
  reconstruction gradient at ~43/s. So: 500 pairs per cell with the attacks both datasets share
  (FGSM, BIM, L-BFGS), 10-step BIM, 20-iteration L-BFGS, no c search. LFW always uses it;
  configs/study.py gives it to MNIST too, so that H1 compares the same attacks run with the same
  number of steps. On an accelerator, `--config.attacks.enabled`, `.bim.steps` and
  `.lbfgs.max_iters` restore the full MNIST grid.
  """
  c.attacks.enabled = ("fgsm", "bim", "lbfgs")
  c.attacks.bim.steps = 10
  c.attacks.bim.step_size_rel = 2.5 / 10
  c.attacks.lbfgs.max_iters = 20
  c.attacks.lbfgs.c_search = False
  c.attacks.vae.latent_l2.max_iters = 20
  c.attacks.vae.reconstruction_l2.max_iters = 20
  return c
