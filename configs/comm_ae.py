"""Physical adversarial attacks on an end-to-end autoencoder communication system.

Sadeghi and Larsson (2019), "Physical Adversarial Attacks Against End-to-End Autoencoder
Communication Systems", IEEE Communications Letters 23(5), on the (7, 4) autoencoder of
O'Shea and Hoydis (2017). `experiment = "comm"` makes experiments.run hand the config to
experiments/comm.py.

  python -m experiments.main --config=configs/comm_ae.py --workdir=results/comm_ae
  python -m experiments.main --config=configs/comm_ae.py:quick --workdir=runs/comm_quick

Sections:
  system   k bits in n channel uses
  models   what is trained / evaluated: mlp_ae, conv_ae (real channel uses, as the issue asks),
           mlp_ae_iq / conv_ae_iq (complex I/Q channel uses, as the paper's code), and the
           classical baselines hamming74_hard, hamming74_ml, bpsk_uncoded
  train    the autoencoders' training (AWGN at ebn0_db, Adam)
  eval     blocks per point, the Eb/N0 grid
  attacks  which attacks, at which PSRs, and how they are crafted
"""

import ml_collections

from configs import base

ARGS = ("", "quick")


def get_config(arg=None):
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"config argument {arg!r} is not known; allowed: '' (full run) or 'quick'")
  quick = arg == "quick"
  c = ml_collections.ConfigDict()
  c.name = "comm_ae"
  c.experiment = "comm"
  c.seed = 0
  c.distributed = False
  c.cluster = base.cluster_config()

  c.system = ml_collections.ConfigDict(dict(k=4, n=7))
  c.models = ("mlp_ae", "conv_ae", "mlp_ae_iq", "hamming74_hard", "hamming74_ml", "bpsk_uncoded")

  # The paper trains at Eb/N0 = 8.5 dB. 10,000 steps of 1,000 messages (lr 1e-3, then 1e-4 from
  # 60%) bring the real-signal MLP autoencoder to Hamming(7,4)-ML-like BLER (measured here).
  c.train = ml_collections.ConfigDict(
    dict(ebn0_db=8.5, steps=10000, batch_size=1000, learning_rate=1e-3, decay_at=(0.6,))
  )
  c.eval = ml_collections.ConfigDict(
    dict(
      blocks=100_000,  # per (model, attack, PSR, Eb/N0) point
      ebn0_db=(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 8.5, 9.0, 10.0),
    )
  )

  a = c.attacks = ml_collections.ConfigDict()
  a.enabled = (
    "jamming", "fgm", "uap", "uap_unsync", "uap_shift", "substitute", "substitute_shift",
  )  # fmt: skip
  a.psr_db = (-10.0, -6.0, -2.0)  # the paper's: every Eb/N0 of eval.ebn0_db
  # BLER vs PSR at one Eb/N0 (curve_ebn0_db, on the eval grid): these PSRs there only.
  a.curve_psr_db = (-20.0, -16.0, -14.0, -12.0, -8.0, -4.0, 0.0)
  a.curve_ebn0_db = 8.5
  a.craft_ebn0_db = 8.5  # the channel noise of the blocks the attacker crafts on
  a.craft_samples = 1000  # Algorithm 1's sampled blocks
  a.passes = 1
  a.search_steps = 20  # halvings of the minimal-FGM scale search
  # Black box: the attacker observes received blocks and the receiver's decisions, and fits a
  # receiver of its own architecture (one hidden layer of 32 units, not the target's 16).
  a.substitute = ml_collections.ConfigDict(
    dict(observations=20000, hidden=(32,), steps=4000, batch_size=256, learning_rate=3e-3)
  )
  a.shard = True  # shard the evaluation's blocks over all local devices (the attack runner)
  a.chunk_size = 0  # 0 = chosen from memory_budget_mb
  a.memory_budget_mb = 1024

  c.output = ml_collections.ConfigDict(dict(figures=True))

  if quick:
    c.models = ("mlp_ae", "hamming74_hard", "hamming74_ml", "bpsk_uncoded")
    c.train.update(steps=1500)
    c.eval.update(blocks=4000, ebn0_db=(0.0, 4.0, 8.5))
    a.curve_psr_db = (-14.0,)
    a.craft_samples = 200
    a.substitute.update(observations=4000, steps=500)
  c.lock()
  return c
