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


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where not glibc (nothing changed)."""
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
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    log.info("allocator tuned: mmap threshold %d, trim threshold %d (%s)", mmap_threshold, trim_threshold, ok)
    return ok
