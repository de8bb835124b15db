"""MNIST defences: distillation, adversarial training, projection; adaptive attacks; transfer.

Run (2-core CPU; see README "Defences" for measured times):
  python -m experiments.main --config=configs/mnist_defenses.py --workdir=runs/mnist_defenses
Only the adversarially trained CNN (the robust-accuracy measurement), or the TRADES one:
  ... --config.defenses.enabled="('adversarial',)" --config.defenses.transfer.enabled=False
  ... --config.defenses.enabled="('trades',)" --config.defenses.transfer.enabled=False
Quick (about a minute): --config=configs/mnist_defenses.py:quick
GPU-sized (Madry et al. 2018's adversarial training: PGD-40, 100,000 steps of 50 examples;
every defence on 10,000 test images, AutoAttack's 9 APGD-T target classes):
  --config=configs/mnist_defenses.py:gpu
The CPU record of 2026-12-06 (README, results/mnist_defenses/) ran the GMVAE and the projection
in two workdirs, each with the undefended CNN as the transfer source:
  ... --workdir=W "--config.defenses.enabled=('gmvae','none')" \
      --config.defenses.attacks.restarts=2 "--config.defenses.transfer.sources=('none',)"
  ... --workdir=W2 "--config.defenses.enabled=('none','projection')" \
      --config.defenses.projection.num_examples=200 --config.defenses.attacks.restarts=2 \
      "--config.defenses.transfer.sources=('none',)"
The GMVAE record of 2026-12-06 (results/mnist_defenses_gmvae/; eps 0.1-0.3, 2 restarts):
  ... --workdir=W "--config.defenses.enabled=('gmvae',)" --config.defenses.transfer.enabled=False \
      "--config.defenses.attacks.eps=(0.1,0.2,0.3)" --config.defenses.attacks.restarts=2

`experiment = "defenses"` makes experiments.run hand the config to experiments/defenses.py.
The model / train sections hold every trained network: `cnn` (the undefended baseline, also
the classifier behind the projection and the distillation architecture), `substitute` (the
black-box attacker's own network), `adversarial` (the adversarially trained CNN), `trades`
(the TRADES-trained one), and
`mlp_vae` / `vae` (the projection's generator).
"""

import ml_collections

from configs import base_defenses

ARGS = ("", "quick", "gpu")


def get_config(arg=None):
  c = base_defenses.get_base("mnist", arg, ARGS)
  quick = arg == "quick"

  cnn = dict(c.model.cnn)
  c.model.substitute = dict(cnn, features=(16, 32), dense=(64,))
  # Wider than the baseline (adversarial training needs capacity, Madry et al. 2018), with
  # Madry's fc1024 head.
  c.model.adversarial = dict(cnn, features=(32, 64), dense=(1024,))
  c.train.substitute = dict(c.train.cnn, epochs=3)
  c.train.distillation = dict(c.train.cnn, epochs=4, augment_shift=0)
  # Measured on real MNIST (this 2-core CPU, 2026-11-22): FGSM with a random start (Wong et
  # al. 2020; steps=1, step_size_rel=1.25) for 8 epochs after a 2-epoch eps ramp gave clean
  # 0.9926 and robust 0.936 under FGSM but only 0.487 under PGD-40 with 5 restarts at eps 0.3
  # (n=1000): catastrophic overfitting, the FGSM robustness is masking. Hence a 3-step PGD
  # inner attack (steps of 0.5 eps from a random start: 1.5 eps of travel), which costs
  # 335 vs 461 examples/s for FGSM-RS (2-core CPU, 2026-12-01). Measured (2026-12-01, 10
  # epochs, 62 minutes under load): clean 0.9929, robust 0.913 under PGD-40 with 5 restarts
  # at eps 0.3 (n=1000), 0.952 under FGSM. Then (2026-12-06) under the APGD ensemble below:
  # 0.894 at eps 0.3, short of issue 18's 0.90; its PGD-3 training attack (1.5 eps of travel)
  # is far weaker than Madry's PGD-40. Hence (2026-12-07) 5 steps of 0.35 eps (1.75 eps of
  # travel, Madry's 40 x 0.01 is 1.33) for 15 epochs: 2.25x the training cost of the above.
  c.train.adversarial = dict(c.train.cnn, epochs=15, batch_size=100, augment_shift=0)
  # TRADES (Zhang et al. 2019) on the same network and schedule. Their MNIST script
  # (github.com/yaodongyu/TRADES, train_trades_mnist.py, read 2026-12-06): eps 0.3, 40 ascent
  # steps of 0.01, beta 1.0 by default (their README: beta in [1, 10], larger is more robust
  # and less accurate), SGD at 0.01 with momentum 0.9, batches of 128, 100 epochs, their
  # four-convolution SmallCNN. Here Adam as every trainer of the library, and on the CPU 10
  # ascent steps of 0.25 eps (2.5 eps of travel) and beta 6.
  c.model.trades = dict(c.model.adversarial)
  c.train.trades = dict(c.train.adversarial, epochs=10)  # its record (results/mnist_defenses)

  d = c.defenses = ml_collections.ConfigDict()
  d.enabled = (
    "none", "substitute", "distillation", "adversarial", "trades", "projection", "gmvae"
  )  # fmt: skip
  d.num_examples = 1000  # the first N test images, shared by every defence and attack
  # Only these of a defence's attacks (by name, e.g. ('pgd_bpda_reject',)); () runs them all.
  # It picks which rows a run makes, not what they measure, so no row's settings hash has it:
  # the masking check of Carlini et al. 2019 reruns one attack stronger (more steps or starts)
  # in its own workdir without the others (README, "Defences").
  d.only_attacks = ()
  d.distillation = ml_collections.ConfigDict(dict(temperature=100.0))
  d.trades = ml_collections.ConfigDict(dict(eps=0.3, steps=10, step_size_rel=0.25, beta=6.0))
  d.adversarial = ml_collections.ConfigDict(
    dict(eps=0.3, steps=5, step_size_rel=0.35, random_start=True, ramp_epochs=2.0)
  )
  d.attacks = ml_collections.ConfigDict(
    # eps 0.5 can turn every pixel mid-grey: robust accuracy should be ~0 there (a
    # gradient-masking check, Carlini et al. 2019).
    dict(eps=(0.1, 0.2, 0.3, 0.5), fgsm=True, pgd_steps=40, pgd_step_size_rel=2.5 / 40, restarts=5)
  )
  # Defense-GAN's L = 200 descent steps from R = 10 random starts (Samangouei et al. 2018, the
  # MNIST setting of their Table 1); Adam at 0.05 instead of their SGD schedule. Measured
  # (2026-12-06): the CNN reads 0.970 of the MLP VAE's reconstructions right (first 1,000 test
  # images), and 100 of 100 projections (0.028 s each on this CPU).
  # The APGD part of AutoAttack (Croce & Hein 2020) on every defence, beside the attacks that
  # know it: APGD-CE, then APGD-T towards the `target_ranks` most likely other classes (9 in
  # AutoAttack's standard version; 3 on this CPU), `steps` iterations each, one start.
  d.apgd = ml_collections.ConfigDict(dict(enabled=True, steps=100, target_ranks=3, restarts=1))
  d.projection = ml_collections.ConfigDict(
    dict(
      steps=200,
      restarts=10,
      learning_rate=0.05,
      # BPDA runs a whole projection (L x R decoder passes) per attack step: fewer steps and
      # restarts than the other defences' attacks, on the CPU.
      attack_steps=10,
      attack_restarts=1,
      false_rejection_rate=0.05,
      threshold_examples=500,  # held-out clean test images (the last ones) for the threshold
      num_examples=1000,
      # The rejection-aware attack's hinge weight and margin (projection.RejectionAwareLogits)
      penalty=10.0,
      margin=0.1,
    )
  )
  # The GMVAE (Ghosh, Losalka and Black, AAAI 2019): a convolutional encoder and decoder with
  # a fully connected layer each way, as their MNIST nets (the study's conv VAE, two 3x3
  # stride-2 convolutions of 32 and 64 channels, plus Dense 512), and their MNIST latent size
  # D = 10 (the authors' write-up: "10 vs 28 x 28 = 784"), so K = D and the class means are
  # orthogonal, 20 e_k (28 units apart). Measured (2026-12-06; closest-component accuracy on
  # the 10,000 test images; right among the accepted: the first 1,000 at the 5% false-rejection
  # thresholds): without the dense layer (D = 16, means 10 e_k) the closest
  # component plateaued at 0.969 after 20 epochs; with it, one epoch gave 0.929 (means
  # 10 e_k), 0.962 (20 e_k), 0.967 (40 e_k), and 3 epochs with 2-pixel shifts (the CNN's
  # augmentation) 0.981 (0.988 right among the accepted); these 15 epochs 0.990 (0.997 right
  # among the accepted, 0.048 rejected; 757 s at load 5-9; README "Measured"). The 2026-12-01
  # MLP GMVAE with means 3 e_k classified 0.847 right.
  c.model.gmvae = dict(c.model.conv_vae, latent_dim=10, hidden=(512,))
  c.train.gmvae = dict(c.train.vae, epochs=15, augment_shift=2)
  d.gmvae = ml_collections.ConfigDict(
    dict(
      architecture="conv_vae",  # a VAE of experiments/models.py MODELS
      mean_scale=20.0,
      false_rejection_rate=0.05,
      threshold_examples=500,  # held-out clean test images (the last ones) for the thresholds
      penalty=10.0,  # the adaptive attack's hinge weight and margin (gmvae.adaptive_logits_fn)
      margin=0.1,
    )
  )
  d.transfer = ml_collections.ConfigDict(
    dict(
      enabled=True, eps=0.3, sources=("substitute", "none", "distillation", "adversarial"),
      restarts=1,
    )
  )  # fmt: skip

  if arg == "gpu":
    # Madry et al.'s training as their public code sets it (github.com/MadryLab/mnist_challenge,
    # config.json and train.py, read 2026-12-06): Adam at 1e-4, batches of 50, 100,000 steps,
    # every batch replaced by PGD-40 examples (eps 0.3, steps of 0.01, a uniform random start),
    # no clean examples, no augmentation; their network is conv32-conv64 (5x5, max-pool) and
    # fc1024, ours conv32-conv64 (3x3, average pool) and fc1024. They train on 55,000 images
    # (5,000 held out), we on 60,000: 84 epochs x 1,200 steps = 100,800 steps.
    c.train.adversarial = dict(
      c.train.adversarial, epochs=84, batch_size=50, learning_rate=1e-4, lr_schedule="constant"
    )
    d.adversarial.update(steps=40, step_size_rel=0.01 / 0.3, ramp_epochs=0.0)
    c.train.trades = dict(c.train.trades, epochs=100, batch_size=128)
    d.trades.update(steps=40, step_size_rel=0.01 / 0.3)
    # Their challenge's white-box evaluation: PGD-100 with 50 restarts (89.62% at eps 0.3); 10
    # restarts here, beside the APGD ensemble with AutoAttack's 9 target classes.
    d.attacks.update(pgd_steps=100, pgd_step_size_rel=2.5 / 100, restarts=10)
    d.apgd.target_ranks = 9
    d.num_examples = 10000
    d.projection.update(num_examples=10000, attack_steps=40, attack_restarts=5)
  if quick:
    c.model.substitute = dict(c.model.substitute, features=(8,), dense=(32,))
    c.model.adversarial = dict(c.model.adversarial, features=(16,), dense=(64,))
    c.model.trades = dict(c.model.adversarial)
    for name in ("substitute", "distillation", "adversarial", "trades"):
      c.train[name] = dict(c.train[name], epochs=2, batch_size=64)
    # The projection classifies decoder outputs with a CNN trained on clean digits, and the
    # GMVAE classifies by latent code: both need generative models that learned the digits.
    # With 2 epochs (62 steps) the CNN read every reconstruction as a 3 or an 8 (clean
    # accuracy 0 on the first 16 test images) and the GMVAE stayed at chance; 30 epochs of
    # the VAE (~12 s) and 20 of the GMVAE (~15 s) reach about 0.7 and 0.8.
    c.train.vae.epochs = 30
    # K = 10 classes need D >= K for orthogonal class means (8 crowds them on a sphere).
    c.model.gmvae = dict(c.model.gmvae, features=(16, 32), hidden=(), latent_dim=16)
    c.train.gmvae = dict(
      c.train.gmvae, epochs=20, batch_size=64, learning_rate=3e-3, augment_shift=0
    )
    d.gmvae.mean_scale = 5.0
    d.gmvae.threshold_examples = 100
    d.num_examples = 64
    d.adversarial.ramp_epochs = 1.0
    d.trades.steps = 2
    d.attacks.update(pgd_steps=5, pgd_step_size_rel=2.5 / 5, restarts=2)
    d.apgd.update(steps=5, target_ranks=2)
    # 5 descent steps leave z near its random start; 50 x 4 (the full run's) cost little.
    d.projection.update(steps=50, restarts=4, attack_steps=3, threshold_examples=100)
    d.projection.num_examples = 16
  return c
