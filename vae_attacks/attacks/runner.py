"""Runs one attack over many (source, target) pairs and an epsilon grid.

Every attack in this package is written for ONE pair and ONE epsilon,
`attack(logits_fn, params, x[H, W, C], target[], *, eps, <knobs>) -> AttackResult`.
This module is the one place where batching happens (docs/style.md, "Batching lives in one place"):

- `make_pairs` picks the (source, target) pairs of an experiment from a data split, with the
  target-selection strategies of the adversarial-examples literature (random other class, next
  class, least-likely class as in Kurakin et al. 2016 "Adversarial examples in the physical
  world", every other class, or a fixed list), attacking only correctly classified sources.
- `run_attack` maps the attack over pairs and over the epsilon grid with two `jax.vmap`s inside
  ONE jitted function, runs it over equal-sized chunks of pairs (the last one padded) so a
  whole sweep compiles once, optionally shards each chunk's pairs over the devices of a 1-D
  mesh, and returns host numpy results with leading axes [E, P]. `iter_attack_chunks` yields the
  same results chunk by chunk so a caller can write them as they are produced.
- `summarise` reduces a result to one row of statistics per epsilon.

In a multi-process run (`jax.distributed`, e.g. on a cluster) every process calls the runner
with the same arguments; the chunks are dealt out to the processes in turn (chunk k to process
k mod n), each process runs its chunks on its own devices (the mesh holds this process's
devices), and after each round the results are gathered on every process (gloo on CPUs), so
each process yields every chunk in order, as a single process would.

Keyword knobs of the attack are split by type: hashable Python values (ints, floats, strings,
bools, tuples, None) are static -- closed over, part of the compilation cache key; jax/numpy
arrays are traced arguments shared by every pair and epsilon (pass `jnp.asarray(0.01)` to sweep
a step size without recompiling); `EpsScaled(f)` is `f * eps` at each eps of the grid (an
eps-relative step size); a knob named `key` is a PRNG key that is split per pair as
`fold_in(key, pair_index)`, with the pair's index in `x`, so results do not depend on chunking.
"""

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vae_attacks import processes
from vae_attacks import progress as progress_lib
from vae_attacks.attacks.base import AttackResult
from vae_attacks.types import Array, LogitsFn, Params, PRNGKey

STRATEGIES = ("random", "next", "least_likely", "all", "fixed")
PAIRS_AXIS = "pairs"
KEY_KNOB = "key"
# Used when neither chunk_size nor memory_budget_bytes is given and the device does not report
# its memory (CPU): small enough to leave room for other processes, large enough that chunks
# of an MNIST CNN attack hold a few hundred pairs.
DEFAULT_CPU_BUDGET_BYTES = 1 << 30
# Fraction of a device's reported memory (bytes_limit) used by default on accelerators.
DEFAULT_BUDGET_FRACTION = 0.5

Attack = Callable[..., AttackResult]


class EpsScaled(NamedTuple):
  """A knob that is `factor * eps` at each eps of the grid, e.g. `step_size=EpsScaled(0.25)`.

  An attack sees the product as a traced scalar; the factor is static (part of the cache key).
  """

  factor: float


class Pairs(NamedTuple):
  """The (source, target) pairs of an experiment, as host numpy arrays."""

  index: np.ndarray  # int32[P] index of the source example in the split
  source_label: np.ndarray  # int32[P] its true label
  target: np.ndarray  # int32[P] the class the attack aims for (never the label)


# ----------------------------------------------------------------------------------------------
# Pairs.


@functools.lru_cache(maxsize=64)
def _jitted_map(fn: Callable, in_axes: tuple) -> Callable:
  """jit(vmap(fn)) over the mapped arguments; cached by fn so repeated calls do not retrace."""
  return jax.jit(jax.vmap(fn, in_axes=in_axes))


def batched_map(
  fn: Callable,
  params: Any,
  *arrays: Array,
  batch_size: int = 256,
  pad: bool = True,
  exact: bool = False,
) -> Any:
  """fn(params, *one_example) over every example of `arrays`, in equal-sized jitted batches.

  The one batched evaluation of the library: logits, embeddings, latent means, SSIM,
  reconstructions, per-pair measures. `fn` is written for ONE example and vmapped; the arrays
  are cut along their leading axis into batches of `batch_size`, the last one padded by
  repeating its last example, so every call has one shape: one compilation, and the values
  do not depend on how many examples there are (a batch of another size may be vectorised,
  and so rounded, differently). Build `fn` once (a module-level function or a hashable
  callable): a fresh lambda on every call retraces.

  Args:
    fn: `(params, *example) -> pytree of arrays` for one example.
    params: passed unmapped to every call (any pytree; None for a function of the data only).
    *arrays: one per example argument of `fn`: [N, ...] host or device arrays, or pytrees of
      them (e.g. a batched AttackResult), mapped over their leading axis.
    batch_size: examples per jitted call.
    pad: False cuts the last batch short instead (a second compilation for its shape).
    exact: every call has `batch_size` examples even when there are fewer (padded), so the
      values do not depend on how many examples one call maps (the measured sweep: chunks of
      any size give bit-identical measures).

  Returns:
    The pytree of `fn`'s outputs with a leading axis [N, ...], as host numpy arrays.
  """
  lengths = [len(a) for a in jax.tree.leaves(arrays)]
  n = lengths[0] if lengths else 0
  if n == 0:
    raise ValueError("no examples to map over")
  if any(m != n for m in lengths):
    raise ValueError(f"arrays differ in length: {lengths}")
  batch = batch_size if exact and pad else min(batch_size, n)
  mapped = _jitted_map(fn, (None,) + (0,) * len(arrays))
  parts = []
  for start in range(0, n, batch):
    stop = min(start + batch, n)
    idx = _padded_indices(start, stop, batch) if pad else np.arange(start, stop)
    out = mapped(params, *jax.tree.map(lambda a, idx=idx: a[idx], arrays))
    parts.append(jax.tree.map(lambda o, keep=stop - start: np.asarray(o)[:keep], out))
  return jax.tree.map(lambda *p: np.concatenate(p, axis=0), *parts)


def batched_logits(
  logits_fn: LogitsFn, params: Params, x: Array, *, batch_size: int = 256
) -> np.ndarray:
  """Logits of every example: `batched_map` of `logits_fn(params, x[H, W, C]) -> logits[K]`.

  Returns:
    float32 numpy logits [N, K].
  """
  if len(x) == 0:
    raise ValueError("x holds no examples")
  return batched_map(logits_fn, params, x, batch_size=batch_size)


def make_pairs(
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  y: Array,
  *,
  strategy: str,
  num_pairs: int | None,
  key: PRNGKey,
  num_classes: int,
  only_correct: bool = True,
  targets: Sequence[int] | None = None,
  batch_size: int = 256,
  eligible: np.ndarray | None = None,
) -> Pairs:
  """Chooses (source, target) pairs from a data split for a targeted attack.

  Sources are the first sources of a permutation (drawn from `key`) of the eligible examples:
  those the model classifies correctly, or all of them when `only_correct=False`. Target
  strategies:

  - "random": uniform over the classes other than the true label (drawn from `key`); when
    num_pairs exceeds the eligible sources, further rounds over the same sources give each a
    new target it has not had (up to K - 1 rounds), so a small test split still yields many
    distinct pairs;
  - "next": (label + 1) % num_classes;
  - "least_likely": the class of smallest logit other than the label (Kurakin et al. 2016);
  - "all": every class other than the label, in increasing order: num_classes - 1 pairs per
    source;
  - "fixed": each class in `targets` that differs from the source's label.

  Args:
    logits_fn: `(params, x[H, W, C]) -> logits[K]`; used (batched) for predictions.
    params: the classifier's parameters.
    x: the split's examples [N, H, W, C].
    y: their labels int[N].
    strategy: one of STRATEGIES.
    num_pairs: number of PAIRS to return (for "all" and "fixed" a source gives several pairs and
      the last source may be cut short); None takes every eligible source.
    key: PRNG key for the order of the sources and for "random" targets.
    num_classes: K.
    only_correct: attack only sources whose prediction equals their label.
    targets: the class ids for strategy "fixed" (and only then).
    batch_size: examples per batch when computing predictions.
    eligible: bool[N], the sources that may be attacked, given by the caller instead of the
      model's correct predictions (e.g. the examples EVERY model of a study classifies
      correctly, so that all of them are attacked on the same pairs); `only_correct` is then
      not used, and `logits_fn` only by strategy "least_likely".

  Returns:
    Pairs(index int32[P], source_label int32[P], target int32[P]) as numpy arrays; for "all" and
    "fixed" the pairs of one source are adjacent, for "random" they come in rounds over the
    sources; the pairs for a smaller num_pairs (same key) are a prefix.

  Raises:
    ValueError: an unknown strategy, bad targets or labels, or too few eligible sources.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is not supported; allowed: {', '.join(STRATEGIES)}")
  if num_classes < 2:
    raise ValueError(f"num_classes={num_classes} must be at least 2")
  if (strategy == "fixed") != (targets is not None):
    raise ValueError(
      f"targets must be given with strategy='fixed' and only then (strategy={strategy!r}, "
      f"targets={targets!r})"
    )
  if targets is not None:
    targets = np.asarray(targets, np.int32).reshape(-1)
    if targets.size == 0 or targets.min() < 0 or targets.max() >= num_classes:
      raise ValueError(f"targets={targets.tolist()} must be class ids in [0, {num_classes})")
  if num_pairs is not None and num_pairs < 1:
    raise ValueError(f"num_pairs={num_pairs} must be positive (or None for all sources)")
  y = np.asarray(y).astype(np.int32).reshape(-1)
  if len(y) != len(x):
    raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes})")

  logits = None
  if eligible is not None:
    eligible = np.asarray(eligible, bool).reshape(-1)
    if len(eligible) != len(y):
      raise ValueError(f"eligible has {len(eligible)} entries for {len(y)} examples")
    eligible = np.flatnonzero(eligible)
  elif only_correct:
    logits = batched_logits(logits_fn, params, x, batch_size=batch_size)
    eligible = np.flatnonzero(np.argmax(logits, axis=-1) == y)
  else:
    eligible = np.arange(len(y))
  order_key, target_key = jax.random.split(key)
  sources = eligible[np.asarray(jax.random.permutation(order_key, len(eligible)))]

  # Targets per source, for the sources in permuted order.
  if strategy in ("all", "fixed"):
    classes = np.arange(num_classes, dtype=np.int32) if strategy == "all" else targets
    src = np.repeat(sources, len(classes))
    tgt = np.tile(classes, len(sources))
    keep = tgt != y[src]
    src, tgt = src[keep], tgt[keep]
  else:
    src = sources if num_pairs is None else sources[:num_pairs]
    if strategy == "random":
      # An offset in [1, K-1] from the label is uniform over the other classes. Drawn for every
      # eligible source, so a smaller num_pairs gives a prefix of the same pairs.
      offset = np.asarray(jax.random.randint(target_key, (len(sources),), 1, num_classes))
      tgt = (y[src] + offset[: len(src)]) % num_classes
      if num_pairs is not None and num_pairs > len(sources) and len(sources):
        # More pairs than sources: further rounds over the same sources, each source taking a
        # new target it has not had, in a random order (round 0 is the pairs above).
        rounds = min(-(-num_pairs // len(sources)), num_classes - 1)
        rest = _other_offsets(jax.random.fold_in(target_key, 1), offset, num_classes)
        src = np.concatenate([sources] * rounds)
        tgt = (y[src] + np.concatenate([offset, *rest.T[: rounds - 1]])) % num_classes
    elif strategy == "next":
      tgt = (y[src] + 1) % num_classes
    else:  # least_likely
      ll = (
        logits[src]
        if logits is not None
        else batched_logits(logits_fn, params, x[src], batch_size=batch_size)
      )
      ll = np.where(np.arange(num_classes)[None] == y[src][:, None], np.inf, ll)
      tgt = np.argmin(ll, axis=-1)

  available = len(src) if strategy in ("all", "fixed", "random") else len(sources)
  if len(src) == 0 or (num_pairs is not None and available < num_pairs):
    what = (
      f"{len(eligible)} of {len(y)} examples are correctly classified"
      if only_correct
      else f"the split has {len(y)} examples, {len(eligible)} eligible"
    )
    raise ValueError(
      f"not enough eligible sources: num_pairs={num_pairs} requested with strategy="
      f"{strategy!r}, but only {available} pairs can be made ({what})"
    )
  if num_pairs is not None:
    src, tgt = src[:num_pairs], tgt[:num_pairs]
  return Pairs(
    index=src.astype(np.int32),
    source_label=y[src].astype(np.int32),
    target=np.asarray(tgt).astype(np.int32),
  )


def _other_offsets(key: PRNGKey, first: np.ndarray, num_classes: int) -> np.ndarray:
  """Per source, the offsets in [1, K-1] other than `first`, in a random order: int[S, K-2]."""
  offsets = np.arange(1, num_classes)
  keys = jax.random.split(key, len(first))
  perms = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, offsets))(keys))
  keep = perms != first[:, None]
  return perms[keep].reshape(len(first), num_classes - 2)


# ----------------------------------------------------------------------------------------------
# Running an attack over pairs x eps.


def pairs_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over axis 'pairs' for sharding attack chunks (default: this process's devices,
  `jax.local_devices()`; in a multi-process run the processes share the chunks out instead).

  On a CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=<cores>` (set before jax is
  imported) makes one host device per core; sharding pairs over them nearly doubles attack
  throughput on 2 cores (docs/performance.md). On GPUs the same mesh spreads pairs over the GPUs.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  return Mesh(np.array(devices), (PAIRS_AXIS,))


def _padded_indices(start: int, stop: int, size: int) -> np.ndarray:
  """Indices start..stop-1 padded to `size` by repeating the last one."""
  idx = np.arange(start, stop)
  return np.concatenate([idx, np.full(size - len(idx), stop - 1, idx.dtype)])


def _signature(tree: Any) -> tuple:
  """Hashable shapes/dtypes/structure of a pytree of arrays."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(a), getattr(a, "dtype", type(a))) for a in leaves)


class _Sweep:
  """The jitted [E, P] attack for one (attack, logits_fn, static knobs, mesh) and its executables.

  Kept in a bounded memo (`_sweep`) so a second run with the same configuration neither retraces
  nor recompiles; executables are keyed by the shapes of their arguments.
  """

  def __init__(self, attack, logits_fn, static_items, dynamic_names, has_key, mesh):
    static = {name: value for name, _, value in static_items}

    def one(params, x, target, eps, key, dynamic):
      kwargs = {
        name: value.factor * eps if isinstance(value, EpsScaled) else value
        for name, value in static.items()
      }
      kwargs.update(zip(dynamic_names, dynamic, strict=True))
      if has_key:
        kwargs[KEY_KNOB] = key
      return attack(logits_fn, params, x, target, eps=eps, **kwargs)

    over_pairs = jax.vmap(one, in_axes=(None, 0, 0, None, 0, None))
    over_grid = jax.vmap(over_pairs, in_axes=(None, None, None, 0, None, None))

    def chunk(params, x, target, eps_grid, pair_index, key, dynamic):
      keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, pair_index) if has_key else None
      return over_grid(params, x, target, eps_grid, keys, dynamic)

    self.mesh = mesh
    if mesh is None:
      self.jitted = jax.jit(chunk)
    else:
      rep, by_pair = NamedSharding(mesh, P()), NamedSharding(mesh, P(PAIRS_AXIS))
      self.jitted = jax.jit(
        chunk,
        in_shardings=(rep, by_pair, by_pair, rep, by_pair, rep, rep),
        out_shardings=NamedSharding(mesh, P(None, PAIRS_AXIS)),
      )
    self._executables = {}

  def executable(self, args: tuple):
    sig = _signature(args)
    if sig not in self._executables:
      self._executables[sig] = self.jitted.lower(*args).compile()
    return self._executables[sig]


@functools.lru_cache(maxsize=32)
def _sweep(attack, logits_fn, static_items, dynamic_names, has_key, mesh) -> _Sweep:
  return _Sweep(attack, logits_fn, static_items, dynamic_names, has_key, mesh)


def _split_knobs(attack_kwargs: dict) -> tuple[tuple, tuple, tuple, Any]:
  """(static items, dynamic names, dynamic values, key or None) from the attack's knobs."""
  static, dyn_names, dyn_values, key = [], [], [], None
  for name, value in sorted(attack_kwargs.items()):
    if name == "eps":
      raise ValueError("eps is swept by the runner: pass eps_grid, not eps=")
    if name == KEY_KNOB:
      key = value
    elif isinstance(value, (jax.Array, np.ndarray)):
      dyn_names.append(name)
      dyn_values.append(jnp.asarray(value))
    else:
      try:
        hash(value)
      except TypeError:
        raise TypeError(
          f"attack knob {name}={value!r} is neither hashable (static) nor an array (traced)"
        ) from None
      static.append((name, type(value), value))  # the type: 1 == 1.0 == True as keys
  return tuple(static), tuple(dyn_names), tuple(dyn_values), key


def _compiled_bytes(executable) -> int | None:
  """Per-device bytes an executable needs (arguments + outputs + temporaries), if XLA says."""
  try:
    ma = executable.memory_analysis()
  except Exception:  # noqa: BLE001 -- not every backend implements it
    return None
  if ma is None:
    return None
  return int(
    ma.argument_size_in_bytes
    + ma.output_size_in_bytes
    + ma.temp_size_in_bytes
    - ma.alias_size_in_bytes
  )


def _default_budget(devices: Sequence[jax.Device]) -> int:
  try:
    stats = devices[0].memory_stats()
  except Exception:  # noqa: BLE001
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(DEFAULT_BUDGET_FRACTION * stats["bytes_limit"])
  return DEFAULT_CPU_BUDGET_BYTES


def _per_device_budget(budget: int, devices: Sequence[jax.Device]) -> int:
  """The budget of one device: CPU devices of a process share the host's memory, so there the
  budget is for all of them together (8 host devices may not take 8 budgets)."""
  shared = sum(d.platform == "cpu" and d.process_index == jax.process_index() for d in devices)
  return budget // max(shared, 1)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def iter_attack_chunks(
  attack: Attack,
  logits_fn: LogitsFn,
  params: Params,
  x: Array,
  target: Array,
  eps_grid: Sequence[float] | Array,
  *,
  chunk_size: int | None = None,
  memory_budget_bytes: int | None = None,
  mesh: Mesh | None = None,
  progress: bool = True,
  desc: str | None = None,
  batched: Callable | None = None,
  start: int = 0,
  **attack_kwargs,
) -> Iterator[tuple[slice, AttackResult]]:
  """Runs `attack` over pairs x eps chunk by chunk, giving results as they are produced.

  The attack (written for one pair and one eps) is vmapped over the pairs of a chunk and over
  the eps grid inside one jitted function. Every chunk has the same number of pairs (the last
  is padded by repeating its last pair, and the padding dropped), so a sweep compiles once; the
  compiled function is memoised, so a second call with the same attack, logits_fn, static knobs,
  mesh and shapes neither retraces nor recompiles. While the host fetches one chunk's results,
  the next chunk is already dispatched.

  Chunk size: `chunk_size` if given; otherwise the largest that fits `memory_budget_bytes`
  (per device; default half of the device's reported memory, or DEFAULT_CPU_BUDGET_BYTES when
  the device reports none, as on CPU). CPU devices share the host's memory, so on CPU the budget
  is for all of this process's devices together. The need is measured, not guessed: the sweep
  is compiled for all pairs at once and XLA's `memory_analysis()` (arguments + outputs +
  temporaries) read; if that exceeds the budget, the per-pair share (total minus the replicated
  parameters, over the pairs) sets the chunk size and the function is compiled once more at
  that size.
  With a mesh, the chunk size is rounded up to a multiple of the device count.

  Args:
    attack: `attack(logits_fn, params, x[H, W, C], target[], *, eps, **knobs) -> AttackResult`.
    logits_fn: the model as `(params, x[H, W, C]) -> logits[K]`; build it once (a fresh lambda
      per call defeats the cache).
    params: the model's parameters (replicated on every device).
    x: source examples [P, H, W, C] (numpy on the host is fine: chunks are sent as needed).
    target: the attack's class per pair int[P] (the true label for untargeted attacks).
    eps_grid: epsilons [E]; each is passed to the attack as a traced float32 scalar.
    chunk_size: pairs per compiled call (overrides the memory budget).
    memory_budget_bytes: memory a chunk may use per device (per host, for CPU devices), when
      chunk_size is None.
    mesh: a 1-D mesh over axis 'pairs' (see `pairs_mesh`) to shard each chunk's pairs.
    progress: show a tqdm line (pairs/s, ETA) on stderr.
    desc: the progress line's label (e.g. "cnn bim linf x 3 eps"; default: the attack's
      function name and the number of eps).
    batched: the host-loop strategy: a batched form of `attack`,
      `batched(logits_fn, params, x[B, ...], target[B], *, eps[B], **knobs) -> AttackResult[B]`
      (e.g. `lbfgs.lbfgs_batch`, a host loop over compiled solver steps) run on the chunk's
      pairs x eps problems at once, instead of the jitted vmap of `attack`. Same results up
      to float rounding; faster where the attack's loop is a solver with early stopping
      (benchmarks/attacks.py). Static knobs only.
    start: the first pair to run (a stopped sweep resumed: pairs before it are not run). A
      pair's result does not depend on it (keys are folded in by the index in x), and at a
      multiple of the chunk size the chunks are those of the whole sweep.
    **attack_kwargs: the attack's knobs: hashable values are static, arrays traced and shared,
      `EpsScaled(f)` becomes f * eps, and `key` is split per pair as fold_in(key, index of the
      pair in x).

  Returns:
    An iterator of (pairs slice into x, AttackResult of host numpy arrays with leading axes
    [E, pairs]). Arguments are checked and the sweep compiled when this function is called;
    the chunks run as the iterator is consumed.

  Raises:
    ValueError: empty or mismatched inputs, a bad mesh or chunk size, or an `eps=` knob.
  """
  n_pairs = len(x)
  if n_pairs == 0:
    raise ValueError("no pairs to attack: x is empty")
  target = np.asarray(target, np.int32).reshape(-1)
  if len(target) != n_pairs:
    raise ValueError(f"x has {n_pairs} pairs but target has {len(target)}")
  eps_grid = jnp.asarray(eps_grid, jnp.float32).reshape(-1)
  if mesh is not None and mesh.axis_names != (PAIRS_AXIS,):
    raise ValueError(f"mesh must be 1-D over axis {PAIRS_AXIS!r}, got axes {mesh.axis_names}")
  if mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat):
    raise ValueError("mesh must hold this process's devices only (see `pairs_mesh`)")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be positive")
  if not 0 <= start < n_pairs:
    raise ValueError(f"start={start} must be a pair index in [0, {n_pairs})")

  static, dyn_names, dyn_values, key = _split_knobs(attack_kwargs)
  has_key = key is not None
  if batched is not None:
    if dyn_names or has_key or any(isinstance(v, EpsScaled) for _, _, v in static):
      raise ValueError(
        "the host-loop strategy takes static knobs only (no arrays, keys, EpsScaled)"
      )
    return _host_loop_chunks(
      batched, logits_fn, params, x, target, eps_grid, dict((n, v) for n, _, v in static),
      chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes, mesh=mesh,
      progress=progress, desc=desc, start=start,
    )  # fmt: skip
  sweep = _sweep(attack, logits_fn, static, dyn_names, has_key, mesh)
  devices = list(mesh.devices.flat) if mesh is not None else [jax.local_devices()[0]]
  n_dev = len(devices)

  if mesh is not None:
    rep, by_pair = NamedSharding(mesh, P()), NamedSharding(mesh, P(PAIRS_AXIS))
  else:
    rep = by_pair = devices[0]
  params = jax.device_put(params, rep)
  eps_grid = jax.device_put(eps_grid, rep)
  dyn_values = jax.device_put(dyn_values, rep)
  key = jax.device_put(key, rep) if has_key else None

  def args_for(idx: np.ndarray) -> tuple:
    return (
      params,
      jax.device_put(x[idx], by_pair),
      jax.device_put(target[idx], by_pair),
      eps_grid,
      jax.device_put(idx.astype(np.int32), by_pair),
      key,
      dyn_values,
    )

  def abstract(size: int) -> tuple:
    return (
      params,
      jax.ShapeDtypeStruct((size, *x.shape[1:]), jax.dtypes.canonicalize_dtype(x.dtype)),
      jax.ShapeDtypeStruct((size,), np.int32),
      eps_grid,
      jax.ShapeDtypeStruct((size,), np.int32),
      key,
      dyn_values,
    )

  if chunk_size is not None:
    chunk = _round_up(min(chunk_size, n_pairs), n_dev)
  else:
    budget = _per_device_budget(memory_budget_bytes or _default_budget(devices), devices)
    chunk = _round_up(n_pairs, n_dev)
    need = _compiled_bytes(sweep.executable(abstract(chunk)))
    if need is not None and need > budget:
      fixed = sum(a.nbytes for a in jax.tree.leaves(params))
      per_pair = max(need - fixed, 1) / (chunk / n_dev)  # per device
      fit = int((budget - fixed) // per_pair) * n_dev
      chunk = max(n_dev, min(chunk, fit - fit % n_dev))
    chunk = _share_of_pairs(chunk, n_pairs, n_dev)
  chunk = _agreed_chunk(chunk, n_dev)
  executable = sweep.executable(abstract(chunk))

  desc = desc or f"{getattr(attack, '__name__', 'attack')} x {eps_grid.shape[0]} eps"
  # Everything above runs now (errors and compilation at the call); the chunks run on iteration.
  return _run_chunks(
    executable, args_for, n_pairs, chunk, desc=desc, progress=progress, start=start
  )


# Bytes per problem of a host-loop solver, as a multiple of the problem's input bytes: the
# L-BFGS memory (2 x 10 curvature pairs) plus the iterate, gradient, direction, trial point and
# the model's activations (measured with `memory_analysis` of `lbfgs._batched_block` on the
# MNIST CNN: ~28 input sizes per problem at memory 10).
_HOST_LOOP_BYTES_PER_INPUT = 32


def _host_loop_chunks(
  batched, logits_fn, params, x, target, eps_grid, knobs, *, chunk_size, memory_budget_bytes,
  mesh, progress, desc=None, start=0,
):  # fmt: skip
  """`iter_attack_chunks` with the host-loop strategy: each chunk's pairs x eps problems are
  solved together by `batched`, with the problems sharded over the mesh."""
  n_pairs, n_eps = len(x), int(eps_grid.shape[0])
  devices = list(mesh.devices.flat) if mesh is not None else [jax.local_devices()[0]]
  n_dev = len(devices)
  if chunk_size is not None:
    chunk = min(chunk_size, n_pairs)
  else:
    budget = _per_device_budget(memory_budget_bytes or _default_budget(devices), devices)
    per_pair = n_eps * _HOST_LOOP_BYTES_PER_INPUT * int(np.prod(x.shape[1:])) * 4
    chunk = _share_of_pairs(max(1, min(n_pairs, budget * n_dev // per_pair)), n_pairs, 1)
  while (chunk * n_eps) % n_dev:  # problems split evenly over the devices
    chunk += 1
  chunk = _agreed_chunk(chunk, n_dev)
  if mesh is not None:
    rep, by_problem = NamedSharding(mesh, P()), NamedSharding(mesh, P(PAIRS_AXIS))
  else:
    rep = by_problem = devices[0]
  params = jax.device_put(params, rep)
  eps_host = np.asarray(eps_grid, np.float32)

  def solve(idx):
    xs = np.concatenate([x[idx]] * n_eps)  # [E * B, ...], eps-major
    ts = np.tile(target[idx], n_eps)
    es = np.repeat(eps_host, len(idx))
    put = lambda a: jax.device_put(a, by_problem)
    res = batched(logits_fn, params, put(xs), put(ts), eps=put(es), **knobs)
    return jax.tree.map(lambda a: a.reshape(n_eps, len(idx), *a.shape[1:]), res)

  desc = desc or f"{getattr(batched, '__name__', 'attack')} x {n_eps} eps"
  return _run_chunks(
    solve, lambda idx: (idx,), n_pairs, chunk, desc=desc, progress=progress, start=start
  )


def _share_of_pairs(chunk: int, n_pairs: int, n_dev: int) -> int:
  """A chunk size chosen by memory, cut to one process's share of the pairs in a multi-process
  run, so that every process gets chunks to run."""
  share = _round_up(-(-n_pairs // jax.process_count()), n_dev)
  return min(chunk, share)


def _agreed_chunk(chunk: int, n_dev: int) -> int:
  """The chunk size every process of the run uses: the smallest one chosen, rounded up to a
  multiple of every process's device count (hosts may differ); `chunk` in a single process."""
  if jax.process_count() == 1:
    return chunk
  sizes = np.asarray(processes.allgather((chunk, n_dev)))
  return _round_up(int(sizes[:, 0].min()), math.lcm(*(int(d) for d in sizes[:, 1])))


def _run_chunks(executable, args_for, n_pairs, chunk, *, desc, progress, start=0):
  """Yields (slice, host result) per chunk from pair `start` on, each chunk before the next
  is dispatched: the caller's measures and its save of a chunk run while nothing else is
  queued. (Dispatching the next chunk first kept the device busy between chunks, but the
  measures of a chunk then queued behind the whole next chunk, so a finished chunk was saved
  only a chunk's time later, and a run stopped in between lost it: ABS's HopSkipJump on the
  faces, ~17 minutes a chunk.)

  In a multi-process run, chunk k runs on process k mod n and each round of n chunks is
  gathered on every process; a process with no chunk left in the last round runs the last
  chunk again (its copy is dropped), so that every process takes part in every gather."""
  bar = progress_lib.bar(
    n_pairs,
    desc=desc,
    unit="pair",
    disable=not progress or jax.process_index() != 0,
    initial=start,
  )
  starts = list(range(start, n_pairs, chunk))
  n_proc, me = jax.process_count(), jax.process_index()
  rounds = [starts[r : r + n_proc] for r in range(0, len(starts), n_proc)]

  def fetch(pending):
    mine, out = pending
    host = jax.tree.map(np.asarray, jax.device_get(out))
    results = processes.allgather(host)  # every process's chunk of this round, in order
    for start, res in zip(mine, results, strict=False):
      stop = min(start + chunk, n_pairs)
      bar.update(stop - start)
      yield slice(start, stop), jax.tree.map(lambda a, v=stop - start: a[:, :v], res)

  try:
    for mine in rounds:
      start = mine[min(me, len(mine) - 1)]
      stop = min(start + chunk, n_pairs)
      yield from fetch((mine, executable(*args_for(_padded_indices(start, stop, chunk)))))
  finally:
    bar.close()


# Pairs per call of the per-pair measures: one fixed shape whatever the attack's chunk size, so
# XLA runs the same program and the measures are bit-identical across chunk sizes.
MEASURE_BLOCK = 32


@functools.lru_cache(maxsize=32)
def _over_eps(measure: Callable) -> Callable:
  """measure(mparams, *inputs, result) for one pair and one eps, mapped over the eps axis of
  the pair's result [E, ...]; cached so each measure has one identity (one compilation)."""

  def one_pair(mparams, *args):
    *inputs, result = args
    return jax.vmap(lambda r: measure(mparams, *inputs, r))(result)

  one_pair.__name__ = f"over_eps_{getattr(measure, '__name__', type(measure).__name__)}"
  return one_pair


def iter_measured_chunks(
  attack: Attack, logits_fn: LogitsFn, params: Params, x: Array, target: Array, eps_grid, *,
  measure: Callable, measure_params: Any = None, measure_inputs: tuple | None = None, **kwargs,
) -> Iterator[tuple[slice, AttackResult, Any]]:  # fmt: skip
  """`iter_attack_chunks` with the per-pair measures of each chunk computed as it comes.

  Args:
    attack, logits_fn, params, x, target, eps_grid, **kwargs: as in `iter_attack_chunks`.
    measure: `(measure_params, *inputs_of_one_pair, result_of_one_pair_at_one_eps) -> pytree`,
      e.g. `metrics.pair_measures` bound to the eval settings; hashable (build it once).
    measure_params: passed unmapped to `measure` (e.g. a VAE's parameters), or None.
    measure_inputs: per-pair arrays [P, ...] given to `measure` (default: (x,)).

  Yields:
    (pairs slice into x, AttackResult [E, B, ...], measures [E, B, ...]) as host numpy arrays;
    the measures run in blocks of MEASURE_BLOCK pairs (`batched_map`).
  """
  inputs = (x,) if measure_inputs is None else tuple(measure_inputs)
  per_pair = _over_eps(measure)
  for sl, res in iter_attack_chunks(attack, logits_fn, params, x, target, eps_grid, **kwargs):
    by_pair = jax.tree.map(lambda a: np.swapaxes(a, 0, 1), res)  # [B, E, ...]
    m = batched_map(
      per_pair,
      measure_params,
      *(a[sl] for a in inputs),
      by_pair,
      batch_size=MEASURE_BLOCK,
      exact=True,
    )
    yield sl, res, jax.tree.map(lambda a: np.swapaxes(a, 0, 1), m)


def run_attack(
  attack: Attack, logits_fn: LogitsFn, params: Params, x: Array, target: Array, eps_grid, **kwargs
) -> AttackResult:
  """Runs `attack` on every pair at every eps; the arguments and keywords (chunk_size,
  memory_budget_bytes, mesh, progress, batched, the attack's knobs) are those of
  `iter_attack_chunks`.

  Returns:
    AttackResult of host numpy arrays with leading axes [E, P] (eps, pair): e.g. `x_adv` is
    [E, P, H, W, C] and `success` bool[E, P].
  """
  chunks = iter_attack_chunks(attack, logits_fn, params, x, target, eps_grid, **kwargs)
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=1), *[r for _, r in chunks])


def summarise(result: AttackResult, *, eps_grid: Sequence[float] | Array) -> list[dict]:
  """One row of statistics per eps of a [E, P] result.

  Means of distortion and target probability are over ALL pairs, successful or not (the
  distortion of a failed attack is that of its final iterate); `mean_l2_success` is over the
  successful pairs only (NaN when none succeeded).

  Args:
    result: AttackResult with leading axes [E, P], e.g. from `run_attack`.
    eps_grid: the E epsilons of the sweep.

  Returns:
    A list of E dicts with keys eps, n_pairs, success_rate, mean_target_prob, mean_l0, mean_l1,
    mean_l2, mean_linf, mean_l2_success (Python floats/ints).
  """
  eps_grid = np.asarray(eps_grid, np.float64).reshape(-1)
  success = np.asarray(result.success, bool)
  if success.ndim != 2 or success.shape[0] != len(eps_grid):
    raise ValueError(f"result.success has shape {success.shape}; expected [E={len(eps_grid)}, P]")
  d = result.distortion
  rows = []
  for e, eps in enumerate(eps_grid):
    ok = success[e]
    l2 = np.asarray(d.l2[e], np.float64)
    rows.append(
      dict(
        eps=float(eps),
        n_pairs=int(ok.size),
        success_rate=float(ok.mean()),
        mean_target_prob=float(np.mean(result.target_prob[e])),
        mean_l0=float(np.mean(d.l0[e])),
        mean_l1=float(np.mean(d.l1[e])),
        mean_l2=float(np.mean(l2)),
        mean_linf=float(np.mean(d.linf[e])),
        mean_l2_success=float(l2[ok].mean()) if ok.any() else math.nan,
      )
    )
  return rows
