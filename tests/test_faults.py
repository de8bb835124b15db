"""Faults lose nothing: NaN/inf in an attack or in training is reported where it happened and
never written as a result."""

import errno
import importlib
import json
import os
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
from experiments import keys, report, store
from experiments import models as models_lib
from experiments import run as run_lib
from experiments import workdir as workdir_lib
from experiments.errors import UserError

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


class _Stopped(BaseException):
  """A run stopped from the test (as by a kill) right after a partial sweep was saved."""


@pytest.mark.slow
@pytest.mark.parametrize(
  "name, attack", [("mnist_cnn", "pgd_l2"), ("mnist_vae", "latent_l2")]
)  # fmt: skip
def test_a_sweep_stopped_after_a_chunk_resumes_at_the_next_chunk_with_identical_rows(
  name, attack, data_root, tmp_path, monkeypatch
):
  """Chunks of 2 of 4 pairs; the run is stopped right after `attack`'s first chunk is on disk
  (a classifier attack with a random start; a VAE attack, with its AUDDC curve points). The
  rerun runs that sweep from pair 2 only, and its rows and per-pair records equal those of an
  uninterrupted run; no partial is left."""
  config = tiny(name, data_root, attacks=("fgsm", "pgd_l2"))
  config.attacks.pgd_l2.steps = 2
  config.attacks.pgd_l2.eps = (1.0, 2.0)
  config.attacks.chunk_size = 2
  config.output.figures = False
  ref, resumed = tmp_path / "ref", tmp_path / "resumed"
  run_lib.run(config, str(ref))
  resumed.mkdir()
  for part in ("config.json", "checkpoints"):  # the same trained models
    (shutil.copytree if part == "checkpoints" else shutil.copy)(ref / part, resumed / part)

  save = attacks_lib._Partial.save

  def save_then_stop(self, measures, *args):
    save(self, measures, *args)
    if self.path.name.startswith(f"{attack}_"):
      raise _Stopped

  monkeypatch.setattr(attacks_lib._Partial, "save", save_then_stop)
  with pytest.raises(_Stopped):
    run_lib.run(config, str(resumed))
  (partial,) = (resumed / attacks_lib.PARTIAL_DIR).rglob(f"{attack}_*.npz")
  with np.load(partial) as f:
    assert f["m_success"].shape[1] == 2  # one chunk of two pairs kept
  assert attack not in {r["attack"] for r in _rows(resumed)}

  monkeypatch.setattr(attacks_lib._Partial, "save", save)
  starts = []
  measured = attacks_lib.runner.iter_measured_chunks

  def spy(*args, start=0, **kwargs):
    starts.append(start)
    return measured(*args, start=start, **kwargs)

  monkeypatch.setattr(attacks_lib.runner, "iter_measured_chunks", spy)
  run_lib.run(config, str(resumed))
  assert 2 in starts  # the stopped sweep ran from its second chunk, not from its first
  assert not (resumed / attacks_lib.PARTIAL_DIR).exists()  # nothing left, not even folders
  a, b = _rows(ref), _rows(resumed)
  assert _by_key(_without_timing(b)) == _by_key(_without_timing(a))
  for row in a:
    with np.load(ref / row["record"]) as x, np.load(resumed / row["record"]) as y:
      assert x.files == y.files
      for k in x.files:
        np.testing.assert_array_equal(x[k], y[k], err_msg=f"{row['record']}: {k}")


# ---------------------------------------------------------------------------------------------
# Two writers, a full disk, rows of an older format, non-finite settings, a failed start.


def small_config(data_root):
  """The tiny MNIST CNN run with one attack and no figures: seconds."""
  c = tiny("mnist_cnn", data_root, attacks=("fgsm",))
  c.attacks.fgsm.eps = (0.1, 0.3)
  c.output.figures = False
  return c


def _small_config_file(tmp_path, data_root) -> pathlib.Path:
  path = tmp_path / "small_config.py"
  path.write_text(
    "import pathlib, sys\n"
    f"sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
    "from test_faults import small_config\n\n\n"
    "def get_config(arg=None):\n"
    f"  return small_config(pathlib.Path({str(data_root)!r}))\n"
  )
  return path


def _main(*args) -> list[str]:
  return [sys.executable, "-m", "experiments.main", *map(str, args)]


def _errors(stderr: str) -> list[str]:
  return [x for x in stderr.splitlines() if x.startswith("error: ")]


@pytest.mark.slow
def test_two_runs_started_at_once_one_writes_the_other_stops_naming_it(data_root, tmp_path):
  """Two `experiments.main` on one fresh workdir, started together: one runs to the end, the
  other stops at once (exit 2) with one line naming the holder's pid; every row once."""
  config_file, workdir = _small_config_file(tmp_path, data_root), tmp_path / "w"
  cmd = _main(f"--config={config_file}", f"--workdir={workdir}")
  procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]  # fmt: skip
  outs = [p.communicate(timeout=600)[1] for p in procs]
  codes = [p.returncode for p in procs]
  assert sorted(codes) == [0, 2], outs
  winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
  assert "Traceback" not in outs[loser]
  (line,) = _errors(outs[loser])
  assert line == outs[loser].strip().splitlines()[-1]
  assert f"workdir {workdir} is in use by pid {procs[winner].pid} on " in line
  rows = _rows(workdir)
  assert len(rows) == len(_by_key(rows)) == 2
  assert (workdir / ".lock").read_text() == ""  # released at exit


def test_lock_names_its_holder_and_is_taken_over_from_a_dead_one(data_root, tmp_path, caplog):
  """A held lock refuses a run before it touches the workdir; a lock file left by a process
  that died (SIGKILL: the kernel dropped its flock, its holder line stays) is taken over."""
  wd = tmp_path / "w"
  with workdir_lib.locked(wd) as lock:
    assert f"pid {os.getpid()} on " in lock.read_text()
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"is in use by pid {os.getpid()} on "):
      run_lib.run(small_config(data_root), str(wd))
  assert sorted(p.name for p in wd.iterdir()) == [".lock"]
  dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  dead.kill()
  dead.wait()
  (wd / ".lock").write_text(f"pid {dead.pid} on host, started 2026-01-01T00:00:00+00:00: x\n")
  caplog.set_level("WARNING")
  with workdir_lib.locked(wd):
    pass
  assert any(f"took over the lock left by pid {dead.pid} on host" in m for m in caplog.messages)


def _enospc_on(monkeypatch, match):
  """os.write fails with ENOSPC for files whose path (temporary names included) `match`es."""
  real = os.write

  def write(fd, data):
    if match(os.readlink(f"/proc/self/fd/{fd}")):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd, data)

  monkeypatch.setattr(os, "write", write)


def test_full_disk_at_each_file_is_one_error_naming_it_and_the_rerun_completes(
  data_root, tmp_path, monkeypatch
):
  """ENOSPC injected into the writes of train_metrics.json, the shared pairs (pairs/*.npz), a
  row's per-pair record (records/<model>/*.npz), the second result row, the examples
  (examples/*.npz), a figure and summary.md, one run each on one workdir: each run stops with
  OutOfSpace naming that file and leaves no torn row and no temporary file; a run with space
  again ends with every row once."""
  config = small_config(data_root)
  config.attacks.enabled = ("fgsm", "bim")
  config.output.figures = True
  wd = tmp_path / "w"
  results = str(wd / "results.jsonl")
  appended = []
  real_write = os.write

  def second_row(path):  # the first row goes through, the second does not fit
    if path == results:
      appended.append(path)
      return len(appended) > 1
    return False

  cases = [
    ("train_metrics.json", lambda p: ".train_metrics.json." in p),
    ("pairs/", lambda p: "/pairs/." in p),
    ("records/cnn/", lambda p: "/records/cnn/." in p),
    ("results.jsonl", second_row),
    ("examples/cnn_bim.npz", lambda p: ".cnn_bim.npz." in p),
    ("figures/", lambda p: "/figures/." in p and p.endswith(".tmp")),
    ("summary.md", lambda p: ".summary.md." in p),
  ]
  for name, match in cases:
    _enospc_on(monkeypatch, match)
    with pytest.raises(store.OutOfSpace) as err:
      run_lib.run(config, str(wd))
    monkeypatch.setattr(os, "write", real_write)
    assert str(err.value).startswith(f"out of disk space writing {wd / name}"), name
    assert not [p for p in wd.rglob("*") if p.name.endswith(".tmp")], name
    _rows(wd)  # every line whole
  run_lib.run(config, str(wd))
  rows = _rows(wd)
  assert len(rows) == len(_by_key(rows)) == 4
  assert (wd / "summary.md").exists() and list((wd / "figures").glob("*.png"))


UNSHARE = shutil.which("unshare")


def _can_mount_tmpfs() -> bool:
  if UNSHARE is None:
    return False
  probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"
  return subprocess.run([UNSHARE, "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs")
def test_full_disk_at_a_checkpoint_on_a_real_small_filesystem(data_root, tmp_path):
  """A 120 KiB tmpfs: config.json fits, the CNN's first checkpoint (orbax, ~300 KB) does not.
  The command ends with one line naming the checkpoint folder, exit 2, and leaves no
  half-written checkpoint. (That a rerun with space again completes is shown in-process by
  test_full_disk_at_each_file_is_one_error_naming_it_and_the_rerun_completes.)"""
  config_file, mnt = _small_config_file(tmp_path, data_root), tmp_path / "fs"
  mnt.mkdir()
  workdir = mnt / "w"
  cmd = " ".join(_main(f"--config={config_file}", f"--workdir={workdir}"))
  script = (
    f"mount -t tmpfs -o size=120k tmpfs {mnt} && cd {REPO} && "
    f"{cmd} 2> {tmp_path}/stderr.txt; echo $? > {tmp_path}/rc; "
    f"find {workdir} > {tmp_path}/files.txt"
  )
  subprocess.run([UNSHARE, "-rm", "sh", "-c", script], timeout=600, check=True)
  stderr = (tmp_path / "stderr.txt").read_text()
  assert (tmp_path / "rc").read_text().strip() == "2", stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: out of disk space writing {workdir}/checkpoints/cnn"), last
  assert len(_errors(stderr)) == 1
  files = (tmp_path / "files.txt").read_text()
  assert "orbax-checkpoint-tmp" not in files and "results.jsonl" not in files


def test_rows_of_an_older_format_and_broken_rows_on_a_rerun(data_root, tmp_path, caplog):
  """results.jsonl as an older version wrote it (no format_version), one row lacking
  `validity_rate` and one with it renamed: the rerun says so in one line each, migrates the
  old rows, recomputes exactly the two broken ones (the same numbers), and the report shows
  validity for every row again."""
  config = small_config(data_root)
  config.attacks.fgsm.eps = (0.05, 0.1, 0.2, 0.3)
  wd = tmp_path / "w"
  run_lib.run(config, str(wd))
  reference = _rows(wd)
  old = [{k: v for k, v in r.items() if k != "format_version"} for r in reference]
  del old[0]["validity_rate"]
  old[1]["valid_rate"] = old[1].pop("validity_rate")
  (wd / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
  caplog.set_level("WARNING")
  run_lib.run(config, str(wd))
  said = [m for m in caplog.messages if "results.jsonl" in m]
  assert said == [
    "results.jsonl: migrated 2 of format 1 to format 2",
    "results.jsonl: 2 rows set aside in results.jsonl.rejected, to be recomputed: "
    "missing field 'validity_rate' (2)",
  ]
  rows = _rows(wd)
  assert len(rows) == len(_by_key(rows)) == 4
  assert _by_key(_without_timing(rows)) == _by_key(_without_timing(reference))
  shown = report.load_run(wd).rows
  assert len(shown) == 4 and all(r["validity_rate"] is not None for r in shown)


def _set_field(config, field: str, value) -> None:
  """Sets `field` ('a.b.c' or 'a.b.c[i]' for an item of a tuple) of `config` to `value`."""
  path, _, index = field.partition("[")
  section, _, attr = path.rpartition(".")
  node = config
  for p in filter(None, section.split(".")):
    node = node[p]
  if index:
    items = list(node[attr])
    items[int(index[:-1])] = value
    node[attr] = tuple(items)
  else:
    node[attr] = value


@pytest.mark.parametrize("name", ["mnist_cnn", "study", "mnist_defenses", "lfw_defenses"])
def test_every_numeric_setting_rejects_nan_inf_and_negative(name):
  """For every number of the :quick config (tuples item by item, every section), NaN, inf and
  -1 are rejected by validation with one line naming the field. A float cannot be set into an
  int field at all (ml_collections' typed fields; from the command line: 'bad command line')."""
  from experiments import validate  # noqa: PLC0415

  base = importlib.import_module(f"configs.{name}").get_config("quick")
  parts = [base[p] for p in base.runs] if "runs" in base else [base]
  fields = [(i, f, v) for i, part in enumerate(parts)
            for f, v in validate._numeric_leaves(part, "")]  # fmt: skip
  assert len(fields) > 40
  tried = 0
  for i, field, value in fields:
    for bad in (float("nan"), float("inf"), -1):
      config = importlib.import_module(f"configs.{name}").get_config("quick")
      part = config[config.runs[i]] if "runs" in config else config
      path = field.partition("[")[0]
      try:
        _set_field(part, field, bad)
      except TypeError:  # an int field refuses a float: it can never hold NaN
        assert isinstance(bad, float) and isinstance(value, int)
        continue
      with pytest.raises(validate.ConfigError) as err:
        validate.validate(part)
      assert str(err.value).startswith(path), (field, bad, str(err.value))
      assert "\n" not in str(err.value)
      tried += 1
  assert tried >= len(fields)  # at least one bad value per field


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("pixel_sd", 0.0, "model.cvae.pixel_sd=0.0; allowed: a number > 0"),
    ("pixel_sd", float("nan"), "model.cvae.pixel_sd=nan; allowed: a number > 0"),
    ("likelihood", "gauss", "model.cvae.likelihood='gauss' is not allowed; allowed: bernoulli"),
  ],
)
def test_the_generative_likelihood_settings_are_checked_in_one_line(field, value, message):
  from configs import study_genclf  # noqa: PLC0415
  from experiments import validate  # noqa: PLC0415

  part = study_genclf.get_config("quick").lfw_genclf28
  validate.validate(part)  # the face recipe (gaussian, pixel sd 0.1) passes
  part.model.cvae[field] = value
  with pytest.raises(validate.ConfigError) as err:
    validate.validate(part)
  assert str(err.value).startswith(message)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.attacks.fgsm.eps=(1e999,)", "attacks.fgsm.eps contains inf; allowed: finite"),
    ("--config.attacks.bim.step_size_rel=nan", "attacks.bim.step_size_rel=nan; allowed: a fin"),
    ("--config.train.cnn.learning_rate=nan", "train.cnn.learning_rate=nan; allowed: a finite"),
  ],
)
def test_non_finite_setting_on_the_command_line_is_one_line_before_any_work(
  override, message, tmp_path
):
  proc = subprocess.run(
    _main("--config=configs/mnist_cnn.py:quick", f"--workdir={tmp_path / 'w'}", override),
    capture_output=True, text=True, timeout=300, cwd=REPO,
  )  # fmt: skip
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  (line,) = _errors(proc.stderr)
  assert message in line
  assert not (tmp_path / "w").exists()


def test_config_comparison_is_nan_safe_and_a_failed_start_never_blocks(data_root, tmp_path):
  """A config.json holding NaN (written before validation rejected it) does not make the
  identical config "different"; and a run that failed before producing anything (a wrong data
  folder) leaves nothing that refuses the corrected command."""
  nan = float("nan")
  assert keys.diff({"train": {"lr": nan, "eps": [nan, 1.0]}},
                   {"train": {"lr": nan, "eps": [nan, 1.0]}}) == []  # fmt: skip
  assert keys.diff({"lr": nan}, {"lr": 0.1}) == ["lr"]
  made = tmp_path / "made"
  made.mkdir()
  config = {"seed": 0, "train": {"cnn": {"learning_rate": nan}}}
  (made / "config.json").write_text(json.dumps(config))
  (made / "train_metrics.json").write_text("{}")  # something was made under it
  workdir_lib.claim_workdir(config, made)
  with pytest.raises(UserError, match="differs in: train.cnn.learning_rate"):
    workdir_lib.claim_workdir({"seed": 0, "train": {"cnn": {"learning_rate": 0.1}}}, made)

  wd = tmp_path / "w"
  wrong = small_config(data_root)
  wrong.data.dir = str(tmp_path / "no_such_folder")
  wrong.data.source = "local"
  with pytest.raises(UserError):
    run_lib.run(wrong, str(wd))
  assert not workdir_lib.has_products(wd)
  right = small_config(data_root)
  workdir_lib.claim_workdir(right, wd)  # what the corrected run does first: accepted
  assert json.loads((wd / "config.json").read_text())["data"]["dir"] == str(data_root)
  (wd / "config.json").write_text('{"seed": 0, "da')  # a kill mid-write by hand: replaced too
  workdir_lib.claim_workdir(right, wd)


@pytest.mark.parametrize("name", ["mnist_defenses", "lfw_defenses", "study", "comm_ae"])
def test_every_kind_of_run_takes_the_workdir_lock(name, tmp_path):
  """Defences, the study (its own folder; each part locks its own) and the comm experiment
  stop at once on a workdir another process holds, naming it, before touching it."""
  config = importlib.import_module(f"configs.{name}").get_config("quick")
  wd = tmp_path / "w"
  with workdir_lib.locked(wd):
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"is in use by pid {os.getpid()} on "):
      run_lib.run(config, str(wd))
  assert sorted(p.name for p in wd.iterdir()) == [".lock"]


def test_comm_settings_reject_nan_and_inf_in_every_number():
  """The comm experiment's own validation walks every number too (dB values may be negative):
  NaN and inf anywhere are one line naming the field."""
  from experiments import comm, validate  # noqa: PLC0415

  base = importlib.import_module("configs.comm_ae").get_config("quick")
  fields = list(validate._numeric_leaves(base, ""))
  assert len(fields) > 10
  for field, _ in fields:
    for bad in (float("nan"), float("inf")):
      config = importlib.import_module("configs.comm_ae").get_config("quick")
      path = field.partition("[")[0]
      try:
        _set_field(config, field, bad)
      except TypeError:  # an int field refuses a float
        continue
      with pytest.raises(UserError) as err:
        comm.validate(config)
      assert str(err.value).startswith(path), (field, bad, str(err.value))
