"""Robust aggregation: coordinate-wise median, trimmed mean, Krum / multi-Krum.

FedAvg lets one site move the global model anywhere (a x1e6 update, or a
claim of 10⁶ examples). These strategies bound what a minority of sites can
do, at a price FedAvg does not pay: they need all N results of a round at
once, so they cannot fold each tensor as it arrives.

* ``median``: each coordinate of the new model is the median of the N
  results' values (``np.median``: the mean of the two middle values for even
  N). Breakdown point: fewer than N/2 arbitrary results move it at most within
  the range of the honest ones. Needs N ≥ 3 (with two results the median is
  their mean and protects against nothing).
* ``trimmedmean`` (β = ``trimFraction``): per coordinate, the ``k = ⌊β·N⌋``
  smallest and ``k`` largest values are dropped and the rest averaged (Yin et
  al. 2018). With β > 0 a round whose N trims nothing (``k = 0``) fails
  rather than silently become a plain mean.
* ``krum`` (f = ``byzantine``, m = ``krumSelect``; Blanchard et al. 2017):
  each result scores the sum of squared distances to its ``N - f - 2``
  nearest other results (over all float tensors); the m best-scored results
  are averaged (m = 1 is Krum, m > 1 multi-Krum). Needs N > 2f + 2 and
  m ≤ N - f. Ties in score go to the smaller attempt key (deterministic).

All three ignore ``num_examples``: it is self-reported and unbounded, the very
lever a poisoned site would pull; every delivered result counts once.
Integer and bool tensors cannot be averaged: they take the coordinate-wise
*lower* median (``sorted[(n-1)//2]``) of the results the strategy keeps (all N
for median and trimmed mean, the m selected for Krum), a value some client
produced, the majority for bools. (FedAvg gives them the value of the client
with the largest weight; here weights are ignored, see above.) Float tensors
are computed in float32 (float64 for float64 tensors), so float16 and
bfloat16 are widened once and cast back once, and checked for NaN/Inf
before they are staged, like FedAvg's.

Memory and disk. Each committed result is *staged on disk*, not in memory:
one file per result attempt under a directory the server owns (the
checkpoint volume's ``.robust-staging/`` when the server has one, else a
temp dir), every tensor written as it arrives with positional writes. At
``finish`` the rule runs per tensor in column blocks: it reads the same
element range of that tensor from every result (N reads of one block) into an
``N x block`` buffer, computes those coordinates of the new model and moves
on. Reads and writes go through ``pread``/``pwrite``, not ``np.memmap``: a
mapped file's pages count in the process's RSS while mapped, positional I/O
leaves them in the page cache, which the kernel reclaims (it does count
towards a pod's cgroup limit until written back, which the kernel throttles).

* server memory: global model S + new model S + ``block_bytes`` (32 MiB by
  default) x ~3 of block buffers, whatever N, plus the one tensor per
  download in flight that every strategy has; not N x S and not even N x one
  tensor.
* disk: N x S (the results in their wire dtypes) during the round, removed
  when the round finishes or fails, and when the next round begins.
* passes: median and trimmed mean read the staged results once (N x S bytes);
  Krum twice: once for the NxN distances (over float tensors only), once to
  average the m selected (m x S bytes read). Writes: N x S once.

Exact exclusion: nothing is folded before ``finish``, so ``discard`` deletes
the attempt's file and forgets it; nothing is ever rebuilt (``owed()`` is
always empty and ``refold`` never has work).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedkube.errors import ConfigError
from fedkube.server.aggregate import (
    AggregationError,
    DiscardOutcome,
    InvalidResultError,
    accumulator_dtype,
    all_finite,
)
from fedkube.server.model import Model, ModelSpec, TensorSpec
from fedkube.spec.strategy import Strategy as StrategySpec
from fedkube.spec.strategy import min_results, trim_count

if TYPE_CHECKING:  # strategies.py imports this module to register the strategies
    from fedkube.server.strategies import StrategyState

log = logging.getLogger(__name__)

STAGING_DIR = ".robust-staging"
"""Sub-directory of the server's checkpoint directory where robust strategies stage a round's results."""
BLOCK_BYTES = 32 << 20
"""Budget of one ``N x block`` read buffer in the accumulator dtype (the working set of ``finish``)."""
_ALIGN = 64


class TooFewResultsError(ConfigError):
    """A round ended with fewer results than the robust strategy needs; the job's settings must change."""


def lower_median(sorted_block: np.ndarray) -> np.ndarray:
    """Row ``(n-1)//2`` of values sorted along axis 0: a value some result holds (integer and bool tensors)."""
    return sorted_block[(sorted_block.shape[0] - 1) // 2]


# -- the rules: what each strategy computes from the staged results ------------------------------------


class _Rule:
    """One robust rule: how many results it needs and how it combines them."""

    name = ""

    def too_few(self, n: int) -> str:
        """Why ``n`` results are not enough ("" when they are)."""
        raise NotImplementedError

    def combine(self, stack: _Stack) -> Model:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {}


class _Median(_Rule):
    name = "median"

    def too_few(self, n: int) -> str:
        if n < 3:
            return (f"median needs at least 3 results to outvote one bad site, {n} delivered; fix: raise "
                    "spec.minClients to at least 3 (with that many clients)")
        return ""

    def combine(self, stack: _Stack) -> Model:
        def block(values: np.ndarray) -> np.ndarray:
            return np.median(values, axis=0, overwrite_input=True)

        return stack.coordinatewise(block)


class _TrimmedMean(_Rule):
    name = "trimmedmean"

    def __init__(self, beta: float) -> None:
        if not (isinstance(beta, (int, float)) and 0 <= beta < 0.5):
            raise ConfigError(f"spec.strategy.trimFraction={beta!r} is out of range; it must be in [0, 0.5)")
        self.beta = float(beta)

    def too_few(self, n: int) -> str:
        if self.beta > 0 and trim_count(self.beta, n) == 0:
            need = min_results(StrategySpec(name="trimmedmean", trimFraction=self.beta))
            return (f"trimmedmean with trimFraction={self.beta:g} trims ⌊{self.beta:g}·{n}⌋ = 0 of {n} results at "
                    f"each end, which would be a plain mean; fix: raise spec.minClients to at least {need} "
                    "(with that many clients) or raise trimFraction")
        return ""

    def combine(self, stack: _Stack) -> Model:
        k = trim_count(self.beta, stack.n)

        def block(values: np.ndarray) -> np.ndarray:
            values.sort(axis=0)
            return np.mean(values[k : values.shape[0] - k], axis=0)

        return stack.coordinatewise(block)

    def meta(self) -> dict[str, Any]:
        return {"trimFraction": self.beta}


class _Krum(_Rule):
    name = "krum"

    def __init__(self, byzantine: int, select: int) -> None:
        for field_name, value, lo in (("byzantine", byzantine, 0), ("krumSelect", select, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"spec.strategy.{field_name}={value!r} must be an integer ≥ {lo}")
        self.f = byzantine
        self.m = select

    def too_few(self, n: int) -> str:
        if n <= 2 * self.f + 2:
            return (f"krum with byzantine={self.f} needs more than 2·{self.f}+2 = {2 * self.f + 2} results, {n} "
                    f"delivered; fix: raise spec.minClients to at least {2 * self.f + 3} or lower byzantine")
        if self.m > n - self.f:
            return (f"krum selects krumSelect={self.m} results but only N - byzantine = {n - self.f} of {n} may be "
                    f"selected; fix: lower krumSelect to at most {n - self.f} or raise spec.minClients")
        return ""

    def combine(self, stack: _Stack) -> Model:
        chosen = krum_select(stack.distances(), self.f, self.m)
        log.info("krum selected %s of %s", [stack.keys[i] for i in chosen], list(stack.keys))
        return stack.subset(chosen).coordinatewise(lambda values: np.mean(values, axis=0))

    def meta(self) -> dict[str, Any]:
        return {"byzantine": self.f, "krumSelect": self.m}


def krum_select(distances: np.ndarray, f: int, m: int) -> list[int]:
    """Indices of the ``m`` best Krum scores (ties: the lower index) from squared pairwise distances."""
    n = distances.shape[0]
    nearest = n - f - 2
    scores = []
    for i in range(n):
        others = np.delete(distances[i], i)
        scores.append(float(np.sort(others)[:nearest].sum()))
    return sorted(range(n), key=lambda i: (scores[i], i))[:m]


# -- the staging area -----------------------------------------------------------------------------------


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


class _Stack:
    """The committed results' files, read per tensor in ``N x block`` column blocks."""

    def __init__(self, spec: ModelSpec, offsets: Mapping[str, int], keys: Sequence[str], paths: Sequence[Path],
                 block_bytes: int) -> None:  # fmt: skip
        self.spec, self.offsets, self.keys, self.paths = spec, offsets, tuple(keys), tuple(paths)
        self.block_bytes = block_bytes

    @property
    def n(self) -> int:
        return len(self.keys)

    def subset(self, rows: Sequence[int]) -> _Stack:
        return _Stack(self.spec, self.offsets, [self.keys[i] for i in rows], [self.paths[i] for i in rows],
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


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class RobustAggregator:
    """A round's RoundAggregator for the robust rules: stages each attempt's tensors on disk, combines at finish."""

    def __init__(self, spec: ModelSpec, rule: _Rule, directory: Path, *, block_bytes: int = BLOCK_BYTES) -> None:
        self.spec = spec
        self.rule = rule
        self.directory = directory
        self.block_bytes = block_bytes
        directory.mkdir(parents=True, exist_ok=False)
        # Removed however the round ends: finish(), a failed round that drops the aggregator, or the process exit.
        self._cleanup = weakref.finalize(self, _remove, directory)
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

    def _check(self, client: str, name: str, array: np.ndarray, weight: float) -> TensorSpec:
        spec = self.spec.get(name)
        if spec is None:
            raise InvalidResultError(client, f"tensor {name!r} is not in the global model")
        dtype = array.dtype if isinstance(array, (np.ndarray, np.generic)) else None
        if dtype != spec.np_dtype:
            raise InvalidResultError(client, f"tensor {name!r} has dtype {dtype}, the global model has {spec.dtype}")
        if tuple(array.shape) != spec.shape:
            raise InvalidResultError(
                client, f"tensor {name!r} has shape {tuple(array.shape)}, the global model has {spec.shape}"
            )
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise InvalidResultError(
                client, f"weight {weight!r} is not a positive finite number (num_examples must be > 0)"
            )
        return spec

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        """Stage one tensor on disk; False (ignored) when the attempt was discarded or an earlier one kept it."""
        weight = float(weight)
        spec = self._check(client, name, array, weight)
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
            return self.rule.combine(_Stack(self.spec, self.offsets, keys, paths, self.block_bytes))
        finally:
            self._cleanup()


# -- the strategies -------------------------------------------------------------------------------------


class _RobustStrategy:
    """A Strategy whose rounds are RobustAggregators staging under ``spill_dir``."""

    name = ""

    def __init__(self, rule: _Rule, spill_dir: Path | None, block_bytes: int) -> None:
        self.rule = rule
        self.spill_dir = spill_dir
        self.block_bytes = block_bytes
        self._root: Path | None = None

    def _staging_root(self) -> Path:
        if self._root is None:
            if self.spill_dir is None:
                self._root = Path(tempfile.mkdtemp(prefix="fedkube-robust-"))
                weakref.finalize(self, _remove, self._root)
            else:
                # One server owns the checkpoint volume: what is here before its first round is a crashed
                # server's. Later rounds remove their own directory (finish, or the aggregator's finalizer).
                self._root = self.spill_dir / STAGING_DIR
                _remove(self._root)
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def begin_round(self, global_model: Mapping[str, np.ndarray]) -> RobustAggregator:
        if not global_model:
            raise AggregationError("the global model has no tensors; nothing to aggregate")
        spec = ModelSpec.of(global_model)
        directory = self._staging_root() / f"round-{uuid.uuid4().hex[:12]}"
        return RobustAggregator(spec, self.rule, directory, block_bytes=self.block_bytes)

    def state(self) -> StrategyState:
        """The parameters, for the record: a robust strategy carries nothing from round to round."""
        from fedkube.server.strategies import StrategyState  # a cycle at import time: strategies imports us

        return StrategyState(self.name, self.rule.meta())

    def load_state(self, state: StrategyState) -> None:
        if state.name != self.name:
            raise ConfigError(
                f"the checkpoint holds state of strategy {state.name!r}, but the job uses {self.name!r}; "
                f"resume with spec.strategy.name={state.name!r} or start from a fresh checkpoint directory"
            )


class Median(_RobustStrategy):
    """Coordinate-wise median of the round's results."""

    name = "median"

    def __init__(self, *, spill_dir: Path | None = None, block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__(_Median(), spill_dir, block_bytes)


class TrimmedMean(_RobustStrategy):
    """Coordinate-wise mean after dropping the ⌊β·N⌋ smallest and largest values."""

    name = "trimmedmean"

    def __init__(self, *, trim_fraction: float = 0.2, spill_dir: Path | None = None,
                 block_bytes: int = BLOCK_BYTES) -> None:  # fmt: skip
        super().__init__(_TrimmedMean(trim_fraction), spill_dir, block_bytes)


class Krum(_RobustStrategy):
    """Krum / multi-Krum: the mean of the m results closest to their N - f - 2 nearest others."""

    name = "krum"

    def __init__(self, *, byzantine: int = 1, krum_select: int = 1, spill_dir: Path | None = None,
                 block_bytes: int = BLOCK_BYTES) -> None:  # fmt: skip
        super().__init__(_Krum(byzantine, krum_select), spill_dir, block_bytes)


ROBUST_STRATEGIES = ("median", "trimmedmean", "krum")
_PARAMS: dict[str, dict[str, str]] = {
    "median": {},
    "trimmedmean": {"trimFraction": "trim_fraction"},
    "krum": {"byzantine": "byzantine", "krumSelect": "krum_select"},
}


def build_robust(name: str, params: Mapping[str, Any], spill_dir: Path | None) -> _RobustStrategy:
    """A robust strategy from its spec parameters (camelCase); ConfigError for unknown ones."""
    known = _PARAMS[name]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"spec.strategy: unknown {name} parameter(s) {unknown}; known: {sorted(known)}")
    kwargs = {known[k]: v for k, v in params.items()}
    if name == "median":
        return Median(spill_dir=spill_dir)
    if name == "trimmedmean":
        return TrimmedMean(spill_dir=spill_dir, **kwargs)
    return Krum(spill_dir=spill_dir, **kwargs)
