"""Recycling of a superseded global model's arrays as the next round's accumulators.

Why: every round the aggregator needs S bytes of accumulators, and the global
model of two rounds ago (S bytes of the same shapes) has just become garbage.
Tensors of 64 MiB are far above glibc's mmap threshold, so freeing one unmaps
it and the next ``np.empty`` maps fresh pages that the kernel must fault in and
zero: measured on the round benchmark (S = 1 GiB), page zeroing alone was a
third of the server's CPU per round. Copying the first contribution into a
recycled array writes to pages that are already resident.

Safety: a retired array is handed out again only when nothing but the pool
refers to it. Every Python-level holder of its memory — the workflow's model
dict, a checkpoint write still in flight, a transfer service's memoryview, a
numpy view (``.base``), a torch tensor from ``torch.from_numpy`` — holds a
reference to the array object, so its reference count says whether anyone
else can still read or write it (a weak reference is not counted: a holder
must keep a strong one, as all of fedkube does). Only arrays that own their data are
accepted, or views covering the whole of an array that does (what ``np.load``
returns for an ``.npz``), whose base's count is checked too; a partial view's
memory may be shared with arrays the pool cannot see.
An array still referenced when a same-shape array is asked for is dropped
from the pool instead (its other holders free it when done), so the pool never
keeps a second copy of memory alive: at most the one superseded model, which
the round that follows turns into its accumulators.

Alignment: what ``take`` allocates is page-aligned (for tensors of at least a
page), so the checkpoint can write it with ``O_DIRECT`` straight from this
memory (``fedkube.server.checkpoint``). ``np.empty`` alone puts a large array
16 bytes past a page (glibc's mmap chunk header), so ``take`` over-allocates a
flat byte array by one page and returns the aligned view of it
(:func:`aligned_empty`). Such a view is pooled like an array that owns its
data: numpy points every view of it (a reshape, ``as_bytes``'s byte view, a
slice) at the flat base, never at the view, so the base's reference count
shows every holder; the view's own count shows holders of the view.
A retired array of at least ``ALIGNED_MIN`` bytes that is not page-aligned
is not kept: recycled, it would become round 2's accumulator, round 4's, and
so on, and every other round's checkpoint would go through the page cache.
The workflow copies a model it loads or receives at start-up into aligned
memory (:func:`realigned`), so no round needs fresh accumulators after the
first.
"""

from __future__ import annotations

import logging
import math
import mmap
import sys
import threading
from collections.abc import Iterable

import numpy as np

log = logging.getLogger(__name__)

ALIGN = max(mmap.PAGESIZE, 4096)
"""Address alignment of the arrays ``take`` allocates (O_DIRECT wants 4096 on every common filesystem)."""
ALIGNED_MIN = 1 << 20
"""Retired arrays this large are pooled only when page-aligned; below it a buffered checkpoint write is cheap."""


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an ``ALIGN`` boundary (when it has any bytes).

    At most ``ALIGN`` bytes more than the array are allocated; its ``base`` is the flat uint8
    array that owns the memory.
    """
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes < ALIGN:
        return np.empty(shape, dt)
    raw = np.empty(nbytes + ALIGN, np.uint8)
    offset = -raw.ctypes.data % ALIGN
    return raw[offset : offset + nbytes].view(dt).reshape(shape)


def realigned(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model`` with every large tensor that is not page-aligned copied into aligned memory, in place.

    A model loaded from a file (``np.load``, a checkpoint read back) or
    downloaded from a client sits at arbitrary addresses; once it is the
    global model it is what the next round recycles as its accumulators, and
    what the round after checkpoints. Copied here, at start-up, it can be both
    (round 2 needs no fresh memory, and its checkpoint takes ``O_DIRECT``).
    One tensor at a time: the extra memory is one tensor, never a model.
    """
    for name, array in model.items():
        if array.nbytes >= ALIGNED_MIN and array.ctypes.data % ALIGN:
            copy = aligned_empty(array.shape, array.dtype)
            np.copyto(copy, array)
            model[name] = copy
            del array  # the original goes as soon as nothing else holds it
    return model


def _refcount_at(bucket: list[np.ndarray], index: int) -> int:
    # Measured through the same path for the probe and for every candidate, so the baseline
    # (the list's slot + this local + getrefcount's argument) needs no hard-coded number.
    arr = bucket[index]
    return sys.getrefcount(arr)


def _base_refcount_at(bucket: list[np.ndarray], index: int) -> int:
    arr = bucket[index]
    base = arr.base
    return sys.getrefcount(base)


def _whole_view(array: np.ndarray) -> bool:
    # npz loading returns a reshaped view of a flat array that owns the data: the same memory,
    # recyclable when neither the view nor its base has another holder.
    base = array.base
    return (
        type(base) is np.ndarray
        and base.base is None
        and base.flags.owndata
        and base.nbytes == array.nbytes
        and base.ctypes.data == array.ctypes.data
    )


def _aligned_view(array: np.ndarray) -> bool:
    # What aligned_empty returns: a view inside a flat byte array that owns the memory and is at
    # most ALIGN bytes larger. Any other view of that memory refers to the base, whose count is checked.
    base = array.base
    return (
        type(base) is np.ndarray
        and base.base is None
        and base.flags.owndata
        and base.dtype == np.uint8
        and base.ndim == 1
        and base.nbytes - array.nbytes <= ALIGN
        and base.ctypes.data <= array.ctypes.data
        and array.ctypes.data + array.nbytes <= base.ctypes.data + base.nbytes
    )


def _poolable(array: object) -> bool:
    return (
        type(array) is np.ndarray
        and array.flags.c_contiguous
        and array.flags.writeable
        and array.flags.aligned
        and array.size > 0
        and (array.flags.owndata or _whole_view(array) or _aligned_view(array))
    )


class ArrayPool:
    """Arrays of a retired model, handed out again by (shape, dtype) once nothing else refers to them.

    Thread-safe: ``take`` is called from several download threads at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = {}
        probe = [np.empty(1), np.empty(2).reshape(1, 2)]
        self._free_refs = _refcount_at(probe, 0)
        self._free_base_refs = _base_refcount_at(probe, 1)
        self.reused = 0
        """Arrays handed out from the pool (no fresh allocation)."""
        self.allocated = 0
        """Arrays ``take`` had to allocate because no free pooled one fit."""
        self.busy = 0
        """Pooled arrays dropped because something still referred to them when asked for."""

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds now."""
        with self._lock:
            return sum(a.nbytes for bucket in self._buckets.values() for a in bucket)

    def retire(self, arrays: Iterable[np.ndarray]) -> int:
        """Replace the pool's contents with ``arrays`` (a superseded model); returns how many it kept.

        Whatever the pool still held from an earlier retire is dropped: it was
        not needed for a whole round, so keeping it would only hold memory.
        Arrays that do not own their data are ignored, and so are large ones
        that are not page-aligned (see the module docstring).
        """
        buckets: dict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = {}
        seen: set[int] = set()
        kept = 0
        for array in arrays:
            if not _poolable(array) or id(array) in seen:
                continue
            if array.nbytes >= ALIGNED_MIN and array.ctypes.data % ALIGN:
                continue
            seen.add(id(array))
            buckets.setdefault((tuple(array.shape), array.dtype), []).append(array)
            kept += 1
        with self._lock:
            self._buckets = buckets
        return kept

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A writable C-contiguous array of ``shape`` and ``dtype`` with undefined contents.

        A pooled array nothing else refers to when one fits, else a fresh page-aligned one
        (:func:`aligned_empty`).
        """
        key = (tuple(int(d) for d in shape), np.dtype(dtype))
        with self._lock:
            bucket = self._buckets.get(key)
            while bucket:
                # A holder is a reference beyond the pool's own; such an array is dropped, never reused.
                if _refcount_at(bucket, -1) <= self._free_refs and (
                    bucket[-1].base is None or _base_refcount_at(bucket, -1) <= self._free_base_refs
                ):
                    self.reused += 1
                    return bucket.pop()
                bucket.pop()
                self.busy += 1
            self.allocated += 1
        return aligned_empty(key[0], key[1])

    def clear(self) -> None:
        """Drop everything pooled."""
        with self._lock:
            self._buckets = {}
