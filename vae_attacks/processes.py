"""Python values shared between the processes of a multi-process JAX run (`jax.distributed`).

`allgather(value)` gives every process the list of every process's value, in process order;
`broadcast(value)` gives every process process 0's. Values are pickled (host numpy arrays,
dicts, tuples, pytrees of them) and exchanged as one byte buffer through one collective over a
mesh of ONE device per process (the first local device of each), waiting for its result
before the next. Why not `multihost_utils.process_allgather`: it runs one collective per leaf
over every device, returning when the first local device's part is done; with 2 processes of 2
CPU host devices each, a run here hung in it for good (both processes idle, each inside a
collective: consecutive collectives whose per-device parts, we believe, met the gloo rendezvous
in different orders; jax 0.10.2). Every process must make the same calls in the same order.
Outside a multi-process run both return at once.
"""

import functools
import pickle
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_AXIS = "processes"


@functools.lru_cache(maxsize=1)
def _mesh() -> Mesh:
  """A 1-D mesh of the first device of each process, in process order."""
  first = {}
  for d in sorted(jax.devices(), key=lambda d: d.id):
    first.setdefault(d.process_index, d)
  return Mesh(np.array([first[p] for p in sorted(first)]), (_AXIS,))


@functools.lru_cache(maxsize=1)
def _replicate():
  mesh = _mesh()
  return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))


def _gather_rows(row: np.ndarray) -> np.ndarray:
  """[processes, len(row)]: every process's 1-D `row` (of one length everywhere)."""
  mesh = _mesh()
  mine = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  local = jax.device_put(row[None], mine)
  sharding = NamedSharding(mesh, P(_AXIS))
  global_rows = jax.make_array_from_single_device_arrays(
    (mesh.devices.size, row.size), sharding, [local]
  )
  out = _replicate()(global_rows)
  return np.asarray(jax.block_until_ready(out).addressable_data(0))


def allgather(value: Any) -> list:
  """Every process's `value`, in process order (`[value]` in a single process)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(pickle.dumps(jax.device_get(value)), np.uint8)
  sizes = _gather_rows(np.asarray([data.size], np.int64))[:, 0]
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: data.size] = data
  rows = _gather_rows(padded)
  return [pickle.loads(rows[p, : int(n)].tobytes()) for p, n in enumerate(sizes)]


def broadcast(value: Any) -> Any:
  """Process 0's `value` on every process (the others' `value` is not sent)."""
  if jax.process_count() == 1:
    return value
  return allgather(value if jax.process_index() == 0 else None)[0]
