"""Classical baselines of the (7, 4) autoencoder: uncoded BPSK and the Hamming(7,4) code.

Sadeghi and Larsson (2019), "Physical Adversarial Attacks Against End-to-End Autoencoder
Communication Systems", compare the autoencoder of O'Shea and Hoydis (2017) with Hamming(7,4)
over BPSK, decoded by hard decision or by maximum likelihood (ML). Every scheme here sends
real BPSK symbols of energy 1 (a block of n symbols has energy n) over AWGN of variance
sigma^2 = 1 / (2 R Eb/N0) per real dimension, R = k / n bits per channel use (the same Eb/N0
definition as the autoencoder, `system.noise_std`).

Closed forms (Proakis, "Digital Communications", ch. 7-8):
- uncoded BPSK, k bits per block: bit error p = Q(sqrt(2 Eb/N0)), BLER = 1 - (1 - p)^k;
- Hamming(7,4), hard decision: channel bit error p = Q(sqrt(2 R Eb/N0)), R = 4/7; the code
  corrects exactly the single errors (it is perfect), so BLER = 1 - [(1-p)^7 + 7 p (1-p)^6];
- Hamming(7,4), ML (soft) decoding has no closed form; its BLER lies between the nearest
  neighbour bound Q(sqrt(2 d_min R Eb/N0)) and the union bound
  sum_d A_d Q(sqrt(2 d R Eb/N0)) over the weight distribution A_3 = A_4 = 7, A_7 = 1.
"""

import numpy as np
from scipy import special

HAMMING_K = 4
HAMMING_N = 7
# Systematic generator [I_4 | P] of Hamming(7,4): codeword = (m1..m4, p1, p2, p3).
HAMMING_PARITY = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], np.int32)
HAMMING_WEIGHTS = {3: 7, 4: 7, 7: 1}  # A_d: number of codewords of Hamming weight d


def message_bits(k: int) -> np.ndarray:
  """The k bits of every message index 0..2^k - 1, most significant first: int32[2^k, k]."""
  m = np.arange(2**k)[:, None]
  return ((m >> np.arange(k - 1, -1, -1)[None, :]) & 1).astype(np.int32)


def hamming74_codewords() -> np.ndarray:
  """The 16 codewords of Hamming(7,4) in message order: int32[16, 7] of 0/1."""
  bits = message_bits(HAMMING_K)
  return np.concatenate([bits, bits @ HAMMING_PARITY % 2], axis=1).astype(np.int32)


def bpsk(bits: np.ndarray) -> np.ndarray:
  """BPSK symbols 2b - 1 in {-1, +1} (energy 1 per symbol): float32, same shape."""
  return (2.0 * np.asarray(bits, np.float32) - 1.0).astype(np.float32)


def q_function(x):
  """Gaussian tail Q(x) = P(N(0, 1) > x)."""
  return 0.5 * special.erfc(np.asarray(x, np.float64) / np.sqrt(2.0))


def _ebn0(ebn0_db):
  return 10.0 ** (np.asarray(ebn0_db, np.float64) / 10.0)


def uncoded_bpsk_bler(ebn0_db, k: int = HAMMING_K):
  """BLER of k uncoded BPSK bits per block: 1 - (1 - Q(sqrt(2 Eb/N0)))^k."""
  p = q_function(np.sqrt(2.0 * _ebn0(ebn0_db)))
  return 1.0 - (1.0 - p) ** k


def hamming74_bit_error(ebn0_db):
  """Channel bit error of Hamming(7,4)-coded BPSK: Q(sqrt(2 R Eb/N0)), R = 4/7."""
  return q_function(np.sqrt(2.0 * HAMMING_K / HAMMING_N * _ebn0(ebn0_db)))


def hamming74_hard_bler(ebn0_db):
  """Exact BLER of Hamming(7,4) with hard-decision decoding: 1 - [(1-p)^7 + 7 p (1-p)^6]."""
  p = hamming74_bit_error(ebn0_db)
  return 1.0 - ((1.0 - p) ** 7 + 7.0 * p * (1.0 - p) ** 6)


def hamming74_ml_bounds(ebn0_db):
  """(lower, upper) bounds on the ML BLER: nearest-neighbour bound and union bound."""
  r = HAMMING_K / HAMMING_N
  e = _ebn0(ebn0_db)
  lower = q_function(np.sqrt(2.0 * 3 * r * e))
  upper = sum(a * q_function(np.sqrt(2.0 * d * r * e)) for d, a in HAMMING_WEIGHTS.items())
  return lower, np.minimum(upper, 1.0)
