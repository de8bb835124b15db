"""Trains the study's models on the real data and prints accuracy, -ELBO and timings.

  python -m benchmarks.train_real --dataset=mnist
  python -m benchmarks.train_real --dataset=lfw --models=cnn
  python -m benchmarks.train_real --dataset=mnist --models=cnn --config.mnist.cnn.train.epochs=4

The settings below are the ones measured for the report (see the table each run prints);
`--config.<dataset>.<model>.<section>.<field>=value` overrides any of them. Data come from
`vae_attacks.data.load` (the local originals under --data_dir, default $VAE_ATTACKS_DATA_DIR).
Nothing is written unless --checkpoint_root is given (then a killed run resumes exactly).

Measured with these settings and seed 0 (jax 0.10.2, the 2-core CPU shared with other jobs at
load average 3-11, so wall times are 2-4x an idle machine's; CPU seconds are the steadier
number):
  mnist cnn               99.43 % test accuracy, 8 epochs,  559 CPU-s (1877 s wall at load ~9)
  mnist mlp_vae           -ELBO 99.91 nats (76.46 recon + 23.46 KL), 20 epochs, 256 CPU-s
    latent classifier     98.30 % (dropout 0.3; 98.13 % without)
  mnist conv_vae          -ELBO 104.58 nats (76.30 + 28.28), 10 epochs, ~750 CPU-s
    latent classifier     98.39 %
  lfw cnn                 94.10 % (prior 41 %), 60 epochs, 465 CPU-s (1712 s wall at load ~8-11)
  lfw conv_vae            -ELBO 41440.92 nats (41198.22 + 242.70) per 154x154x3 image, 30 epochs
    latent classifier     81.68 % (dropout 0.5; 78.88 % without)
"""

import os
import time

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from vae_attacks import data, models, train

MODELS = ("cnn", "mlp_vae", "conv_vae")


def _settings() -> ml_collections.ConfigDict:
  """The measured settings (results in the module docstring)."""
  c = ml_collections.ConfigDict()
  c.mnist = dict(
    cnn=dict(
      model=dict(features=(32, 64), dense=(128,)),
      train=dict(
        epochs=8,
        batch_size=64,
        learning_rate=2e-3,
        lr_schedule="cosine",
        augment_shift=2,
      ),
    ),
    mlp_vae=dict(
      model=dict(latent_dim=32, hidden=(512, 256)),
      train=dict(epochs=20, batch_size=128, learning_rate=1e-3, lr_schedule="cosine"),
      clf_model=dict(hidden=(256, 128), dropout_rate=0.3),
      clf_train=dict(epochs=30, batch_size=128, learning_rate=1e-3, lr_schedule="cosine"),
    ),
    conv_vae=dict(
      model=dict(latent_dim=32, features=(32, 64), hidden=()),
      train=dict(epochs=10, batch_size=128, learning_rate=1e-3, lr_schedule="cosine"),
      clf_model=dict(hidden=(256, 128), dropout_rate=0.0),
      clf_train=dict(epochs=30, batch_size=128, learning_rate=1e-3, lr_schedule="cosine"),
    ),
  )
  c.lfw = dict(
    cnn=dict(
      model=dict(features=(16, 32, 64, 128), dense=(128,), stem_stride=2, dropout_rate=0.3),
      train=dict(
        epochs=60,
        batch_size=32,
        learning_rate=2e-3,
        weight_decay=1e-4,
        lr_schedule="cosine",
        augment_flip=True,
        augment_shift=8,
      ),
    ),
    mlp_vae=dict(  # not measured: its first layer alone has 154 * 154 * 3 * 1024 = 73M weights
      model=dict(latent_dim=64, hidden=(1024, 512)),
      train=dict(epochs=40, batch_size=32, learning_rate=1e-3, lr_schedule="cosine"),
      clf_model=dict(hidden=(256, 128), dropout_rate=0.5),
      clf_train=dict(epochs=60, batch_size=32, learning_rate=1e-3, lr_schedule="cosine"),
    ),
    conv_vae=dict(
      model=dict(latent_dim=128, features=(8, 16, 32, 64), hidden=()),
      train=dict(epochs=30, batch_size=32, learning_rate=1e-3, lr_schedule="cosine"),
      clf_model=dict(hidden=(256, 128), dropout_rate=0.5),
      clf_train=dict(epochs=60, batch_size=32, learning_rate=1e-3, lr_schedule="cosine"),
    ),
  )
  return c


flags.DEFINE_enum("dataset", "mnist", ("mnist", "lfw"), "Data set.")
flags.DEFINE_list("models", ["cnn", "mlp_vae"], f"Models to train, from {MODELS}.")
flags.DEFINE_string("data_dir", os.environ.get(data.DATA_ENV, ""), "Folder of the real data.")
flags.DEFINE_string("checkpoint_root", "", "If set, checkpoints go to <root>/<dataset>_<model>.")
flags.DEFINE_integer("seed", 0, "Seed of every run.")
flags.DEFINE_integer("max_train", 0, "Use only this many training examples (0 = all).")
config_flags.DEFINE_config_dict("config", _settings())
FLAGS = flags.FLAGS


def _timed(fn, *args, **kwargs):
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - wall, time.process_time() - cpu


def _checkpoint(model: str, part: str) -> str | None:
  if not FLAGS.checkpoint_root:
    return None
  return os.path.join(FLAGS.checkpoint_root, f"{FLAGS.dataset}_{model}", part)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  if not FLAGS.data_dir:
    raise app.UsageError(f"set --data_dir or {data.DATA_ENV}")
  ds, load_s, _ = _timed(
    data.load, {"name": FLAGS.dataset, "dir": FLAGS.data_dir, "max_train": FLAGS.max_train}
  )
  num_classes = len(ds.class_names)
  image_shape = tuple(ds.x_train.shape[1:])
  print(
    f"{FLAGS.dataset}: train {ds.x_train.shape}, test {ds.x_test.shape}, {num_classes} classes, "
    f"loaded in {load_s:.1f} s; jax {jax.__version__} on {jax.devices()[0].platform}, "
    f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
    flush=True,
  )
  settings = FLAGS.config[FLAGS.dataset]
  key = jax.random.key(FLAGS.seed)
  rows = []
  for name in FLAGS.models:
    if name not in MODELS:
      raise app.UsageError(f"unknown model {name!r}; choose from {MODELS}")
    s = settings[name]
    train_settings = train.TrainSettings.from_config(s.train)
    if name == "cnn":
      model = models.CNN(num_classes, **s.model)
      (params, m), wall, cpu = _timed(
        train.train_classifier, model, ds, key=key, settings=train_settings,
        checkpoint_dir=_checkpoint(name, "cnn"),
      )  # fmt: skip
      rows.append((name, models.param_count(params), m, wall, cpu, "test_accuracy"))
      continue
    cls = models.MLPVAE if name == "mlp_vae" else models.ConvVAE
    vae = cls(image_shape=image_shape, **s.model)
    vae_key, clf_key = jax.random.split(key)
    (vae_params, m), wall, cpu = _timed(
      train.train_vae, vae, ds, key=vae_key, settings=train_settings,
      checkpoint_dir=_checkpoint(name, "vae"),
    )  # fmt: skip
    rows.append((name, models.param_count(vae_params), m, wall, cpu, "test_neg_elbo_nats"))
    clf = models.LatentClassifier(num_classes, **s.clf_model)
    (params, m), wall, cpu = _timed(
      train.train_latent_classifier,
      vae,
      vae_params,
      clf,
      ds,
      key=clf_key,
      settings=train.TrainSettings.from_config(s.clf_train),
      checkpoint_dir=_checkpoint(name, "latent_classifier"),
    )
    rows.append(
      (f"{name} latent clf", models.param_count(params["clf"]), m, wall, cpu, "test_accuracy")
    )

  print()
  print(f"{FLAGS.dataset} (load average now {os.getloadavg()[0]:.1f})")
  header = (
    f"{'model':<22}{'params':>10}{'epochs':>8}{'metric':>22}{'value':>12}"
    f"{'train s':>10}{'compile s':>11}{'wall s':>9}{'cpu s':>9}{'ex/s':>8}"
  )
  print(header)
  print("-" * len(header))
  for name, count, m, wall, cpu, metric in rows:
    print(
      f"{name:<22}{count:>10,}{m['epochs']:>8}{metric:>22}{m[metric]:>12.4f}"
      f"{m['train_seconds']:>10.1f}{m['compile_seconds']:>11.1f}{wall:>9.1f}{cpu:>9.1f}"
      f"{m['examples_per_second']:>8.0f}"
    )
  for name, _, m, *_ in rows:
    if "test_recon_nats" in m:
      print(f"{name}: recon {m['test_recon_nats']:.2f} + KL {m['test_kl_nats']:.2f} nats")


if __name__ == "__main__":
  app.run(main)
