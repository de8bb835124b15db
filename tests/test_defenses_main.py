"""End to end: configs/mnist_defenses.py:quick through experiments.run on tiny fake MNIST."""

import json

import numpy as np
import pytest
from fakedata import make_data_root
from test_newcomer import check_timings

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
  c.defenses.enabled = ("distillation", "projection", "gmvae")
  c.defenses.num_examples = 16
  c.defenses.attacks.update(eps=(0.1, 0.3), fgsm=False, pgd_steps=2, restarts=2)
  c.defenses.projection.update(
    steps=2, restarts=2, attack_steps=2, threshold_examples=16, num_examples=16
  )
  c.defenses.gmvae.threshold_examples = 16
  c.defenses.transfer.sources = ("distillation",)
  c.attacks.shard = False
  return c


def read_rows(workdir):
  return [json.loads(x) for x in (workdir / "defenses.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~110 s of CPU: seven small trainings and ten attack compilations
def test_quick_defenses_run_writes_rows_report_and_resumes(data_root, tmp_path):
  config = tiny(data_root)
  run_lib.run(config, str(tmp_path))
  rows = read_rows(tmp_path)
  attacked = [r for r in rows if r["kind"] == "defense"]
  # Attacks each, no FGSM; the projection's third knows its rejection too; each also gets the
  # APGD ensemble (`defenses.apgd`).
  per_defense = {"distillation": 3, "projection": 4, "gmvae": 3}
  assert len(attacked) == sum(per_defense.values()) * 2  # x 2 eps
  for name in per_defense:  # the costly APGD ensemble after the defence's other attacks
    kinds = [r["attack"] == "apgd" for r in attacked if r["defense"] == name]
    assert kinds == sorted(kinds) and any(kinds)
  by = {(r["defense"], r["attack"], r["eps"]): r for r in attacked}
  assert len(by) == len(attacked)
  # Distillation and projection each have an attack that knows them and one that does not.
  assert by[("distillation", "pgd_adaptive", 0.3)]["adaptive"]
  assert not by[("distillation", "pgd", 0.3)]["adaptive"]
  assert by[("projection", "pgd_bpda", 0.3)]["adaptive"]
  assert by[("projection", "pgd_bpda_reject", 0.3)]["adaptive"]
  for r in attacked:
    assert r["n"] == 16 and r["n_robust_accuracy"] == 16
    if r["attack"] == "apgd":  # the ensemble row: broken flags per run, no images kept
      assert set(r["broken_by"]) == {"apgd_ce", "apgd_t1", "apgd_t2"}
      assert sum(r["broken_by"].values()) <= r["n"]  # each example counted by its first breaker
    else:
      assert r["max_linf"] <= r["eps"] + 1e-5
      # The worst case over the first r restarts never rises with r, and ends at the row's.
      curve = r["unbroken_by_restart"]
      assert len(curve) == r["restarts"] and np.all(np.diff(curve) <= 0)
      if r["defense"] == "distillation":
        assert curve[-1] == pytest.approx(r["robust_accuracy"])
    lo, hi = r["robust_accuracy_ci"]
    assert lo <= r["robust_accuracy"] <= hi
    # The examples the attack broke are exactly the complement of its robust accuracy.
    broken = r["not_robust_examples"]
    assert len(set(broken)) == len(broken) and all(0 <= i < r["n"] for i in broken)
    assert len(broken) == round((1.0 - r["robust_accuracy"]) * r["n"])
    if r["defense"] != "distillation":  # a rejecting defence reports its rejection rates
      assert 0.0 <= r["false_rejection_rate"] <= 1.0
      assert "detection_rate" in r or r["attack"] == "apgd"
      # Correct and accepted <= correct, rejection aside; the gap is at most the rejections.
      aside = r["clean_accuracy_without_rejection"]
      assert r["clean_accuracy"] <= aside <= r["clean_accuracy"] + r["false_rejection_rate"]
    else:
      assert "false_rejection_rate" not in r
      assert "clean_accuracy_without_rejection" not in r
  moved = [r for r in rows if r["kind"] == "transfer"]
  assert {(r["source"], r["target"]) for r in moved} == {
    (s, t) for s in ("distillation",) for t in per_defense
  }
  diagonal = next(r for r in moved if r["source"] == r["target"])
  assert diagonal["white_box"] and diagonal["crafted_with"] == "pgd_adaptive"
  metrics = json.loads((tmp_path / "train_metrics.json").read_text())
  assert set(metrics) == set(per_defense)
  assert set(metrics["distillation"]) >= {"teacher", "student", "test_accuracy"}
  summary = (tmp_path / "summary.md").read_text()
  assert "### Defences" in summary and "Black-box transfer" in summary
  assert "pgd_bpda" in summary and "**Gradient-masking checks**" in summary
  _check_defense_figures(config, tmp_path, summary)

  # The timing table: one row per stage of the plan (each defence's build, its attacks, the
  # transfer matrix), with this run's seconds; the rerun rebuilds (restores) and attacks nothing.
  from experiments import defenses, progress  # noqa: PLC0415
  from vae_attacks import data as data_lib  # noqa: PLC0415

  sections = {k: v.sections for k, v in defenses.DEFENSES.items()}
  n_train = len(data_lib.load(config.data).x_train)
  labels = [s.label for s in progress.defense_plan(config, n_train, 16, sections)]
  first = check_timings(tmp_path, labels)
  before = (tmp_path / "defenses.jsonl").read_text()
  run_lib.run(config, str(tmp_path))  # everything done: nothing appended, checkpoints reused
  assert (tmp_path / "defenses.jsonl").read_text() == before
  check_timings(tmp_path, labels, done_earlier=("attack", "transfer"), first=first)
  reused = json.loads((tmp_path / "train_metrics.json").read_text())
  assert reused["distillation"]["student"]["reused_checkpoint"]


def test_only_attacks_runs_the_named_attack_alone_and_names_unknown_ones(data_root, tmp_path):
  """`defenses.only_attacks` makes the named attack's rows and no others; the transfer rows'
  settings do not depend on it; a name no defence runs is one line listing those that exist,
  after the rows of the names that do exist are written."""
  from experiments import keys  # noqa: PLC0415
  from experiments.errors import UserError  # noqa: PLC0415

  config = tiny(data_root)
  config.defenses.enabled = ("projection",)
  config.defenses.attacks.eps = (0.3,)
  config.defenses.apgd.enabled = False
  config.defenses.transfer.enabled = False
  before = keys.transfer_settings(config)
  config.defenses.only_attacks = ("pgd_bpda_reject",)
  assert keys.transfer_settings(config) == before
  run_lib.run(config, str(tmp_path))
  rows = [r for r in read_rows(tmp_path) if r["kind"] == "defense"]
  assert [(r["defense"], r["attack"], r["eps"]) for r in rows] == [
    ("projection", "pgd_bpda_reject", 0.3)
  ]
  config.defenses.only_attacks = ("pgd_bpda", "nope")
  with pytest.raises(UserError, match="only_attacks names nope, .*allowed: pgd, pgd_bpda, "):
    run_lib.run(config, str(tmp_path))
  attacks = sorted(r["attack"] for r in read_rows(tmp_path) if r["kind"] == "defense")
  assert attacks == ["pgd_bpda", "pgd_bpda_reject"]  # the existing name's row was kept


def _check_defense_figures(config, workdir, summary):
  """The figure arrays of the projection and the GMVAE, and their PNGs linked in the report."""
  import numpy as np  # noqa: PLC0415

  from vae_attacks import data as data_lib  # noqa: PLC0415

  data = data_lib.load(config.data)
  n = config.defenses.projection.num_examples
  x, y = np.asarray(data.x_test[:n]), np.asarray(data.y_test[:n])
  with np.load(workdir / "defense_examples" / "projection.npz") as f:
    proj = {k: f[k] for k in f.files}
  rows = min(8, n)
  np.testing.assert_array_equal(proj["x"], x[:rows])  # the clean inputs, in order
  np.testing.assert_array_equal(proj["label"], y[:rows])
  assert proj["x_adv"].shape == proj["x_proj"].shape == x[:rows].shape
  assert float(proj["eps"]) == max(config.defenses.attacks.eps)
  assert np.max(np.abs(proj["x_adv"] - proj["x"])) <= proj["eps"] + 1e-5
  assert not np.allclose(proj["x_proj"], proj["x_adv"])  # a projection, not the input
  assert proj["x_proj"].min() >= 0.0 and proj["x_proj"].max() <= 1.0  # pixels, not logits
  with np.load(workdir / "defense_examples" / "gmvae.npz") as f:
    gm = {k: f[k] for k in f.files}
  k, dim = len(data.class_names), config.model.gmvae["latent_dim"]
  m = config.defenses.num_examples
  assert gm["z"].shape == gm["z_pgd"].shape == gm["z_pgd_adaptive"].shape == (m, dim)
  assert gm["means"].shape == (k, dim)
  np.testing.assert_array_equal(gm["label"], np.asarray(data.y_test[:m]))
  assert gm["rejected_pgd"].dtype == bool and gm["rejected_pgd"].shape == (m,)
  assert not np.allclose(gm["z_pgd"], gm["z"])  # the attack moved the codes
  for name in ("projection", "gmvae"):
    png = workdir / "figures" / f"mnist_defense_{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"figures/mnist_defense_{name}.png" in summary.split("### Defences")[1]


def test_pca_2d_recovers_the_plane_of_planar_codes():
  import numpy as np  # noqa: PLC0415

  from experiments import report  # noqa: PLC0415

  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(6, 2)))[0]  # [6, 2] orthonormal
  coords = rng.normal(size=(50, 2)) * np.array([5.0, 1.0])
  z = coords @ basis.T + 3.0
  other = np.array([[1.0, 2.0]]) @ basis.T + 3.0
  z2, other2 = report.pca_2d(z, other)
  assert z2.shape == (50, 2)
  # Distances within the plane are preserved; the first axis carries the larger variance.
  d = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731
  np.testing.assert_allclose(d(z2), d(coords), atol=1e-8)
  assert np.var(z2[:, 0]) > np.var(z2[:, 1])
  want = np.linalg.norm(np.array([1.0, 2.0]) - coords.mean(axis=0))
  np.testing.assert_allclose(np.linalg.norm(other2[0]), want)  # z2 is centred at 0


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("defenses.enabled", ("bogus",), "defenses.enabled[]='bogus' is not allowed"),
    ("defenses.adversarial.eps", 1.5, "defenses.adversarial.eps=1.5"),
    ("defenses.trades.beta", 0.0, "defenses.trades.beta=0.0"),
    ("defenses.trades.eps", 1.5, "defenses.trades.eps=1.5"),
    ("defenses.attacks.restarts", 0, "defenses.attacks.restarts=0"),
    ("defenses.projection.false_rejection_rate", 1.0, "false_rejection_rate=1.0"),
    ("defenses.transfer.sources", ("projection",), "sources[]='projection' is not allowed"),
    ("defenses.only_attacks", ("",), "defenses.only_attacks=.*; allowed: a tuple of attack names"),
  ],
)
def test_bad_defense_fields_are_named(field, value, message):
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
  # TRADES' MNIST script: 40 ascent steps of 0.01 at eps 0.3, 100 epochs (gpu).
  assert gpu.defenses.trades.steps == 40 and gpu.train.trades.epochs == 100
  assert gpu.defenses.trades.step_size_rel * gpu.defenses.trades.eps == pytest.approx(0.01)
  with pytest.raises(ValueError, match="allowed"):
    mnist_defenses.get_config("slow")


def _row(defense, attack, adaptive, robust, **extra):
  return dict(kind="defense", dataset="mnist", defense=defense, attack=attack, eps=0.3,
              adaptive=adaptive, n=100, clean_accuracy=0.99, clean_accuracy_ci=[0.95, 1.0],
              robust_accuracy=robust, robust_accuracy_ci=[robust - 0.05, robust + 0.05],
              restarts=5, steps=40, **extra)  # fmt: skip


def test_defense_table_takes_the_worst_adaptive_attack_and_withholds_the_rest():
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
  # Rows without per-example fields (an older run): no per-example worst case, the lowest
  # single attack that knows the defence still shown.
  clean = "0.990 [0.950, 1.000]"
  assert f"| distillation | 0.3 | {clean} | — | 0.020 [-0.030, 0.070] | pgd_adaptive" in worst
  assert f"| adversarial | 0.3 | {clean} | — | 0.890 [0.840, 0.940] | pgd |" in worst
  assert "| obscure | 0.3 | 0.990 [0.950, 1.000] | — (no adaptive attack) |" in worst
  every = text.split("**Every attack**")[1]
  assert "detection rate" in every and "| gate | pgd | yes | 0.3 | 100 | 5 x 40 |" in every


def test_defense_worst_case_is_per_example_over_every_attack():
  """An example is robust only if no attack broke it: a blind attack that breaks examples the
  adaptive one missed lowers the worst case below every single attack's robust accuracy."""
  from experiments import report  # noqa: PLC0415
  from vae_attacks import metrics  # noqa: PLC0415

  blind = list(range(0, 10))  # 0.90 robust
  adaptive = list(range(5, 17))  # 0.88 robust; together 17 examples broken: 0.83
  # Fooled (misclassified and accepted): the blind attack's inputs were mostly rejected.
  fooled = dict(pgd=[0, 1], pgd_adaptive=list(range(5, 15)))  # together 12: 0.88 defended
  rows = [
    _row("gmvae", "pgd", False, 0.90, not_robust_examples=blind, broken_examples=fooled["pgd"]),
    _row(
      "gmvae",
      "pgd_adaptive",
      True,
      0.88,
      not_robust_examples=adaptive,
      broken_examples=fooled["pgd_adaptive"],
    ),  # fmt: skip
    _row("obscure", "pgd", False, 0.80, not_robust_examples=list(range(20))),
  ]
  worst = report.defense_markdown(rows).split("**Every attack**")[0]

  def cell(mask):
    rate, lo, hi = metrics.success_rate(mask)
    return f"{report.fmt_rate(rate)} {report.fmt_ci([lo, hi])}"

  assert metrics.success_rate(np.arange(100) >= 17)[0] == 0.83
  robust = cell(np.arange(100) >= 17)
  defended = cell(~np.isin(np.arange(100), [0, 1, *range(5, 15)]))
  clean = "0.990 [0.950, 1.000]"
  assert (
    f"| gmvae | 0.3 | {clean} | {robust} | 0.880 [0.830, 0.930] | pgd_adaptive | {defended} |"
    in worst
  )
  assert "| obscure | 0.3 | 0.990 [0.950, 1.000] | — (no adaptive attack) |" in worst


@pytest.fixture(scope="module")
def quick_data_root(tmp_path_factory):
  return make_data_root(tmp_path_factory.mktemp("quick_data"), n_train=1024, n_test=160, size=40)


@pytest.mark.slow  # ~55 s of CPU: the :quick trainings of the CNN, the VAE and the GMVAE
def test_quick_projection_and_gmvae_classify_clean_images_above_chance(quick_data_root, tmp_path):
  """With the :quick training budgets (steps, not a trimmed copy of them), the projection
  defence and the GMVAE must beat chance on clean images: 2 epochs of the VAE once left the
  CNN reading every projection as a 3 or an 8 (clean accuracy 0) and the GMVAE at chance."""
  import numpy as np  # noqa: PLC0415

  from experiments import defenses  # noqa: PLC0415
  from vae_attacks import data as data_lib  # noqa: PLC0415

  c = mnist_defenses.get_config("quick")
  c.data.dir = str(quick_data_root)
  data = data_lib.load(c.data)
  k = len(data.class_names)
  ctx = defenses.Context(c, data, tmp_path)
  x, y = np.asarray(data.x_test[:32]), np.asarray(data.y_test[:32])

  proj = defenses.build_projection(ctx)
  assert proj.metrics["classifier_on_reconstructions"] > 3.0 / k
  clean_pred, clean_rejected = defenses._Judge(proj, y)(x)
  assert np.mean(clean_pred == y) > 3.0 / k
  assert np.mean((clean_pred == y) & ~clean_rejected) > 2.0 / k

  gm = defenses.build_gmvae(ctx)
  assert gm.metrics["test_accuracy"] > 3.0 / k
  pred, rejected = defenses._Judge(gm, y)(x)
  assert np.mean((pred == y) & ~rejected) > 2.0 / k


@pytest.fixture(scope="module")
def lfw_root(tmp_path_factory):
  counts = {"Alice_Smith": 14, "Bob_Jones": 12, "Carol_White": 12}
  return make_data_root(tmp_path_factory.mktemp("lfw"), n_train=8, n_test=8, counts=counts, size=64)


LFW_MODELS = ("none", "siamese", "conv_vae", "joint_vae")


@pytest.mark.slow  # ~80 s at load 6 (~55 s before the VAEs joined): four models, two attacks each
def test_lfw_defenses_quick_attacks_the_cnn_the_siamese_net_and_the_vaes_on_the_same_faces(
  lfw_root, tmp_path
):
  from configs import lfw_defenses  # noqa: PLC0415

  c = lfw_defenses.get_config("quick")
  validate.validate(c)
  assert c.data.image_size == 32 and tuple(c.defenses.enabled) == LFW_MODELS
  assert tuple(c.defenses.transfer.sources) == LFW_MODELS
  assert c.defenses.attacks.eps == tuple(c.attacks.bim.eps)  # the LFW L-inf grid
  assert c.import_params == ""  # :quick trains its own models (the record's are 154 x 154)
  c.data.dir = str(lfw_root)
  c.data.update(min_faces_per_person=10, crop_size=48, image_size=16)
  for t in c.train.values():  # the CNN, the siamese net, the VAEs and the latent classifier
    t.update(epochs=1, batch_size=8)
  c.defenses.num_examples = 8
  c.defenses.attacks.update(eps=(0.05, 0.3), fgsm=False, pgd_steps=2, restarts=1)
  c.attacks.shard = False
  run_lib.run(c, str(tmp_path))
  rows = read_rows(tmp_path)
  attacked = {(r["defense"], r["attack"], r["eps"]): r for r in rows if r["kind"] == "defense"}
  assert set(attacked) == {
    (d, a, e) for d in LFW_MODELS for a in ("pgd", "impersonation") for e in (0.05, 0.3)
  }
  for r in attacked.values():
    # The same faces: every model is judged on the same first 8 test images.
    assert r["n"] == 8 and r["n_robust_accuracy"] == 8 and r["max_linf"] <= r["eps"] + 1e-5
    assert r["adaptive"]  # white-box: every attack knows the whole model
    if r["attack"] == "impersonation":  # impersonated faces are among the misidentified ones
      assert r["n_impersonation_rate"] == 8
      assert r["impersonation_rate"] <= 1.0 - r["robust_accuracy"] + 1e-9
    else:
      assert "impersonation_rate" not in r
  # The report's notes say which VAE classifier is which.
  assert "with a probe" in attacked[("conv_vae", "pgd", 0.3)]["note"]
  assert "trained jointly" in attacked[("joint_vae", "pgd", 0.3)]["note"]
  moved = {(r["source"], r["target"]) for r in rows if r["kind"] == "transfer"}
  assert moved == {(s, t) for s in LFW_MODELS for t in LFW_MODELS}
  metrics = json.loads((tmp_path / "train_metrics.json").read_text())
  assert set(metrics) == set(LFW_MODELS)
  assert 0.0 <= metrics["siamese"]["test_accuracy"] <= 1.0
  vae_m = metrics["conv_vae"]  # the probe's accuracy and the VAE's ELBO
  assert vae_m["test_accuracy"] == vae_m["latent_classifier"]["test_accuracy"]
  assert 0.0 <= vae_m["test_accuracy"] <= 1.0
  assert vae_m["test_neg_elbo_nats"] == vae_m["vae"]["test_neg_elbo_nats"] > 0.0
  assert metrics["joint_vae"]["test_neg_elbo_nats"] > 0.0 and "ce_weight" in metrics["joint_vae"]
  summary = (tmp_path / "summary.md").read_text()
  worst, every = summary.split("**Every attack**")
  for name in LFW_MODELS:
    assert f"| {name} | 0.3 |" in worst and f"| {name} | impersonation | yes | 0.3 |" in every
  assert "impersonation rate" in every.splitlines()[2]  # the column's header
  assert "| joint_vae (pgd) |" in every  # a row of the transfer matrix


def _tiny_context(tmp_path):
  """A defences Context on toy 8 x 8 images whose MLP VAE is given (random weights: what is
  tested is how the builder composes it, and ctx.vae()'s training costs seconds)."""
  import types  # noqa: PLC0415

  import jax  # noqa: PLC0415
  from fakedata import numpy_init, toy_data  # noqa: PLC0415

  from configs import lfw_defenses  # noqa: PLC0415
  from experiments import defenses  # noqa: PLC0415
  from vae_attacks import models  # noqa: PLC0415

  c = lfw_defenses.get_config("quick")
  c.model.mlp_vae = dict(latent_dim=4, hidden=(16,))
  c.model.latent_classifier = dict(hidden=(8,), dropout_rate=0.0)
  c.train.latent_classifier = dict(c.train.latent_classifier, epochs=1, batch_size=16)
  data = toy_data()
  data = types.SimpleNamespace(**vars(data), class_names=("a", "b", "c"))
  ctx = defenses.Context(c, data, tmp_path)
  vae = models.MLPVAE(image_shape=data.x_train.shape[1:], **c.model.mlp_vae)
  vae_params = numpy_init(vae, data.x_train[:1], jax.random.key(0))
  ctx.trained["vae"] = (vae, vae_params, {"test_neg_elbo_nats": 50.0, "train_seconds": 1.0})
  return ctx


def test_vae_classifier_deploys_the_latent_classifier_on_the_encoder_mean(tmp_path):
  import jax  # noqa: PLC0415

  from experiments import defenses  # noqa: PLC0415
  from vae_attacks import models  # noqa: PLC0415
  from vae_attacks.attacks import runner  # noqa: PLC0415

  ctx = _tiny_context(tmp_path)
  d = defenses.build_vae_classifier(ctx)
  vae, vae_params, _ = ctx.vae()  # the study's MLP VAE (shared with the projection defence)
  clf = models.LatentClassifier(num_classes=3, **ctx.config.model.latent_classifier)
  x = ctx.data.x_test[:5]
  mean = vae.apply(vae_params, x, method="encode")[0]  # [5, D]
  want = clf.apply(d.params["clf"], mean)
  got = jax.vmap(d.logits_fn, in_axes=(None, 0))(d.params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, d.params["vae"], vae_params)
  # The reported test accuracy is the deployed function's on the whole test set.
  pred = np.argmax(runner.batched_logits(d.logits_fn, d.params, ctx.data.x_test), axis=-1)
  assert d.metrics["test_accuracy"] == pytest.approx(np.mean(pred == ctx.data.y_test))
  assert d.metrics["latent_classifier"]["kind"] == "classifier"
  assert d.metrics["test_neg_elbo_nats"] == 50.0 and d.metrics["vae"] is ctx.vae()[2]
  assert d.metrics["train_seconds"] == 1.0 + d.metrics["latent_classifier"]["train_seconds"]
  # White-box: every attack, and the transfer matrix's crafting, differentiates the deployed
  # function with the deployed weights.
  assert [s.name for s in d.attacks] == ["fgsm", "impersonation", "pgd"]
  assert d.transfer_spec is d.attacks[-1] and d.reject is None
  assert all(s.logits_fn == d.logits_fn and s.params is d.params for s in d.attacks)

  again = defenses.build_vae_classifier(_tiny_context(tmp_path))  # a rerun: the checkpoints
  assert again.metrics["latent_classifier"]["reused_checkpoint"]
  jax.tree.map(np.testing.assert_array_equal, again.params, d.params)


def test_the_defense_table_keeps_every_random_stream_and_names_transfer_sources():
  from experiments import defenses  # noqa: PLC0415

  streams = {name: spec.key_index for name, spec in defenses.DEFENSES.items()}
  streams.update(defenses.SHARED_KEY_INDEX)
  # The numbers every finished result was made with: never renumber.
  assert streams == {
    "none": 0, "substitute": 11, "distillation": 12, "adversarial": 13, "vae": 14,
    "projection": 15, "gmvae": 16, "siamese": 17, "vae_classifier": 18, "conv_vae": 19,
    "joint_vae": 20, "trades": 21,
  }  # fmt: skip
  assert len(set(streams.values())) == len(streams)  # one stream each
  assert set(defenses.TRANSFER_SOURCES) <= set(defenses.DEFENSES)
  c = mnist_defenses.get_config("quick")
  c.defenses.transfer.sources = ("projection",)  # no transfer_spec: not a source
  with pytest.raises(validate.ConfigError, match="defenses.transfer.sources"):
    validate.validate(c)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("defenses.enabled", ("vae",), r"defenses.enabled\[\]='vae' is not allowed; allowed: .*"
     r"siamese, vae_classifier, conv_vae, joint_vae"),
    ("train.latent_classifier", None, "defence 'conv_vae' needs train.latent_classifier"),
    ("model.joint_vae", None, "defence 'joint_vae' needs model.joint_vae"),
  ],
)  # fmt: skip
def test_lfw_defense_fields_are_named(field, value, message):
  from configs import lfw_defenses  # noqa: PLC0415

  c = lfw_defenses.get_config("quick")
  section, _, leaf = field.rpartition(".")
  if value is None:
    del c[section][leaf]
  else:
    c[section][leaf] = value
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(c)


STUDY_DEFENCES = {"none": "cnn", "conv_vae": "conv_vae", "joint_vae": "joint_vae"}


def _tiny_study(tmp_path):
  """configs/lfw_defenses.py's full form with tiny models on toy 8 x 8 faces, and the study's
  record beside the defences' workdir (tmp_path/lfw_vae: params/<model>.msgpack and
  train_metrics.json), its models trained and exported by the model table: (config, data,
  {model: Trained}, defences workdir)."""
  import types  # noqa: PLC0415

  from fakedata import toy_data  # noqa: PLC0415

  from configs import lfw_defenses  # noqa: PLC0415
  from experiments import models as models_lib  # noqa: PLC0415

  c = lfw_defenses.get_config()
  c.model.cnn = dict(c.model.cnn, features=(4,), dense=(8,), stem_stride=1, dropout_rate=0.0)
  c.model.conv_vae = c.model.joint_vae = dict(latent_dim=2, features=(4,), hidden=())
  c.model.latent_classifier = dict(hidden=(8,), dropout_rate=0.0)
  for t in c.train.values():
    t.update(epochs=1, batch_size=16)
    if "augment_shift" in t:
      t.augment_shift = 1
  data = types.SimpleNamespace(**vars(toy_data()), class_names=("a", "b", "c"))
  study = c.copy_and_resolve_references()
  study.models = tuple(STUDY_DEFENCES.values())
  study.output.export_params = True
  trained = models_lib.train_all(study, data, tmp_path / "lfw_vae")
  record = {k: v.metrics for k, v in trained.items()}
  (tmp_path / "lfw_vae" / "train_metrics.json").write_text(json.dumps(record, default=float))
  return c, data, trained, tmp_path / "lfw_defenses"


def test_lfw_defenses_deploy_the_study_models_imported_from_the_record(tmp_path):
  """At full size the CNN and the two VAE classifiers are the study's trained models, read from
  the record `import_params` names (the default "../lfw_vae": the study's LFW part beside the
  workdir): each defence's logits are those of the model table's function with the trained
  parameters, nothing is trained, and a missing record is a one-line error."""
  import jax  # noqa: PLC0415

  from experiments import defenses  # noqa: PLC0415
  from experiments.errors import UserError  # noqa: PLC0415

  c, data, trained, workdir = _tiny_study(tmp_path)
  assert c.import_params == "../lfw_vae"
  ctx = defenses.Context(c, data, workdir)
  x = np.asarray(data.x_test[:6])
  logits = {}
  for name, model in STUDY_DEFENCES.items():
    assert defenses.DEFENSES[name].study_model == model
    d = defenses.DEFENSES[name].build(ctx)
    got = jax.vmap(d.logits_fn, in_axes=(None, 0))(d.params, x)
    ref = trained[model]
    want = jax.vmap(ref.logits_fn, in_axes=(None, 0))(ref.params, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    logits[name] = got
    assert d.metrics["imported_from"].endswith(f"lfw_vae/params/{model}.msgpack")
    assert d.metrics["test_accuracy_here"] == pytest.approx(ref.metrics["test_accuracy"])
    assert d.transfer_spec is d.attacks[-1]  # every one crafts transfer examples
  assert not np.allclose(logits["conv_vae"], logits["joint_vae"])  # two models, not one twice
  assert not (workdir / "checkpoints").exists()  # nothing trained in their place

  c.import_params = "../nowhere"
  with pytest.raises(UserError, match=r"^cnn: no committed parameters at .*nowhere") as e:
    defenses.build_none(defenses.Context(c, data, workdir))
  assert "\n" not in str(e.value)
  (tmp_path / "lfw_vae" / "params" / "joint_vae.msgpack").unlink()
  c.import_params = str(tmp_path / "lfw_vae")  # an absolute path works too
  ctx = defenses.Context(c, data, workdir)
  defenses.build_none(ctx)
  with pytest.raises(UserError, match=r"^joint_vae: no committed parameters at "):
    defenses.DEFENSES["joint_vae"].build(ctx)


def test_lfw_defenses_config_attacks_the_committed_study_models():
  """The full config's defences are its transfer sources; the study's models among them have
  the sections they were trained with (configs/study.py's LFW part), and the default record,
  beside the workdir named in the README, holds their committed parameters."""
  import pathlib  # noqa: PLC0415

  from configs import lfw_defenses, study  # noqa: PLC0415
  from experiments import defenses  # noqa: PLC0415
  from experiments import models as models_lib  # noqa: PLC0415

  c, part = lfw_defenses.get_config(), study.get_config().lfw_vae
  validate.validate(c)
  assert tuple(c.defenses.enabled) == tuple(c.defenses.transfer.sources) == LFW_MODELS
  assert c.data.to_dict() == part.data.to_dict() and c.data.image_size == 154
  repo = pathlib.Path(__file__).resolve().parents[1]
  record = models_lib.import_folder(repo / "results/study/lfw_defenses", c.import_params)
  assert record == repo / "results/study/lfw_vae"
  models = {defenses.DEFENSES[n].study_model for n in c.defenses.enabled} - {None}
  assert models == set(STUDY_DEFENCES.values()) and models <= set(study.LFW_MODELS)
  for model in models:
    assert (record / "params" / f"{model}.msgpack").exists()
  # The sections the study trained them from (conv_vae: train.vae, then its probe's).
  for where, names in (("model", ("cnn", "conv_vae", "joint_vae", "latent_classifier")),
                       ("train", ("cnn", "vae", "joint_vae", "latent_classifier"))):  # fmt: skip
    for name in names:
      assert c[where][name].to_dict() == part[where][name].to_dict(), f"{where}.{name}"
  assert c.model.siamese["features"] == c.model.cnn["features"]  # the CNN's architecture
  # The plan shows the imports as imports, and the siamese net as the one model trained.
  from experiments import progress  # noqa: PLC0415

  sections = {k: v.sections for k, v in defenses.DEFENSES.items()}
  imported = {n: f"{m} from R" for n, m in STUDY_DEFENCES.items()}
  builds = [s.label for s in progress.defense_plan(c, 966, 100, sections, (), imported)][::2]
  assert builds[:2] == [
    "build defence none: imports cnn from R",
    "build defence siamese: trains siamese (siamese, 60 epochs) on 966 examples",
  ]
  assert builds[2:4] == [f"build defence {n}: imports {n} from R" for n in LFW_MODELS[2:]]


def test_impersonation_reaches_the_most_similar_other_class_on_a_linear_model():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from experiments import defenses  # noqa: PLC0415

  w = jnp.array([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])

  def logits_fn(params, x):
    return params @ x.reshape(-1)

  x = jnp.array([0.6, 0.1, 0.3, 0.5]).reshape(2, 2, 1)  # class 0; class 2 is the runner-up
  assert jnp.argmax(logits_fn(w, x)) == 0
  res = defenses._impersonation(
    logits_fn, w, x, jnp.int32(0), eps=0.5, key=jax.random.key(0), steps=20, step_size_rel=0.1
  )
  assert int(jnp.argmax(logits_fn(w, res.x_adv))) == 2  # not class 1, the less similar one
  assert bool(res.success)
  assert float(jnp.max(jnp.abs(res.x_adv - x))) <= 0.5 + 1e-6


def test_a_defenses_rows_keep_their_settings_when_another_defense_changes():
  """Enabling another defence or changing another's knobs must not invalidate finished rows;
  changing the defence's own section or the shared attacks must."""
  from experiments import defenses  # noqa: PLC0415

  c = mnist_defenses.get_config()
  before = {n: defenses.defense_settings(c, n) for n in ("gmvae", "projection", "none")}
  c.defenses.enabled = ("gmvae",)
  c.defenses.projection.penalty = 3.0
  after = {n: defenses.defense_settings(c, n) for n in before}
  assert after["gmvae"] == before["gmvae"] and after["none"] == before["none"]
  assert after["projection"] != before["projection"]
  c.defenses.attacks.restarts = 2
  assert defenses.defense_settings(c, "gmvae") != before["gmvae"]


def test_projection_needs_the_cnn_it_classifies_with():
  c = mnist_defenses.get_config("quick")
  c.defenses.enabled = ("projection",)
  del c.model["cnn"]
  with pytest.raises(validate.ConfigError, match="defence 'projection' needs model.cnn"):
    validate.validate(c)


def test_masking_checks_flag_the_defence_whose_evaluation_shows_masked_gradients():
  """Carlini et al. 2019's checks from the rows: a worst case that rises with eps, that one
  more restart still lowers, and that a transfer attack beats, flags its defence; a defence
  whose worst case falls to 0 at eps 0.5 and has converged passes."""
  from experiments import report  # noqa: PLC0415

  def row(defense, attack, eps, broken, **extra):
    r = _row(defense, attack, True, 1.0 - len(broken) / 100, not_robust_examples=broken, **extra)
    return dict(r, eps=eps)

  rows = [
    row("sound", "pgd", 0.1, list(range(10)), unbroken_by_restart=[0.9, 0.9]),
    row("sound", "fgsm", 0.1, list(range(5))),
    row("sound", "pgd", 0.5, list(range(100)), unbroken_by_restart=[0.0, 0.0]),
    row("masked", "pgd", 0.1, list(range(50)), unbroken_by_restart=[0.5, 0.5]),
    row("masked", "pgd", 0.3, list(range(30)), unbroken_by_restart=[0.9, 0.7]),
    row("masked", "pgd", 0.5, list(range(40)), unbroken_by_restart=[0.6, 0.6]),
  ]
  into_masked = dict(kind="transfer", dataset="mnist", defense="masked", source="none",
                     target="masked", eps=0.3, n=100, robust_accuracy=0.2, white_box=False,
                     robust_accuracy_ci=[0.1, 0.3], crafted_with="pgd")  # fmt: skip
  text = report.defense_markdown([*rows, into_masked])
  checks = text.split("**Gradient-masking checks**")[1]
  assert "Flagged (a check failed): **masked**." in checks
  assert "| sound | falls_with_eps | passed |" in checks
  assert "| sound | more_restarts_changes_little | passed |" in checks
  assert "| sound | single_step_weaker | passed |" in checks
  assert "| masked | falls_with_eps | **failed** |" in checks  # 0.5 -> 0.7 -> 0.6
  assert "| masked | transfer_weaker | **failed** |" in checks  # 0.2 by transfer < 0.7
  # At eps 0.3 the second restart still broke 0.2 more: the evaluation has not converged.
  assert "| masked | more_restarts_changes_little | **failed** |" in checks
