"""Runs of several processes through jax.distributed, on this machine (a localhost coordinator,
gloo collectives over TCP): the sweep of tests/multiproc_configs.py (attacks on a tiny CNN, and
one defence) as 1, 2 and 4 processes, and a process killed mid-sweep.

Process 0 gets the workdir; every other process is pointed at a folder of its own, which must
still not exist when the run ends: had another process written (or locked, or claimed) anything,
it would be there. Nor can they read process 0's workdir, so a rerun that skips the finished
rows shows that they learn what is done from process 0.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from fakedata import make_data_root

REPO = pathlib.Path(__file__).resolve().parents[1]
PARTS = {"attacks": "results.jsonl", "defenses": "defenses.jsonl"}
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_data_root(tmp_path_factory.mktemp("data"), n_train=256, n_test=64, size=40)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# XLA host devices per process: each process also shards its chunks over its own devices. The
# reference has as many: sharding L-BFGS's host loop over another number of devices rounds
# differently in the last bits (one process alone too), which is not what is tested here.
DEVICES = 2


def launch(n, workdir, data_root, *, devices=DEVICES, arg="both") -> list:
  """`python -m experiments.main` as processes 0..n-1 of one run; process i > 0 gets the workdir
  `<workdir>.others/<i>`. Returns the Popen objects (stderr in <workdir>.<i>.err)."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  parts = PARTS if arg == "both" else {arg: PARTS[arg]}
  prefix = {p: f"{p}." if arg == "both" else "" for p in parts}
  procs = []
  for i in range(n):
    own = workdir if i == 0 else pathlib.Path(f"{workdir}.others") / str(i)
    cmd = [
      sys.executable, "-m", "experiments.main", f"--config=tests/multiproc_configs.py:{arg}",
      f"--workdir={own}", f"--config.cluster.coordinator_address=localhost:{port}",
      f"--config.cluster.num_processes={n}", f"--config.cluster.process_id={i}",
    ]  # fmt: skip
    cmd += [f"--config.{prefix[p]}data.dir={data_root}" for p in parts]
    err = open(f"{workdir}.{i}.err", "w")  # noqa: SIM115  (closed by the child's exit)
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err))
    err.close()
  return procs


def wait(procs, workdir, timeout=RUN_TIMEOUT_S) -> list[tuple[int, str]]:
  """(exit status, stderr) of each process once all have ended."""
  deadline = time.monotonic() + timeout
  out = []
  for i, p in enumerate(procs):
    try:
      rc = p.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((rc, pathlib.Path(f"{workdir}.{i}.err").read_text()))
  return out


def run(n, workdir, data_root, **kwargs) -> None:
  """A whole run of n processes that must succeed."""
  for i, (rc, err) in enumerate(wait(launch(n, workdir, data_root, **kwargs), workdir)):
    assert rc == 0, f"process {i} of {n} ended with {rc}:\n{err[-3000:]}"


def rows(path: pathlib.Path) -> dict:
  """The rows of a log by key, without `seconds` (each row's time)."""
  out = {}
  for line in path.read_text().splitlines():
    r = json.loads(line)
    r.pop("seconds", None)
    key = (r.get("kind"), r.get("model"), r.get("defense"), r["attack"], r.get("norm"), r["eps"])
    assert key not in out
    out[key] = r
  return out


def files(workdir: pathlib.Path) -> set[str]:
  """Every file under workdir, relative (the lock files aside); a checkpoint counts as its step
  folder (orbax names the files inside at random)."""
  out = set()
  for p in workdir.rglob("*"):
    parts = p.relative_to(workdir).parts
    if "checkpoints" in parts:
      out.add("/".join(parts[: parts.index("checkpoints") + 3]))
    elif p.is_file() and p.name != ".lock":
      out.add("/".join(parts))
  return out


def same_records(ref: pathlib.Path, got: pathlib.Path) -> None:
  """The per-pair records of every row hold the same arrays: pairs gathered in their order."""
  records = sorted(p.relative_to(ref) for p in ref.rglob("records/**/*.npz"))
  assert records
  for rel in records:
    with np.load(ref / rel) as a, np.load(got / rel) as b:
      assert set(a.files) == set(b.files)
      for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel}: {k}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
  """The sweep as one process (through jax.distributed too)."""
  workdir = tmp_path_factory.mktemp("one") / "w"
  run(1, workdir, data_root)
  return workdir


def check_like_reference(workdir: pathlib.Path, reference: pathlib.Path) -> None:
  for part, log in PARTS.items():
    want, got = rows(reference / part / log), rows(workdir / part / log)
    assert got == want, part
  same_records(reference / "attacks", workdir / "attacks")


# The whole file: 19 minutes on this 2-core CPU under a load average of 30-37 from other jobs
# (the 1-process reference 7 min, 2 and 4 processes 5 min each, the kill and rerun 3 min).
@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_n_processes_give_the_rows_of_one_and_only_process_0_writes(
  n, reference, data_root, tmp_path
):
  workdir = tmp_path / "w"
  run(n, workdir, data_root)
  check_like_reference(workdir, reference)
  # Process 0 wrote everything a single process writes: results log, per-pair records, pairs,
  # examples, checkpoints, train metrics, the report and the figures ...
  assert files(workdir) == files(reference)
  assert (workdir / "summary.md").exists() and any((workdir / "figures").glob("*.png"))
  # ... and no other process created anything (their workdirs do not exist).
  assert not pathlib.Path(f"{workdir}.others").exists()


@pytest.mark.slow
def test_killed_process_ends_the_run_in_one_line_and_a_rerun_resumes(
  reference, data_root, tmp_path
):
  """Process 1 killed while process 0 attacks (the attacks part alone)."""
  workdir = tmp_path / "w"
  log = workdir / PARTS["attacks"]
  procs = launch(2, workdir, data_root, arg="attacks")
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not (log.exists() and len(log.read_text().splitlines()) >= 4):  # the FGSM rows
    assert all(p.poll() is None for p in procs), "a process ended before the kill"
    assert time.monotonic() < deadline
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  (rc, err), (rc1, _) = wait(procs, workdir, timeout=120)
  assert rc1 == -signal.SIGKILL
  # Process 0 ends soon after, in one line naming what happened.
  assert time.monotonic() - killed_at < 60
  assert rc == 2, err[-3000:]
  assert "Traceback" not in err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "another process of this run stopped" in errors[0], err[-3000:]
  assert "rerun all 2 processes" in errors[0]
  # Nothing torn: every line of the log is a whole row whose record exists; no report yet.
  kept = [json.loads(line) for line in log.read_text().splitlines()]
  assert 4 <= len(kept) < len(rows(reference / "attacks" / PARTS["attacks"]))
  assert all((workdir / r["record"]).exists() for r in kept)
  assert not (workdir / "summary.md").exists()

  run(2, workdir, data_root, arg="attacks")  # resumes: the rows made before the kill are kept
  again = {(r["attack"], r["eps"]): r for r in map(json.loads, log.read_text().splitlines())}
  assert all(again[(r["attack"], r["eps"])]["seconds"] == r["seconds"] for r in kept)
  assert rows(log) == rows(reference / "attacks" / PARTS["attacks"])
  same_records(reference / "attacks", workdir)
  assert (workdir / "summary.md").exists()
  assert not pathlib.Path(f"{workdir}.others").exists()
