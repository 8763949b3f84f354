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
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable

import numpy as np

log = logging.getLogger(__name__)


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


def _poolable(array: object) -> bool:
    return (
        type(array) is np.ndarray
        and array.flags.c_contiguous
        and array.flags.writeable
        and array.flags.aligned
        and array.size > 0
        and (array.flags.owndata or _whole_view(array))
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
        Arrays that do not own their data are ignored.
        """
        buckets: dict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = {}
        seen: set[int] = set()
        kept = 0
        for array in arrays:
            if not _poolable(array) or id(array) in seen:
                continue
            seen.add(id(array))
            buckets.setdefault((tuple(array.shape), array.dtype), []).append(array)
            kept += 1
        with self._lock:
            self._buckets = buckets
        return kept

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A writable C-contiguous array of ``shape`` and ``dtype`` with undefined contents.

        A pooled array nothing else refers to when one fits, else a fresh one.
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
        return np.empty(key[0], key[1])

    def clear(self) -> None:
        """Drop everything pooled."""
        with self._lock:
            self._buckets = {}
