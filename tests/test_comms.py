"""Autoencoder communication system and its attacks (Sadeghi and Larsson 2019).

Baselines against their closed forms / exact enumeration within Monte Carlo error; every
perturbation at its power budget exactly; the universal perturbation one vector for every
message; the runner's vmapped sweep equal to a per-block loop; a trained autoencoder better
than uncoded BPSK at 8.5 dB; bad settings as one-line errors.
"""

import itertools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_newcomer import check_timings

from configs import comm_ae
from experiments import comm, progress
from experiments import run as run_lib
from vae_attacks.comms import attacks, baselines
from vae_attacks.comms import system as system_lib


def _mc_close(errors: int, blocks: int, p: float, z: float = 4.5) -> bool:
  """Is errors / blocks within z binomial standard deviations of p?"""
  sd = math.sqrt(p * (1 - p) / blocks)
  return abs(errors / blocks - p) <= z * sd + 1.0 / blocks


@pytest.fixture(scope="module")
def trained_ae():
  ae = system_lib.make_system("mlp_ae")
  params, hist = system_lib.train_autoencoder(
    ae, key=jax.random.key(0), steps=3000, batch_size=1000, learning_rate=3e-3,
    ebn0_db=8.5, decay_at=(0.5,),
  )  # fmt: skip
  return ae, params, hist


# ----------------------------------------------------------------------------------------------
# Baselines.


def test_hamming_code_is_the_perfect_7_4_code():
  cw = baselines.hamming74_codewords()
  assert cw.shape == (16, 7) and len({tuple(c) for c in cw}) == 16
  np.testing.assert_array_equal(cw[:, :4], baselines.message_bits(4))  # systematic
  weights = np.bincount(cw.sum(1), minlength=8)
  assert weights.tolist() == [1, 0, 0, 7, 7, 0, 0, 1]
  dists = [np.sum(a != b) for a, b in itertools.combinations(cw, 2)]
  assert min(dists) == 3
  # Perfect: the radius-1 balls around the 16 codewords tile all 2^7 words.
  balls = {tuple(c) for c in cw} | {
    tuple(np.where(np.arange(7) == i, 1 - c, c)) for c in cw for i in range(7)
  }
  assert len(balls) == 128


def test_closed_forms_known_values():
  # Q(sqrt(2 * 10^0.96)) ~ 1e-5: the BPSK textbook point (9.6 dB).
  assert baselines.q_function(np.sqrt(2 * 10**0.96)) == pytest.approx(1.0e-5, rel=0.1)
  p = baselines.hamming74_bit_error(4.0)
  assert baselines.hamming74_hard_bler(4.0) == pytest.approx(
    1 - (1 - p) ** 7 - 7 * p * (1 - p) ** 6
  )
  lo, hi = baselines.hamming74_ml_bounds(6.0)
  assert lo < hi < baselines.hamming74_hard_bler(6.0)


@pytest.mark.parametrize(
  "name, closed",
  [
    ("bpsk_uncoded", baselines.uncoded_bpsk_bler),
    ("hamming74_hard", baselines.hamming74_hard_bler),
  ],
)
def test_baseline_monte_carlo_matches_closed_form(name, closed):
  system = system_lib.make_system(name)
  grid = (0.0, 3.0, 6.0)
  rows = comm.evaluate(
    system, {}, attack="none", psr_db=None, ebn0_grid=grid, blocks=40000, table=None,
    key=jax.random.key(3),
  )  # fmt: skip
  for r in rows:
    p = float(closed(r["ebn0_db"]))
    assert _mc_close(r["block_errors"], r["blocks"], p), (r, p)
    assert r["bler_lo"] <= r["bler"] <= r["bler_hi"]


def test_hard_decision_is_syndrome_decoding_and_ml_is_enumeration(key):
  hard = system_lib.make_system("hamming74_hard")
  ml = system_lib.make_system("hamming74_ml")
  cw = baselines.hamming74_codewords()
  # Hard: a codeword with any one bit flipped decodes to its message.
  for m in range(16):
    for i in range(8):
      bits = cw[m].copy()
      if i < 7:
        bits[i] ^= 1
      y = jnp.asarray(baselines.bpsk(bits) * 0.7)
      assert int(hard.decide({}, y)) == m
  # ML: the nearest of the 16 BPSK codewords, by exhaustive enumeration in numpy.
  y = np.asarray(jax.random.normal(key, (2000, 7)) * 1.2)
  book = baselines.bpsk(cw).astype(np.float64)
  want = np.argmin(((y[:, None, :] - book[None]) ** 2).sum(-1), axis=1)
  got = np.asarray(jax.vmap(ml.decide, in_axes=(None, 0))({}, jnp.asarray(y)))
  np.testing.assert_array_equal(got, want)


def test_ml_monte_carlo_within_bounds_and_below_hard():
  ml = system_lib.make_system("hamming74_ml")
  hard = system_lib.make_system("hamming74_hard")
  grid = (2.0, 5.0, 7.0)
  kw = dict(attack="none", psr_db=None, ebn0_grid=grid, blocks=40000, table=None,
            key=jax.random.key(4))  # fmt: skip
  rows_ml = comm.evaluate(ml, {}, **kw)
  rows_hard = comm.evaluate(hard, {}, **kw)  # the same noise draws: paired
  for r, h in zip(rows_ml, rows_hard, strict=True):
    lo, hi = baselines.hamming74_ml_bounds(r["ebn0_db"])
    sd = math.sqrt(hi * (1 - hi) / r["blocks"])
    assert float(lo) - 4.5 * sd <= r["bler"] <= float(hi) + 4.5 * sd + 1 / r["blocks"]
    assert r["block_errors"] < h["block_errors"]


# ----------------------------------------------------------------------------------------------
# The system.


def test_energy_normalisation_and_noise(key):
  for name in ("mlp_ae", "conv_ae", "mlp_ae_iq"):
    ae = system_lib.make_system(name)
    params = ae.init(key)
    x = jax.jit(jax.vmap(ae.encode, in_axes=(None, 0)))(params, jnp.arange(16))
    assert x.shape == (16, ae.dims)
    np.testing.assert_allclose(np.sum(np.asarray(x) ** 2, axis=1), 7.0, rtol=1e-5)
    assert jax.jit(jax.vmap(ae.logits, in_axes=(None, 0)))(params, x).shape == (16, 16)
  assert system_lib.make_system("mlp_ae_iq").dims == 14
  # sigma^2 = 1 / (2 R Eb/N0): R = 4/7 at 0 dB gives 7/8.
  assert float(system_lib.noise_std(0.0, 4 / 7)) ** 2 == pytest.approx(7 / 8)


def test_trained_autoencoder_beats_uncoded_bpsk(trained_ae):
  ae, params, hist = trained_ae
  assert hist["loss"][-1] < hist["loss"][0]
  kw = dict(attack="none", psr_db=None, ebn0_grid=(8.5,), blocks=100_000, table=None,
            key=jax.random.key(5))  # fmt: skip
  (r_ae,) = comm.evaluate(ae, params, **kw)
  (r_bpsk,) = comm.evaluate(system_lib.make_system("bpsk_uncoded"), {}, **kw)
  # Significantly better: the intervals do not overlap.
  assert r_ae["bler_hi"] < r_bpsk["bler_lo"], (r_ae, r_bpsk)
  assert r_bpsk["bler"] == pytest.approx(float(baselines.uncoded_bpsk_bler(8.5)), rel=0.5)


# ----------------------------------------------------------------------------------------------
# Attacks.


@pytest.mark.parametrize("psr_db", [-10.0, -6.0, -2.0])
def test_every_perturbation_meets_its_budget_exactly(trained_ae, psr_db):
  ae, params, _ = trained_ae
  energy = attacks.psr_energy(psr_db, ae.n)
  assert float(energy) == pytest.approx(7 * 10 ** (psr_db / 10), rel=1e-6)
  n_craft = 64
  labels = jnp.arange(n_craft) % 16
  signals = jax.vmap(ae.encode, in_axes=(None, 0))(params, labels)
  shifts = jnp.arange(n_craft) % 7
  perts = {
    "jamming": attacks.jamming(jax.random.key(1), ae.dims, energy),
    "fgm": attacks.fgm(ae, params, signals[3], labels[3], energy=energy),
    "uap": attacks.universal_perturbation(ae, params, signals, labels, energy=energy),
    "uap_shift": attacks.universal_perturbation(
      ae, params, signals, labels, energy=energy, shifts=shifts
    ),
  }
  for name, p in perts.items():
    assert float(jnp.sum(p**2)) == pytest.approx(float(energy), rel=1e-5), name
  # And as received, per block, through the runner (jamming drawn per block, shifted UAP).
  tables = {"jamming": None, "uap": jnp.tile(perts["uap"], (16, 1))}
  for attack in ("jamming", "uap", "uap_unsync"):
    table = tables.get(attack, tables["uap"])
    (row,) = comm.evaluate(
      ae, params, attack=attack, psr_db=psr_db, ebn0_grid=(8.5,), blocks=256, table=table,
      key=jax.random.key(2),
    )  # fmt: skip
    assert row["psr_measured_db"] == pytest.approx(psr_db, abs=1e-4), attack


def test_universal_perturbation_is_one_vector_for_every_message(trained_ae):
  ae, params, _ = trained_ae
  cfg = comm_ae.get_config("quick")
  with cfg.unlocked():
    cfg.attacks.craft_samples = 64
    cfg.attacks.enabled = ("fgm", "uap", "uap_unsync", "uap_shift", "substitute")
    cfg.attacks.substitute.update(observations=512, steps=50)
  tables, sub = comm._craft(cfg, ae, params, [-6.0], jax.random.key(7))
  assert 0.0 <= sub["agreement_with_receiver"] <= 1.0
  for att in ("uap", "uap_unsync", "uap_shift", "substitute"):
    t = np.asarray(tables[(att, -6.0)])
    assert t.shape == (16, ae.dims)
    np.testing.assert_array_equal(t, np.broadcast_to(t[0], t.shape))
  fgm = np.asarray(tables[("fgm", -6.0)])
  assert not np.allclose(fgm, fgm[0])  # input-specific: it differs per message
  # What the receiver gets, with the noise switched off: y - x is the same p for every message.
  p = tables[("uap", -6.0)]
  received = []
  for m in range(16):
    r = system_lib.transmit_block(
      ae, params, jnp.int32(m), jnp.int32(m), eps=jnp.float32(300.0), mode="table", delta=p,
      energy=jnp.float32(0.0), key=jax.random.key(m),
    )  # fmt: skip
    received.append(np.asarray(r.x_adv - ae.encode(params, m)))
  np.testing.assert_allclose(np.stack(received), np.broadcast_to(p[0], (16, ae.dims)), atol=1e-5)


def test_minimal_fgm_flips_and_is_minimal(trained_ae):
  ae, params, _ = trained_ae
  for m in range(0, 16, 5):
    y = ae.encode(params, m)
    r = attacks.minimal_fgm(ae, params, y, jnp.int32(m), max_scale=jnp.sqrt(jnp.sum(y * y)))
    assert int(ae.decide(params, y)) == m
    assert int(ae.decide(params, y + r)) != m
    assert int(ae.decide(params, y + 0.99 * r)) == m  # the scale search is tight


def test_uap_beats_jamming_on_the_trained_autoencoder(trained_ae):
  """The paper's direction of effect, at -6 dB and 8.5 dB, on 20,000 paired blocks."""
  ae, params, _ = trained_ae
  energy = attacks.psr_energy(-6.0, ae.n)
  labels = jax.random.randint(jax.random.key(8), (500,), 0, 16)
  signals = jax.vmap(ae.encode, in_axes=(None, 0))(params, labels)
  signals = signals + system_lib.noise_std(8.5, ae.rate) * jax.random.normal(
    jax.random.key(9), signals.shape
  )
  p = attacks.universal_perturbation(ae, params, signals, labels, energy=energy)
  kw = dict(psr_db=-6.0, ebn0_grid=(8.5,), blocks=20000, key=jax.random.key(10))
  (uap,) = comm.evaluate(ae, params, attack="uap", table=jnp.tile(p, (16, 1)), **kw)
  (jam,) = comm.evaluate(ae, params, attack="jamming", table=None, **kw)
  assert uap["bler_lo"] > jam["bler_hi"], (uap, jam)


def test_vmapped_sweep_equals_a_loop(trained_ae):
  ae, params, _ = trained_ae
  key = jax.random.key(11)
  p = attacks.jamming(jax.random.key(12), ae.dims, 2.0)
  table = jnp.tile(p, (16, 1))
  grid = (2.0, 8.5)
  blocks = 37  # not a multiple of the chunk: padding must not count
  for mode, attack in (("shifted", "uap_unsync"), ("jamming", "jamming"), ("table", "uap")):
    rows = comm.evaluate(
      ae, params, attack=attack, psr_db=-3.0, ebn0_grid=grid, blocks=blocks, table=table,
      key=key, runner_kwargs=dict(chunk_size=8),
    )  # fmt: skip
    energy = jnp.float32(attacks.psr_energy(-3.0, ae.n))
    one = jax.jit(system_lib.transmit_block, static_argnums=0, static_argnames="mode")
    for row, e in zip(rows, grid, strict=True):
      errors = 0
      for i in range(blocks):
        r = one(
          ae, params, jnp.int32(i % 16), jnp.int32(i % 16), eps=jnp.float32(e), mode=mode,
          delta=table, energy=energy, key=jax.random.fold_in(key, i),
        )  # fmt: skip
        errors += int(r.success)
      assert row["block_errors"] == errors, (mode, e)
  # Crafting: vmapped over budgets equals one budget at a time.
  labels = jnp.arange(32) % 16
  signals = jax.vmap(ae.encode, in_axes=(None, 0))(params, labels)
  energies = jnp.asarray([0.5, 1.5])
  craft = lambda e: attacks.universal_perturbation(ae, params, signals, labels, energy=e)
  batched = jax.jit(jax.vmap(craft))(energies)
  for i, e in enumerate(energies):
    np.testing.assert_allclose(batched[i], jax.jit(craft)(e), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Settings.


@pytest.mark.parametrize(
  "field, value, words",
  [
    ("system.n", -7, "system.n=-7"),
    ("system.k", 8, "system.k=8"),
    ("attacks.enabled", ("jamming", "carrier_wave"), "'carrier_wave'"),
    ("models", ("mlp_ae", "turbo"), "'turbo'"),
    ("eval.blocks", 0, "eval.blocks=0"),
  ],
)
def test_bad_settings_are_one_line_errors(field, value, words):
  cfg = comm_ae.get_config("quick")
  section, _, name = field.rpartition(".")
  with cfg.unlocked():
    (cfg[section] if section else cfg)[name] = value
  with pytest.raises(run_lib.UserError) as e:
    comm.validate(cfg)
  msg = str(e.value)
  assert "\n" not in msg and words in msg and "allowed" in msg


def test_library_rejects_bad_codes_and_attacks():
  with pytest.raises(ValueError, match="n=-1"):
    system_lib.make_system("mlp_ae", k=4, n=-1)
  with pytest.raises(ValueError, match="k=8"):
    system_lib.make_system("mlp_ae", k=8, n=7)
  with pytest.raises(ValueError, match="not known"):
    system_lib.make_system("ldpc")
  with pytest.raises(ValueError, match="not known"):
    comm.evaluate(
      system_lib.make_system("hamming74_ml"), {}, attack="laser", psr_db=-6.0, ebn0_grid=(1.0,),
      blocks=4, table=None, key=jax.random.key(0),
    )  # fmt: skip


def test_main_reports_a_bad_setting_in_one_line(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "experiments.main", "--config=configs/comm_ae.py:quick",
     f"--workdir={tmp_path}", "--config.system.k=9"],
    capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert out.returncode == 2
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "system.k=9" in errors[0], out.stderr[-2000:]


@pytest.mark.slow
def test_end_to_end_run_and_rerun(tmp_path):
  cfg = comm_ae.get_config("quick")
  with cfg.unlocked():
    cfg.models = ("mlp_ae", "hamming74_ml")
    cfg.train.steps = 300
    cfg.eval.update(blocks=300, ebn0_db=(4.0, 8.5))
    cfg.attacks.update(psr_db=(-6.0,), curve_psr_db=(-12.0,), craft_samples=32)
    cfg.attacks.enabled = ("jamming", "uap", "substitute_shift")
    cfg.attacks.substitute.update(observations=256, steps=50)
    cfg.output.figures = True
  out = run_lib.run(cfg, str(tmp_path))
  rows = out["results"]
  # per model: none at 2 Eb/N0 + 3 attacks x (-6 dB at 2 Eb/N0 + -12 dB at 8.5 dB)
  assert len(rows) == 2 * (2 + 3 * 3)
  for r in rows:
    assert r["dataset"] == "comm" and r["blocks"] == 300
    assert r["bler_lo"] <= r["bler"] <= r["bler_hi"]
    if r["attack"] != "none":
      assert r["psr_measured_db"] == pytest.approx(r["psr_db"], abs=1e-4)
  assert (tmp_path / "summary.md").exists() and (tmp_path / "figures" / "bler_vs_psr.png").exists()
  # The timing table: one row per stage of the plan, each with the seconds this run took.
  stages = progress.comm_plan(cfg, sum(len(g) for _, _, g in comm._points(cfg)))
  first = check_timings(tmp_path, [s.label for s in stages])
  again = run_lib.run(cfg, str(tmp_path))  # everything done: no new rows
  assert len(again["results"]) == len(rows)
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  assert len(lines) == len(rows)
  done = ("train", "craft", "evaluate")  # the autoencoder's parameters reloaded, nothing crafted
  check_timings(tmp_path, [s.label for s in stages], done_earlier=done, first=first)
