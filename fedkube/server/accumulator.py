"""The per-tensor pieces of the streaming mean (``fedkube.server.aggregate``): accumulators, intakes, finite checks.

:class:`TensorAccumulator` holds one tensor's running weighted mean (or, for
integer tensors, the chosen value), its lock and its open receive claim;
:class:`Intake` is one client's tensor on its way in (``WeightedMean.intake``);
:class:`FiniteCheck` and :func:`all_finite` reject NaN/Inf before anything is
folded in. The errors the aggregation raises, ``check_tensor`` and
``DiscardOutcome`` are defined here too, so both modules can use them
(``fedkube.server.aggregate`` re-exports them). :func:`toward` and
``TensorAccumulator.fold(clip=...)`` make a clipped result (``g + s·(x - g)``)
with the same block operations, so every clipping path agrees to the bit.
The design and the memory math are in the docstring of
``fedkube.server.aggregate``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedkube.errors import FedkubeError
from fedkube.server.model import ModelSpec, TensorSpec
from fedkube.server.pool import ArrayPool

if TYPE_CHECKING:
    from fedkube.server.aggregate import WeightedMean

BLOCK = 1 << 18
"""Elements per block of the accumulate loop (1 MiB of float32 scratch: measured fastest, it stays in cache)."""


class AggregationError(FedkubeError):
    """Aggregation was used wrongly (e.g. finish with nothing to aggregate)."""


class InvalidResultError(AggregationError):
    """A client's tensor does not fit the global model or its weight is unusable."""

    def __init__(self, client: str, message: str) -> None:
        super().__init__(f"client {client!r}: {message}")
        self.client = client
        self.detail = message


class FoldAbortedError(AggregationError):
    """An add gave up waiting for another client's tensor to be received, because its abort event was set."""


@dataclass(frozen=True)
class DiscardOutcome:
    """What discarding a client left behind, and what must be fetched again to take it out exactly."""

    client: str
    kept_tensors: tuple[str, ...] = ()
    """Tensors whose verified contribution from this client stays in the average (only ``discard(rebuild=False)``,
    for a retry of the same result)."""
    rebuild: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Tensor -> the other clients whose contribution to it must be fetched again and given to ``refold``:
    the tensor was emptied because this client's contribution was folded into it."""

    @property
    def exact(self) -> bool:
        """True when nothing of the client is left in the aggregate (once ``rebuild`` is refolded)."""
        return not self.kept_tensors


def _finite_into(flat: np.ndarray, mask: np.ndarray, widened: np.ndarray | None) -> bool:
    """True when the flat float array holds no NaN or Inf; ``mask``/``widened`` are BLOCK-sized scratch."""
    for start in range(0, flat.size, BLOCK):
        block = flat[start : start + BLOCK]
        if widened is not None:
            # isfinite on ml_dtypes' bfloat16 is ~10x slower than widening to float32 first.
            w = widened[: block.size]
            w[...] = block
            block = w
        m = mask[: block.size]
        np.isfinite(block, out=m)
        if not m.all():
            return False
    return True


def all_finite(array: np.ndarray) -> bool:
    """True when a float array holds no NaN or Inf; blockwise, so no array-sized temporary."""
    flat = np.ascontiguousarray(array).reshape(-1)
    mask = np.empty(min(BLOCK, flat.size), np.bool_)
    widened = None if flat.dtype.itemsize >= 4 else np.empty(min(BLOCK, flat.size), np.float32)
    return _finite_into(flat, mask, widened)


class FiniteCheck:
    """Checks a float tensor for NaN/Inf piece by piece while it is received (a fetch ``RangeInspector``).

    The server's download hands it to ``Fetcher.fetch_into``, which calls
    ``update`` right after hashing each received piece, while its bytes are
    still in the CPU cache: one read of hot data instead of a cold pass over
    the whole tensor afterwards. Pieces may end inside an element (a resumed
    stream); the check stops at the last whole element (``checked`` is always
    a multiple of the item size) and takes the rest with the next piece.

    ``finite`` is only a record, never a decision: bytes of a corrupted piece
    can look like NaN, so a verdict counts only once the whole tensor verified
    against its checksum. A refetch from byte 0 calls ``reset``.
    """

    __slots__ = ("_mask", "_scratch", "_widened", "checked", "dtype", "finite", "nbytes", "reference", "sq")

    def __init__(
        self, dtype: np.dtype, nbytes: int, *, mask: np.ndarray | None = None, widened: np.ndarray | None = None,
        reference: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        """``mask`` (bool) and ``widened`` (float32, used for 2-byte floats) are optional ``BLOCK``-sized scratch.

        With ``reference`` (the global model's tensor) it also sums ``‖x - reference‖²`` of the checked
        bytes (``sq``), the update norm that clipping needs, while each piece is hot.
        """
        self.dtype = np.dtype(dtype)
        self.nbytes = nbytes
        self.checked = 0
        """Bytes from the start of the tensor that were checked (whole elements)."""
        self.finite = True
        """False once a NaN or Inf was seen in the checked bytes."""
        self.reference = None if reference is None else np.ascontiguousarray(reference).reshape(-1)
        self.sq = 0.0
        """``‖x - reference‖²`` over the checked bytes (with a reference)."""
        if mask is None or mask.size < BLOCK or mask.dtype != np.bool_:
            mask = np.empty(BLOCK, np.bool_)
        if widened is None or widened.size < BLOCK or widened.dtype != np.float32:
            widened = np.empty(BLOCK, np.float32) if self.dtype.itemsize < 4 or reference is not None else None
        self._mask = mask
        self._widened = widened if self.dtype.itemsize < 4 else None
        self._scratch = widened  # float32 scratch of the norm: the widening buffer, which the finite check is done with

    @property
    def complete(self) -> bool:
        """True when every byte of the tensor was checked (the verdict covers it all)."""
        return self.checked == self.nbytes

    def reset(self) -> None:
        self.checked = 0
        self.finite = True
        self.sq = 0.0

    def update(self, buf: memoryview, start: int, stop: int) -> None:
        item = self.dtype.itemsize
        end = min(stop, self.nbytes) // item * item
        if end <= self.checked:
            return
        if self.finite:  # one NaN decides the verdict; later pieces only move the watermark
            count = (end - self.checked) // item
            flat = np.frombuffer(buf, self.dtype, count=count, offset=self.checked)
            self.finite = _finite_into(flat, self._mask, self._widened)
            if self.finite and self.reference is not None:
                first = self.checked // item
                assert self._scratch is not None
                self.sq += squared_distance(flat, self.reference[first : first + count], self._scratch)
        self.checked = end


def squared_distance(x: np.ndarray, g: np.ndarray, scratch: np.ndarray) -> float:
    """``‖x - g‖²``, an update's squared norm (fedkube.server.influence), blockwise: no array-sized temporary.

    ``scratch`` is BLOCK float32 (float64 tensors use their own). A block whose
    float32 square sum overflows (differences above ~1e19) is summed again in
    float64, so a huge update gets its true norm, not Inf.
    """
    fx = np.ascontiguousarray(x).reshape(-1)
    fg = np.ascontiguousarray(g).reshape(-1)
    if fg.dtype == np.float64 and scratch.dtype != np.float64:
        scratch = np.empty(min(BLOCK, fg.size), np.float64)
    total = 0.0
    for start in range(0, fx.size, BLOCK):
        stop = min(start + BLOCK, fx.size)
        d = scratch[: stop - start]
        if fx.dtype == d.dtype and fg.dtype == d.dtype:
            np.subtract(fx[start:stop], fg[start:stop], out=d)
        else:  # half precision: widen first
            d[...] = fx[start:stop]
            d -= fg[start:stop]
        with np.errstate(over="ignore"):
            part = float(np.dot(d, d))
        if not math.isfinite(part):
            d64 = d.astype(np.float64)
            part = float(np.dot(d64, d64))
        total += part
    return total


def toward(g: np.ndarray, x: np.ndarray, scale: float, dtype: np.dtype) -> np.ndarray:
    """``g + scale·(x - g)`` in ``dtype`` (the accumulator's): the clipped result, one tensor-sized array."""
    out = np.empty(g.shape, dtype)
    fo, fx, fg = out.reshape(-1), np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(g).reshape(-1)
    for start in range(0, fo.size, BLOCK):
        stop = min(start + BLOCK, fo.size)
        _toward_block(fo[start:stop], fx[start:stop], fg[start:stop], scale)
    return out


def toward_in_place(x: np.ndarray, g: np.ndarray, scale: float) -> None:
    """``x = g + scale·(x - g)`` in place (x in the accumulator's dtype): the same values as :func:`toward`."""
    fx, fg = x.reshape(-1), np.ascontiguousarray(g).reshape(-1)
    for start in range(0, fx.size, BLOCK):
        stop = min(start + BLOCK, fx.size)
        _toward_block(fx[start:stop], None, fg[start:stop], scale)


def _toward_block(out: np.ndarray, x: np.ndarray | None, g: np.ndarray, scale: float) -> None:
    """One block of the clipped result (of ``out`` itself when ``x`` is None); every clipping path goes through it,
    so they agree to the bit."""
    if x is not None:
        out[...] = x
    out -= g
    out *= scale
    out += g


def check_tensor(spec: ModelSpec, client: str, name: str, array: np.ndarray, weight: float) -> TensorSpec:
    """``name``'s spec in the global model, once ``array`` matches it and ``weight`` is a positive finite number;
    else InvalidResultError naming the tensor (every strategy checks a result's tensors this way)."""
    found = spec.get(name)
    if found is None:
        raise InvalidResultError(client, f"tensor {name!r} is not in the global model")
    arr_dtype = array.dtype if isinstance(array, (np.ndarray, np.generic)) else None
    if arr_dtype is None or found.np_dtype != arr_dtype:
        raise InvalidResultError(client, f"tensor {name!r} has dtype {arr_dtype}, the global model has {found.dtype}")
    if tuple(array.shape) != found.shape:
        raise InvalidResultError(
            client, f"tensor {name!r} has shape {tuple(array.shape)}, the global model has {found.shape}"
        )
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise InvalidResultError(client, f"weight {weight!r} is not a positive finite number "
                                 "(num_examples must be > 0)")
    return found


def accumulator_dtype(spec: TensorSpec) -> np.dtype:
    """float64 for float64 tensors, float32 for the other floats."""
    return np.dtype(np.float64) if spec.dtype == "float64" else np.dtype(np.float32)


class TensorAccumulator:
    """Accumulation state of one tensor across clients (its lock, claim, running mean or chosen value)."""

    __slots__ = (
        "acc", "best", "best_key", "claim", "contributors", "lock", "pool", "released", "spare", "spec",
        "total_weight",
    )  # fmt: skip

    def __init__(self, spec: TensorSpec, pool: ArrayPool | None = None) -> None:
        self.spec = spec
        self.pool = pool
        self.lock = threading.Lock()
        self.released = threading.Condition(self.lock)
        """Notified (under ``lock``) when a claim ends, published or given up."""
        self.claim: Intake | None = None
        """The intake receiving the first contribution straight into a would-be accumulator, if any."""
        self.spare: np.ndarray | None = None
        """The array of a claim that was given up: the next first contribution goes there."""
        self.acc: np.ndarray | None = None
        self.total_weight = 0.0
        self.contributors: list[str] = []
        self.best: np.ndarray | None = None
        self.best_key: tuple[float, str] | None = None

    def fold(
        self, client: str, array: np.ndarray, weight: float, scratch: np.ndarray,
        clip: tuple[np.ndarray, float] | None = None,
    ) -> None:  # fmt: skip
        """Add one client's array; caller holds self.lock.

        With ``clip`` (the global model's tensor g and the factor s) the array counts as ``g + s·(array - g)``,
        made block by block in the scratch (:func:`toward`'s values, no tensor-sized temporary).
        """
        self.contributors.append(client)
        if not self.spec.is_float:
            # Largest weight wins; ties go to the smaller name, so order of arrival does not matter.
            key = (-weight, client)
            if self.best_key is None or key < self.best_key:
                self.best_key = key
                self.best = np.array(array, copy=True)
            return
        self.total_weight += weight
        if self.acc is None:
            # The first contribution is the mean so far, copied so the caller's array is not aliased;
            # into a recycled array when the pool has one, whose pages need no fault and no zeroing.
            acc = self.take_accumulator()
            np.copyto(acc, array, casting="unsafe")
            if clip is not None:
                toward_in_place(acc, *clip)
            self.acc = acc
            return
        factor = weight / self.total_weight
        flat_acc = self.acc.reshape(-1)
        flat_x = np.ascontiguousarray(array).reshape(-1)
        tmp_all = scratch if scratch.dtype == flat_acc.dtype else np.empty(BLOCK, flat_acc.dtype)
        flat_g = None if clip is None else np.ascontiguousarray(clip[0]).reshape(-1)
        for start in range(0, flat_acc.size, BLOCK):
            stop = min(start + BLOCK, flat_acc.size)
            tmp = tmp_all[: stop - start]
            if clip is not None:
                assert flat_g is not None
                _toward_block(tmp, flat_x[start:stop], flat_g[start:stop], clip[1])
                tmp -= flat_acc[start:stop]
            elif flat_x.dtype == flat_acc.dtype:
                np.subtract(flat_x[start:stop], flat_acc[start:stop], out=tmp)
            else:
                tmp[...] = flat_x[start:stop]  # half precision: widen first
                tmp -= flat_acc[start:stop]
            tmp *= factor
            flat_acc[start:stop] += tmp

    def reset(self, gone: str) -> None:
        """Forget every contribution (caller holds self.lock): the tensor is rebuilt from the clients still in.

        The accumulator's array is kept as the spare, so refolding costs no
        allocation. An open claim of another client stays (it was registered
        for nothing yet and publishes into the emptied tensor); one of the
        client ``gone`` is revoked, its array never used.
        """
        if self.claim is not None and self.claim.client == gone:
            self.claim = None
            self.released.notify_all()
        if self.acc is not None and self.spare is None:
            self.spare = self.acc
        self.acc = None
        self.total_weight = 0.0
        self.contributors = []
        self.best = None
        self.best_key = None

    def take_accumulator(self) -> np.ndarray:
        """An array for the accumulator (contents undefined): a given-up claim's, a pooled one or a fresh one."""
        if self.spare is not None:
            acc, self.spare = self.spare, None
            return acc
        dtype = accumulator_dtype(self.spec)
        return self.pool.take(self.spec.shape, dtype) if self.pool is not None else np.empty(self.spec.shape, dtype)

    def wait_unclaimed(self, abort: threading.Event | None, discarded: Callable[[str], bool]) -> None:
        """Block until no claim is open; caller holds self.lock.

        Never fold into an accumulator that is still being received: a later
        contribution waits for the claimer's fetch to end (bounded by that
        fetch's own idle timeout and abort event). A claim of a client that
        was discarded meanwhile is revoked instead of waited for: its array
        may still be written, so it is never used (the claimer's ``add`` then
        takes the ordinary path and is ignored as stale).
        """
        while self.claim is not None:
            if discarded(self.claim.client):
                self.claim = None
                return
            if abort is not None and abort.is_set():
                raise FoldAbortedError(f"aborted while waiting for tensor {self.spec.name!r} to be received")
            self.released.wait(0.1 if abort is not None else None)

    def mean(self) -> np.ndarray:
        """The float accumulator (accumulator dtype) or the chosen integer value."""
        if self.spec.is_float:
            assert self.acc is not None
            return self.acc
        assert self.best is not None
        return self.best


def non_finite(client: str, name: str) -> InvalidResultError:
    return InvalidResultError(client, f"tensor {name!r} contains NaN or Inf values; the client's training diverged")


class Intake:
    """One client's tensor on its way into the aggregate; see ``WeightedMean.intake``."""

    __slots__ = ("_done", "abort", "check", "client", "engine", "name", "target", "tensor", "weight")

    def __init__(
        self, engine: WeightedMean, client: str, name: str, weight: float, tensor: TensorAccumulator | None,
        abort: threading.Event | None,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.client = client
        self.name = name
        self.weight = weight
        self.tensor = tensor
        self.abort = abort
        self.check: FiniteCheck | None = None
        """Give it to ``Fetcher.fetch_into(inspect=...)``; ``add`` trusts its verdict when it saw every byte."""
        self.target: np.ndarray | None = None
        """Receive straight into this array (this intake claimed the tensor), or None: use your own buffer."""
        self._done = False

    @property
    def claimed(self) -> bool:
        """True while this intake holds the tensor's claim (its first contribution goes into ``target``)."""
        return self.tensor is not None and self.tensor.claim is self

    def add(self, array: np.ndarray) -> bool:
        """Fold the received, checksum-verified array in; like ``WeightedMean.add``.

        When this intake claimed the tensor, ``array`` must be ``target`` (or a
        view of its memory): it becomes the accumulator without a copy.
        """
        if self._done:
            raise AggregationError(f"Intake.add({self.client!r}, {self.name!r}) called twice")
        self._done = True
        check = self.check
        finite = check.finite if check is not None and check.complete else None
        # The norm the check summed while each piece was hot, else None: the engine reads the array again.
        sq = check.sq if finite and check is not None and check.reference is not None else None
        if not self.claimed:
            return self.engine._add(self.client, self.name, array, self.weight, finite, self.abort, sq)
        tensor, target = self.tensor, self.target
        assert tensor is not None and target is not None
        try:
            if array.size != target.size or array.ctypes.data != target.ctypes.data:
                raise AggregationError(
                    f"Intake.add({self.client!r}, {self.name!r}): the tensor was claimed, so the array must be "
                    "the intake's target"
                )
            spec = check_tensor(self.engine.spec, self.client, self.name, array, self.weight)
            if spec.is_float and not (all_finite(array) if finite is None else finite):
                raise non_finite(self.client, self.name)
            if sq is None:  # before publishing: then other folds change the array
                sq = self.engine.distance(spec, array)
            clip = self.engine.clip_of(self.client, spec)
            if clip is not None:  # a pre-pass measured the norm (fedkube.server.prepass): folded clipped at once
                toward_in_place(target, *clip)
            with tensor.lock:
                with self.engine._lock:
                    accepted = self.engine._register(self.client, self.name, self.weight, None, sq)
                if accepted:
                    assert tensor.acc is None, "an accumulator appeared while the tensor was claimed"
                    tensor.contributors.append(self.client)
                    tensor.total_weight += self.weight
                    tensor.acc = target
                    self.target = None
                self._release()
            return accepted
        finally:
            self.close()

    def _release(self) -> None:
        """Give up the claim (caller holds the tensor's lock); an unpublished target becomes the spare."""
        tensor = self.tensor
        assert tensor is not None
        if tensor.claim is self:
            tensor.claim = None
            if self.target is not None:
                tensor.spare, self.target = self.target, None
            tensor.released.notify_all()

    def close(self) -> None:
        """End the intake; a claim that was not published is given back (the tensor is as if never claimed)."""
        self._done = True
        if self.tensor is not None and self.tensor.claim is self:
            with self.tensor.lock:
                self._release()

    def __enter__(self) -> Intake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
