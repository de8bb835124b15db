"""End-to-end autoencoder communication systems and physical adversarial attacks on them.

O'Shea and Hoydis (2017), "An Introduction to Deep Learning for the Physical Layer", learn a
transmitter and a receiver as one autoencoder across a noisy channel; Sadeghi and Larsson
(2019), "Physical Adversarial Attacks Against End-to-End Autoencoder Communication Systems"
(IEEE Communications Letters 23(5)), show that an adversary who can only add a signal to the
channel degrades it far more than jamming of the same power.

- `system`: the (n, k) systems (MLP and convolutional autoencoders, Hamming(7,4), uncoded BPSK)
  as hashable pure functions, the AWGN channel at a given Eb/N0, energy normalisation, training
  and the per-block evaluation the runner batches.
- `baselines`: closed forms (uncoded BPSK, Hamming(7,4) hard decision) and codebooks.
- `attacks`: jamming, the input-specific FGM, the universal perturbation of Algorithm 1, the
  substitute-receiver black-box attack and shift-invariant perturbations.
"""
