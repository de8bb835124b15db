"""End to end: configs/mnist_defenses.py:quick through experiments.run on tiny fake MNIST."""

import json

import pytest
from fakedata import make_data_root

from configs import mnist_defenses
from experiments import run as run_lib
from experiments import validate


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_data_root(tmp_path_factory.mktemp("data"), n_train=256, n_test=64, size=40)


def tiny(data_root):
  """The :quick config shrunk further so the whole run takes seconds."""
  c = mnist_defenses.get_config("quick")
  c.data.dir = str(data_root)
  for t in c.train.values():
    t.epochs = 1
    t.batch_size = 32
  # Adversarial training and the substitute are unit-tested (tests/test_defenses.py); the run
  # keeps the two defences that have both a naive and an adaptive attack.
  c.defenses.enabled = ("distillation", "projection")
  c.defenses.num_examples = 16
  c.defenses.attacks.update(eps=(0.1, 0.3), fgsm=False, pgd_steps=2, restarts=2)
  c.defenses.projection.update(
    steps=2, restarts=2, attack_steps=2, threshold_examples=16, num_examples=16
  )
  c.defenses.transfer.sources = ("distillation",)
  c.attacks.shard = False
  return c


def read_rows(workdir):
  return [json.loads(x) for x in (workdir / "defenses.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~90 s of CPU: six small trainings and eight attack compilations
def test_quick_defenses_run_writes_rows_report_and_resumes(data_root, tmp_path):
  config = tiny(data_root)
  run_lib.run(config, str(tmp_path))
  rows = read_rows(tmp_path)
  attacked = [r for r in rows if r["kind"] == "defense"]
  per_defence = {"distillation": 2, "projection": 2}  # attacks each, no FGSM
  assert len(attacked) == sum(per_defence.values()) * 2  # x 2 eps
  by = {(r["defense"], r["attack"], r["eps"]): r for r in attacked}
  assert len(by) == len(attacked)
  # Distillation and projection each have an attack that knows them and one that does not.
  assert by[("distillation", "pgd_adaptive", 0.3)]["adaptive"]
  assert not by[("distillation", "pgd", 0.3)]["adaptive"]
  assert by[("projection", "pgd_bpda", 0.3)]["adaptive"]
  for r in attacked:
    assert r["n"] == 16 and r["n_robust_accuracy"] == 16
    assert r["max_linf"] <= r["eps"] + 1e-5
    lo, hi = r["robust_accuracy_ci"]
    assert lo <= r["robust_accuracy"] <= hi
    if r["defense"] == "projection":  # a rejecting defence reports its rejection rates
      assert 0.0 <= r["false_rejection_rate"] <= 1.0 and "detection_rate" in r
    else:
      assert "false_rejection_rate" not in r
  moved = [r for r in rows if r["kind"] == "transfer"]
  assert {(r["source"], r["target"]) for r in moved} == {
    (s, t) for s in ("distillation",) for t in per_defence
  }
  diagonal = next(r for r in moved if r["source"] == r["target"])
  assert diagonal["white_box"] and diagonal["crafted_with"] == "pgd_adaptive"
  metrics = json.loads((tmp_path / "train_metrics.json").read_text())
  assert set(metrics) == set(per_defence)
  assert set(metrics["distillation"]) >= {"teacher", "student", "test_accuracy"}
  summary = (tmp_path / "summary.md").read_text()
  assert "### Defences" in summary and "Black-box transfer" in summary
  assert "pgd_bpda" in summary

  before = (tmp_path / "defenses.jsonl").read_text()
  run_lib.run(config, str(tmp_path))  # everything done: nothing appended, checkpoints reused
  assert (tmp_path / "defenses.jsonl").read_text() == before
  reused = json.loads((tmp_path / "train_metrics.json").read_text())
  assert reused["distillation"]["student"]["reused_checkpoint"]


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("defenses.enabled", ("bogus",), "defenses.enabled[]='bogus' is not allowed"),
    ("defenses.adversarial.eps", 1.5, "defenses.adversarial.eps=1.5"),
    ("defenses.attacks.restarts", 0, "defenses.attacks.restarts=0"),
    ("defenses.projection.false_rejection_rate", 1.0, "false_rejection_rate=1.0"),
    ("defenses.transfer.sources", ("projection",), "sources[]='projection' is not allowed"),
  ],
)
def test_bad_defence_fields_are_named(field, value, message):
  c = mnist_defenses.get_config("quick")
  section, _, leaf = field.rpartition(".")
  node = c
  for part in section.split("."):
    node = node[part]
  node[leaf] = value
  with pytest.raises(validate.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    validate.validate(c)


def test_config_variants():
  quick, full, gpu = (mnist_defenses.get_config(a) for a in ("quick", None, "gpu"))
  for c in (quick, full, gpu):
    validate.validate(c)
  assert gpu.defenses.adversarial.steps == 40  # Madry et al.: PGD-40 training ...
  steps = gpu.train.adversarial.epochs * (60000 // gpu.train.adversarial.batch_size)
  assert steps >= 100_000  # ... for 100,000 steps
  assert full.defenses.num_examples >= 1000 and full.defenses.attacks.pgd_steps == 40
  with pytest.raises(ValueError, match="allowed"):
    mnist_defenses.get_config("slow")


def _row(defense, attack, adaptive, robust, **extra):
  return dict(kind="defense", dataset="mnist", defense=defense, attack=attack, eps=0.3,
              adaptive=adaptive, n=100, clean_accuracy=0.99, clean_accuracy_ci=[0.95, 1.0],
              robust_accuracy=robust, robust_accuracy_ci=[robust - 0.05, robust + 0.05],
              restarts=5, steps=40, **extra)  # fmt: skip


def test_defence_table_takes_the_worst_adaptive_attack_and_withholds_the_rest():
  from experiments import report  # noqa: PLC0415

  rows = [
    _row("distillation", "pgd", False, 0.90),  # the naive attack, fooled by saturation
    _row("distillation", "pgd_adaptive", True, 0.02),
    _row("adversarial", "fgsm", True, 0.95),
    _row("adversarial", "pgd", True, 0.89),
    _row("obscure", "pgd", False, 0.80),  # no attack that knows it: no robustness figure
    _row(
      "gate", "pgd", True, 0.5, false_rejection_rate=0.05, detection_rate=0.7, defended_rate=0.85
    ),  # fmt: skip
  ]
  text = report.defense_markdown(rows)
  worst = text.split("**Every attack**")[0]
  assert (
    "| distillation | 0.3 | 0.990 [0.950, 1.000] | 0.020 [-0.030, 0.070] | pgd_adaptive" in worst
  )
  assert "| adversarial | 0.3 | 0.990 [0.950, 1.000] | 0.890 [0.840, 0.940] | pgd |" in worst
  assert "| obscure | 0.3 | 0.990 [0.950, 1.000] | — (no adaptive attack) |" in worst
  every = text.split("**Every attack**")[1]
  assert "detection rate" in every and "| gate | pgd | yes | 0.3 | 100 | 5 x 40 |" in every
