"""A run of several processes (`jax.distributed`): joining, who writes, and losing a process.

`--config.distributed=True` makes `experiments.main` call `initialize(config)` before anything
touches a device. The coordinator address, the number of processes and this process's id come
from `config.cluster` where set, else from the environment JAX detects (SLURM, Open MPI, Cloud
TPU, `JAX_COORDINATOR_ADDRESS`). On CPUs the processes talk through gloo over TCP
(`jax_cpu_collectives_implementation`), so a run of several processes works on one machine.

How a run is shared out (experiments/run.py, attacks.py, defenses.py, models.py):
- process 0 is the only writer. It takes the workdir's lock, checks and records config.json and
  the data's identity, writes the checkpoints, the results log, the per-pair records, the pairs,
  the examples, the report and the figures; `store`'s writers do nothing on the other
  processes (`writes()`), which never create, lock or write anything in the workdir.
- what process 0 read from the workdir and decided (the rows already done, the shared pairs, a
  refusal) reaches the others through `from_writer`, so that every process runs the same
  sweeps in the same order, whatever the others can see of the workdir.
- training is replicated: every process trains the same model from the same seed (process 0
  alone with checkpoints), and process 0's parameters are then broadcast (`same_as_writer`), so
  that every process attacks the same weights bit for bit.
- attack sweeps: the runner deals whole chunks of pairs out to the processes and gathers their
  results back in order on every process (vae_attacks/attacks/runner.py).

A lost process (killed, crashed, its host gone) closes its TCP connections: the others fail at
their next collective (a chunk's gather, a broadcast) and `main` reports that as one line
(`lost_process`) and exits without JAX's shutdown barrier, which would abort with a stack trace.
JAX's heartbeat (`cluster.heartbeat_timeout_s`) ends a process that waits longer than that in
local work. Each row of the log is one `write` call, so no kill leaves half a row. When process
0 dies, JAX itself ends the others at once (its coordination service lived there), with its
own message and an abort: jaxlib's client takes a callback for that case, but
`jax.distributed.initialize` does not pass one through, and a Python callable given to the
client directly fails with std::bad_cast (jaxlib 0.10.2).
"""

from collections.abc import Callable
from typing import Any, TypeVar

from experiments.errors import UserError

T = TypeVar("T")

# This process's place in the run: set once by `initialize`, read by the writers of `store`.
_PROCESS = {"index": 0, "count": 1}


def process_index() -> int:
  """This process's index in the run (0 outside a multi-process run); touches no device."""
  return _PROCESS["index"]


def process_count() -> int:
  """The number of processes of the run (1 outside a multi-process run)."""
  return _PROCESS["count"]


def writes() -> bool:
  """True on the one process that writes in the workdir (process 0)."""
  return _PROCESS["index"] == 0


def settings_of(config):
  """The config section holding `distributed` and `cluster`: the config itself, else the first
  part of a study config that sets distributed=True; None when nothing asks for it."""
  parts = [config] + [config[p] for p in config.get("runs", ()) if p in config]
  return next((p for p in parts if p.get("distributed", False) is True), None)


def _check(cluster) -> dict:
  """config.cluster as initialize()'s keyword arguments (unset fields left out), or UserError."""
  address = cluster.get("coordinator_address")
  n = cluster.get("num_processes")
  pid = cluster.get("process_id")
  heartbeat = cluster.get("heartbeat_timeout_s", 100)
  env = "unset (None) for the environment's: JAX_COORDINATOR_ADDRESS, SLURM, Open MPI"
  if address is not None and (not isinstance(address, str) or ":" not in address):
    raise UserError(f"cluster.coordinator_address={address!r}; allowed: 'host:port', or {env}")
  if n is not None and n < 1:
    raise UserError(f"cluster.num_processes={n!r}; allowed: an int >= 1, or {env}")
  if pid is not None and not 0 <= pid < (n or pid + 1):
    raise UserError(f"cluster.process_id={pid!r}; allowed: 0 .. num_processes - 1, or {env}")
  if heartbeat < 1:
    raise UserError(f"cluster.heartbeat_timeout_s={heartbeat!r}; allowed: an int >= 1 (seconds)")
  given = dict(coordinator_address=address, num_processes=n, process_id=pid)
  kwargs = {k: v for k, v in given.items() if v is not None}
  return dict(kwargs, heartbeat_timeout_seconds=heartbeat)


def initialize(config) -> None:
  """`jax.distributed.initialize` with `config.cluster` (where set) over the environment's
  settings; before anything touches a device. A failure is one line (UserError)."""
  import jax  # noqa: PLC0415

  kwargs = _check(config.get("cluster", {}))
  # Collectives between CPU processes (a chunk's gather, a broadcast) go through gloo over TCP;
  # JAX's default already, set so that a JAX that changes it still runs here.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError, TypeError) as e:
    raise UserError(
      f"distributed=True but jax.distributed.initialize() failed ({e}); set "
      "--config.cluster.coordinator_address, .num_processes and .process_id, or run under a "
      "cluster manager JAX detects (SLURM, Open MPI, Cloud TPU, ...), or set "
      "--config.distributed=False"
    ) from None
  _PROCESS.update(index=jax.process_index(), count=jax.process_count())


def from_writer(fn: Callable[[], T]) -> T:
  """`fn()` run on process 0 only, its value (pickled) given to every process.

  A UserError of `fn` (a busy workdir, another config's workdir, a full disk) is raised on every
  process with the same message, so that the others stop too instead of waiting for process 0
  at the next collective. Outside a multi-process run: `fn()`.
  """
  if process_count() == 1:
    return fn()
  outcome: tuple[str, Any] = ("ok", None)
  error = None
  if writes():
    try:
      outcome = ("ok", fn())
    except UserError as e:
      error, outcome = e, ("error", str(e))
  from vae_attacks import processes  # noqa: PLC0415  (imports jax)

  kind, value = processes.broadcast(outcome)
  if error is not None:
    raise error
  if kind == "error":
    raise UserError(value)
  return value


def same_as_writer(tree: T) -> T:
  """Process 0's values of a pytree of arrays (the others pass theirs: the same structure and
  shapes), as host numpy arrays on every process; `tree` itself outside a multi-process run."""
  if process_count() == 1:
    return tree
  from vae_attacks import processes  # noqa: PLC0415  (imports jax)

  return processes.broadcast(tree)


# What a collective or the coordination service says when a peer process is gone.
_LOST = (
  "Connection closed by peer",
  "Connection reset by peer",
  "Gloo",
  "heartbeat",
  "coordination service",
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "Broken pipe",
)


def is_lost_process(e: BaseException) -> bool:
  """True if `e`, in a multi-process run, says that another process of the run is gone."""
  if process_count() == 1 or isinstance(e, UserError):
    return False
  text = str(e)
  return any(s in text for s in _LOST)


def lost_process(e: BaseException, workdir: str) -> str:
  """The one line for a lost process: which process saw it, the first line of what JAX said,
  what is kept and how to resume."""
  first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
  kept = f"every finished row is kept in {workdir}" if writes() else "process 0 keeps the rows"
  return (
    f"process {process_index()} of {process_count()}: another process of this run stopped "
    f"(killed, crashed, or its host lost): {first}; {kept}; rerun all {process_count()} "
    "processes with the same command to resume"
  )
