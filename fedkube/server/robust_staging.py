"""Where the robust strategies keep a round's results: one file per result attempt, read back in column blocks.

:class:`RobustAggregator` is the RoundAggregator of ``fedkube.server.robust``'s
strategies: it stages each tensor on disk as it arrives (positional writes)
and, at ``finish``, hands a :class:`StagedResults` to the strategy's rule,
which reads the same element range of a tensor from every result into an
``N x block`` buffer. The memory and disk cost are in ``fedkube.server.robust``.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedkube.server.aggregate import (
    AggregationError,
    DiscardOutcome,
    InvalidResultError,
    accumulator_dtype,
    all_finite,
    check_tensor,
)
from fedkube.server.jobs import JobFailed
from fedkube.server.model import Model, ModelSpec, TensorSpec

STAGING_DIR = ".robust-staging"
"""Sub-directory of the server's checkpoint directory where robust strategies stage a round's results."""
BLOCK_BYTES = 32 << 20
"""Budget of one ``N x block`` read buffer in the accumulator dtype (the working set of ``finish``)."""
_ALIGN = 64


TOO_FEW_RESULTS = "TooFewResults"


class TooFewResultsError(JobFailed):
    """A round ended with fewer results than the robust strategy needs; the job fails with reason TooFewResults.

    Not a ConfigError: the spec may be fine (enough clients listed) and the round short of results because sites
    failed; either way no aggregate of too few results is made.
    """

    def __init__(self, message: str) -> None:
        super().__init__(TOO_FEW_RESULTS, message)


def lower_median(sorted_block: np.ndarray) -> np.ndarray:
    """Row ``(n-1)//2`` of values sorted along axis 0: a value some result holds (integer and bool tensors)."""
    return sorted_block[(sorted_block.shape[0] - 1) // 2]


class Rule(Protocol):
    """One robust rule (``fedkube.server.robust``): how many results it needs and how it combines them."""

    name: str

    def too_few(self, n: int) -> str:
        """Why ``n`` results are not enough ("" when they are)."""
        ...

    def combine(self, stack: StagedResults) -> Model:
        """The new global model from the committed results."""
        ...

    def meta(self) -> dict[str, Any]:
        """The rule's parameters by their spec names."""
        ...


@dataclass
class _Slot:
    """One result attempt's file: tensors written to it, and those an earlier attempt left (``reopen``)."""

    path: Path
    weight: float | None = None
    staged: set[str] = field(default_factory=set)
    writing: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    view = out.view(np.uint8).data
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise AggregationError(f"staged result file ended early at byte {offset}; the staging disk lost data")
        view, offset = view[got:], offset + got


class StagedResults:
    """The committed results' files, read per tensor in ``N x block`` column blocks."""

    def __init__(self, spec: ModelSpec, offsets: Mapping[str, int], keys: Sequence[str], paths: Sequence[Path],
                 block_bytes: int) -> None:  # fmt: skip
        self.spec, self.offsets, self.keys, self.paths = spec, offsets, tuple(keys), tuple(paths)
        self.block_bytes = block_bytes

    @property
    def n(self) -> int:
        return len(self.keys)

    def subset(self, rows: Sequence[int]) -> StagedResults:
        return StagedResults(self.spec, self.offsets, [self.keys[i] for i in rows], [self.paths[i] for i in rows],
                      self.block_bytes)  # fmt: skip

    def _blocks(self, t: TensorSpec) -> tuple[int, Callable[[list[int], int, int, np.ndarray], np.ndarray]]:
        per = max(1, self.block_bytes // max(1, self.n * accumulator_dtype(t).itemsize))
        dt = t.np_dtype

        def read(fds: list[int], start: int, stop: int, raw: np.ndarray) -> np.ndarray:
            block = raw[:, : stop - start]
            for row, fd in enumerate(fds):
                _pread_into(fd, block[row], self.offsets[t.name] + start * dt.itemsize)
            return block

        return per, read

    def _open(self) -> list[int]:
        return [os.open(p, os.O_RDONLY) for p in self.paths]

    def coordinatewise(self, combine_float: Callable[[np.ndarray], np.ndarray]) -> Model:
        """Each tensor of the new model, block by block: ``combine_float`` on float blocks, lower median on others."""
        out: Model = {}
        fds = self._open()
        try:
            for t in self.spec:
                result = np.empty(t.shape, t.np_dtype)
                flat = result.reshape(-1)
                per, read = self._blocks(t)
                raw = np.empty((self.n, min(per, max(1, flat.size))), t.np_dtype)
                wide = np.empty(raw.shape, accumulator_dtype(t)) if t.is_float else None
                for start in range(0, flat.size, per):
                    stop = min(start + per, flat.size)
                    block = read(fds, start, stop, raw)
                    if wide is None:
                        block.sort(axis=0)
                        flat[start:stop] = lower_median(block)
                        continue
                    values = wide[:, : stop - start]
                    values[...] = block
                    flat[start:stop] = combine_float(values)
                out[t.name] = result
        finally:
            for fd in fds:
                os.close(fd)
        return out

    def distances(self) -> np.ndarray:
        """Squared Euclidean distances between the results over all float tensors, in float64."""
        d = np.zeros((self.n, self.n), np.float64)
        fds = self._open()
        try:
            for t in self.spec:
                if not t.is_float:
                    continue
                per, read = self._blocks(t)
                per = max(1, per // 4)  # float64 values and one difference buffer of the same size
                raw = np.empty((self.n, min(per, max(1, t.size))), t.np_dtype)
                for start in range(0, t.size, per):
                    stop = min(start + per, t.size)
                    x = read(fds, start, stop, raw).astype(np.float64)
                    for i in range(self.n - 1):
                        diff = x[i + 1 :] - x[i]
                        row = np.einsum("ij,ij->i", diff, diff)
                        d[i, i + 1 :] += row
                        d[i + 1 :, i] += row
        finally:
            for fd in fds:
                os.close(fd)
        return d


def remove_tree(path: Path) -> None:
    """Remove a staging directory and everything in it; missing is fine."""
    shutil.rmtree(path, ignore_errors=True)


class RobustAggregator:
    """A round's RoundAggregator for the robust rules: stages each attempt's tensors on disk, combines at finish."""

    def __init__(self, spec: ModelSpec, rule: Rule, directory: Path, *, block_bytes: int = BLOCK_BYTES) -> None:
        self.spec = spec
        self.rule = rule
        self.directory = directory
        self.block_bytes = block_bytes
        directory.mkdir(parents=True, exist_ok=False)
        # Removed however the round ends: finish(), a failed round that drops the aggregator, or the process exit.
        self._cleanup = weakref.finalize(self, remove_tree, directory)
        offsets: dict[str, int] = {}
        pos = 0
        for t in spec:
            offsets[t.name] = pos
            pos += -(-t.nbytes // _ALIGN) * _ALIGN
        self.offsets = offsets
        self.file_bytes = pos
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._committed: list[str] = []
        self._discarded: set[str] = set()
        self._finished = False

    @property
    def committed(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._committed)

    def staged_bytes(self) -> int:
        """Bytes of staged results on disk now (the files' allocated size)."""
        return sum(p.stat().st_blocks * 512 for p in self.directory.iterdir() if p.is_file())

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        """Stage one tensor on disk; False (ignored) when the attempt was discarded or an earlier one kept it."""
        weight = float(weight)
        spec = check_tensor(self.spec, client, name, array, weight)
        if spec.is_float and not all_finite(array):
            raise InvalidResultError(client, f"tensor {name!r} contains NaN or Inf values; the client's training "
                                     "diverged")  # fmt: skip
        with self._lock:
            if self._finished:
                raise AggregationError(f"add({client!r}, {name!r}) after finish(); the round is over")
            if client in self._discarded:
                return False
            if client in self._committed:
                raise AggregationError(f"add({client!r}, {name!r}) after commit({client!r})")
            slot = self._slots.get(client)
            if slot is None:
                slot = self._slots[client] = _Slot(self.directory / f"{uuid.uuid4().hex}.staged")
                os.close(os.open(slot.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            if name in slot.kept:
                return False
            if slot.weight is None:
                slot.weight = weight
            elif slot.weight != weight:
                raise InvalidResultError(client, f"weight changed from {slot.weight} to {weight} within one result")
            if name in slot.staged or name in slot.writing:
                raise InvalidResultError(client, f"tensor {name!r} was added twice")
            slot.writing.add(name)
            # Opened under the lock, so a discard cannot unlink the file between the check and the open;
            # one that comes later unlinks it under our write, which then lands in a file nobody reads.
            fd = os.open(slot.path, os.O_WRONLY)
        try:
            data = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data  # 0-d too: a 1-element view
            _pwrite_all(fd, data, self.offsets[name])
        finally:
            os.close(fd)
            with self._lock:
                slot.writing.discard(name)
        with self._lock:
            if self._slots.get(client) is not slot or client in self._discarded:
                return False
            slot.staged.add(name)
        return True

    def commit(self, client: str) -> None:
        with self._lock:
            if client in self._discarded:
                raise AggregationError(f"commit({client!r}) after discard({client!r})")
            if client in self._committed:
                raise AggregationError(f"commit({client!r}) called twice")
            slot = self._slots.get(client)
            have = set() if slot is None else slot.staged | slot.kept
            missing = [n for n in self.spec.names if n not in have]
            if missing:
                raise InvalidResultError(
                    client, f"result incomplete: {len(missing)} tensor(s) never added, first {missing[0]!r}"
                )
            self._committed.append(client)

    def discard(self, client: str, *, rebuild: bool = True) -> DiscardOutcome:
        """Drop an attempt: its file is deleted (``rebuild=False``: kept for ``reopen``, the same result again)."""
        with self._lock:
            if client in self._committed:
                raise AggregationError(f"discard({client!r}) after commit({client!r}); its result is already in")
            self._discarded.add(client)
            slot = self._slots.get(client)
            if slot is None:
                return DiscardOutcome(client)
            if not rebuild:
                return DiscardOutcome(client, tuple(n for n in self.spec.names if n in slot.staged | slot.kept))
            del self._slots[client]
        slot.path.unlink(missing_ok=True)
        return DiscardOutcome(client)

    def refold(self, client: str, name: str, array: np.ndarray, *, abort: threading.Event | None = None) -> bool:
        """Never needed: a discard leaves nothing to rebuild (nothing is combined before finish)."""
        return False

    def owed(self) -> dict[str, tuple[str, ...]]:
        return {}

    def reopen(self, client: str, new_key: str | None = None) -> tuple[str, ...]:
        """Accept a new attempt of a discarded client; the tensors it already staged stay and are not added again."""
        key = client if new_key is None else new_key
        with self._lock:
            if client not in self._discarded:
                raise AggregationError(f"reopen({client!r}) of a client that was not discarded")
            if key != client and (key in self._slots or key in self._discarded or key in self._committed):
                raise AggregationError(f"reopen({client!r}, {key!r}): key {key!r} was already used this round")
            slot = self._slots.pop(client, None)
            if key == client:
                self._discarded.discard(client)
            if slot is None:
                return ()
            slot.kept |= slot.staged
            slot.staged = set()
            slot.weight = None  # the new attempt may carry a new weight
            self._slots[key] = slot
            return tuple(n for n in self.spec.names if n in slot.kept)

    def finish(self) -> Model:
        """Combine the committed results with the rule; raises TooFewResultsError when there are too few."""
        with self._lock:
            if self._finished:
                raise AggregationError("finish() called twice")
            in_flight = [k for k in self._slots if k not in self._discarded and k not in self._committed]
            if in_flight:
                raise AggregationError(f"clients {in_flight} have tensors added but were neither committed nor "
                                       "discarded")  # fmt: skip
            if not self._committed:
                raise AggregationError("no client result was committed this round; nothing to aggregate")
            self._finished = True
            keys = sorted(self._committed)
            paths = [self._slots[k].path for k in keys]
        try:
            problem = self.rule.too_few(len(keys))
            if problem:
                raise TooFewResultsError(f"the round's {len(keys)} result(s) are too few for the strategy: {problem}")
            return self.rule.combine(StagedResults(self.spec, self.offsets, keys, paths, self.block_bytes))
        finally:
            self._cleanup()
