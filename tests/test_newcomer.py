"""A newcomer's first hour: the README's notebook snippet and the example notebook run from
another directory on a finished run; the run's identity is its data's fingerprint, not their
folder; user errors are one line (exit 2), Ctrl-C one line (exit 130); the job's plan."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

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
  job.rates["attack:fgsm"] = 0.5  # 0.5 s per pair x eps: the gradient pass is estimated
  gradient_pass = [s for s in stages if s.group == "attack:0"]
  eta = job.eta()  # the trainings and the L-BFGS passes are not measured yet
  assert eta.startswith("~") and f"+ {len(stages) - len(gradient_pass)} stages" in eta


def test_report_warns_of_a_chance_level_or_weak_model():
  from experiments.report.tables import weak_model_warnings  # noqa: PLC0415

  train = {"cnn": {"test_accuracy": 0.99}, "mlp_vae": {"test_accuracy": 0.092},
           "conv_vae": {"test_accuracy": 0.8}}  # fmt: skip
  chance, weak = weak_model_warnings(train, "mnist", 0.9)
  assert "mlp_vae is at chance level" in chance and "guessing gives 0.100" in chance
  assert "conv_vae is weak" in weak and "0.9 x that of cnn (0.990)" in weak
  assert weak_model_warnings({"cnn": {"test_accuracy": 0.99}}, "mnist", 0.9) == []
