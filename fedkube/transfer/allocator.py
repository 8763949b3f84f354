"""Opt-in glibc allocator tuning for processes that move large tensors.

Measured (bench/README.md): with glibc's defaults, the 1 MiB message buffers
that gRPC and Python allocate per chunk are served by ``mmap``/``munmap`` or
trimmed back to the kernel after each use, so every chunk pays fresh page
faults and page zeroing; that alone costs about a third of a receiver's CPU.
Raising the mmap threshold (buffers up to 64 MiB come from the heap) and the
trim threshold (up to 256 MiB of free heap is kept for reuse) removes it.

The trade-off is memory: up to ``trim_threshold`` bytes of freed heap may stay
resident, and tensors smaller than ``mmap_threshold`` no longer return to the
kernel individually when freed. Hence opt-in: process entry points (server,
sidecar, trainer) call :func:`tune_allocator` at startup, or a pod sets
:data:`ALLOCATOR_ENV` in its environment (same effect, read by glibc at exec).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20

# The environment-variable form, for pod specs (glibc reads these at process start).
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator(
    mmap_threshold: int = MMAP_THRESHOLD,
    trim_threshold: int | None = TRIM_THRESHOLD,
    *,
    arena_max: int | None = None,
) -> bool:
    """Set glibc's allocator thresholds for this process; False where not glibc (nothing changed).

    ``None`` leaves a setting at glibc's default. Setting the mmap threshold
    at all also stops glibc from raising it after the first large free.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("allocator tuning unavailable: %s has no mallopt", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    wanted = [(_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_ARENA_MAX, arena_max)]
    ok = all(bool(mallopt(param, value)) for param, value in wanted if value is not None)
    log.info("allocator tuned: mmap threshold %s, trim threshold %s, arena max %s (%s)", mmap_threshold,
             trim_threshold, arena_max, ok)
    return ok


def release_free_memory() -> bool:
    """Return glibc's free heap memory to the kernel (``malloc_trim(0)``); False where not glibc.

    Measured (bench/README.md, round benchmark): freed 1 MiB chunk buffers stay
    in glibc's per-thread arenas, so a process's RSS between rounds drifts by
    up to a quarter of the model. One trim after a round's buffers are dropped
    keeps it flat at a cost of milliseconds, far cheaper than mmapping every
    chunk. The return value says whether the call was made, not whether any
    memory was released.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        log.debug("malloc_trim unavailable: %s is not glibc", name)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
