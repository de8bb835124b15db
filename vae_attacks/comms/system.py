"""(n, k) communication systems as pure functions: autoencoders, Hamming(7,4), uncoded BPSK.

O'Shea and Hoydis (2017), "An Introduction to Deep Learning for the Physical Layer", learn
the transmitter and the receiver of a block code as one autoencoder: a message s in
{0..M-1}, M = 2^k, one-hot -> transmitter -> n real channel symbols x with ||x||^2 = n ->
AWGN -> receiver -> softmax over the M messages. Sadeghi and Larsson (2019), "Physical
Adversarial Attacks Against End-to-End Autoencoder Communication Systems", attack the (7, 4)
system trained at Eb/N0 = 8.5 dB, whose transmitter is Dense(M, relu) -> Dense(n) -> energy
normalisation and whose receiver is Dense(M, relu) -> Dense(M) (softmax), and a convolutional
variant.

A system is a frozen (hashable) dataclass with three per-block pure functions:

  encode(params, message[]) -> x[n]        the transmitted block, ||x||^2 = n
  logits(params, y[n]) -> logits[M]         differentiable scores (what gradient attacks see)
  decide(params, y[n]) -> int32[]           the receiver's decision

and `__call__ = logits`, so a system is also the `logits_fn` the attack runner takes
(`vae_attacks.attacks.runner`). `transmit_block` is one block through the channel with an
attacker's perturbation, written for one block and one Eb/N0 in the runner's attack signature;
the runner batches it over blocks x Eb/N0 (and shards the blocks over devices).
"""

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vae_attacks.attacks import base as attack_base
from vae_attacks.comms import baselines
from vae_attacks.types import Array, Params, PRNGKey

# "_iq": complex channel uses (I and Q, 2n real dimensions), as the authors' code.
AUTOENCODERS = ("mlp_ae", "conv_ae", "mlp_ae_iq", "conv_ae_iq")
CODES = ("hamming74_hard", "hamming74_ml", "bpsk_uncoded")
SYSTEMS = AUTOENCODERS + CODES
# How the attacker's perturbation enters a block (`transmit_block`):
#   clean     no perturbation
#   table     delta[message]: a universal perturbation (every row equal) or an input-specific one
#   jamming   Gaussian noise scaled to the energy budget, drawn per block
#   shifted   delta[message] cyclically shifted by a uniform random offset per block (the
#             attacker does not know the symbol timing)
MODES = ("clean", "table", "jamming", "shifted")


def noise_std(ebn0_db, rate: float):
  """AWGN standard deviation per real dimension: 1 / sqrt(2 R Eb/N0) (symbols of energy 1)."""
  return 1.0 / jnp.sqrt(2.0 * rate * 10.0 ** (jnp.asarray(ebn0_db, jnp.float32) / 10.0))


def normalize_energy(x: Array, energy) -> Array:
  """Scales the last axis of x to squared norm `energy` (every codeword exactly)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x * (jnp.sqrt(jnp.asarray(energy, x.dtype)) / jnp.maximum(norm, 1e-12))


def check_code(k: int, n: int) -> None:
  """Raises ValueError on an impossible (n, k): n >= 1, 1 <= k <= n."""
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"n={n!r} channel uses: allowed a positive integer")
  if not isinstance(k, int) or k < 1 or k > n:
    raise ValueError(f"k={k!r} bits in n={n} channel uses: allowed 1 <= k <= n")


# ----------------------------------------------------------------------------------------------
# Flax modules (one block, no batch axis; vmap for batches).


class Transmitter(nn.Module):
  """One-hot message [M] -> n channel symbols with ||x||^2 = n (O'Shea and Hoydis 2017).

  arch "mlp": Dense(M, relu) -> Dense(n) (Sadeghi and Larsson 2019, Table 1); "conv": Dense(M,
  relu) -> Conv1D(filters, kernel, relu) over the M features -> Dense(n), after the
  convolutional autoencoder of the same paper (its Table 1, without the complex I/Q layout).
  """

  n: int
  symbol_dim: int = 1
  arch: str = "mlp"
  filters: int = 16
  kernel: int = 6

  @nn.compact
  def __call__(self, onehot: Array) -> Array:  # [M] -> [n * symbol_dim]
    m = onehot.shape[-1]
    h = nn.relu(nn.Dense(m)(onehot))  # [M]
    if self.arch == "conv":
      h = nn.relu(nn.Conv(self.filters, (self.kernel,), padding="SAME")(h[:, None]))  # [M, F]
      h = h.reshape(-1)
    x = nn.Dense(self.n * self.symbol_dim)(h)  # [n * symbol_dim]
    return normalize_energy(x, self.n)


class Receiver(nn.Module):
  """Received block y[n] -> logits[M].

  arch "mlp": Dense(hidden[0], relu) ... -> Dense(M) (the paper: one hidden layer of M units);
  "conv": Conv1D(16, 3, relu) -> Conv1D(8, 3, relu) over the n symbols -> Dense(2M, relu) ->
  Dense(M), after the paper's convolutional receiver.
  """

  num_messages: int
  symbol_dim: int = 1
  arch: str = "mlp"
  hidden: tuple[int, ...] = (16,)
  filters: tuple[int, ...] = (16, 8)
  kernel: int = 3

  @nn.compact
  def __call__(self, y: Array) -> Array:  # [n * symbol_dim] -> [M]
    h = y
    if self.arch == "conv":
      h = y.reshape(-1, self.symbol_dim)  # [n, symbol_dim]: I/Q as channels
      for f in self.filters:
        h = nn.relu(nn.Conv(f, (self.kernel,), padding="SAME")(h))  # [n, f]
      h = h.reshape(-1)
      h = nn.relu(nn.Dense(2 * self.num_messages)(h))
    else:
      for width in self.hidden:
        h = nn.relu(nn.Dense(width)(h))
    return nn.Dense(self.num_messages)(h)


# ----------------------------------------------------------------------------------------------
# Systems.


class _Code:
  """k bits per block over n channel uses: M = 2^k messages at rate k / n."""

  @property
  def num_messages(self) -> int:
    return 2**self.k

  @property
  def rate(self) -> float:
    return self.k / self.n


class _Receives:
  """What a system with a learned receiver (params["rx"]) does with a received block."""

  def logits(self, params: Params, y: Array) -> Array:  # [n] -> [M]
    return self.receiver.apply(params["rx"], y)

  def decide(self, params: Params, y: Array) -> Array:  # [n] -> int32[]
    return jnp.argmax(self.logits(params, y)).astype(jnp.int32)

  def __call__(self, params: Params, y: Array) -> Array:
    return self.logits(params, y)


@dataclasses.dataclass(frozen=True)
class AutoencoderSystem(_Code, _Receives):
  """An autoencoder (transmitter + receiver); params = {"tx": ..., "rx": ...}."""

  name: str
  k: int
  n: int
  transmitter: Transmitter
  receiver: Receiver
  symbol_dim: int = 1  # real dimensions per channel use: 1 (real), 2 (complex, I/Q)

  @property
  def dims(self) -> int:
    return self.n * self.symbol_dim

  def init(self, key: PRNGKey) -> Params:
    k_tx, k_rx = jax.random.split(key)
    onehot = jnp.zeros((self.num_messages,), jnp.float32)
    return {
      "tx": self.transmitter.init(k_tx, onehot),
      "rx": self.receiver.init(k_rx, jnp.zeros((self.dims,), jnp.float32)),
    }

  def encode(self, params: Params, message: Array) -> Array:  # [] -> [n]
    onehot = jax.nn.one_hot(message, self.num_messages, dtype=jnp.float32)
    return self.transmitter.apply(params["tx"], onehot)


@dataclasses.dataclass(frozen=True)
class ReceiverOnly(_Receives):
  """A receiver on its own (the black-box attacker's substitute); params = {"rx": ...}."""

  name: str
  n: int
  receiver: Receiver

  def init(self, key: PRNGKey) -> Params:
    return {"rx": self.receiver.init(key, jnp.zeros((self.n,), jnp.float32))}


@dataclasses.dataclass(frozen=True)
class CodeSystem(_Code):
  """A classical block code over BPSK: Hamming(7,4) or k uncoded bits; params = {} (none).

  `logits` are the ML soft scores -||y - c_m||^2 / (2 sigma^2) at `logit_ebn0_db` (so a
  gradient attack has something to differentiate; their argmax is the ML decision);
  `decide` is ML (minimum Euclidean distance) or hard decision (signs, then the codeword at
  minimum Hamming distance, which for the perfect Hamming(7,4) code is syndrome decoding).
  """

  name: str
  code: str  # "hamming74" | "uncoded"
  decoder: str  # "ml" | "hard"
  k: int = 4
  logit_ebn0_db: float = 8.5

  @property
  def n(self) -> int:
    return baselines.HAMMING_N if self.code == "hamming74" else self.k

  @property
  def symbol_dim(self) -> int:
    return 1  # BPSK: the quadrature dimension carries nothing, so it is left out

  @property
  def dims(self) -> int:
    return self.n

  def codebook_bits(self) -> np.ndarray:  # int32[M, n]
    if self.code == "hamming74":
      return baselines.hamming74_codewords()
    return baselines.message_bits(self.k)

  def codebook(self) -> Array:  # float32[M, n] of +-1
    return jnp.asarray(baselines.bpsk(self.codebook_bits()))

  def init(self, key: PRNGKey) -> Params:
    del key
    return {}

  def encode(self, params: Params, message: Array) -> Array:  # [] -> [n]
    del params
    return self.codebook()[message]

  def logits(self, params: Params, y: Array) -> Array:  # [n] -> [M]
    del params
    sigma = noise_std(self.logit_ebn0_db, self.rate)
    d2 = jnp.sum((y[None, :] - self.codebook()) ** 2, axis=-1)  # [M]
    return -d2 / (2.0 * sigma**2)

  def decide(self, params: Params, y: Array) -> Array:  # [n] -> int32[]
    if self.decoder == "ml":
      return jnp.argmax(self.logits(params, y)).astype(jnp.int32)
    bits = (y > 0).astype(jnp.int32)  # [n]
    dist = jnp.sum(bits[None, :] != jnp.asarray(self.codebook_bits()), axis=-1)  # [M]
    return jnp.argmin(dist).astype(jnp.int32)

  def __call__(self, params: Params, y: Array) -> Array:
    return self.logits(params, y)


def make_system(
  name: str,
  *,
  k: int = 4,
  n: int = 7,
  complex_symbols: bool = False,
  arch: dict | None = None,
  **kw,
):
  """The system called `name` (one of SYSTEMS) for k bits in n channel uses.

  Args:
    name: one of SYSTEMS: "mlp_ae", "conv_ae" (real channel uses), "mlp_ae_iq", "conv_ae_iq"
      (complex channel uses), "hamming74_hard", "hamming74_ml" or "bpsk_uncoded".
    k, n: bits per block and channel uses (Hamming(7,4) needs k = 4, n = 7; uncoded BPSK
      sends k symbols, whatever n).
    complex_symbols: the autoencoder's channel uses are complex (I/Q: 2n real dimensions, as
      O'Shea and Hoydis 2017 and the authors' code) rather than real (n dimensions). The
      energy per block is n and the noise per real dimension 1 / (2 R Eb/N0) either way; BPSK
      codes use the in-phase dimension only.
    arch: optional module fields for the autoencoders, {"transmitter": {...}, "receiver": {...}}.
    **kw: CodeSystem fields (logit_ebn0_db).

  Raises:
    ValueError: an unknown name or impossible (n, k).
  """
  check_code(k, n)
  arch = arch or {}
  if name in AUTOENCODERS:
    kind = "mlp" if name.startswith("mlp") else "conv"
    sd = 2 if (complex_symbols or name.endswith("_iq")) else 1
    tx = Transmitter(n=n, symbol_dim=sd, arch=kind, **arch.get("transmitter", {}))
    rx_fields = dict(arch.get("receiver", {}))
    rx_fields.setdefault("hidden", (2**k,))
    rx = Receiver(num_messages=2**k, symbol_dim=sd, arch=kind, **rx_fields)
    return AutoencoderSystem(name=name, k=k, n=n, transmitter=tx, receiver=rx, symbol_dim=sd)
  if name in ("hamming74_hard", "hamming74_ml"):
    if (k, n) != (baselines.HAMMING_K, baselines.HAMMING_N):
      raise ValueError(f"{name} is a (7, 4) code: needs k=4, n=7 (got k={k}, n={n})")
    return CodeSystem(name=name, code="hamming74", decoder=name.rsplit("_", 1)[1], k=k, **kw)
  if name == "bpsk_uncoded":
    return CodeSystem(name=name, code="uncoded", decoder="ml", k=k, **kw)
  raise ValueError(f"system {name!r} is not known; allowed: {', '.join(SYSTEMS)}")


# ----------------------------------------------------------------------------------------------
# Training.


def _batch_loss(system, params, messages, noise):  # messages int[B], noise [B, n]
  x = jax.vmap(system.encode, in_axes=(None, 0))(params, messages)  # [B, n]
  logits = jax.vmap(system.logits, in_axes=(None, 0))(params, x + noise)  # [B, M]
  return optax.softmax_cross_entropy_with_integer_labels(logits, messages).mean()


def train_autoencoder(
  system: AutoencoderSystem,
  *,
  key: PRNGKey,
  steps: int,
  batch_size: int,
  learning_rate: float,
  ebn0_db: float,
  decay_at: Sequence[float] = (),
  steps_per_call: int = 500,
) -> tuple[Params, dict]:
  """Trains transmitter and receiver end to end with cross-entropy over AWGN at `ebn0_db`.

  Every step draws `batch_size` uniform messages and channel noise (fold_in(key, step)), as
  O'Shea and Hoydis (2017); Adam, with the learning rate divided by 10 at each fraction of
  `steps` in `decay_at`. Steps run in jitted `lax.scan` blocks of `steps_per_call`.

  Returns:
    (params, {"loss": [mean loss of each block of steps], "steps": steps}).
  """
  init_key, data_key = jax.random.split(key)
  params = system.init(init_key)
  boundaries = {int(f * steps): 0.1 for f in decay_at}
  tx = optax.adam(optax.piecewise_constant_schedule(learning_rate, boundaries))
  opt_state = tx.init(params)
  sigma = noise_std(ebn0_db, system.rate)

  def step(carry, i):
    params, opt_state = carry
    k_msg, k_noise = jax.random.split(jax.random.fold_in(data_key, i))
    messages = jax.random.randint(k_msg, (batch_size,), 0, system.num_messages)
    noise = sigma * jax.random.normal(k_noise, (batch_size, system.dims))
    loss, grads = jax.value_and_grad(lambda p: _batch_loss(system, p, messages, noise))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def run(params, opt_state, start):
    idx = start + jnp.arange(steps_per_call)
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), idx)
    return params, opt_state, losses

  history = []
  for start in range(0, steps, steps_per_call):
    params, opt_state, losses = run(params, opt_state, start)
    n_valid = min(steps_per_call, steps - start)  # the last block may run past `steps`
    history.append(float(np.mean(np.asarray(losses)[:n_valid])))
  return params, {"loss": history, "steps": int(math.ceil(steps / steps_per_call) * steps_per_call)}


def train_receiver(
  receiver: ReceiverOnly,
  signals: Array,
  labels: Array,
  *,
  key: PRNGKey,
  steps: int,
  batch_size: int,
  learning_rate: float,
) -> Params:
  """Fits a receiver to (received signal [N, n], label int[N]) pairs by cross-entropy (Adam).

  The black-box attacker's substitute (Papernot et al. 2017, "Practical Black-Box Attacks
  against Machine Learning"): labels are the attacked receiver's decisions.
  """
  init_key, data_key = jax.random.split(key)
  params = receiver.init(init_key)
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)
  signals = jnp.asarray(signals, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)

  def loss_fn(p, y, t):
    logits = jax.vmap(receiver.logits, in_axes=(None, 0))(p, y)
    return optax.softmax_cross_entropy_with_integer_labels(logits, t).mean()

  def step(carry, i):
    p, s = carry
    idx = jax.random.randint(jax.random.fold_in(data_key, i), (batch_size,), 0, len(labels))
    grads = jax.grad(loss_fn)(p, signals[idx], labels[idx])
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))((params, opt_state))
  return params


# ----------------------------------------------------------------------------------------------
# One block through the channel (the runner's "attack": one pair, one eps = Eb/N0 in dB).


def transmit_block(
  system,
  params: Params,
  message: Array,
  label: Array,
  *,
  eps: Array,
  mode: str,
  delta: Array,
  energy: Array,
  key: PRNGKey,
) -> attack_base.AttackResult:
  """Sends `message` through AWGN at Eb/N0 = `eps` dB with the attacker's perturbation added.

  y = encode(message) + n + p, n ~ N(0, sigma^2 I), sigma = 1 / sqrt(2 R Eb/N0); p by `mode`
  (MODES): 0, delta[message], Gaussian jamming of squared norm exactly `energy`, or
  delta[message] cyclically shifted by a uniform offset of 0..n-1 channel uses. Written for the
  attack runner (`runner.iter_attack_chunks(transmit_block, system, params, messages, messages,
  ebn0_grid, mode=..., delta=..., energy=..., key=...)`), which batches it over blocks x Eb/N0.

  Args:
    system: an AutoencoderSystem or CodeSystem (the runner's `logits_fn` slot).
    params: its parameters.
    message: int32[] the message sent.
    label: int32[] the same message (the runner's target slot).
    eps: Eb/N0 in dB (traced scalar).
    mode: one of MODES (static).
    delta: float32[M, n] the attacker's perturbation per message (rows equal for a universal
      perturbation); ignored by "clean" and "jamming".
    energy: float32[] the jamming energy budget.
    key: this block's key (the runner folds in the block's index).

  Returns:
    AttackResult: x_adv = y [n]; success = block error (decision != label); target_prob = the
    receiver's softmax probability of the label; distortion = norms of p; iterations 0.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not known; allowed: {', '.join(MODES)}")
  k_noise, k_jam, k_shift = jax.random.split(key, 3)
  x = system.encode(params, message)  # [dims]
  n = x.shape[-1]
  noise = noise_std(eps, system.rate) * jax.random.normal(k_noise, (n,))
  if mode == "clean":
    p = jnp.zeros((n,), jnp.float32)
  elif mode == "jamming":
    g = jax.random.normal(k_jam, (n,))
    p = normalize_energy(g, energy)
  else:
    p = delta[message]
    if mode == "shifted":
      shift = jax.random.randint(k_shift, (), 0, system.n)  # whole channel uses
      p = jnp.roll(p, shift * system.symbol_dim)
  y = x + noise + p
  decided = system.decide(params, y)
  prob = jax.nn.softmax(system.logits(params, y))[label]
  return attack_base.AttackResult(
    x_adv=y,
    success=decided != label,
    target_prob=prob,
    distortion=attack_base.distortion(x, x + p),
    iterations=jnp.zeros((), jnp.int32),
    loss_trace=jnp.zeros((1,), jnp.float32),
  )
