"""The sink of the init task (``spec.model.source: firstClient``): one client's tensors become the initial model.

Memory: the first client's upload is the only copy of the initial model the
server needs. The download receives each tensor straight into a page-aligned
array that :meth:`InitCollector.target` hands out, and the collector keeps
that array (not the byte view the transfer returns over it), so the model is
what the global model of any round is: aligned, so ``pool.realigned`` has
nothing to copy before round 1 (no second S, no seconds of copying), and
poolable, so round 2 recycles it as accumulators. :meth:`finish` hands the
model over and keeps nothing: whatever still refers to the finished init
round (its collector included) cannot keep the model alive once the
workflow has replaced it.

A peer's announcement sizes the target (bounded first by ``spec.model.maxBytes``),
but what it costs is what arrives: the array is reserved, never zeroed or
touched ahead of the data, so the kernel commits its pages only as received
bytes are written into them. A client that announces 1 GiB and sends 1 MiB
costs the server ~1 MiB of memory until its upload times out
(``tests/integration/server/test_init_bound.py``). Keep it so: filling the
target (``np.zeros`` + a write, ``fill``) would make the announcement the cost.
"""

from __future__ import annotations

import threading

import numpy as np

from fedkube.server.aggregate import DiscardOutcome, InvalidResultError
from fedkube.server.model import numpy_dtype
from fedkube.server.pool import aligned_empty


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return a.ctypes.data == b.ctypes.data and a.dtype == b.dtype and a.shape == b.shape


class InitCollector:
    """Collects the init task's tensors; thread-safe (downloads call ``target`` and ``add`` from their threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: dict[str, np.ndarray] = {}
        self._targets: dict[str, np.ndarray] = {}

    def target(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """A page-aligned array to receive tensor ``name`` into; :meth:`add` keeps it as the model's tensor."""
        array = aligned_empty(tuple(shape), numpy_dtype(dtype))
        with self._lock:
            self._targets[name] = array
        return array

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        """Take ``array`` as tensor ``name``; the target it was received into is kept in its place."""
        with self._lock:
            if name in self._model:
                raise InvalidResultError(client, f"tensor {name!r} was sent twice")
            target = self._targets.pop(name, None)
            # The target is the same memory as ``array``, held the way the pool recognises (its base owns it).
            self._model[name] = target if target is not None and _same_memory(target, array) else array
        return True

    def commit(self, client: str) -> None:
        """Nothing to fold: the collected tensors are the model."""

    def discard(self, client: str) -> DiscardOutcome:
        with self._lock:
            self._model = {}
            self._targets = {}
        return DiscardOutcome(client, ())

    def finish(self) -> dict[str, np.ndarray]:
        """The collected model, handed over: the collector keeps no reference to it."""
        with self._lock:
            model, self._model = self._model, {}
            self._targets = {}
        return model
