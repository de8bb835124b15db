"""The study's MNIST part, and an LFW part, with the generative classifiers built from VAEs
(issue 19).

Run: python -m experiments.main --config=configs/study_genclf.py --workdir=runs/study_genclf
     (`--config.runs="('mnist_vae',)"` runs the MNIST part alone; `:gpu` puts the LFW part at
     the full 154x154)

The MNIST part of configs/study.py (its `design`: the same attacks, steps, budgets and shared
pairs) with the VAE trained jointly with its latent classifier and two more models, attacked
like the CNN through their logits:
- "abs": analysis by synthesis, Schott et al. (2019), one VAE per class (vae_attacks.genclf);
- "cvae": the Bayes classifier of a class-conditional VAE, Li, Bradshaw and Sharma (2019), GFY.
A model's robustness per pair is the minimum over the attacks of its minimal perturbation
(experiments.report). ABS's inference (8000 bank samples and 50 Adam steps per class and input)
makes every attack on it ~100x an attack on the CNN; the pairs are fewer than the study's.
The LFW part (`lfw_part`): the faces at 28x28 colour (154x154 under `:gpu`).
"""

import ml_collections

from configs import base, mnist_vae
from configs import study as study_cfg

ARGS = ("", "quick", "gpu")

# Schott et al. (2019)'s inference (their public code, bethgelab/AnalysisBySynthesis,
# abs_models/models.py and inference.py). Their class VAE is convolutional (models.py get_VAE,
# nets.py: encoder="conv", decoder="conv" here, without BatchNorm); the study keeps MLPs: on this
# 2-core CPU the conv decoder made ABS's inference ~8x slower per input (one 10-class decode
# and its gradient: 3.1 ms vs ~0.5 ms, 50 per input) and its training 1.26 s per step of 64 x 10
# images (130 s per epoch), and after 6 of 12 epochs it was behind the MLP at the same epoch
# (bank-only accuracy 0.930 vs 0.950, test objective 29.7 vs 26.0; issue 19, branch genclf99).
# The MLP ABS's full-inference accuracy: 0.9730 on the first 2,000 test images after 60 epochs
# (Wilson 95% CI 0.965-0.979), 0.9654 on the first 5,000 after 20: short of the paper's 0.99.
# The conv VAEs trained for 20 epochs (2026-12-07, `python -m benchmarks.genclf_accuracy
# --config.model_name=abs`, on 2,000 held-out training images): 0.973, no better.
ABS_MODEL = dict(
  latent_dim=8, hidden=(512, 256), encoder="mlp", decoder="mlp", n_samples=8000, steps=50,
  lr=0.05, radius=5.0, logit_scale=440.0, gradient="envelope",
)  # fmt: skip
# Li et al. (2019)'s GFY on MNIST (deepgenerativeclassifier/DeepBayes: vae_mnist.py,
# models/conv_encoder_mnist.py, models/conv_generator_mnist_B.py, alg/lowerbound_functions.py):
# latent dim 64, encoder three 5x5 stride-2 convolutions of 64 channels then Dense 500 (shared by
# the classes), y joined, Dense 500; learned prior p(z | y) (Dense 500); the "l2" likelihood;
# 10 importance samples per class. Deviation: the decoder is Dense 500 -> Dense 1024 -> the 784
# pixels, where theirs continues from its Dense 1024 (4x4x64) with three 5x5 transposed
# convolutions (~27M multiply-adds per decode, 20x this one; a class score decodes 10 x 10).
# Measured (issue 19, branch genclf99; all 10,000 test images, S = 10): 0.9828 with these
# settings (training 1770 s, 20 epochs, shared CPU); 0.9829 with the MLP encoder (500, 500) and
# the same prior and likelihood (30 epochs, 261 s); 0.9728 before, Bernoulli likelihood and
# N(0, I) prior. Short of the 0.99 asked for (issue 19): what remains of Li et al.'s recipe is
# their transposed-convolution decoder and their 100 epochs at 1e-4. A sharper likelihood does
# not help on MNIST (2026-12-07, benchmarks.genclf_accuracy, 5,000 held-out training images): a
# Gaussian of pixel sd 0.1 (the faces' recipe, FACE_CVAE) 0.874, of sd 1.0 0.973.
# Their decoder (`decoder_hidden=(500,), decoder_features=(64, 64, 64)`), measured 2026-12-06
# (sixth session; batches of 64 of the training set, accuracy of the Bayes classifier with S = 4
# on the first 200 test images): with the "l2" likelihood, Adam at 1e-3 or 3e-4 collapses
# within 100 steps to one image for every z and y (the logits of the classes equal to 0.01,
# accuracy at chance, loss flat at ~88: the squared error through the sigmoid stops giving a
# gradient once the pixel logits saturate); at Li et al.'s 1e-4 it learns (0.525 after 400
# steps); with the Bernoulli likelihood at 1e-3 it learns fast (0.86 after 400 steps).
CVAE_MODEL = dict(
  latent_dim=64, features=(64, 64, 64), feature_hidden=(500,), hidden=(500,),
  decoder_hidden=(500, 1024), decoder_features=(), likelihood="l2", prior="learned",
  num_samples=10,
)  # fmt: skip
# Adam with a cosine schedule from 1e-3 for 20 epochs of batches of 64 (Li et al.: Adam 1e-4,
# batches of 50, 100 epochs). ABS's training settings are not in Schott et al.'s public code;
# J. Rauber's reimplementation (jonasrauber/analysis-by-synthesis, args.py, datasets.py,
# architecture.py) trains its conv VAEs (with BatchNorm) with Adam at 3e-3 on class-balanced
# batches of 128, beta 1, and light augmentation (zoom, shear, skew and elastic distortion, each
# with probability 0.1); its inference drops the worst 10% of a larger bank
# (`fraction_to_dismiss`). Not adopted here: the gap to 0.99 is measured with this recipe.
GENCLF_TRAIN = dict(epochs=20, batch_size=64, learning_rate=1e-3, lr_schedule="cosine")
# ABS's class VAEs for 60 epochs: the model measured above (0.9730 after 60 epochs, 0.9654 after
# 20); an epoch of the ten MLP VAEs costs seconds on this CPU.
ABS_EPOCHS = 60
# `abs_long` (MNIST part; issue 19, item 1): the same ABS with its class VAEs trained 300 epochs
# (the cosine schedule over all of them). Chosen on held-out training images (2026-12-07,
# twelfth session, `benchmarks/genclf_accuracy.py`, the last 5,000 held out, first 1,000
# scored): 300 epochs 0.983, against 0.973-0.974 for Schott et al.'s convolutional VAEs at 12
# or 20 epochs, with or without their BatchNorm. Trained on all 60,000: 0.9862 on the 10,000
# test images; this part's abs_long 0.9864, 0.9805 on the first 2,000 (Schott et al.'s
# published VAEs under this inference: 0.9845 there, benchmarks/abs_reference.py). Appended
# after the part's rows were made (like the matched control: attacked on the same pairs, which
# it does not choose), so the earlier ABS and its rows stay as they were.
# Neither longer nor shifted training moves it further (fourteenth session, same benchmark):
# 1,000 epochs overfit (the held-out objective rising from epoch ~150); one-pixel shifts
# (`augment_shift=1`, `train.augment_batch`) gave 0.9869 on the test set, level with 0.9864.
# The published VAEs under this inference: 0.9902 on all 10,000: the gap is our training.
ABS_LONG_EPOCHS = 300


def add_generative(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the generative classifiers' model and train sections and names to `c`, in place."""
  c.model.abs = dict(ABS_MODEL)
  c.model.cvae = dict(CVAE_MODEL)
  c.train.abs = dict(GENCLF_TRAIN, epochs=ABS_EPOCHS)
  c.train.cvae = dict(GENCLF_TRAIN)
  c.models = (*c.models, "abs", "cvae")
  return c


# The accuracy-matched control of the MNIST part (issue 19: the LFW study found a CNN stopped
# early at a lower accuracy needing a LARGER budget than the full one, so the generative
# classifiers' lower accuracy is a candidate confounder of their margin): the study's CNN
# (architecture, augmentation, learning rate, cosine schedule over the same 360,000 examples)
# stopped at the first evaluation whose test accuracy reaches ABS's. Its whole first epoch
# already gives 0.987 (results/study/mnist_vae), so it is evaluated every
# MATCHED_EPOCH_EXAMPLES examples. It is attacked on the part's pairs, which it does not
# choose (`attacks.pair_models`: the pairs, and the rows made on them, stay those of the six
# models), so its rows join the finished ones; the report pairs it with ABS and the
# class-conditional VAE on the pairs whose source it classifies correctly.
MATCHED_EPOCH_EXAMPLES = 2000


def add_matched_control(c: ml_collections.ConfigDict) -> None:
  """Adds `cnn_matched`, matched to ABS's accuracy, to a part that has abs, in place."""
  c.attacks.pair_models = tuple(c.models)
  c.models = (*c.models, "cnn_matched")
  base.add_model_sections(c, c.models)
  n_train = c.data.max_train or 60_000  # MNIST's training set, or the part's share of it
  per_epoch = min(MATCHED_EPOCH_EXAMPLES, n_train)
  c.train.cnn_matched.update(
    match_to="abs", epoch_examples=per_epoch, epochs=c.train.cnn.epochs * n_train // per_epoch
  )


# LFW (issue 19, item 4): the 7-person split at a reduced resolution on the CPU, the full size
# in the `:gpu` config. The part is the study's resolution part at that size (its CNN, the
# accuracy-matched CNN and the joint VAE classifier, each trained as there) plus both generative
# classifiers, attacked with the MNIST part's attacks on shared pairs. No latent-probe VAE (the
# resolution parts have none; at 154 the LFW part's probe has 0.73 against the CNN's 0.92).
LFW_GENCLF_SIZE = 28


# The faces' recipe for the generative classifiers (issue 19, item 4), chosen on 2026-12-07 before
# any attack row of these models, on a validation split of the 28x28 training faces (a seeded
# 20%, 193 faces; trained on the other 773; the test faces, where the attack pairs come from,
# unused). With the MNIST settings the class-conditional VAE classified 0.482 of them: its "l2"
# likelihood (a Gaussian of variance 1/2) leaves the classes' bounds a median 1.1 nats apart.
# A Gaussian likelihood of pixel sd 0.1: 0.772 (sd 0.05: 0.751; Bernoulli, measured on the test
# faces before the split was made: 0.624). ABS (MNIST settings: 0.544): its latent prior
# weighted as for a Gaussian of sd 0.05 (beta = 2 sd^2 = 0.005, 0.570; 0.02: 0.560) and latent
# 32 (0.622; 16: 0.601). Wilson intervals on 193 faces are about +-0.07: the choices among the
# sharper settings are within noise; the gain over the MNIST settings is not. The logit scale
# (440) is kept: it sets the softmax's confidence, not the predicted class.
FACE_CVAE = dict(likelihood="gaussian", pixel_sd=0.1)
FACE_ABS = dict(beta=0.005, latent_dim=32)


def lfw_part(size: int, quick: bool, attacks: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The LFW part at size x size colour with the generative classifiers and `attacks`."""
  name = f"lfw_genclf{size}"
  c = add_generative(study_cfg.resolution_part(name, size, False, quick))
  # The faces are few (~1,000 training images for 7 people): the generative classifiers train
  # for as many epochs as the joint VAE, with its shifts and flips (ABS's class VAEs without:
  # their training rows are per class, `train.train_abs`).
  joint = c.train.joint_vae
  for net in ("abs", "cvae"):
    c.train[net].update(epochs=joint.epochs)
  c.train.cvae.update(augment_shift=joint.augment_shift, augment_flip=joint.augment_flip)
  c.model.cvae.update(FACE_CVAE)
  c.model.abs.update(FACE_ABS)
  base.add_attacks(c, "latent_descent", "hop_skip_jump")
  c.attacks.enabled = attacks
  c.attacks.vae.enabled = ()  # the VAE attacks are the LFW part's (configs/study.py)
  c.import_params = ""  # every model trains in this part's workdir
  c.attacks.only_correct = True
  c.attacks.num_pairs = 200
  if quick:
    study_cfg.shrink(c)
    _quick_generative(c)
  return c


def _quick_generative(c: ml_collections.ConfigDict) -> None:
  """The generative models, their training and their attacks at :quick size, in place."""
  for name in ("abs", "abs_long"):
    if name in c.model:
      c.model[name].update(n_samples=200, steps=5, hidden=(64,))
  for name in ("abs", "abs_long", "cvae"):
    if name in c.train:
      c.train[name].update(epochs=2)
  c.model.cvae.update(
    features=(4,), feature_hidden=(16,), hidden=(16,), decoder_hidden=(16,), latent_dim=8,
    num_samples=2, decoder_features=(),
  )  # fmt: skip
  c.attacks.hop_skip_jump.update(iterations=3, num_evals=16, bisect_steps=8)
  c.attacks.latent_descent.update(steps=3, bisect_steps=4)


def get_config(arg=None):
  if (arg or "") not in ARGS:
    raise ValueError(f"config argument {arg!r} is not known; allowed: {ARGS}")
  quick, gpu = arg == "quick", arg == "gpu"
  c = ml_collections.ConfigDict()
  c.name = "study_genclf"
  mnist = mnist_vae.get_config("quick" if quick else None)
  # The VAE trained jointly with its latent classifier (the LFW part's strongest VAE
  # classifier; issue 19 item 3: "where it exists"): the conv VAE's net, the CNN's schedule.
  mnist.models = (*mnist.models, "joint_vae")
  base.add_model_sections(mnist, mnist.models)
  c.mnist_vae = add_generative(mnist)
  study_cfg.design(c.mnist_vae)
  # The attacks that know the generative models: latent descent (run on abs and cvae only) and
  # the decision-based HopSkipJump (every model: the check that no robustness is masking).
  base.add_attacks(c.mnist_vae, "latent_descent", "hop_skip_jump")
  # Inference-heavy models: 200 shared pairs (the issue: "a few hundred pairs" on this CPU).
  c.mnist_vae.attacks.num_pairs = 200
  c.mnist_vae.attacks.vae.num_pairs = 100
  add_matched_control(c.mnist_vae)
  c.mnist_vae.models = (*c.mnist_vae.models, "abs_long")
  c.mnist_vae.model.abs_long = dict(ABS_MODEL)
  c.mnist_vae.train.abs_long = dict(GENCLF_TRAIN, epochs=ABS_LONG_EPOCHS)
  # The study's CNN and VAEs can be imported from its committed record instead of retrained
  # (`--config.mnist_vae.import_params=$PWD/results/study/mnist_vae`; relative paths are to
  # the part's workdir): the same models the study attacked, on the same pairs.
  c.mnist_vae.import_params = ""
  if quick:
    study_cfg.shrink(c.mnist_vae)
    _quick_generative(c.mnist_vae)
  size = 154 if gpu else LFW_GENCLF_SIZE
  lfw = lfw_part(size, quick, tuple(c.mnist_vae.attacks.enabled))
  c[f"lfw_genclf{size}"] = lfw
  c.runs = ("mnist_vae", f"lfw_genclf{size}")
  return c
