"""Training: loss goes down on separable toy data, checkpoints resume exactly and are reused."""

import functools
import re
import types

import chex
import fakedata
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_attacks import models, train

DATA = fakedata.toy_data()
CNN = models.CNN(3, features=(4,), dense=(16,))
CNN_INIT = fakedata.numpy_init(CNN, DATA.x_train[:1])
VAE = models.MLPVAE((8, 8, 1), 2, hidden=(32,))
VAE_INIT = fakedata.numpy_init(VAE, DATA.x_train[:1], jax.random.key(0))


def _fit_cnn(key, epochs, checkpoint_dir=None, **settings):
  return train.train_classifier(
    CNN,
    DATA,
    key=key,
    settings=train.TrainSettings(epochs=epochs, batch_size=16, learning_rate=1e-2, **settings),
    init_params=CNN_INIT,
    checkpoint_dir=checkpoint_dir,
  )


@pytest.fixture(scope="module")
def cnn_run():
  """Four epochs straight, shared by the tests below (each training run compiles a step)."""
  return _fit_cnn(jax.random.key(0), 4)


@pytest.fixture(scope="module")
def vae_run():
  return train.train_vae(
    VAE,
    DATA,
    key=jax.random.key(0),
    settings=train.TrainSettings(epochs=4, batch_size=16, learning_rate=1e-2),
    init_params=VAE_INIT,
  )


def test_classifier_learns_separable_toy_data(cnn_run):
  params, metrics = cnn_run
  history = metrics["history"]
  assert [h["epoch"] for h in history] == [1, 2, 3, 4]
  assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
  assert metrics["test_accuracy"] == 1.0
  # the reported accuracy is the per-example logits function's accuracy
  logits = jax.jit(jax.vmap(models.classifier_fns(CNN), in_axes=(None, 0)))(params, DATA.x_test)
  assert np.mean(np.argmax(logits, -1) == DATA.y_test) == metrics["test_accuracy"]
  assert metrics["reused_checkpoint"] is False and metrics["epochs"] == 4


def test_vae_beats_the_uniform_decoder_and_improves(vae_run):
  _, metrics = vae_run
  history = metrics["history"]
  assert history[-1]["test_neg_elbo_nats"] < history[0]["test_neg_elbo_nats"]
  # a decoder that ignores z and outputs 1/2 costs log 2 per pixel, before any KL
  assert metrics["test_neg_elbo_nats"] < 64 * np.log(2)
  np.testing.assert_allclose(
    metrics["test_neg_elbo_nats"], metrics["test_recon_nats"] + metrics["test_kl_nats"], rtol=1e-6
  )


def test_latent_classifier_uses_the_frozen_encoder(key, vae_run):
  # The classifier sees the images only through the frozen encoder's 2-d mean code.
  vae_params, _ = vae_run
  clf = models.LatentClassifier(3, hidden=(16,))
  params, metrics = train.train_latent_classifier(
    VAE,
    vae_params,
    clf,
    DATA,
    key=key,
    settings=train.TrainSettings(epochs=6, batch_size=16, learning_rate=2e-2),
  )
  chex.assert_trees_all_equal(params["vae"], vae_params)
  logits_fn = models.latent_classifier_fn(VAE, clf)
  logits = jax.jit(jax.vmap(logits_fn, in_axes=(None, 0)))(params, DATA.x_test)
  accuracy = np.mean(np.argmax(logits, -1) == DATA.y_test)
  np.testing.assert_allclose(accuracy, metrics["test_accuracy"])
  assert accuracy > 1 / 3 + 0.3  # far above chance (1/3) on 48 test points


def test_resume_from_checkpoint_equals_an_uninterrupted_run(cnn_run, tmp_path):
  key = jax.random.key(0)
  straight, _ = cnn_run
  ckpt = str(tmp_path / "run")
  _, first = _fit_cnn(key, 2, checkpoint_dir=ckpt)
  resumed, metrics = _fit_cnn(key, 4, checkpoint_dir=ckpt)
  assert first["resumed_from_epoch"] == 0 and metrics["resumed_from_epoch"] == 2
  assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
  chex.assert_trees_all_equal(resumed, straight)

  # a finished run is reused: no training happens and the same parameters come back
  again, reused = _fit_cnn(key, 4, checkpoint_dir=ckpt)
  assert reused["reused_checkpoint"] is True and reused["train_seconds"] == 0.0
  chex.assert_trees_all_equal(again, straight)
  assert reused["test_accuracy"] == metrics["test_accuracy"]

  # keeps at most two checkpoints
  assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["3", "4"]

  # a checkpoint made with other hyper-parameters is not silently resumed
  with pytest.raises(ValueError, match="checkpoint"):
    _fit_cnn(key, 4, checkpoint_dir=ckpt, augment_shift=1)


def test_cosine_schedule_refuses_a_different_run_length(key, tmp_path):
  ckpt = str(tmp_path / "cos")
  init = jax.tree.map(jnp.asarray, CNN_INIT)
  train.train_classifier(
    CNN, DATA, key=key, checkpoint_dir=ckpt, init_params=init,
    settings=train.TrainSettings(epochs=1, batch_size=16, learning_rate=1e-2, lr_schedule="cosine"),
  )  # fmt: skip
  # the caller's starting arrays survive (the jitted step donates only its own copy)
  chex.assert_trees_all_equal(init, CNN_INIT)
  with pytest.raises(ValueError, match="checkpoint"):
    _fit_cnn(key, 2, checkpoint_dir=ckpt, lr_schedule="cosine")


def test_augment_image_is_a_flip_and_an_edge_padded_translation(key):
  x = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2)
  chex.assert_trees_all_equal(train.augment_image(key, x, flip=False, max_shift=0), x)
  s = 2
  padded = np.pad(x, ((s, s), (s, s), (0, 0)), mode="edge")
  windows = [padded[i : i + 5, j : j + 6] for i in range(2 * s + 1) for j in range(2 * s + 1)]
  windows += [w[:, ::-1] for w in windows]
  augment = jax.jit(lambda k: train.augment_image(k, x, flip=True, max_shift=s))
  outs = [np.asarray(augment(jax.random.fold_in(key, i))) for i in range(8)]
  for out in outs:
    assert any(np.array_equal(out, w) for w in windows)
  assert len({o.tobytes() for o in outs}) > 1


def test_augment_batch_augments_each_image_of_any_leading_shape_with_its_own_key(key):
  augment = functools.partial(train.augment_image, flip=True, max_shift=2)
  x = jax.random.uniform(key, (3, 4, 5, 6, 2))  # per-class rows [B, K, H, W, C]
  out = np.asarray(train.augment_batch(augment, key, x))
  keys = jax.random.split(key, 12)
  loop = [augment(keys[4 * b + k], x[b, k]) for b in range(3) for k in range(4)]
  np.testing.assert_array_equal(out, np.stack(loop).reshape(x.shape))
  # a plain batch is augmented as before: vmap over split(key, B)
  flat = x.reshape(12, 5, 6, 2)
  np.testing.assert_array_equal(
    np.asarray(train.augment_batch(augment, key, flat)),
    np.asarray(jax.vmap(augment)(keys, flat)),
  )


def test_make_optimizer_rejects_unknown_schedule():
  with pytest.raises(ValueError, match="lr_schedule"):
    train.make_optimizer(learning_rate=1e-3, total_steps=10, lr_schedule="linear")


def test_non_finite_epoch_is_an_error_and_never_checkpointed(key, tmp_path):
  ckpt = str(tmp_path / "nan")
  _fit_cnn(key, 1, checkpoint_dir=ckpt)
  x_train = DATA.x_train.copy()
  x_train[5, 0, 0, 0] = np.nan  # one bad pixel: every parameter is NaN after its step
  poisoned = types.SimpleNamespace(**{**vars(DATA), "x_train": x_train})
  with pytest.raises(train.NonFiniteError) as err:
    train.train_classifier(
      CNN, poisoned, key=key, init_params=CNN_INIT, checkpoint_dir=ckpt,
      settings=train.TrainSettings(epochs=2, batch_size=16, learning_rate=1e-2),
    )  # fmt: skip
  # The parameters are NaN while the losses may look finite: XLA's CPU max (ReLU) drops NaN.
  message = str(err.value)
  assert f"classifier ({ckpt}): non-finite" in message
  assert "parameters at epoch 2/2" in message
  assert "keeps epoch 1" in message
  # epoch 2 was not saved: a rerun on good data resumes from the finite epoch 1
  assert sorted(p.name for p in (tmp_path / "nan").iterdir() if p.name.isdigit()) == ["1"]
  _, metrics = _fit_cnn(key, 2, checkpoint_dir=ckpt)
  assert metrics["resumed_from_epoch"] == 1 and np.isfinite(metrics["test_loss"])


def test_checkpoint_of_another_model_or_corrupt_is_named_not_a_traceback(key, tmp_path):
  ckpt = tmp_path / "other"
  _fit_cnn(key, 1, checkpoint_dir=str(ckpt))
  wider = models.CNN(3, features=(8,), dense=(16,))  # other parameter shapes
  with pytest.raises(train.CheckpointError, match=f"checkpoint {ckpt} was made for another model"):
    train.train_classifier(
      wider, DATA, key=key, settings=train.TrainSettings(1, 16), checkpoint_dir=str(ckpt)
    )
  # Same hyper-parameters but unreadable parameter files (a copied or damaged folder).
  for f in (ckpt / "1" / "state").rglob("*"):
    if f.is_file() and f.name != "_METADATA":
      f.write_bytes(b"not a tensorstore chunk")
  with pytest.raises(train.CheckpointError, match=f"saved in {ckpt} .step 1. do not fit"):
    _fit_cnn(key, 1, checkpoint_dir=str(ckpt))


def test_settings_come_from_a_config_section_and_refuse_a_misspelt_field():
  section = dict(epochs=3, batch_size=8, lr_schedule="cosine", margin=0.2)
  s = train.TrainSettings.from_config(section, extra=("margin",))
  assert s == train.TrainSettings(epochs=3, batch_size=8, lr_schedule="cosine")
  assert s.hparams()["schedule_epochs"] == 3 and s.steps_per_epoch(20) == 2
  with pytest.raises(ValueError, match="margin"):
    train.TrainSettings.from_config(section)


def test_vae_checkpoints_written_without_weight_decay_or_augmentation_resume(key, tmp_path):
  # A VAE's checkpoint recorded no weight_decay / augment_* before every trainer took
  # TrainSettings: at their defaults they equal their absence.
  ckpt = str(tmp_path / "vae")
  settings = train.TrainSettings(epochs=1, batch_size=16, learning_rate=1e-2)
  train.train_vae(VAE, DATA, key=key, settings=settings, init_params=VAE_INIT, checkpoint_dir=ckpt)
  import orbax.checkpoint as ocp  # noqa: PLC0415

  with ocp.CheckpointManager(ckpt, item_names=("state", "meta")) as manager:
    meta = manager.restore(1, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  assert meta["hparams"]["weight_decay"] == 0.0
  _, again = train.train_vae(
    VAE, DATA, key=key, settings=settings, init_params=VAE_INIT, checkpoint_dir=ckpt
  )
  assert again["reused_checkpoint"] is True
  with pytest.raises(train.CheckpointError, match="differs in: weight_decay"):
    train.train_vae(
      VAE, DATA, key=key, settings=settings._replace(weight_decay=0.1), checkpoint_dir=ckpt
    )


def test_a_checkpoint_from_before_a_module_gained_a_field_resumes_at_its_default(key, tmp_path):
  # genclf.ABSVAE gained `batch_norm` (default False) after checkpoints were written with a
  # repr that lacks it: at False the line equals its absence; at True it is another model.
  from vae_attacks import genclf  # noqa: PLC0415

  def run(model_repr, epochs=1):
    loss = lambda params, x, y, k: (jnp.mean((x - params["w"][None]) ** 2), {})
    return train.fit(
      loss, DATA.x_train, DATA.y_train, name="toy", init=lambda: {"w": jnp.zeros((8, 8, 1))},
      evaluate=lambda params: {}, key=key, settings=train.TrainSettings(epochs, 16),
      hparams={"model": model_repr}, checkpoint_dir=str(tmp_path / "ckpt"),
    )  # fmt: skip

  now = repr(genclf.ABSVAE(image_shape=(8, 8, 1), latent_dim=2, hidden=(4,)))
  assert "    batch_norm = False\n" in now
  before = now.replace("    batch_norm = False\n", "")
  first_params, _ = run(before)
  params, metrics = run(now)
  assert metrics["reused_checkpoint"] is True
  chex.assert_trees_all_equal(params, first_params)
  _, metrics = run(now, epochs=2)  # and a partial run resumes from it
  assert metrics["resumed_from_epoch"] == 1
  # Another model is refused, the error naming the lines that differ.
  for field, value in (("batch_norm", "True"), ("latent_dim", "3")):
    other = re.sub(rf"{field} = .*", f"{field} = {value}", now)
    with pytest.raises(train.CheckpointError, match=f"differs in: model.*'{field} = {value}' here"):
      run(other, epochs=2)
