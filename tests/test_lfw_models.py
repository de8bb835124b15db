"""The LFW study's additions: the jointly trained VAE, the accuracy-matched stop, exported and
imported parameters (checked against the record), and LFW in grey."""

import hashlib
import json
import pathlib

import fakedata
import jax
import numpy as np
import pytest

from experiments import models as models_lib
from experiments.errors import UserError
from vae_attacks import data as data_lib
from vae_attacks import models, train

DATA = fakedata.toy_data()


def _settings(epochs, **kw):
  return train.TrainSettings(epochs=epochs, batch_size=16, learning_rate=1e-2, **kw)


def test_stop_at_accuracy_ends_at_the_first_epoch_reaching_it_and_a_rerun_reuses_it(tmp_path):
  cnn = models.CNN(3, features=(4,), dense=(16,))
  full, m_full = train.train_classifier(cnn, DATA, key=jax.random.key(0), settings=_settings(6))
  accs = [h["test_accuracy"] for h in m_full["history"]]
  target = accs[1]  # reached at epoch 2 at the latest
  first = next(i for i, a in enumerate(accs) if a >= target) + 1
  assert first < 6, accs
  settings = _settings(6, stop_at_accuracy=target)
  ckpt = str(tmp_path / "ckpt")
  params, m = train.train_classifier(
    cnn, DATA, key=jax.random.key(0), settings=settings, checkpoint_dir=ckpt
  )
  assert m["epochs_trained"] == first and m["epochs"] == 6
  assert m["test_accuracy"] >= target
  # the same epochs as the full run (the schedule spans 6 epochs in both)
  for a, b in zip(m["history"], m_full["history"][:first], strict=True):
    assert a["train_loss"] == b["train_loss"] and a["test_accuracy"] == b["test_accuracy"]
  again, m2 = train.train_classifier(
    cnn, DATA, key=jax.random.key(0), settings=settings, checkpoint_dir=ckpt
  )
  assert m2["reused_checkpoint"] and m2["train_seconds"] == 0.0 and m2["epochs_trained"] == first
  chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), params, again)
  assert all(jax.tree.leaves(chex_equal))


def test_epoch_examples_evaluates_and_stops_within_the_first_epoch(tmp_path):
  """An epoch of 32 of the 96 training examples (2 steps): the accuracy is evaluated every 2
  steps, so a target the whole first epoch (6 steps) passes stops the training at the first
  2-step evaluation reaching it, after fewer examples; the schedule's length is in such epochs;
  a checkpoint of whole epochs is not resumed as one of short epochs."""
  cnn = models.CNN(3, features=(4,), dense=(16,))
  assert _settings(1, epoch_examples=32).steps_per_epoch(96) == 2
  assert _settings(1, epoch_examples=1000).steps_per_epoch(96) == 6  # at most the whole set
  _, whole = train.train_classifier(cnn, DATA, key=jax.random.key(0), settings=_settings(1))
  target = whole["history"][0]["test_accuracy"]
  short = _settings(30, epoch_examples=32)
  _, free = train.train_classifier(cnn, DATA, key=jax.random.key(0), settings=short)
  accs = [h["test_accuracy"] for h in free["history"]]
  assert len(accs) == 30
  first = next(i for i, a in enumerate(accs) if a >= target) + 1
  assert first * 32 < 96  # reached before one whole epoch's examples
  ckpt = tmp_path / "ckpt"
  _, m = train.train_classifier(
    cnn, DATA, key=jax.random.key(0), checkpoint_dir=str(ckpt),
    settings=short._replace(stop_at_accuracy=target),
  )  # fmt: skip
  assert m["epochs_trained"] == first  # the first short epoch reaching it, not a later one
  assert [h["test_accuracy"] for h in m["history"]] == accs[:first]
  assert m["test_accuracy"] >= target > max(accs[: first - 1], default=-1.0)
  with pytest.raises(train.CheckpointError, match="epoch_examples"):
    train.train_classifier(
      cnn, DATA, key=jax.random.key(0), checkpoint_dir=str(ckpt),
      settings=_settings(30, stop_at_accuracy=target),
    )  # fmt: skip


def test_joint_vae_learns_to_classify_and_to_reconstruct():
  vae = models.ConvVAE((8, 8, 1), 4, features=(4, 8))
  clf = models.LatentClassifier(3, hidden=(16,))
  params, m = train.train_joint_vae(
    vae, clf, DATA, key=jax.random.key(0), settings=_settings(8), ce_weight=6.4
  )
  hist = m["history"]
  assert m["test_accuracy"] == 1.0  # the toy classes are separable
  # both terms improve: the ELBO is still a VAE's (not given up for the labels)
  assert hist[-1]["test_neg_elbo_nats"] < hist[0]["test_neg_elbo_nats"]
  assert hist[-1]["test_neg_elbo_nats"] < 64 * np.log(2)  # beats the uniform decoder
  # the reported accuracy is that of the attacked function, latent_classifier_fn
  fn = models.latent_classifier_fn(vae, clf)
  logits = jax.vmap(fn, in_axes=(None, 0))(params, DATA.x_test)
  assert np.mean(np.argmax(logits, -1) == DATA.y_test) == m["test_accuracy"]
  # and without the cross-entropy term the same net's latent means are not trained for labels
  _, m0 = train.train_joint_vae(
    vae, clf, DATA, key=jax.random.key(0), settings=_settings(8), ce_weight=0.0
  )
  assert m0["test_loss"] > m["test_loss"]


def _config(models_names=("cnn", "conv_vae")):
  from configs import base  # noqa: PLC0415

  c = base.get_config(dataset="mnist", models=models_names, quick=True)
  c.model.cnn = dict(c.model.cnn, features=(4,), dense=(16,))
  c.model.conv_vae = dict(latent_dim=2, features=(4,), hidden=())
  c.model.latent_classifier = dict(hidden=(8,), dropout_rate=0.0)
  for t in c.train.values():
    t.epochs, t.batch_size = 2, 16
  c.output.export_params = True
  return c


def _data():
  import types  # noqa: PLC0415

  return types.SimpleNamespace(
    x_train=DATA.x_train, y_train=DATA.y_train, x_test=DATA.x_test, y_test=DATA.y_test,
    class_names=("a", "b", "c"),
  )  # fmt: skip


def _write_metrics(workdir, trained):
  metrics = {k: v.metrics for k, v in trained.items()}
  (workdir / "train_metrics.json").write_text(json.dumps(metrics, default=float))


def test_exported_parameters_are_imported_checked_and_attack_the_same_functions(
  tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)  # runs start at the repository root; the record lies below it
  c, data = _config(), _data()
  first = models_lib.train_all(c, data, tmp_path / "a")
  _write_metrics(tmp_path / "a", first)
  exported = sorted(p.name for p in (tmp_path / "a" / "params").iterdir())
  assert exported == ["cnn.msgpack", "conv_vae.msgpack"]
  # A later part on another machine: the record (params + train_metrics.json), no checkpoints.
  record = tmp_path / "b"
  record.mkdir()
  for name in ("params", "train_metrics.json"):
    src = tmp_path / "a" / name
    (record / name).mkdir() if src.is_dir() else None
    if src.is_dir():
      for f in src.iterdir():
        (record / name / f.name).write_bytes(f.read_bytes())
    else:
      (record / name).write_bytes(src.read_bytes())
  # experiments/run.py rewrites train_metrics.json after each model with the models so far:
  # the second import must still find its entry in the record as it was.
  second = models_lib.train_all(c, data, record, on_model=lambda got: _write_metrics(record, got))
  assert not (record / "checkpoints").exists()  # nothing trained
  for name in ("cnn", "conv_vae"):
    a, b = first[name], second[name]
    file = record / "params" / f"{name}.msgpack"
    assert b.metrics["imported_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert b.metrics["imported_from"] == f"b/params/{name}.msgpack"  # no machine's folders
    assert b.metrics["test_accuracy_here"] == a.metrics["test_accuracy"]
    x = np.asarray(data.x_test[:5])
    la = jax.vmap(a.logits_fn, in_axes=(None, 0))(a.params, x)
    lb = jax.vmap(b.logits_fn, in_axes=(None, 0))(b.params, x)
    np.testing.assert_array_equal(la, lb)
  # another part imports from the first (import_params, relative to its workdir)
  c2 = _config(("cnn",))
  c2.import_params = "../b"
  third = models_lib.train_all(c2, data, tmp_path / "c")
  assert third["cnn"].metrics["test_accuracy_here"] == first["cnn"].metrics["test_accuracy"]


def test_imported_parameters_that_do_not_match_the_record_are_refused(tmp_path):
  c, data = _config(("cnn",)), _data()
  first = models_lib.train_all(c, data, tmp_path)
  metrics = {k: dict(v.metrics) for k, v in first.items()}
  import shutil  # noqa: PLC0415

  shutil.rmtree(tmp_path / "checkpoints")
  metrics["cnn"]["test_accuracy"] = first["cnn"].metrics["test_accuracy"] - 0.2
  (tmp_path / "train_metrics.json").write_text(json.dumps(metrics, default=float))
  with pytest.raises(UserError, match=r"cnn: imported parameters .* classify the test set at"):
    models_lib.train_all(c, data, tmp_path)
  c.model.cnn = dict(c.model.cnn, dense=(8,))  # another architecture
  with pytest.raises(UserError, match=r"do not fit config.model.cnn"):
    models_lib.train_all(c, data, tmp_path)
  (tmp_path / "train_metrics.json").write_text("{}")
  with pytest.raises(UserError, match=r"no entry for it in"):
    models_lib.train_all(c, data, tmp_path)


def test_lfw_in_grey_is_the_bt601_luma_of_the_colour_faces(tmp_path):
  root = fakedata.make_lfw_dir(tmp_path / "lfw", counts={"Ann": 4, "Bob": 4}, size=40, seed=0)
  cfg = dict(name="lfw", source="local", dir=str(root), min_faces_per_person=2, crop_size=40,
             image_size=20)  # fmt: skip
  colour = data_lib.load(cfg)
  grey = data_lib.load(dict(cfg, grey=True))
  assert grey.x_train.shape == colour.x_train.shape[:3] + (1,)
  want = 0.299 * colour.x_train[..., 0] + 0.587 * colour.x_train[..., 1]
  want += 0.114 * colour.x_train[..., 2]
  np.testing.assert_allclose(grey.x_train[..., 0], want, atol=1e-6)
  np.testing.assert_array_equal(grey.y_test, colour.y_test)
  with pytest.raises(data_lib.DataError, match="data.grey"):
    data_lib.load(dict(name="mnist", grey=True, dir=str(pathlib.Path(tmp_path))))


def test_each_model_is_reported_as_it_finishes_so_a_stopped_run_keeps_its_record(tmp_path):
  c, data = _config(), _data()
  seen = []
  models_lib.train_all(c, data, tmp_path, on_model=lambda out: seen.append(list(out)))
  assert seen == [["cnn"], ["cnn", "conv_vae"]]
