"""Faults lose nothing: NaN/inf in an attack or in training is reported where it happened and
never written as a result."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist_cnn
from experiments import attacks as attacks_lib
from experiments import models as models_lib
from experiments import run as run_lib
from experiments import store

SHAPE = (28, 28, 1)


def _linear(params, x):
  return jnp.ravel(x) @ params["w"] + params["b"]


def blows_up_far_from_grey(params, x):
  """A linear classifier whose logits are NaN once any pixel is more than 0.2 from 0.5 grey."""
  far = jnp.max(jnp.abs(x - 0.5)) > 0.2
  return jnp.where(far, jnp.nan, 1.0) * _linear(params, x)


def test_non_finite_attack_point_is_reported_and_not_written(tmp_path):
  """FGSM and BIM move pixels of a grey image by up to eps: at eps 0.1 the model is finite, at
  0.3 its logits are NaN. The 0.1 rows are written; the 0.3 rows are not, and the error names
  the model, attack, eps and quantity (here the loss: XLA's fused softmax happens to return a
  finite probability from NaN logits, which is why every quantity is checked)."""
  config = mnist_cnn.get_config("quick")
  config.attacks.enabled = ("fgsm", "bim")
  config.attacks.fgsm.eps = (0.1, 0.3)
  config.attacks.bim.eps = (0.1, 0.3)
  config.attacks.bim.steps = 1
  config.attacks.bim.step_size_rel = 1.0
  config.attacks.num_pairs = 4
  config.attacks.only_correct = False
  config.attacks.shard = False
  rng = np.random.default_rng(0)
  n = 8
  data = types.SimpleNamespace(
    name="mnist",
    x_test=(0.5 + rng.uniform(-0.01, 0.01, (n, *SHAPE))).astype(np.float32),
    y_test=np.arange(n) % 10,
    class_names=[str(i) for i in range(10)],
  )
  params = {
    "w": jnp.asarray(rng.normal(size=(784, 10)), jnp.float32),
    "b": jnp.zeros(10, jnp.float32),
  }
  trained = {"cnn": models_lib.Trained("cnn", "classifier", blows_up_far_from_grey, params,
                                       None, {})}  # fmt: skip
  log = store.ResultsLog(tmp_path / "results.jsonl", run_lib.RESULT_KEY)
  with pytest.raises(attacks_lib.NonFiniteError) as err:
    attacks_lib.run_all(config, data, trained, log)
  message = str(err.value)
  for attack in ("fgsm", "bim"):
    assert f"model cnn, attack {attack}, eps=0.3: non-finite" in message
    assert f"attack {attack}, eps=0.1" not in message
  assert message.count("non-finite loss in 4/4 pairs") == 2
  rows = [r for r in store.ResultsLog(tmp_path / "results.jsonl", run_lib.RESULT_KEY).rows]
  assert sorted((r["attack"], r["eps"]) for r in rows) == [("bim", 0.1), ("fgsm", 0.1)]
  for r in rows:
    assert r["mean_target_prob"] is not None and np.isfinite(r["mean_target_prob"])
