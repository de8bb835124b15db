"""experiments.report: summary.md numbers equal results.jsonl, H0/H1 verdicts, figures."""

import json
import math
import pathlib
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
from absl import app
from absl.testing import flagsaver
from PIL import Image

from experiments import keys, report, store
from experiments.report import cli
from vae_attacks import metrics

NUM = r"(-?[0-9.e+-]+|—)"
RATE_CI = re.compile(rf"^{NUM} \[{NUM}, {NUM}\]$")


def make_row(dataset, model, attack, norm, eps, *, n=40, k=10, high=None, validity=0.75, **extra):
  """A result row as experiments.attacks writes it, with known, non-round numbers."""
  high = k // 2 if high is None else high
  lo, hi = metrics.wilson_interval(k, n)
  vlo, vhi = metrics.wilson_interval(round(validity * n), n)
  moderate = k - high
  low = round(validity * n) - high
  seed = zlib.crc32(f"{dataset}{model}{attack}{eps}".encode()) % 1000 / 1000.0
  row = dict(
    dataset=dataset,
    model=model,
    attack=attack,
    norm=norm,
    eps=eps,
    settings="abc",
    n_pairs=n,
    n_sources=n,
    success_rate=k / n,
    success_rate_ci=[lo, hi],
    mean_target_prob=0.123456 + 0.5 * seed,
    mean_target_prob_ci=[0.1, 0.7],
    validity_rate=validity,
    validity_rate_ci=[vlo, vhi],
    mean_ssim=0.876543,
    effectiveness=dict(
      high=high,
      moderate=moderate,
      low=max(low, 0),
      ineffective=n - high - moderate - max(low, 0),
      modal="low",
    ),
    mean_l0=700.0 + seed,
    mean_l0_ci=[690.0, 710.0],
    mean_l1=12.34567 + seed,
    mean_l1_ci=[12.0, 13.0],
    mean_l2=1.234567 + seed,
    mean_l2_ci=[1.1, 1.3],
    mean_linf=0.0987654 + seed,
    mean_linf_ci=[0.09, 0.11],
    seconds=1.5,
  )
  row.update(extra)
  return row


def make_workdir(path, dataset, rows, *, models=("cnn", "mlp_vae"), image=(8, 8, 1), curves=()):
  """A work directory as experiments.run leaves it, with small examples and curves."""
  path.mkdir(parents=True, exist_ok=True)
  store.write_json_atomic(
    path / "config.json",
    dict(name=f"{dataset}_test", data=dict(name=dataset), output=dict(figures=True)),
  )
  train = {}
  for i, m in enumerate(models):
    train[m] = dict(test_accuracy=0.91234 - 0.1 * i, train_seconds=12.3456, param_count=123457)
    if m.endswith("vae"):
      train[m] = dict(
        test_accuracy=0.8123,
        test_neg_elbo_nats=98.7654,
        train_seconds=20.5,
        vae=dict(param_count=1000),
        latent_classifier=dict(param_count=234),
      )
  store.write_json_atomic(path / "train_metrics.json", train)
  log = store.ResultsLog(path / "results.jsonl", keys.RESULT_KEY)
  log.extend(rows)
  rng = np.random.default_rng(0)
  for model, attack in {(r["model"], r["attack"]) for r in rows}:
    eps = sorted({r["eps"] for r in rows if (r["model"], r["attack"]) == (model, attack)})
    x = rng.uniform(size=(3, *image)).astype(np.float32)
    x_adv = np.clip(x[None] + rng.normal(0, 0.05, (len(eps), 3, *image)), 0, 1)
    arrays = dict(x=x, x_adv=x_adv, source_label=np.arange(3), target=np.arange(1, 4), eps=eps)
    if model.endswith("vae"):
      arrays["rec_adv"] = np.clip(x_adv + 0.1, 0, 1)
      arrays["x_target"] = x[::-1]
    (path / "examples").mkdir(exist_ok=True)
    np.savez(path / "examples" / f"{model}_{attack}.npz", **arrays)
  for model, attack in curves:
    (path / "curves").mkdir(exist_ok=True)
    c = np.array([10.0, 1.0, 0.1, 0.01])
    xs = rng.uniform(0, 1, (5, 4)).cumsum(axis=1) / 4
    np.savez(path / "curves" / f"{model}_{attack}.npz", c=c, x=xs, y=1 - xs)
  return path


def cells(line):
  return [c.strip() for c in line.strip().strip("|").split("|")]


def table_after(text, heading):
  """The body rows of the first markdown table after `heading`, as lists of cells."""
  start = text.index(heading)
  lines = text[start:].splitlines()[1:]
  i = next(j for j, line in enumerate(lines) if line.startswith("|"))
  header = cells(lines[i])
  body = []
  for line in lines[i + 2 :]:
    if not line.startswith("|"):
      break
    body.append(dict(zip(header, cells(line), strict=True)))
  return body


def num(s):
  return None if s == "—" else float(s)


def rate_ci(s):
  m = RATE_CI.match(s)
  assert m, s
  return tuple(num(g) for g in m.groups())


def r3(v):
  return None if v is None else round(v, 3)


def close4(text, value):
  """A number printed with 4 significant digits equals `value` to that precision."""
  return float(text) == pytest.approx(value, rel=6e-4)


def find(rows, model, attack, eps):
  (r,) = [r for r in rows if (r["model"], r["attack"], r["eps"]) == (model, attack, eps)]
  return r


# --------------------------------------------------------------------------------------------
# Tables.


def grid_rows(dataset="mnist"):
  """CNN and MLP VAE rows: fgsm (validity falls with eps) and lbfgs (a penalty: C)."""
  rows = []
  for model, shift in (("cnn", 0), ("mlp_vae", -4)):
    for eps, k, val in ((0.1, 12, 0.9), (0.2, 20, 0.6), (0.3, 33, 0.3)):
      rows.append(make_row(dataset, model, "fgsm", "linf", eps, k=k + shift, validity=val))
    for c, k, val in ((0.01, 40, 0.2), (0.1, 30, 0.55), (1.0, 5, 0.95)):
      rows.append(make_row(dataset, model, "lbfgs", "l2", c, k=k + shift, validity=val))
    rows.append(make_row(dataset, model, "bim_l1", "l1", 5.0, k=7 + shift, validity=0.1))
  for c, val in ((0.01, 0.2), (0.1, 0.6), (1.0, 0.9)):  # a VAE attack, penalty C
    rows.append(make_row(dataset, "mlp_vae", "latent_l2", "l2", c, k=9, validity=val))
  return rows


def test_reference_table_equals_rows_at_the_documented_eps(tmp_path):
  rows = grid_rows()
  wd = make_workdir(tmp_path / "run", "mnist", rows)
  text = report.write_report(wd, figures=False).read_text()
  assert "validity rate >= 0.5" in text  # the rule is stated
  body = table_after(text, "### Model x attack at the reference eps: classifier attacks")
  vae_body = table_after(text, "### Model x attack at the reference eps: VAE attacks")
  # fgsm: largest eps with validity >= 0.5 -> 0.2; lbfgs, latent_l2: smallest C with it -> 0.1;
  # bim_l1: no eps qualifies -> its weakest (only) setting.
  want = {"fgsm": 0.2, "lbfgs": 0.1, "bim_l1": 5.0, "latent_l2": 0.1}
  assert len(body) == 6 and [line["attack"] for line in vae_body] == ["latent_l2"]
  for line in body + vae_body:
    eps = want[line["attack"]]
    assert float(line["eps"]) == eps
    r = find(rows, line["model"], line["attack"], eps)
    rate, lo, hi = rate_ci(line["success rate [95% CI]"])
    assert (rate, lo, hi) == (r3(r["success_rate"]), *map(r3, r["success_rate_ci"]))
    assert num(line["mean confidence"]) == r3(r["mean_target_prob"])
    assert num(line["validity rate"]) == r3(r["validity_rate"])
    assert line["effectiveness (modal)"] == r["effectiveness"]["modal"]
    counts = [int(c) for c in line["high / moderate / low / ineffective"].split(" / ")]
    assert counts == [r["effectiveness"][k] for k in ("high", "moderate", "low", "ineffective")]
    assert close4(line["mean L2"], r["mean_l2"])
    assert close4(line["mean L∞"], r["mean_linf"])
    assert int(line["n pairs"]) == r["n_pairs"]
  assert [line["model"] for line in body][:3] == ["cnn"] * 3  # the CNN first


def test_full_table_has_every_row_and_train_table_the_metrics(tmp_path):
  rows = grid_rows()
  wd = make_workdir(tmp_path / "run", "mnist", rows)
  text = report.write_report(wd, figures=False).read_text()
  body = table_after(text, "MNIST: every eps")
  assert len(body) == len(rows)
  for line in body:
    r = find(rows, line["model"], line["attack"], float(line["eps"]))
    assert rate_ci(line["success rate [95% CI]"])[0] == r3(r["success_rate"])
    e_rate, e_lo, e_hi = rate_ci(line["high eff. rate [95% CI]"])
    assert e_rate == r3(r["effectiveness"]["high"] / r["n_pairs"])
    assert (e_lo, e_hi) == tuple(
      map(r3, metrics.wilson_interval(r["effectiveness"]["high"], r["n_pairs"]))
    )
    assert close4(line["mean L1"], r["mean_l1"])
  train = {line["model"]: line for line in table_after(text, "### Trained models")}
  assert num(train["cnn"]["test accuracy"]) == 0.912
  assert train["cnn"]["test −ELBO (nats)"] == "—"
  assert train["cnn"]["params"] == "123,457"
  assert num(train["mlp_vae"]["test −ELBO (nats)"]) == 98.77
  assert train["mlp_vae"]["params"] == "1,234"  # VAE + its latent classifier


def test_time_per_stage_sums_each_sweeps_eps_rows_and_each_models_training(tmp_path):
  rows = grid_rows()
  for i, r in enumerate(rows):  # distinct times, so a wrong grouping shows in the sums
    r["seconds"] = 1.0 + i
  rows[0]["seconds"] = None  # a row without a time counts for nothing
  wd = make_workdir(tmp_path / "run", "mnist", rows)
  text = report.write_report(wd, figures=False).read_text()
  body = table_after(text, "MNIST: time per stage")
  wall = lambda line: float(line["wall s"].replace(",", ""))
  got = {(line["stage"], line["model / sweep"]): wall(line) for line in body}
  sweeps: dict = {}
  for r in rows:
    key = ("attack", f"{r['model']} {r['attack']} {r['norm']}")
    sweeps[key] = sweeps.get(key, 0.0) + (r["seconds"] or 0.0)
  want = {("train", "cnn"): 12.3456, ("train", "mlp_vae"): 20.5, **sweeps}
  for key, s in want.items():
    assert got[key] == pytest.approx(s, abs=0.5)  # printed to the second
  total = sum(want.values())
  assert got[("**total**", "")] == pytest.approx(total, abs=0.5)
  assert got[("**all train**", "")] == pytest.approx(32.8456, abs=0.5)
  walls = [got[k] for k in got if not k[0].startswith("**")]
  assert walls == sorted(walls, reverse=True)  # longest first
  assert f"{total / 3600:.2f} h" in text


def test_time_per_stage_counts_defence_and_transfer_rows():
  """A defences record's attack time is in its rows (kind "defense"), not in `model` rows:
  each (defence, attack) sums its eps, a transfer row is named by source and target."""
  from experiments.report import tables  # noqa: PLC0415

  def row(defense, attack, eps, seconds, **extra):
    return dict(kind="defense", defense=defense, attack=attack, eps=eps, seconds=seconds, **extra)

  rows = [
    row("projection", "apgd", 0.1, 100.0),
    row("projection", "apgd", 0.3, 20.0),
    row("projection", "pgd_bpda", 0.1, 7.0),
    row("gmvae", "apgd", 0.1, 3.0),
    row("none", "pgd", 0.1, 5.0, source="none", target="projection"),
    row("none", "pgd", 0.3, 6.0, source="none", target="projection"),
  ]
  got = {what: s for kind, what, s in tables.stage_seconds({"gmvae": {"train_seconds": 9.0}},
                                                           rows)}  # fmt: skip
  assert got == {
    "gmvae": 9.0,
    "projection apgd": 120.0,
    "projection pgd_bpda": 7.0,
    "gmvae apgd": 3.0,
    "none -> projection pgd": 11.0,
  }


def test_only_current_settings_and_last_row_per_cell_and_torn_line():
  a = make_row("mnist", "cnn", "fgsm", "linf", 0.1, k=1, settings="old")
  b = make_row("mnist", "cnn", "fgsm", "linf", 0.1, k=2, settings="new")
  c = make_row("mnist", "cnn", "fgsm", "linf", 0.2, k=3, settings="old")
  kept, left = report.select_rows([a, b, c], "new")
  assert kept == [b] and left == 2
  kept, left = report.select_rows([a, b, c], None)  # no config: the last row of each cell
  assert kept == [b, c] and left == 1


def test_torn_results_line_is_skipped_and_file_untouched(tmp_path):
  wd = make_workdir(tmp_path / "run", "mnist", grid_rows()[:2])
  path = wd / "results.jsonl"
  raw = path.read_bytes() + b'{"dataset": "mni'
  path.write_bytes(raw)
  assert len(report.load_run(wd).rows) == 2
  report.write_report(wd, figures=False)
  assert path.read_bytes() == raw


def test_auddc_line(tmp_path):
  extra = dict(auddc=0.41234, auddc_std=0.1234, auddc_ci=[0.35, 0.47], n_auddc_pairs=17)
  rows = [make_row("mnist", "mlp_vae", "latent_l2", "l2", c, **extra) for c in (0.1, 1.0)]
  text = report.write_report(make_workdir(tmp_path / "r", "mnist", rows), figures=False)
  (line,) = table_after(text.read_text(), "### AUDDC")  # one line for the C grid
  assert line["C grid"] == "0.1, 1"
  assert line["AUDDC mean ± std"] == "0.412 ± 0.123"
  assert line["95% CI"] == "[0.350, 0.470]"
  assert line["n pairs"] == "17"


# --------------------------------------------------------------------------------------------
# H0 and H1.


def pair_rows(dataset, a_model, b_model, k_a, k_b, *, attacks=("fgsm", "bim"), eps=(0.1, 0.2)):
  rows = []
  for attack in attacks:
    for e in eps:
      rows.append(make_row(dataset, a_model, attack, "linf", e, k=k_a, high=k_a))
      rows.append(make_row(dataset, b_model, attack, "linf", e, k=k_b, high=k_b))
  return rows


@pytest.mark.parametrize(
  "k_cnn, k_vae, verdict, favour, against",
  [(35, 5, "supported", 4, 0), (5, 35, "rejected", 0, 4), (20, 17, "inconclusive", 0, 0)],
)
def test_h0_verdict(k_cnn, k_vae, verdict, favour, against):
  rows = pair_rows("mnist", "cnn", "conv_vae", k_cnn, k_vae)
  rows.append(make_row("mnist", "conv_vae", "latent_l2", "l2", 1.0))  # no CNN twin
  v = report.h0_verdict(rows)
  for measure in ("success", "effective"):
    t = v[measure]
    assert (t["verdict"], t["favour"], t["against"], t["total"]) == (verdict, favour, against, 4)
    assert t["same"] == 4 - favour - against
  assert v["verdict"] == verdict
  assert v["pairs"] == {"baseline": [40, 40], "vae": [40, 40]}
  assert set(v["per_attack"]) == {"fgsm", "bim"}


def test_h0_verdict_mixed_cells_and_majority_rule():
  rows = pair_rows("mnist", "cnn", "mlp_vae", 35, 5, eps=(0.1,))  # fgsm, bim: VAE below
  rows += pair_rows("mnist", "cnn", "mlp_vae", 5, 35, attacks=("pgd",), eps=(0.1,))  # above
  v = report.h0_verdict(rows)
  assert (v["success"]["favour"], v["success"]["against"]) == (2, 1)
  assert v["verdict"] == "supported"  # 2 of 3 cells is a strict majority
  rows += pair_rows("mnist", "cnn", "mlp_vae", 20, 20, attacks=("x",), eps=(0.1,))
  assert report.h0_verdict(rows)["verdict"] == "inconclusive"  # 2 of 4 is not
  assert report.h0_verdict([])["verdict"] == "not tested"


def test_h0_in_summary_states_counts_and_pairs(tmp_path):
  rows = pair_rows("mnist", "cnn", "mlp_vae", 35, 5)
  text = report.write_report(make_workdir(tmp_path / "r", "mnist", rows), figures=False)
  text = text.read_text()
  assert re.search(r"\*\*H0\*\*.*MNIST: by success rate \*\*supported\*\* — in 4 of 4", text)
  assert "Pairs per cell: CNN 40, VAE 40" in text
  assert "**H1**" in text and "not tested" in text.split("**H1**")[1][:400]


def h1_rows(k_lfw, k_mnist, ratio):
  rows = []
  for model in ("cnn", "mlp_vae"):
    rows.append(make_row("mnist", model, "fgsm", "linf", 0.1, k=k_mnist))
    rows.append(make_row("lfw", model, "fgsm", "linf", 0.1, k=k_lfw))
    rows.append(make_row("mnist", model, "pgd_l2", "l2", 1.0, k=k_mnist))
    rows.append(make_row("lfw", model, "pgd_l2", "l2", round(math.sqrt(ratio), 2), k=k_lfw))
    rows.append(make_row("mnist", model, "bim_l1", "l1", 5.0, k=k_mnist))
    rows.append(make_row("lfw", model, "bim_l1", "l1", 5.0, k=k_lfw))  # not scaled: no match
    rows.append(make_row("mnist", model, "lbfgs", "l2", 0.1, k=k_mnist))  # penalty C
    rows.append(make_row("lfw", model, "lbfgs", "l2", 0.1, k=k_lfw))
  return rows


@pytest.mark.parametrize(
  "k_lfw, k_mnist, verdict", [(36, 6, "supported"), (6, 36, "rejected"), (22, 18, "inconclusive")]
)
def test_h1_verdict(k_lfw, k_mnist, verdict):
  pixels = {"mnist": 784, "lfw": 154 * 154 * 3}
  v = report.h1_verdict(h1_rows(k_lfw, k_mnist, 154 * 154 * 3 / 784), pixels=pixels)
  assert v["success"]["total"] == 4  # fgsm and pgd_l2, two models
  assert v["effective"]["total"] == 4
  assert v["verdict"] == v["success"]["verdict"] == verdict
  assert v["effective"]["verdict"] == verdict  # high = k // 2 follows k
  assert v["norms"] == ["l2", "linf"]
  assert v["excluded"] == ["lbfgs"]
  assert v["unmatched"] == 2  # bim_l1 of both models
  (l2,) = {c["eps_high"] for c in v["cells"] if c["norm"] == "l2"}
  assert l2 == pytest.approx(math.sqrt(v["pixel_ratio"]), abs=0.01)


def test_combined_report_has_h1_and_both_datasets(tmp_path):
  ratio = (16 * 16 * 3) / (8 * 8 * 1)
  rows = h1_rows(36, 6, ratio)
  mn = make_workdir(tmp_path / "mnist", "mnist", [r for r in rows if r["dataset"] == "mnist"])
  lf = make_workdir(
    tmp_path / "lfw", "lfw", [r for r in rows if r["dataset"] == "lfw"], image=(16, 16, 3)
  )
  out = report.write_combined_report(tmp_path / "study", [mn, lf], figures=False).read_text()
  assert "## MNIST" in out and "## LFW" in out
  # D comes from the examples' shapes (8x8x1 and 16x16x3), so the L2 budget matched is sqrt(12).
  assert re.search(r"\*\*H1\*\*.*by success rate \*\*supported\*\* — in 4 of 4", out)
  assert "Pairs per cell: LFW 40, MNIST 40" in out
  assert "left out (eps is a penalty weight, not a budget): lbfgs" in out


def test_null_intervals_do_not_crash(tmp_path):
  r1 = make_row("mnist", "cnn", "fgsm", "linf", 0.1, n=1, k=1)
  r2 = make_row("mnist", "mlp_vae", "fgsm", "linf", 0.1, n=1, k=0)
  for r in (r1, r2):
    for key in [k for k in r if k.endswith("_ci")]:
      r[key] = [None, None]
    r["mean_ssim"] = None
  r2["effectiveness"] = {"high": 0, "moderate": 0, "low": 0, "ineffective": 1, "modal": None}
  r3_ = make_row("mnist", "mlp_vae", "bim", "linf", 0.1, success_rate=None, n_pairs=0)
  r3_["effectiveness"], r3_["success_rate_ci"] = {}, [None, None]
  r4 = make_row("mnist", "cnn", "bim", "linf", 0.1)
  wd = make_workdir(tmp_path / "r", "mnist", [r1, r2, r3_, r4], image=(6, 6, 1))
  for p in (wd / "examples").glob("*.npz"):  # the rates figures meet the null intervals
    p.unlink()
  text = report.write_report(wd).read_text()
  assert len(list((wd / "figures").glob("*_rates.png"))) == 2
  ref = {(x["model"], x["attack"]): x for x in table_after(text, "### Model x attack at")}
  assert ref["cnn", "fgsm"]["success rate [95% CI]"] == "1.000 [—, —]"
  assert ref["mlp_vae", "bim"]["success rate [95% CI]"] == "— [—, —]"
  v = report.h0_verdict([r1, r2, r3_, r4])
  # n = 1: the Wilson interval is recomputed (wide, overlapping); n = 0: no interval.
  assert (v["success"]["same"], v["success"]["skipped"], v["success"]["total"]) == (1, 1, 1)
  assert v["verdict"] == "inconclusive"


# --------------------------------------------------------------------------------------------
# Figures.


def test_figures_are_valid_pngs_linked_from_the_summary(tmp_path):
  rows = grid_rows()[:3] + grid_rows()[7:10]  # fgsm of cnn and mlp_vae
  rows.append(make_row("mnist", "mlp_vae", "latent_l2", "l2", 1.0, auddc=0.3, auddc_std=0.1))
  wd = make_workdir(tmp_path / "r", "mnist", rows, curves=[("mlp_vae", "latent_l2")])
  text = report.write_report(wd).read_text()
  figs = sorted((wd / "figures").glob("*.png"))
  names = {p.name for p in figs}
  assert names == {
    "mnist_cnn_rates.png",
    "mnist_cnn_fgsm_examples.png",
    "mnist_mlp_vae_rates.png",
    "mnist_mlp_vae_fgsm_examples.png",
    "mnist_mlp_vae_latent_l2_examples.png",
    "mnist_mlp_vae_latent_l2_curves.png",
  }
  sizes = {}
  for p in figs:
    with Image.open(p) as im:
      im.verify()
    with Image.open(p) as im:
      assert im.format == "PNG"
      assert im.size[0] >= 200 and im.size[1] >= 200
      assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something is drawn
      sizes[p.name] = im.size
    assert f"(figures/{p.name})" in text
  assert not list((wd / "figures").glob(".*"))  # no temporary file left
  # The VAE files add two columns: the target image and the reconstruction of the adversarial.
  w_cnn = sizes["mnist_cnn_fgsm_examples.png"][0]
  assert sizes["mnist_mlp_vae_fgsm_examples.png"][0] == pytest.approx(w_cnn * 5 / 3, rel=0.02)


def test_combined_figure_links_resolve(tmp_path):
  rows = grid_rows()[:1]
  wd = make_workdir(tmp_path / "runs" / "a", "mnist", rows)
  out = report.write_combined_report(tmp_path / "study", [wd])
  for link in re.findall(r"\]\(([^)]+\.png)\)", out.read_text()):
    assert (out.parent / link).is_file(), link


def test_amplified_perturbation():
  d = np.array([-0.02, 0.0, 0.01, 0.04])
  a = report.amplified(d)
  assert a[1] == 0.5 and a[3] == 1.0
  np.testing.assert_allclose(a, 0.5 + 0.5 * d / 0.04)
  assert np.all(report.amplified(np.zeros(3)) == 0.5)


def test_config_hash_of_config_json_matches_row_settings(tmp_path):
  """The report keeps rows of the config's settings: its hash must be the runner's."""
  import importlib  # noqa: PLC0415

  c = importlib.import_module("configs.mnist_cnn").get_config("quick")
  settings = keys.attack_settings(c)
  as_saved = json.loads(c.to_json())
  assert report.settings_hash(as_saved) == settings


def test_command_line(tmp_path, capsys):
  mn = make_workdir(tmp_path / "m", "mnist", pair_rows("mnist", "cnn", "mlp_vae", 35, 5))
  lf = make_workdir(tmp_path / "l", "lfw", pair_rows("lfw", "cnn", "mlp_vae", 35, 5))
  with flagsaver.flagsaver():
    argv = cli.FLAGS(["report", "--out", str(tmp_path / "s"), "--nofigures", str(mn), str(lf)])
    path = cli.report_from_flags(argv)
  assert path == tmp_path / "s" / "summary.md"
  assert capsys.readouterr().out.strip() == str(path)
  text = path.read_text()
  assert text.count("by success rate **supported**") == 3  # MNIST, LFW, both together
  with flagsaver.flagsaver(), pytest.raises(SystemExit):  # several workdirs need --out
    app.run(cli.main, argv=["report", "--nofigures", str(mn), str(lf)])


# --------------------------------------------------------------------------------------------
# The attack lists come from the registry; the committed study summary is reproduced.


def test_attack_families_come_from_the_registry(tmp_path, monkeypatch):
  """A new classifier attack in the registry is filed with the classifier attacks, a new VAE
  attack with the VAE attacks; a name the registry lacks gets its own, named table."""
  from vae_attacks.attacks import registry  # noqa: PLC0415

  fgsm, latent = registry.ATTACKS["fgsm"], registry.ATTACKS["latent_fgsm"]
  monkeypatch.setitem(registry.ATTACKS, "new_cls", fgsm._replace(name="new_cls"))
  monkeypatch.setitem(registry.ATTACKS, "new_vae", latent._replace(name="new_vae"))
  rows = [
    make_row("mnist", "cnn", "fgsm", "linf", 0.1),
    make_row("mnist", "cnn", "new_cls", "linf", 0.1),
    make_row("mnist", "mlp_vae", "new_vae", "linf", 0.1),
    make_row("mnist", "mlp_vae", "mystery", "linf", 0.1),
  ]
  text = report.write_report(make_workdir(tmp_path / "r", "mnist", rows), figures=False)
  text = text.read_text()
  heading = "### Model x attack at the reference eps: "
  classifier = table_after(text, heading + "classifier attacks")
  vae = table_after(text, heading + "VAE attacks")
  unknown = table_after(text, heading + "attacks not in the registry")
  assert [line["attack"] for line in classifier] == ["fgsm", "new_cls"]  # the registry's order
  assert [line["attack"] for line in vae] == ["new_vae"]
  assert [line["attack"] for line in unknown] == ["mystery"]
  assert "Not in vae_attacks/attacks/registry.py, so of no known family: mystery." in text
  assert "new_vae, ..." in text  # the reading notes list the registry's VAE attacks
  assert report.attack_family("new_cls") == "classifier" and report.attack_family("x") is None


def _study_copy(tmp_path):
  """The committed records of the 2026-12-01 study (results/study_2026-12-01), copied into
  tmp_path, or a skip."""
  study = pathlib.Path(__file__).resolve().parents[1] / "results" / "study_2026-12-01"
  parts = [study / "mnist_vae", study / "lfw_vae"]
  if not (study / "summary.md").is_file() or not all(
    (p / "results.jsonl").is_file() for p in parts
  ):
    pytest.skip(f"the committed study records are absent from {study}")
  for p in parts:
    shutil.copytree(p, tmp_path / p.name)
  return (study / "summary.md").read_bytes(), [tmp_path / p.name for p in parts]


def test_committed_study_summary_is_reproduced_byte_for_byte(tmp_path):
  want, parts = _study_copy(tmp_path)
  path = report.write_combined_report(tmp_path, parts, figures=False)
  assert path.read_bytes() == want


def test_readme_command_reproduces_the_study_summary(tmp_path):
  """`python -m experiments.report --nofigures --out=DIR DIR/mnist_vae DIR/lfw_vae` (README)."""
  want, parts = _study_copy(tmp_path)
  repo = pathlib.Path(__file__).resolve().parents[1]
  argv = ["-m", "experiments.report", "--nofigures", f"--out={tmp_path}", *map(str, parts)]
  proc = subprocess.run(
    [sys.executable, *argv], cwd=repo, capture_output=True, text=True, timeout=300, check=False
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(tmp_path / "summary.md")
  assert (tmp_path / "summary.md").read_bytes() == want
