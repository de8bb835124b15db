"""The class-conditional VAE's clean MNIST accuracy under variants of its recipe (issue 19).

  python -m benchmarks.cvae_accuracy                          # the study's settings
  python -m benchmarks.cvae_accuracy --config.model.likelihood=bernoulli
  python -m benchmarks.cvae_accuracy --config.train.augment_shift=2 --config.samples="(10,)"
  python -m benchmarks.cvae_accuracy "--config.model.features=(64,64,64)" \
    "--config.model.decoder_hidden=(500,)" "--config.model.decoder_features=(64,64,64)"

Trains `genclf.ConditionalVAE` (the model and training sections of configs/study_genclf.py,
with an MLP encoder unless `--config.model.features` says otherwise) on all 60,000 training
images with seed 0, then prints the Bayes classifier's accuracy on all 10,000 test images for
each number of importance samples per class in `samples` (`genclf.cvae_params`, fixed noise of
key 1) and the wall seconds of training and of each evaluation. Data from
`vae_attacks.data.load` ($VAE_ATTACKS_DATA_DIR offline). Nothing is written.

Measured (2026-12-06, the 2-core CPU shared with three or four other runs, so the seconds are
long), 30 epochs, MLP encoder (500) then (500) after y joins, decoder (500, 1024), learned
prior p(z | y) (these defaults): the "l2" likelihood (Li et al.'s) with 2-pixel shifts 0.9815
(S = 10); the Bernoulli likelihood 0.9822 with S = 10 and 0.9849 with S = 100. (An earlier
session, configs/study_genclf.py's note: 0.9829 with the l2 likelihood, S = 10.)
"""

import time

import jax
import ml_collections
import numpy as np
from absl import app
from ml_collections import config_flags

from configs import study_genclf
from experiments import hostmem
from vae_attacks import data, genclf, train
from vae_attacks.attacks import runner


def _settings() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  model = dict(study_genclf.CVAE_MODEL)
  model.pop("num_samples")
  c.model = dict(model, features=(), feature_hidden=(500,), decoder_features=())
  c.train = dict(study_genclf.GENCLF_TRAIN, epochs=30)
  c.samples = (10, 100)
  return c


_CONFIG = config_flags.DEFINE_config_dict("config", _settings())


def main(argv) -> None:
  del argv
  hostmem.keep_freed_memory()
  c = _CONFIG.value
  ds = data.load({"name": "mnist"})
  vae = genclf.ConditionalVAE(image_shape=ds.x_train.shape[1:], num_classes=10, **c.model)
  t0 = time.perf_counter()
  params, _ = train.train_cvae(
    vae, ds, key=jax.random.PRNGKey(0), settings=train.TrainSettings(**c.train),
    num_samples=int(min(c.samples)),
  )  # fmt: skip
  print(f"model {dict(c.model)}\ntrain {dict(c.train)}: {time.perf_counter() - t0:.0f} s")
  logits_fn = genclf.cvae_logits_fn(vae)
  print(f"{'S':>5}{'test accuracy':>15}{'seconds':>9}")
  for s in c.samples:
    t0 = time.perf_counter()
    p = genclf.cvae_params(params, jax.random.PRNGKey(1), num_samples=int(s),
                           latent_dim=vae.latent_dim)  # fmt: skip
    acc = float(np.mean(np.argmax(runner.batched_logits(logits_fn, p, ds.x_test), -1) == ds.y_test))
    print(f"{s:>5}{acc:>15.4f}{time.perf_counter() - t0:>9.0f}")


if __name__ == "__main__":
  app.run(main)
