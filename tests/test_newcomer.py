"""A newcomer's first hour: the README's notebook snippet and the example notebook run from
another directory on a finished run; the run's identity is its data's fingerprint, not their
folder; user errors are one line (exit 2), Ctrl-C one line (exit 130) at any moment, during
the imports too; the job's plan covers every part of a study; the timing table's rows are the
stages the run did."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import pytest
from fakedata import make_data_root
from test_main import tiny

from configs import mnist_vae
from experiments import identity, progress, userio
from experiments import run as run_lib
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from experiments.load import load_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny mnist_vae run (CNN, MLP VAE, conv VAE; FGSM and BIM) and its data."""
  data = make_data_root(
    tmp_path_factory.mktemp("data"), n_train=256, n_test=64, counts={"Alice_Smith": 2}, size=16
  )
  config = tiny("mnist_vae", data, attacks=("fgsm", "bim"))
  config.attacks.vae.enabled = ("latent_fgsm",)
  workdir = tmp_path_factory.mktemp("run")
  run_lib.run(config, str(workdir))
  return workdir, data, config


def _env_outside_repo(tmp_path, **extra):
  """The environment for a child run from `tmp_path`: the installed package (pip install -e .,
  as CI and the README do); a checkout that is not installed gets the repository on its path."""
  env = dict(os.environ, **extra)
  probe = [
    sys.executable,
    "-c",
    "import importlib.util as u; print(bool(u.find_spec('experiments')))",
  ]
  installed = subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True)
  if installed.stdout.strip() != "True":
    env["PYTHONPATH"] = str(ROOT)
  return env


def _readme_snippet() -> str:
  text = (ROOT / "README.md").read_text()
  section = text.split("## A finished run in a notebook", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_as_written_from_another_directory(finished, tmp_path):
  workdir, _, _ = finished
  (tmp_path / "snippet.py").write_text(_readme_snippet())
  env = _env_outside_repo(tmp_path, VAE_ATTACKS_RUN=str(workdir))
  env.pop("VAE_ATTACKS_DATA_DIR", None)  # the data folder comes from the run's record
  proc = subprocess.run(
    [sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("(2, 8)"), proc.stdout


def test_example_notebook_executes(finished, tmp_path):
  workdir, _, _ = finished
  env = _env_outside_repo(
    tmp_path, VAE_ATTACKS_RUN=str(workdir), VAE_ATTACKS_NOTEBOOK_OUT=str(tmp_path)
  )
  proc = subprocess.run(
    [sys.executable, str(ROOT / "notebooks" / "first_run.py")],
    cwd=tmp_path, env=env, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "notebook_cnn_vs_vae.png").stat().st_size > 0
  assert "cnn success at eps 0.1 / 0.3" in proc.stdout


def test_load_run_gives_data_models_and_rows(finished):
  workdir, _, config = finished
  run = load_run(workdir)
  assert list(run.models) == list(config.models) and run.rows
  assert run.data.x_test.shape[1:] == (28, 28, 1)
  with pytest.raises(UserError, match="not a finished run"):
    load_run(workdir / "nope")


def test_identity_is_the_data_fingerprint_not_the_folder(finished, tmp_path):
  workdir, data, config = finished
  moved = tmp_path / "moved"
  shutil.copytree(data, moved)
  again = config.copy_and_resolve_references()
  again.data.dir = str(moved)  # the same data from another folder: accepted
  workdir_lib.open_run(again, workdir)
  recorded = json.loads((workdir / identity.IDENTITY_FILE).read_text())
  assert recorded["folder"] == str(data)  # the first run's folder stays on record
  other = make_data_root(
    tmp_path / "other", n_train=256, n_test=64, counts={"Alice_Smith": 2}, size=16, seed=1
  )
  again.data.dir = str(other)  # other data under the same settings: refused
  with pytest.raises(UserError, match="was run on other data"):
    workdir_lib.open_run(again, workdir)


def test_config_file_errors_are_one_line():
  assert userio.config_file_error(["--workdir=x"]).startswith("--config is required: one of")
  msg = userio.config_file_error(["--config=configs/nope.py"])
  assert msg.startswith("config file configs/nope.py not found") and "configs/mnist_vae.py" in msg
  assert userio.config_file_error(["--help"]) is None
  names = [p for p, _, _ in userio.configs()]
  assert "configs/study.py" in names and "configs/base.py" not in names
  assert "configs/mnist_defenses.py:gpu" in userio.configs_help()


_MAIN_WITH = """
import sys
from absl import app
from experiments import main, run
def fail(config, workdir):
  raise {exc}
run.run = fail
sys.argv = ["main", "--config=configs/mnist_cnn.py:quick", "--workdir={workdir}"]
app.run(main.main, flags_parser=main._parse_flags)
"""


@pytest.mark.parametrize(
  "exc, code, line",
  [
    ("KeyboardInterrupt()", 130, "interrupted: {w} keeps every finished checkpoint"),
    ("PermissionError(13, 'Permission denied', '{w}/config.json')", 2,
     "error: Permission denied: {w}/config.json; the run needs a writable --workdir"),
    ("OSError(30, 'Read-only file system', '{w}')", 2, "error: Read-only file system: {w};"),
  ],
)  # fmt: skip
def test_interrupt_and_unwritable_workdir_are_one_line(exc, code, line, tmp_path):
  w = str(tmp_path / "w")
  src = _MAIN_WITH.format(exc=exc.format(w=w), workdir=w)
  proc = subprocess.run([sys.executable, "-c", src], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == code, proc.stderr[-2000:]
  lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(("I", "W"))]
  assert len(lines) == 1 and lines[0].startswith(line.format(w=w)), proc.stderr[-2000:]


def test_unknown_config_file_exits_2_with_one_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.main", "--config=configs/nope.py"],
    cwd=ROOT, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(
    "error: config file configs/nope.py not found"
  )


def test_plan_lists_models_then_sweeps_with_counts():
  config = mnist_vae.get_config("quick")
  stages = progress.plan(config, 2000)
  assert [s.label for s in stages[:3]] == [
    "train cnn (CNN): 2 epochs of 2000 examples",
    "train mlp_vae (VAE + latent classifier): 32 epochs of 2000 examples",
    "train conv_vae (VAE + latent classifier): 32 epochs of 2000 examples",
  ]
  assert "attack cnn fgsm linf: 16 pairs x 4 eps" in [s.label for s in stages]
  assert all(s.kind == "attack" for s in stages[3:])
  job = progress.Job(stages, stream=open(os.devnull, "w"))  # noqa: SIM115
  assert job.eta() == "after the first stage"
  job.rates[("", "attack:fgsm")] = 0.5  # 0.5 s per pair x eps: the gradient pass is estimated
  gradient_pass = [s for s in stages if s.group == "attack:0"]
  eta = job.eta()  # the trainings and the L-BFGS passes are not measured yet
  assert eta.startswith("~") and f"+ {len(stages) - len(gradient_pass)} stages" in eta


def test_report_warns_of_a_chance_level_or_weak_model():
  from experiments.report.tables import weak_model_warnings  # noqa: PLC0415

  train = {"cnn": {"test_accuracy": 0.99}, "mlp_vae": {"test_accuracy": 0.092},
           "conv_vae": {"test_accuracy": 0.8}}  # fmt: skip
  chance, weak = weak_model_warnings(train, "mnist", 0.9)
  assert "mlp_vae is at chance level" in chance
  assert "guessing among 10 classes gives 0.100" in chance
  assert "conv_vae is weak" in weak and "0.9 x that of cnn (0.990)" in weak
  assert weak_model_warnings({"cnn": {"test_accuracy": 0.99}}, "mnist", 0.9) == []
  # LFW's people are not balanced: a CNN that always answers the most frequent person scores
  # the run's majority_accuracy (0.41 in the :quick config), far above 1/7.
  lfw = {"cnn": {"test_accuracy": 0.41, "majority_accuracy": 0.41}}
  (warning,) = weak_model_warnings(lfw, "lfw", 0.9)
  assert "cnn is at chance level" in warning and "most frequent class gives 0.410" in warning
  assert weak_model_warnings({"cnn": {"test_accuracy": 0.85, "majority_accuracy": 0.41}}, "lfw",
                             0.9) == []  # fmt: skip


def check_timings(workdir, labels, *, done_earlier=(), first=None) -> list[dict]:
  """The timing table in workdir/timings.json has one row per stage of the plan (`labels`, in
  order): a stage this run did has its wall seconds and examples/s = units / seconds; a stage
  an earlier run did (`done_earlier`, kinds) keeps that run's seconds (`first`: its rows)."""
  rows = json.loads((pathlib.Path(workdir) / progress.TIMINGS_FILE).read_text())["stages"]
  assert [r["label"] for r in rows] == list(labels)
  assert [r["stage"] for r in rows] == list(range(1, len(labels) + 1))
  for i, r in enumerate(rows):
    if r["kind"] in done_earlier:
      assert r["status"] == "done earlier", r
      if first is not None:
        assert r["seconds"] == first[i]["seconds"]
    else:
      assert r["status"] == "ran" and r["seconds"] > 0, r
      assert r["per_second"] == pytest.approx(r["units"] / r["seconds"])
  return rows


def test_timing_table_rows_are_the_stages_run_and_a_rerun_keeps_them(finished, tmp_path):
  workdir, _, config = finished
  from vae_attacks import data as data_lib  # noqa: PLC0415

  stages = run_lib._plan(config, data_lib.load(config.data))
  first = check_timings(workdir, [s.label for s in stages])
  assert sum(r["kind"] == "train" for r in first) == len(config.models)
  # Every sweep of the plan wrote its rows: the table has no stage that did nothing.
  rows = [json.loads(x) for x in (workdir / "results.jsonl").read_text().splitlines()]
  assert {(r["model"], r["attack"]) for r in rows} == {
    (s.model, s.attack) for s in stages if s.kind == "attack"
  }
  again = tmp_path / "again"
  shutil.copytree(workdir, again)
  run_lib.run(config, str(again))  # everything done: checkpoints restored, no sweep run
  check_timings(again, [s.label for s in stages], done_earlier=("train", "attack"), first=first)


def test_study_plan_covers_every_part_and_one_job_eta(tmp_path, capsys):
  data = make_data_root(
    tmp_path / "data", n_train=128, n_test=32, counts={"A_B": 12, "C_D": 12}, size=80
  )
  c = ml_collections.ConfigDict()
  c.name = "study"
  c.runs = ("mnist_cnn", "lfw_cnn")
  c.mnist_cnn = tiny("mnist_cnn", data, attacks=("fgsm",))
  c.lfw_cnn = tiny("lfw_cnn", data, attacks=("fgsm", "bim"))
  run_lib.run(c, str(tmp_path / "w"))
  err = capsys.readouterr().err.splitlines()
  labels = [
    "mnist_cnn: train cnn (CNN): 1 epoch of 128 examples",
    "mnist_cnn: attack cnn fgsm linf: 4 pairs x 4 eps",
    "lfw_cnn: train cnn (CNN): 1 epoch of 18 examples",
    "lfw_cnn: attack cnn fgsm linf: 4 pairs x 4 eps",
    "lfw_cnn: attack cnn bim linf: 4 pairs x 2 eps",
  ]
  plan_at = err.index(
    f"plan of study in {tmp_path / 'w'} (parts: mnist_cnn, lfw_cnn): 5 stages (2 trainings, "
    "3 attack sweeps)"
  )
  assert [x.strip() for x in err[plan_at + 1 : plan_at + 6]] == [
    f"{i}. {label}" for i, label in enumerate(labels, 1)
  ]
  headers = [x for x in err if x.startswith("[")]
  assert [h.split("] ", 1)[1] for h in headers] == labels  # numbered over the whole job
  assert [h.split(" |")[0] for h in headers] == [f"[{i}/5" for i in range(1, 6)]
  # The LFW part's stages are estimated from the MNIST part's rates (scaled by pixels): one
  # ETA for the whole job, with no stage left unmeasured once each kind has run once.
  assert "not yet measured" not in headers[2] and "job ETA ~" in headers[2]
  check_timings(tmp_path / "w", labels)
  table = err[err.index(f"timings (also in {tmp_path / 'w' / 'timings.json'}):") + 2 :][:5]
  assert [t.split(". ", 1)[1].split("  ")[0] for t in table] == labels
  assert err[-1].startswith("done in ") and f"report {tmp_path / 'w' / 'summary.md'}" in err[-1]


def test_a_part_not_started_is_estimated_from_another_parts_rates_scaled_by_pixels():
  mnist = [progress.Stage("train", "cnn", "", "m train", 100, "train:cnn", "train", "m", scale=784),
           progress.Stage("attack", "cnn", "fgsm", "m fgsm", 10, "attack:fgsm", "attack:0", "m",
                          scale=784)]  # fmt: skip
  lfw = [progress.Stage("train", "cnn", "", "l train", 20, "train:cnn", "train", "l", scale=3000),
         progress.Stage("attack", "cnn", "bim", "l bim", 5, "attack:bim", "attack:0", "l",
                        scale=3000),
         progress.Stage("attack", "cnn", "lbfgs", "l lbfgs", 5, "attack:lbfgs", "attack:1", "l",
                        scale=3000)]  # fmt: skip
  job = progress.Job(mnist + lfw, stream=open(os.devnull, "w"))  # noqa: SIM115
  job.done |= {0, 1}
  job.rates[("m", "train:cnn")] = 1.0 / (100 * 784)  # 1 s for the MNIST training
  job.rates[("m", "attack:fgsm")] = 2.0 / (10 * 784)  # 2 s for the MNIST FGSM sweep
  # LFW training: the MNIST training's rate per pixel (20 x 3000 / (100 x 784) s); LFW BIM:
  # no BIM measured anywhere, so the rate of its cost pass (FGSM's); L-BFGS: nothing of its
  # pass measured yet.
  want = 20 * 3000 / (100 * 784) + 5 * 3000 * 2.0 / (10 * 784)
  assert job.eta() == f"~{progress._fmt(want)} + 1 stage not yet measured"


def test_defense_and_comm_plans_list_every_stage_with_counts():
  from configs import comm_ae, mnist_defenses  # noqa: PLC0415
  from experiments import comm, defenses  # noqa: PLC0415

  c = mnist_defenses.get_config("quick")
  sections = {k: v.sections for k, v in defenses.DEFENSES.items()}
  labels = [s.label for s in progress.defense_plan(c, 2000, 64, sections)]
  d = c.defenses
  assert len(labels) == 2 * len(d.enabled) + d.transfer.enabled
  builds = [x for x in labels if x.startswith("build defence")]
  # A model two defences share trains once: the projection classifies with the CNN of "none".
  assert any(x.startswith("build defence none: trains cnn (cnn, ") for x in builds)
  proj = next(x for x in builds if x.startswith("build defence projection"))
  assert "mlp_vae (vae" in proj and "cnn (cnn" not in proj
  assert f"attack defence projection: each of its attacks x {len(d.attacks.eps)} eps on 16 " in (
    "\n".join(labels)
  )
  cc = comm_ae.get_config("quick")
  n_points = sum(len(g) for _, _, g in comm._points(cc))
  stages = progress.comm_plan(cc, n_points)
  assert [s.kind for s in stages[:3]] == ["train", "craft", "evaluate"]  # mlp_ae
  assert [s.kind for s in stages[3:]] == ["craft", "evaluate"] * 3  # the codes: no training
  assert stages[2].units == n_points * cc.eval.blocks


def _main(args, cwd, env=None):
  # Ctrl-C at its default in the child, however pytest was started (a background job, e.g.
  # `nohup ... &`, starts with SIGINT ignored, and the command keeps an ignored Ctrl-C ignored).
  return subprocess.Popen(
    [sys.executable, "-m", "experiments.main", *args],
    cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )  # fmt: skip


def _non_log_lines(stderr: str) -> list[str]:
  """stderr without absl's log lines (I..., W...) and progress lines."""
  return [
    x for x in stderr.splitlines()
    if x.strip() and not re.match(r"[IWE]\d{4} |\[\d+/\d+ |plan of |\s+\d+\. ", x)
  ]  # fmt: skip


def test_ctrl_c_during_the_imports_exits_130_with_one_line(tmp_path):
  w = str(tmp_path / "w")
  proc = _main(["--config=configs/mnist_cnn.py:quick", f"--workdir={w}"], ROOT)
  time.sleep(0.5)  # importing jax takes seconds: still starting up
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err[-2000:]
  assert err.strip().splitlines() == [userio.interrupted_at_start_up([f"--workdir={w}"])]
  assert not (tmp_path / "w").exists()  # nothing written


def test_ctrl_c_during_a_run_exits_130_with_one_line_and_no_thread_traceback(tmp_path):
  data = make_data_root(tmp_path / "data", n_train=256, n_test=32, counts={"A_B": 2}, size=16)
  w = tmp_path / "w"
  args = ["--config=configs/mnist_cnn.py:quick", f"--workdir={w}", f"--config.data.dir={data}",
          "--config.train.cnn.epochs=200", "--config.attacks.shard=False"]  # fmt: skip
  proc = _main(args, ROOT)
  deadline = time.monotonic() + 120
  while not list((w / "checkpoints" / "cnn").glob("[0-9]*")) and time.monotonic() < deadline:
    time.sleep(0.2)  # until the first epoch's checkpoint is saved: mid-training
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err and _non_log_lines(err) == [userio.interrupted(str(w))], err[-3000:]


def test_an_interrupt_a_callback_swallowed_is_delivered_again():
  """jax's garbage-collection callback cannot raise: a Ctrl-C landing in it was printed as
  "Exception ignored" and the run went on; the command delivers it to the main thread again."""
  # (userio, not experiments.main: importing main defines its absl flags in this process)
  from experiments import userio  # noqa: PLC0415

  unraisable = type("Unraisable", (), {"exc_value": KeyboardInterrupt()})()
  # Python's own Ctrl-C handler, however pytest was started (a background job inherits SIGINT
  # ignored, and then interrupt_main delivers nothing)
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      userio.redeliver_interrupt(unraisable, default=None)
      for _ in range(1000):  # the interrupt arrives at the next bytecode boundary
        time.sleep(0.001)
  finally:
    signal.signal(signal.SIGINT, previous)
  seen = []
  other = type("Unraisable", (), {"exc_value": ValueError("x")})()
  userio.redeliver_interrupt(other, default=seen.append)  # anything else: the default hook
  assert seen == [other]


def test_curves_figure_title_states_the_pairs_it_draws_and_the_auddc_pairs(tmp_path, monkeypatch):
  import numpy as np  # noqa: PLC0415

  from experiments.report import figures  # noqa: PLC0415

  titles = []

  def keep_title(fig, path):
    titles.append(fig.axes[0].get_title())
    return path

  monkeypatch.setattr(figures, "save_figure", keep_title)
  x = np.array([[0.1, 0.5], [np.nan, np.nan], [0.2, 0.4]])  # [pairs, C]: the 2nd has no curve
  np.savez(tmp_path / "c.npz", x=x, y=1.0 - x)
  row = {"attack": "latent_l2", "auddc": 0.1, "auddc_std": 0.02, "n_auddc_pairs": 2}
  text = figures._auddc_text([row], "latent_l2")
  figures.plot_curves(tmp_path / "c.npz", tmp_path / "c.png", "mnist: mlp_vae, latent_l2",
                      auddc_text=text)  # fmt: skip
  assert titles == [
    f"mnist: mlp_vae, latent_l2 (2 of 3 pairs drawn), AUDDC over 2 pairs {text.split()[-3]} ± "
    f"{text.split()[-1]}"
  ]
  np.savez(tmp_path / "d.npz", x=x[[0, 2]], y=1.0 - x[[0, 2]])
  figures.plot_curves(tmp_path / "d.npz", tmp_path / "d.png", "t")
  assert titles[-1] == "t (2 pairs)"
