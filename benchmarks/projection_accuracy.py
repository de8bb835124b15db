"""Is the projection defence's generator good enough? (issue 18, item 2)

  python -m benchmarks.projection_accuracy                       # configs/mnist_defenses.py
  python -m benchmarks.projection_accuracy --latent_dim=64 --epochs=50 --n=1000

Trains the MLP VAE of configs/mnist_defenses.py (the projection's generator; `--latent_dim`,
`--epochs` override its sections), imports the study's MNIST CNN from its committed record
(`--cnn_record`, default results/study/mnist_vae), and prints, on the first `--n` test
images: the CNN's accuracy on the VAE's reconstructions (encoder mean, decoded) and on the
Defense-GAN projections with the config's L, R and learning rate (`projection.
ProjectedClassifier`, the deployed defence without its rejection), with the seconds of
training and of projecting. Data from `vae_attacks.data.load` ($VAE_ATTACKS_DATA_DIR
offline). Nothing is written.

Measured (2026-12-06, seventh session, 2-core CPU shared with two other runs; the default
command): the config's generator (latent 32, 20 epochs, -ELBO 99.97 nats; training 208 s),
first 500 test images: the CNN on reconstructions 0.974, on projections 0.988 (34 s for the
500 projections).
"""

import json
import pathlib
import time

import jax
import numpy as np
from absl import app, flags

from configs import mnist_defenses
from experiments import models as models_lib
from vae_attacks import data, models
from vae_attacks.attacks import runner
from vae_attacks.defenses import projection

_N = flags.DEFINE_integer("n", 500, "first test images evaluated")
_LATENT = flags.DEFINE_integer("latent_dim", 0, "the VAE's latent size (0: the config's)")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "the VAE's training epochs (0: the config's)")
_RECORD = flags.DEFINE_string(
  "cnn_record", "results/study/mnist_vae", "committed record holding params/cnn.msgpack"
)


def main(argv) -> None:
  del argv
  c = mnist_defenses.get_config()
  if _LATENT.value:
    c.model.mlp_vae.latent_dim = _LATENT.value
  if _EPOCHS.value:
    c.train.vae.epochs = _EPOCHS.value
  ds = data.load({"name": "mnist"})
  record = pathlib.Path(_RECORD.value)
  cnn_model = models_lib.import_committed("cnn", c, ds, record)
  t0 = time.perf_counter()
  vae, vae_params, vae_m = models_lib.train_vae(
    "mlp_vae", c, ds, key=jax.random.key(c.seed), checkpoint_dir=None
  )
  train_s = time.perf_counter() - t0
  classify = models.classifier_fns(models_lib.MODELS["cnn"].build(c.model.cnn, ds))
  x, y = ds.x_test[: _N.value], np.asarray(ds.y_test[: _N.value])
  recon = runner.batched_logits(models.vae_fns(vae).reconstruct, vae_params, x)
  on_recon = runner.batched_logits(classify, cnn_model.params, recon)
  p = c.defenses.projection
  deployed = projection.ProjectedClassifier(
    decode=models.vae_fns(vae).decode, classify=classify,
    latent_dim=int(c.model.mlp_vae.latent_dim), steps=int(p.steps), restarts=int(p.restarts),
    learning_rate=float(p.learning_rate), seed=int(c.seed), gradient="bpda",
  )  # fmt: skip
  t1 = time.perf_counter()
  projected = runner.batched_logits(deployed, {"decoder": vae_params, "clf": cnn_model.params}, x)
  project_s = time.perf_counter() - t1
  print(json.dumps(dict(
    n=int(len(y)), latent_dim=int(c.model.mlp_vae.latent_dim), epochs=int(c.train.vae.epochs),
    test_neg_elbo_nats=vae_m.get("test_neg_elbo_nats"),
    cnn_on_reconstructions=float(np.mean(np.argmax(on_recon, -1) == y)),
    cnn_on_projections=float(np.mean(np.argmax(projected, -1) == y)),
    train_seconds=round(train_s, 1), project_seconds=round(project_s, 1),
  )))  # fmt: skip


if __name__ == "__main__":
  app.run(main)
