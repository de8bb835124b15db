"""LFW defences: the study's CNN and VAE classifiers and a siamese face identifier, same faces.

Run (full size, 154 x 154; the study's committed LFW models are imported, see below):
  python -m experiments.main --config=configs/lfw_defenses.py --workdir=runs/study/lfw_defenses \
    --config.import_params="$PWD/results/study/lfw_vae"
Quick (32 x 32 faces, trains its own small models): --config=configs/lfw_defenses.py:quick

The study's open question for metric learning: is a siamese embedding network trained with the
triplet loss (Schroff et al. 2015), identifying a face by its nearest class centre, harder to
fool than the CNN, or than a VAE used as a classifier? The defences (experiments/defenses.py):
- `none`: the study's LFW CNN (experiments/models.py `cnn`);
- `conv_vae`: the study's conv VAE with a probe, a latent classifier trained on its frozen
  latent mean (Gondim-Ribeiro et al. 2018's "VAE as classifier");
- `joint_vae`: the study's conv VAE trained jointly with its latent classifier (Kingma et al.
  2014's supervised objective);
- `siamese`: the embedding net (the CNN's architecture with an embedding head), trained here.
At full size the first three are the study's SAME trained models, imported from the record
that `import_params` names (relative to the workdir, like configs/study.py's parts: the
default "../lfw_vae" is the study's LFW part beside this run's workdir; an absolute path, as
above, names the committed record wherever the workdir is) and checked against the accuracies
recorded there (experiments/models.py `import_committed`); a missing record is an error, never
a silent retraining. `import_params=''` trains them here instead (what :quick does: the committed
models are 154 x 154). All four are attacked white-box on the same first test faces at the
L-inf grid `EPS` (below; :quick keeps the LFW grid of configs/base.py) with FGSM, untargeted PGD
and the impersonation attack (targeted BIM to the most similar other person: the siamese net's
nearest other centre, the classifiers' highest other logit); rows go to the same defence table
as configs/mnist_defenses.py, with the transfer matrix between the four.
"""

import ml_collections

from configs import base, base_defenses

ARGS = ("", "quick")
# The models attacked, each also a transfer source (experiments/defenses.py DEFENSES).
DEFENCES = ("none", "siamese", "conv_vae", "joint_vae")
# L-inf budgets per pixel (set 2026-12-06, third session). The first full-size run used the
# study's LFW grid (0.01, 0.02, 0.05, 0.1) and left every model at 0.000-0.020 robust accuracy
# from 0.01 on, so it could not tell them apart; the study's per-pair minimal targeted budgets
# at 154x154 have medians of 0.0059 (conv VAE probe) to 0.0164 (accuracy-matched CNN)
# (results/study/summary.md, `bim_min`), and untargeted PGD needs less. This grid spans 0.0005
# to 0.02, where the models still differ; the transfer matrix uses its largest budget.
EPS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02)


def get_config(arg=None):
  c = base_defenses.get_base("lfw", arg, ARGS)
  quick = arg == "quick"

  # The embedding net is the CNN's architecture with an embedding head (siamese.EmbeddingNet),
  # trained with the CNN's schedule (60 epochs at full size).
  c.model.siamese = dict(c.model.cnn, embedding_dim=64)
  # Triplets come from inside each batch: 64 faces of 7 people hold positives for every anchor.
  # Random in-batch triplets: on the quick setup batch-hard mining stalled at 0.51 test accuracy
  # where random triplets reached 0.79 (20 epochs, learning rate 3e-3).
  c.train.siamese = dict(c.train.cnn, batch_size=64, margin=0.2, mining="random")
  # The record of the study's LFW models (relative to the workdir, or absolute): the study's
  # LFW part beside this run's workdir. :quick trains its own (the record's are 154 x 154).
  c.import_params = "" if quick else "../lfw_vae"

  d = c.defenses = ml_collections.ConfigDict()
  d.enabled = DEFENCES
  # Sized for a 2-core CPU (benchmarks/lfw_defenses_cost.py under nice 10, 2026-12-06, load 5
  # to 6 from two other runs): one PGD step costs 5.6 to 5.9 ms per face on the CNN and the
  # siamese net, 2.7 to 3.5 ms on each VAE classifier; the siamese net trained at 34 and 73
  # faces/s (on 128 and 256 faces: 13 to 29 minutes for its 60 epochs, plus its per-epoch
  # evaluation). 200 faces with 3 restarts projected to ~60 minutes of attacks at that load;
  # 100 faces with 2 restarts (of 40-step PGD and of impersonation) to ~19 minutes, and ~1 for
  # the transfer matrix; an idle CPU roughly halves these. 100 faces give 95% intervals of
  # about +-0.1 on a rate near 0.5.
  d.num_examples = 100  # the first N test faces, shared by every model and every attack
  d.only_attacks = ()  # as configs/mnist_defenses.py: () runs every attack of each defence
  d.attacks = ml_collections.ConfigDict(
    dict(
      eps=EPS if not quick else tuple(c.attacks.bim.eps), fgsm=True, impersonation=True,
      pgd_steps=40,
      pgd_step_size_rel=2.5 / 40, restarts=2,
    )
  )  # fmt: skip
  # logits = -||f(x) - c_k||^2 / (2 T): T only scales the softmax the attacks differentiate.
  d.siamese = ml_collections.ConfigDict(dict(temperature=0.1))
  d.transfer = ml_collections.ConfigDict(
    dict(
      enabled=True,
      eps=float(max(d.attacks.eps)),
      sources=DEFENCES,
      restarts=1,
    )
  )
  if quick:
    d.num_examples = 64
    d.attacks.update(pgd_steps=5, pgd_step_size_rel=2.5 / 5, restarts=2)
    # Base's quick (400 faces, 2 epochs, 8-pixel shifts) leaves both at the majority class
    # (0.41). Measured on real LFW at 32 x 32 (966 training faces, 200 test): the CNN reaches
    # 0.80 and the siamese net 0.79 in 20 epochs (~1 to 2 minutes each on a 2-core CPU).
    c.data.max_train = 0
    c.train.cnn.update(epochs=20, learning_rate=3e-3, augment_shift=2)
    c.train.siamese = dict(c.train.siamese, epochs=20, learning_rate=3e-3, augment_shift=2)
    # Base's quick VAE (latent 8, 2 epochs = 30 steps) and latent classifier (2 epochs) are far
    # below what faces need; keep the full run's latent size, VAE training and latent
    # classifier (which costs little on 64-D codes) on the quick conv VAE's (16, 32) stages.
    # Measured on real LFW at 32 x 32 (2026-12-06, 200 test faces, the whole :quick run 2 min
    # 22 s at load 5): test accuracy CNN 0.85, siamese 0.77, conv VAE probe 0.68, joint VAE
    # 0.84 (prior 0.41); each model trained in 7 to 12 s.
    full = base.get_config(dataset="lfw", models=("cnn",), quick=False)
    c.model.conv_vae = dict(c.model.conv_vae, latent_dim=full.model.conv_vae["latent_dim"])
    c.train.vae = dict(full.train.vae)
    c.model.latent_classifier = dict(full.model.latent_classifier)
    c.train.latent_classifier = dict(full.train.latent_classifier)
  # The joint VAE's sections as the study makes them (the conv VAE's architecture, the CNN's
  # training), after :quick's changes to those.
  base.add_model_sections(c, ("joint_vae",))
  return c
