"""Keeps freed memory in the process, so XLA's per-call buffers do not page-fault on CPU.

XLA on CPU allocates each executable's temporaries with malloc on every call. glibc serves
large requests with fresh mmap'd pages and returns them on free, so every call touches new
pages: on the VMs of docs/performance.md a first touch costs ~1 ms per MiB, which was ~60% of
the LFW CNN's input gradient and of a host-loop L-BFGS step. With one arena, no mmap and no
trimming, freed blocks are reused by the next call. The process keeps its peak heap (the
attack sweeps' chunks are sized by `attacks.memory_budget_mb`).
"""

import ctypes
import ctypes.util
import sys

# glibc <malloc.h> parameters of mallopt(3).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def keep_freed_memory() -> bool:
  """Tunes glibc's malloc for reuse; call before jax starts its threads. True if applied.

  A no-op (False) off Linux/glibc. The process-wide equivalent of MALLOC_ARENA_MAX=1
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> MALLOC_TOP_PAD_=256MiB.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1),
              (_M_TOP_PAD, 256 << 20))  # fmt: skip
  return all(mallopt(param, value) == 1 for param, value in settings)
