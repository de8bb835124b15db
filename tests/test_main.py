"""End to end: `experiments.run` on tiny data in the real file formats, per config."""

import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from fakedata import make_data_root

from configs import study, study_genclf
from experiments import attacks as attacks_lib
from experiments import load, store
from experiments import run as run_lib
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from vae_attacks import metrics
from vae_attacks.attacks import registry

CONFIGS = ("mnist_cnn", "mnist_vae", "lfw_cnn", "lfw_vae")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  counts = {"Alice_Smith": 14, "Bob_Jones": 12, "Carol_White": 12, "Dan_Brown": 3}
  return make_data_root(root, n_train=256, n_test=64, counts=counts, size=80)


def tiny(name, data_root, *, attacks=("fgsm", "bim"), config=None):
  """The config's :quick variant (or `config`) shrunk further so a whole run takes seconds."""
  c = (
    config if config is not None else importlib.import_module(f"configs.{name}").get_config("quick")
  )
  c.data.dir = str(data_root)
  c.data.min_faces_per_person = 10
  c.data.crop_size = 64
  c.data.image_size = 16 if c.data.name == "lfw" else 28
  for t in c.train.values():
    t.epochs = 1
    t.batch_size = 32 if c.data.name == "mnist" else 8
  c.attacks.enabled = attacks
  c.attacks.num_pairs = 4
  c.attacks.only_correct = False
  c.attacks.bim.steps = 2
  c.attacks.bim.eps = (0.1, 0.3)
  c.attacks.lbfgs.max_iters = 3
  c.attacks.lbfgs.search_steps = 2
  c.attacks.shard = False
  c.attacks.vae.enabled = ("latent_fgsm", "latent_l2") if name == "mnist_vae" else ("latent_fgsm",)
  c.attacks.vae.num_pairs = 4
  c.attacks.vae.latent_fgsm.eps = (0.1,)
  c.attacks.vae.latent_l2.eps = (0.01, 1.0)
  c.attacks.vae.latent_l2.max_iters = 3
  return c


def read_rows(workdir):
  return [json.loads(x) for x in (workdir / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", CONFIGS)
def test_quick_run_writes_metrics_and_one_row_per_point(name, data_root, tmp_path):
  config = tiny(name, data_root)
  run_lib.run(config, str(tmp_path))

  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["data"]["name"] == config.data.name
  metrics = json.loads((tmp_path / "train_metrics.json").read_text())
  assert set(metrics) == set(config.models)

  rows = read_rows(tmp_path)
  n_eps = len(config.attacks.fgsm.eps) + len(config.attacks.bim.eps)
  vaes = [m for m in config.models if m.endswith("vae")]
  n_vae_eps = sum(len(config.attacks.vae[a].eps) for a in config.attacks.vae.enabled)
  assert len(rows) == len(config.models) * n_eps + len(vaes) * n_vae_eps
  assert (tmp_path / "summary.md").exists()
  rows = [r for r in rows if r["attack"] in ("fgsm", "bim")]
  keys = {(r["model"], r["attack"], r["eps"]) for r in rows}
  assert len(keys) == len(rows)
  for r in rows:
    assert r["dataset"] == config.data.name
    assert r["n_pairs"] == config.attacks.num_pairs
    assert r["mean_linf"] <= r["eps"] + 1e-5  # both attacks are L-inf here
    # The kept adversarial examples are inside their eps ball and the box, at every eps.
    with np.load(tmp_path / "examples" / f"{r['model']}_{r['attack']}.npz") as f:
      d = np.abs(f["x_adv"] - f["x"][None]).reshape(len(f["eps"]), -1).max(-1)
      assert (d <= f["eps"] + 1e-5).all() and f["x_adv"].min() >= 0 and f["x_adv"].max() <= 1


def test_rerun_reuses_checkpoints_and_rows_and_resumes_identically(data_root, tmp_path):
  config = tiny("mnist_cnn", data_root)
  run_lib.run(config, str(tmp_path / "a"))
  first = (tmp_path / "a" / "results.jsonl").read_text()

  run_lib.run(config, str(tmp_path / "a"))  # nothing to do: same rows, checkpoint reused
  assert (tmp_path / "a" / "results.jsonl").read_text() == first
  metrics = json.loads((tmp_path / "a" / "train_metrics.json").read_text())
  assert metrics["cnn"]["reused_checkpoint"]

  lines = first.splitlines(keepends=True)  # a run killed after 2 rows, half-way into the 3rd
  (tmp_path / "a" / "results.jsonl").write_text("".join(lines[:2]) + lines[2][:9])
  run_lib.run(config, str(tmp_path / "a"))
  strip = lambda text: [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                        for x in text.splitlines()]  # fmt: skip
  assert strip((tmp_path / "a" / "results.jsonl").read_text()) == strip(first)


def test_solver_attacks_run_last_and_their_numbers_do_not_depend_on_it(data_root, tmp_path):
  """Every model's gradient-step rows come first, then the classifiers' L-BFGS rows, then the
  L-BFGS VAE attacks' rows; and the L-BFGS rows equal those of a run of the L-BFGS attacks
  alone (the order changes no key and no pair)."""
  config = tiny("mnist_vae", data_root, attacks=("fgsm", "lbfgs"))
  run_lib.run(config, str(tmp_path / "both"))
  rows = read_rows(tmp_path / "both")
  passes = [registry.ATTACKS[r["attack"]].cost_pass for r in rows]
  assert passes == sorted(passes) and set(passes) == {0, 1, 2}
  for k in (0, 1):  # the gradient-step and the classifier L-BFGS passes reach every model
    assert {r["model"] for r, p in zip(rows, passes, strict=True) if p == k} == set(config.models)
  solver = [p > 0 for p in passes]

  alone = tiny("mnist_vae", data_root, attacks=("lbfgs",))
  alone.attacks.vae.enabled = ("latent_l2",)
  run_lib.run(alone, str(tmp_path / "alone"))
  drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "settings", "record")}
  expected = [drop(r) for r in read_rows(tmp_path / "alone")]
  assert [drop(r) for r, s in zip(rows, solver, strict=True) if s] == expected


def test_a_run_of_only_some_models_then_the_rest_equals_one_whole_run(data_root, tmp_path):
  """`attacks.only_models` picks which models a run attacks: the models named first, the rest
  by a later run without it, give the rows of one run of all (their keys and pairs come from
  each model's place in `models`, not from which run attacks it)."""
  config = tiny("mnist_vae", data_root, attacks=("fgsm",))
  run_lib.run(config, str(tmp_path / "whole"))
  config.attacks.only_models = ("conv_vae",)
  run_lib.run(config, str(tmp_path / "split"))
  first = read_rows(tmp_path / "split")
  assert {r["model"] for r in first} == {"conv_vae"}
  assert {r["attack"] for r in first} == {"fgsm", "latent_fgsm", "latent_l2"}
  config.attacks.only_models = ()
  run_lib.run(config, str(tmp_path / "split"))
  drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "record")}
  key = lambda r: (r["model"], r["attack"], r["eps"])
  split = sorted(map(drop, read_rows(tmp_path / "split")), key=key)
  assert split == sorted(map(drop, read_rows(tmp_path / "whole")), key=key)
  assert len(split) > len(first)


def test_rerun_of_a_finished_vae_run_attacks_nothing(data_root, tmp_path, monkeypatch):
  """Every sweep's rows are found on a rerun (the VAE FGSM variants' rows are L-inf ones), so
  no attack runs again."""
  config = tiny("mnist_vae", data_root)
  config.attacks.vae.enabled = ("latent_fgsm", "reconstruction_fgsm", "latent_l2")
  config.attacks.vae.reconstruction_fgsm.eps = (0.1,)
  monkeypatch.setattr(attacks_lib, "VAE_EXAMPLES", 3)  # of the 4 pairs
  run_lib.run(config, str(tmp_path))
  first = (tmp_path / "results.jsonl").read_text()
  # A VAE sweep keeps the first VAE_EXAMPLES examples, each with the VAE's reconstruction.
  vae = load.load_run(tmp_path).models["mlp_vae"]
  for attack in config.attacks.vae.enabled:
    f = store.load_examples(tmp_path / "examples" / f"mlp_vae_{attack}.npz")
    assert f["x_adv"].shape[1] == f["rec_adv"].shape[1] == 3 and len(f["x"]) == 3
    rec = jax.vmap(jax.vmap(lambda x: vae.vae.reconstruct(vae.params["vae"], x)))(f["x_adv"])
    np.testing.assert_allclose(f["rec_adv"], rec, atol=1e-5)
  calls = []
  real = attacks_lib.runner.iter_attack_chunks
  monkeypatch.setattr(
    attacks_lib.runner, "iter_attack_chunks", lambda *a, **k: calls.append(a[0]) or real(*a, **k)
  )
  run_lib.run(config, str(tmp_path))
  assert calls == []
  assert (tmp_path / "results.jsonl").read_text() == first


def test_workdir_of_another_config_is_refused(data_root, tmp_path):
  config = tiny("mnist_cnn", data_root)
  run_lib.run(config, str(tmp_path))
  config.train.cnn.learning_rate = 0.5
  with pytest.raises(UserError, match="train.cnn.learning_rate"):
    run_lib.run(config, str(tmp_path))


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("attacks.bim.norm", "l3", "attacks.bim.norm='l3' is not allowed; allowed: linf, l2"),
    ("attacks.bim.steps", 0, "attacks.bim.steps=0; allowed: an integer >= 1"),
    ("data.source", "web", "data.source='web' is not allowed"),
    ("eval.ssim_min", 1.5, "eval.ssim_min=1.5; allowed: a number in [0, 1]"),
    ("eval.confidence_min", -0.1, "eval.confidence_min=-0.1; allowed: a number in [0, 1]"),
    ("attacks.bim.eps", (0.1, -0.1), "attacks.bim.eps contains -0.1; allowed: finite numbers >= 0"),
    ("attacks.enabled", ("fgsm", "bimm"), "attacks.enabled[]='bimm' is not allowed; allowed: fgsm"),
    ("data.image_size", 32, "data.image_size=32: MNIST images are 28x28; allowed: 28"),
    ("attacks.only_models", ("vae",), "attacks.only_models[]='vae' is not allowed; allowed: cnn"),
  ],
)
def test_bad_values_are_named_before_any_work(field, value, message, data_root, tmp_path):
  config = tiny("mnist_cnn", data_root)
  section, attr = field.rsplit(".", 1)
  target = config
  for part in section.split("."):
    target = target[part]
  target[attr] = value
  with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
    run_lib.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
  "n, message",
  [
    (5, "attacks.vae.latent_l2.num_pairs=5 exceeds attacks.vae.num_pairs=4; allowed: 1 to"),
    (0, "attacks.vae.latent_l2.num_pairs=0; allowed: an integer >= 1"),
  ],
)
def test_a_vae_attack_takes_at_most_the_vae_pairs(n, message, data_root, tmp_path):
  config = tiny("mnist_vae", data_root)
  with config.attacks.vae.latent_l2.unlocked():
    config.attacks.vae.latent_l2.num_pairs = n
  with pytest.raises(UserError, match=message):
    run_lib.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_an_unknown_lbfgs_direction_is_named(data_root, tmp_path):
  config = tiny("mnist_cnn", data_root, attacks=("lbfgs",))
  with config.attacks.lbfgs.unlocked():
    config.attacks.lbfgs.direction = "newton"
  message = "attacks.lbfgs.direction='newton' is not allowed; allowed: subspace, restricted"
  with pytest.raises(UserError, match=message):
    run_lib.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def main_quick(tmp_path, override: str, env=None) -> subprocess.CompletedProcess:
  """`python -m experiments.main` on mnist_cnn:quick in tmp_path/w with one override."""
  return subprocess.run(
    [sys.executable, "-m", "experiments.main", "--config=configs/mnist_cnn.py:quick",
     f"--workdir={tmp_path / 'w'}", override],
    capture_output=True, text=True, env=env, timeout=300, cwd=pathlib.Path(__file__).parents[1],
  )  # fmt: skip


def test_command_line_reports_missing_data_in_one_line(tmp_path):
  env = {"PATH": "/usr/bin:/bin", "VAE_ATTACKS_DATA_DIR": str(tmp_path / "nowhere")}
  proc = main_quick(tmp_path, "--config.data.source=local", env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  # Said once, as the error line (not also as an absl log line of the same words).
  said = [x for x in proc.stderr.splitlines() if "VAE_ATTACKS_DATA_DIR" in x]
  assert len(said) == 1 and said[0].startswith("error: "), proc.stderr[-2000:]


@pytest.mark.parametrize(
  "override, expected",
  [
    ("--config.attacks.bim.epz=0.1", "attacks.bim has no field 'epz'; valid: eps, norm,"),
    ("--config.atacks.num_pairs=3", "no field 'atacks'; valid: attacks, cluster, data,"),
  ],
)
def test_misspelt_override_is_one_line_listing_valid_fields(override, expected, tmp_path):
  proc = main_quick(tmp_path, override)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert expected in proc.stderr
  assert not (tmp_path / "w").exists()


def test_distributed_initialises_jax_before_any_work(tmp_path):
  """distributed=True calls jax.distributed.initialize() first; off a cluster that fails in one
  line (JAX finds no coordinator), before the workdir is touched."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "SLURM_"))}
  proc = main_quick(tmp_path, "--config.distributed=True", env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert "error: distributed=True but jax.distributed.initialize() failed" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_corrupt_data_file_is_one_line_naming_it(tmp_path):
  root = make_data_root(tmp_path / "data", n_train=20, n_test=10, size=32)
  bad = root / "mnist" / "t10k-images-idx3-ubyte.gz"
  bad.write_bytes(b"\x1f\x8b this is not a gzip stream")
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.main", "--config=configs/mnist_cnn.py:quick",
     f"--workdir={tmp_path / 'w'}", "--config.data.source=local", f"--config.data.dir={root}"],
    capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1],
  )  # fmt: skip
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  error = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert len(error) == 1 and str(bad) in error[0]


def test_corrupt_config_json_in_workdir_is_refused(data_root, tmp_path):
  """Refused when something was made under it (here train_metrics.json); with nothing made, it
  is replaced (tests/test_faults.py)."""
  (tmp_path / "config.json").write_text('{"seed": 0, "data": {"na')
  (tmp_path / "train_metrics.json").write_text("{}")
  with pytest.raises(UserError, match="config.json is not valid JSON"):
    run_lib.run(tiny("mnist_cnn", data_root), str(tmp_path))


def test_checkpoint_of_another_model_is_refused_naming_it(data_root, tmp_path):
  """A workdir without config.json (so the workdir check cannot help) holding checkpoints of a
  CNN of another shape: one message naming the checkpoint folder, not an orbax traceback."""
  run_lib.run(tiny("mnist_cnn", data_root), str(tmp_path / "a"))
  (tmp_path / "b").mkdir()
  shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
  other = tiny("mnist_cnn", data_root)
  other.model.cnn.dense = (32,)
  ckpt = (tmp_path / "b" / "checkpoints" / "cnn").resolve()
  with pytest.raises(UserError, match=f"checkpoint {ckpt} was made for another model"):
    run_lib.run(other, str(tmp_path / "b"))
  assert not (tmp_path / "b" / "results.jsonl").exists()


def test_training_that_blows_up_names_model_epoch_and_quantity(data_root, tmp_path):
  config = tiny("mnist_cnn", data_root)
  config.train.cnn.learning_rate = 1e30
  with pytest.raises(UserError) as err:
    run_lib.run(config, str(tmp_path))
  message = str(err.value)
  assert f"({(tmp_path / 'checkpoints' / 'cnn').resolve()}): non-finite" in message
  assert "at epoch 1/1; nothing was checkpointed" in message
  assert not list((tmp_path / "checkpoints" / "cnn").glob("[0-9]*"))
  assert not (tmp_path / "results.jsonl").exists()
  config.train.cnn.learning_rate = 1e-3  # the corrected command is not refused: nothing was made
  workdir_lib.claim_workdir(config, tmp_path)


def test_every_model_is_attacked_on_the_same_pairs_and_records_reproduce_each_row(
  data_root, tmp_path
):
  """configs/study.py:quick (its MNIST part, shrunk): every model's rows of an attack come
  from the same (source, target) pairs, the VAE attacks' from a prefix of them; each row's
  per-pair record recomputes its rates and counts exactly (metrics.row_stats), with no rerun;
  the minimal-budget rows record a budget per pair."""
  study_attacks = ("fgsm", "bim", "bim_l1", "lbfgs", "bim_min", "bim_l1_min")
  part = study.get_config("quick").mnist_vae
  config = tiny("mnist_vae", data_root, attacks=study_attacks, config=part)
  config.attacks.vae.enabled = ("latent_l2", "latent_kl", "latent_fgsm")
  config.attacks.vae.latent_kl.eps = (0.01, 1.0)
  config.attacks.vae.latent_kl.max_iters = 3
  with config.attacks.vae.latent_kl.unlocked():
    config.attacks.vae.latent_kl.num_pairs = 2  # its own prefix (the LFW latent attacks' 50)
  config.attacks.num_pairs = 6
  config.attacks.vae.num_pairs = 4
  run_lib.run(config, str(tmp_path))
  rows = read_rows(tmp_path)
  assert rows and all("record" in r for r in rows)
  pairs_of = {}
  for r in rows:
    with np.load(tmp_path / r["record"]) as f:
      pairs_of[(r["model"], r["attack"], r["eps"])] = (f["source_index"], f["target"])
    again = metrics.row_stats(attacks_lib.read_record(tmp_path, r))
    for field in (
      "n_pairs",
      "success_rate",
      "validity_rate",
      "effectiveness",
      "mean_ssim",
      "mean_target_prob",
      "mean_l2",
      "validity_rate_psnr",
      "effectiveness_psnr",
    ):
      assert again[field] == r[field], (r["model"], r["attack"], field)  # fmt: skip
    if r["attack"] in ("bim_min", "bim_l1_min"):  # a budget per pair: found, or +inf
      budget = attacks_lib.read_record(tmp_path, r).budget
      assert budget.shape == (6,) and not np.isnan(budget).any()
      assert (np.isinf(budget) | (budget <= r["eps"] * (1 + 1e-6))).all()
  cnn_src, cnn_tgt = pairs_of[("cnn", "fgsm", 0.05)]
  assert len(cnn_src) == 6
  for (model, attack, _), (src, tgt) in pairs_of.items():
    n = 2 if attack == "latent_kl" else 4 if attack.startswith(("latent", "reconstruction")) else 6
    np.testing.assert_array_equal(src, cnn_src[:n], err_msg=f"{model} {attack}")
    np.testing.assert_array_equal(tgt, cnn_tgt[:n], err_msg=f"{model} {attack}")
  # The record of the pairs is kept, and a rerun reads it back (nothing recomputed).
  (saved,) = (tmp_path / "pairs").glob("*.npz")
  with np.load(saved) as f:
    np.testing.assert_array_equal(f["index"], cnn_src)
    assert len(np.unique(f["index"])) == 6  # each source once: the test set allows it


def test_lfw_generative_part_attacks_every_model_on_the_same_colour_pairs(data_root, tmp_path):
  """configs/study_genclf.py's LFW part (issue 19, item 4), shrunk: colour faces, the CNN, the
  matched CNN, the joint VAE and both generative classifiers attacked on the same pairs; the
  latent-descent attack only on the generative classifiers, inside the box."""
  part = study_genclf.get_config("quick").lfw_genclf28
  config = tiny("lfw", data_root, attacks=("bim", "latent_descent"), config=part)
  config.attacks.vae.enabled = ()
  config.model.abs.update(n_samples=32, steps=2)
  run_lib.run(config, str(tmp_path))
  rows = read_rows(tmp_path)
  assert {(r["model"], r["attack"]) for r in rows} == {
    *((m, "bim") for m in config.models),
    ("abs", "latent_descent"),
    ("cvae", "latent_descent"),
  }
  pairs = set()
  for r in rows:
    with np.load(tmp_path / r["record"]) as f:
      pairs.add((tuple(f["source_index"]), tuple(f["target"])))
  assert len(pairs) == 1
  for model in ("abs", "cvae"):
    with np.load(tmp_path / "examples" / f"{model}_latent_descent.npz") as f:
      assert f["x"].shape[-1] == 3 and f["x_adv"].min() >= 0 and f["x_adv"].max() <= 1


def test_a_control_outside_pair_models_joins_a_finished_run_on_its_pairs(data_root, tmp_path):
  """A model added to a finished run with `attacks.pair_models` naming the run's models: the
  pairs file is the same (its hash unchanged), gains the new model's clean predictions, and
  keeps its pairs; the finished rows are kept as they were; the new model is attacked on
  those pairs. Without pair_models the same addition is a new set of pairs."""
  from configs import base  # noqa: PLC0415

  c = tiny("mnist_cnn", data_root, attacks=("fgsm",))
  c.output.figures = False
  run_lib.run(c, str(tmp_path))
  before = read_rows(tmp_path)
  (pairs_path,) = (tmp_path / "pairs").glob("*.npz")
  with np.load(pairs_path) as f:
    pairs0 = {k: f[k] for k in f.files}
  assert "prediction_cnn_matched" not in pairs0
  c.attacks.pair_models = tuple(c.models)
  c.models = (*c.models, "cnn_matched")
  base.add_model_sections(c, c.models)
  c.train.cnn_matched.match_to = "cnn"
  run_lib.run(c, str(tmp_path))
  rows = read_rows(tmp_path)
  assert [r for r in rows if r["model"] == "cnn"] == before  # kept, not recomputed
  assert list((tmp_path / "pairs").glob("*.npz")) == [pairs_path]
  with np.load(pairs_path) as f:
    for k, v in pairs0.items():
      np.testing.assert_array_equal(f[k], v)
    assert f["prediction_cnn_matched"].shape == pairs0["prediction_cnn"].shape
  new = [r for r in rows if r["model"] == "cnn_matched"]
  assert len(new) == len(before)
  for a, b in zip(before, new, strict=True):
    with np.load(tmp_path / a["record"]) as x, np.load(tmp_path / b["record"]) as y:
      for k in ("source_index", "target"):
        np.testing.assert_array_equal(x[k], y[k])
  from experiments import keys  # noqa: PLC0415

  c.attacks.pair_models = ()
  assert keys.pairs_settings(c) != pairs_path.stem
  # Appending is the one change of the models allowed: not a reordering, nor another training.
  for change in ("order", "train"):
    d = c.copy_and_resolve_references()
    if change == "order":
      d.models = ("cnn_matched", "cnn")
      d.train.cnn_matched.match_to = ""
    else:
      d.train.cnn.learning_rate *= 2
    with pytest.raises(UserError, match="belongs to a different config"):
      run_lib.run(d, str(tmp_path))
