"""Faults lose nothing: NaN/inf in an attack or in training is reported where it happened and
never written as a result."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
from fakedata import make_data_root
from test_main import tiny

from configs import mnist_cnn
from experiments import attacks as attacks_lib
from experiments import keys, store
from experiments import models as models_lib
from experiments import run as run_lib

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
  log = store.ResultsLog(tmp_path / "results.jsonl", keys.RESULT_KEY)
  with pytest.raises(attacks_lib.NonFiniteError) as err:
    attacks_lib.run_all(config, data, trained, log)
  message = str(err.value)
  for attack in ("fgsm", "bim"):
    assert f"model cnn, attack {attack}, eps=0.3: non-finite" in message
    assert f"attack {attack}, eps=0.1" not in message
  assert message.count("non-finite loss in 4/4 pairs") == 2
  rows = [r for r in store.ResultsLog(tmp_path / "results.jsonl", keys.RESULT_KEY).rows]
  assert sorted((r["attack"], r["eps"]) for r in rows) == [("bim", 0.1), ("fgsm", 0.1)]
  for r in rows:
    assert r["mean_target_prob"] is not None and np.isfinite(r["mean_target_prob"])


# ---------------------------------------------------------------------------------------------
# SIGKILL at random points, and determinism, end to end.

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("seconds",)  # wall-clock fields of a results row: the only ones that may differ
KILL_SEED = 0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return make_data_root(root, n_train=256, n_test=64, counts={"A_B": 2}, size=32)


def kill_config(data_root):
  """test_main's tiny MNIST CNN run with 3 epochs (so a kill can land between checkpoints) and
  three attacks (rows are appended at three moments)."""
  c = tiny("mnist_cnn", data_root, attacks=("fgsm", "bim", "pgd_l2"))
  c.train.cnn.epochs = 3
  c.attacks.fgsm.eps = (0.1, 0.3)
  c.attacks.pgd_l2.steps = 2
  c.attacks.pgd_l2.eps = (1.0, 2.0)
  c.output.figures = False
  return c


def _rows(workdir: pathlib.Path) -> list[dict]:
  """Every line of results.jsonl, parsed (a torn or invalid line fails the test)."""
  path = workdir / "results.jsonl"
  if not path.exists():
    return []
  text = path.read_text()
  assert not text or text.endswith("\n"), "results.jsonl ends in a torn line"
  return [json.loads(line) for line in text.splitlines()]


def _steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints" / "cnn"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _without_timing(rows):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _by_key(rows):
  return {tuple(json.dumps(r[k]) for k in keys.RESULT_KEY): r for r in rows}


@pytest.mark.slow
def test_sigkill_at_random_points_loses_and_duplicates_nothing(data_root, tmp_path):
  """Runs `python -m experiments.main` and SIGKILLs it at seeded random moments: during start-up
  and training, right after a training checkpoint, and after 1 and 3 result rows; then reruns
  it to the end. results.jsonl must hold exactly the rows of an uninterrupted run."""
  config = kill_config(data_root)
  ref_dir = tmp_path / "reference"
  run_lib.run(config, str(ref_dir))
  reference = _rows(ref_dir)

  config_file = tmp_path / "kill_config.py"
  config_file.write_text(
    "import pathlib, sys\n"
    f"sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
    "from test_faults import kill_config\n\n\n"
    "def get_config(arg=None):\n"
    f"  return kill_config(pathlib.Path({str(data_root)!r}))\n"
  )
  workdir = tmp_path / "killed"
  rng = np.random.default_rng(KILL_SEED)
  # (what must have happened since this attempt started, extra seeded random delay in s)
  triggers = [
    ("start", lambda s, r: True, rng.uniform(1.0, 4.0)),
    ("checkpoint", lambda s, r: _steps(workdir) != s, rng.uniform(0.0, 0.5)),
    ("row", lambda s, r: len(_rows(workdir)) >= r + 1, rng.uniform(0.0, 0.3)),
    ("rows", lambda s, r: len(_rows(workdir)) >= r + 2, rng.uniform(0.0, 0.3)),
  ]
  kills, attempts, log = [], 0, tmp_path / "stderr.txt"
  for name, ready, delay in [*triggers, ("none", None, None)]:
    steps0, rows0 = _steps(workdir), len(_rows(workdir))
    attempts += 1
    with open(log, "ab") as err:
      proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.main", f"--config={config_file}",
         f"--workdir={workdir}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
      )  # fmt: skip
    if ready is not None:
      while proc.poll() is None and not ready(steps0, rows0):
        time.sleep(0.02)
      time.sleep(delay)
    if ready is not None and proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      saved, written = _steps(workdir), len(_rows(workdir))
      kills.append(f"{name}+{delay:.2f}s: epochs saved {saved}, rows {written}")
    else:
      assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
      break
  rows = _rows(workdir)
  print(f"\nkill test: {len(kills)} runs killed with SIGKILL, {attempts} runs in all:")
  print("\n".join(f"  killed at {k}" for k in kills))
  print(f"  {len(rows)} rows compared with an uninterrupted run's {len(reference)}")
  assert len(kills) >= 3  # the test really interrupted the run
  assert len(rows) == len(_by_key(rows)) == len(reference)  # none lost, none duplicated
  assert _by_key(_without_timing(rows)) == _by_key(_without_timing(reference))
  for path in workdir.rglob("*.json"):
    if not path.name.startswith("."):  # .tmp names are a write in flight, never read
      json.loads(path.read_text())
  assert json.loads((workdir / "train_metrics.json").read_text())["cnn"]["epochs"] == 3


@pytest.mark.slow
def test_same_config_and_seed_give_identical_results_across_reruns_and_chunk_sizes(
  data_root, tmp_path
):
  """Two fresh runs of one config, and a third whose attacks run in chunks of 3 pairs (4 pairs:
  a full chunk and a padded one) instead of one chunk from the memory budget: identical
  results.jsonl apart from the wall-clock `seconds`. Exactly identical, not close: the
  attack's randomness is fold_in(key, pair index), the per-pair metrics run in blocks of a
  fixed size (runner.MEASURE_BLOCK; before that, SSIM computed over a chunk of 3 and of 4
  pairs differed in the last bit) and the statistics are reduced on the host in pair order.
  The attack itself gave bit-identical results at both chunk sizes here; XLA may in principle
  round another batch shape differently."""
  config = tiny("mnist_cnn", data_root, attacks=("fgsm", "pgd_l2"))  # pgd_l2: a random start
  config.attacks.fgsm.eps = (0.1, 0.3)
  config.attacks.pgd_l2.steps = 2
  config.attacks.pgd_l2.eps = (1.0, 2.0)
  config.output.figures = False
  run_lib.run(config, str(tmp_path / "a"))
  run_lib.run(config, str(tmp_path / "b"))
  chunked = tmp_path / "chunked"
  chunked.mkdir()
  for name in ("config.json", "checkpoints"):  # the same trained CNN (run b shows training is)
    copy = shutil.copytree if name == "checkpoints" else shutil.copy
    copy(tmp_path / "a" / name, chunked / name)
  config.attacks.chunk_size = 3
  run_lib.run(config, str(chunked))
  a, b, c = (_rows(tmp_path / d) for d in ("a", "b", "chunked"))
  assert len(a) == 4 and {r["attack"] for r in a} == {"fgsm", "pgd_l2"}
  assert _without_timing(b) == _without_timing(a)
  metrics = [json.loads((tmp_path / d / "train_metrics.json").read_text()) for d in "ab"]
  assert (
    metrics[0]["cnn"]["history"][-1]["train_loss"] == metrics[1]["cnn"]["history"][-1]["train_loss"]
  )
  # chunk_size changes no number, so it is not part of a row's settings hash either: the
  # chunked run's rows are the same rows, field for field.
  assert _without_timing(c) == _without_timing(a)
