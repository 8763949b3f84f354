"""Streaming weighted averaging of client results, one tensor at a time.

The server downloads each client's result tensor by tensor and hands every
array to ``WeightedMean.add`` as soon as it arrives and is verified; it never
holds N results.

Accumulator: a running weighted mean per tensor, in float32 for float32,
float16 and bfloat16 models (float64 for float64 models)::

    W_t += w;  acc_t += (w / W_t) * (x - acc_t)

Compared with a float64 reference over 8 clients of 1 M random values each
(means up to ~15), its max abs error was 1.4e-6, about 1.5 float32 ulps of the
largest value (9.5e-7), against 1.7e-6 for a float32 weighted sum
(``acc += w*x`` then ``/ W``); tests/unit/server/test_aggregate.py measures
both (run it with ``-s`` to see the numbers). The running mean is
chosen because its accumulator *is* the result for float32 models: ``finish``
returns it without a copy or a division pass. The accumulators come from an
``ArrayPool`` when the strategy has one (``fedkube.server.pool``): the model
superseded a round ago, recycled once nothing else refers to it, so the first
contribution is copied into resident pages instead of fresh ones that the
kernel must fault in and zero. A float64 accumulator would cost
2xS for the accumulator alone and is not needed at these error levels.
float16/bfloat16 models are accumulated in float32 and cast back once, in
``finish``. The update runs in blocks of ``BLOCK`` elements with a reusable
scratch buffer, so no temporary of a whole tensor's size is ever made.

Receiving into the accumulator. The server's downloads go through
``WeightedMean.intake``: a float tensor that no client has contributed to yet
(and whose accumulator has the wire dtype: float32 and float64 models) is
*claimed* by the first download that reaches it, which receives the bytes
straight into the array that becomes its accumulator (from the pool), so the
first contribution costs no copy. Only one download can hold a tensor's claim;
the others receive into their own buffer as before and, when they are ready to
fold while the claim is still open, wait for it to end (never folding into an
accumulator that is still being written; the wait is bounded by the claimer's
own fetch, i.e. its idle timeout and abort event, and by the waiter's abort
event). The claim of a client discarded meanwhile is revoked rather than
waited for, and its array never used. A claim is published only after the tensor verified against its
checksum, passed the NaN/Inf check and was accepted by the same bookkeeping as
``add`` (client not discarded, tensor not kept from an earlier attempt); a
claim that fails (transfer error, checksum failure, abort, non-finite values,
discarded client) is given back and its array kept for the next first
contribution, so the tensor is as if never claimed: weights and contributors
are untouched. Staged mode, float16/bfloat16 tensors (accumulated in float32)
and integer tensors never claim.

Memory (S = global model bytes, float32 model; the global model stays
resident because the transfer layer serves it and FedAdam needs it):

* streaming (default): global S + accumulator S + the tensors in flight (at
  most one receive buffer per concurrent download; the benchmark's 64 MiB
  arrays; a claimed tensor is received into its accumulator and needs none) +
  scratch (1 MiB per concurrent add) ≈ 2.1xS, under the 2.5xS target.
  Measured peak RSS over 3 rounds, S = 1 GiB in 64 MiB tensors, 2 clients
  interleaved: 2.06xS (8 clients: 2.06xS; FedAdam, with m and v: 4.06xS),
  before claims existed; ``bench/round.py --size-mib 1024`` with them: server
  2.13xS.
* ``staged=True`` (an internal option, not in the job spec): each client's
  tensors are kept until ``commit`` and folded in then: + S per client whose
  download is in flight, i.e. ≥ 3xS (measured 3.0xS for the case above).

Taking out a client whose result fails midway (rejected for NaN/Inf, a
download cut off, a client lost) after some of its tensors were folded.
Subtracting its contribution is not exact: floating point is not reversible,
and a poisoned 1e6 contribution subtracted back would wipe out the other
clients' precision; keeping every result until it is complete is the staged
mode's +S per client. So ``discard(client)`` *rebuilds* each tensor the client
had contributed to: the tensor is emptied (``TensorAccumulator.reset``, under
its lock; the accumulator array becomes the spare for the next first
contribution) and ``DiscardOutcome.rebuild`` names its other contributors. The
server pulls their tensors again (each trainer serves its result until its
next task; the refs carry the same checksums, so bytes changed since fail)
and hands them to ``refold``, which folds them with the weight their result
had; contributions of downloads still in flight fold as usual. ``means``
refuses to end the round while a contribution is still owed, and a tensor that
cannot be pulled again fails the round (the server's ``RebuildFailed``) rather
than end it with a tensor that is not the weighted mean of exactly the
delivered results. A tensor of the failed client that was never folded needs
nothing. The common case pays nothing: without a discard nothing is pulled
twice and no memory is held beyond streaming's.

When a discarded client delivers again (its task was re-sent after a
reconnect: the same result), ``discard(old_key, rebuild=False)`` and
``reopen(old_key, new_key)`` accept the new attempt: tensors the earlier
attempt verified stay, now counted under the new key (so discarding the new
attempt takes them out too), and are not added a second time, so no tensor
ever counts a client twice.

Float tensors holding NaN or Inf are rejected (InvalidResultError) before
any of their values is folded in: one diverged client must not turn the
global model into NaN for everyone. Through ``intake`` the check runs per
received frame (``FiniteCheck``, a fetch inspector), right after the fetcher
hashed the frame, while its bytes are still in cache; its verdict is reset
when the fetcher refetches from byte 0 and read only after the whole tensor
verified, so a NaN that a corrupted frame produced ends as a checksum mismatch
and refetch, never as InvalidResult. ``add`` without a receive-time verdict
reads the array once more (blockwise ``isfinite``). ``np.add.reduce`` per
block (a finite sum proving all values finite) was measured slower than
``isfinite`` on hot 4 MiB frames (0.20 vs 0.12-0.15 ms per frame).

Integer and bool tensors (e.g. BatchNorm's ``num_batches_tracked``, masks)
cannot be averaged meaningfully: they take the value of the contributing
client with the largest weight (ties: the smallest client name), so the result
is always a value some client actually produced and does not depend on
arrival order. Those arrays are copied (they are usually tiny).

Thread safety: ``add`` and ``intake`` may be called from several download
threads at once; adds to different tensors run in parallel (numpy releases the
GIL), adds to the same tensor are serialized by a per-tensor lock (taken
before the engine's bookkeeping lock, never the other way round).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping

import numpy as np

from fedkube.server.accumulator import (
    BLOCK,
    AggregationError,
    DiscardOutcome,
    FiniteCheck,
    FoldAbortedError,
    Intake,
    InvalidResultError,
    TensorAccumulator,
    accumulator_dtype,
    all_finite,
    check_tensor,
    non_finite,
    squared_distance,
)
from fedkube.server.model import ModelSpec, TensorSpec
from fedkube.server.pool import ArrayPool
from fedkube.server.prepass import drift

__all__ = [  # the accumulator's names are re-exported: callers import the aggregation API from here
    "BLOCK", "AggregationError", "DiscardOutcome", "FiniteCheck", "FoldAbortedError", "Intake", "InvalidResultError",
    "WeightedMean", "accumulator_dtype", "all_finite", "cast_to", "check_tensor", "weighted_metrics",
]  # fmt: skip

log = logging.getLogger(__name__)

class _Scratch(threading.local):
    """Per-thread BLOCK-sized buffers of the adds and intakes running on that thread (made on first use)."""

    def __init__(self) -> None:
        self.buf: np.ndarray | None = None
        self.mask: np.ndarray | None = None


class WeightedMean:
    """Per-tensor weighted mean of client results; the engine behind FedAvg and FedAdam.

    Call ``add`` for each (client, tensor) as it arrives, ``commit`` when a
    client's whole result was added, ``discard`` when its download failed, and
    ``means()`` once at the end.
    """

    def __init__(
        self, spec: ModelSpec, *, staged: bool = False, pool: ArrayPool | None = None,
        reference: Mapping[str, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.reference = reference  # the global model: given, update norms are measured and can be clipped (rescale)
        self.staged = staged
        self._tensors = {t.name: TensorAccumulator(t, pool) for t in spec}
        self._lock = threading.Lock()
        self._weights: dict[str, float] = {}
        self._added: dict[str, set[str]] = {}
        self._staged: dict[str, dict[str, np.ndarray]] = {}
        self._committed: list[str] = []
        self._discarded: set[str] = set()
        self._kept: dict[str, set[str]] = {}
        self._kept_weight: dict[str, float] = {}  # new key -> the weight its kept contributions were folded with
        self._owed: dict[str, set[str]] = {}  # tensor -> clients whose emptied contribution must be refolded
        self._sq: dict[str, dict[str, float]] = {}  # client -> tensor -> ||x - reference||^2 (with a reference)
        self._scale: dict[str, float] = {}  # client -> its update's clip factor, applied when it is folded (again)
        self._prescaled: set[str] = set()  # clients whose norm a pre-pass measured before their first add
        self._finished = False
        self._scratch = _Scratch()

    # -- bookkeeping -----------------------------------------------------------

    @property
    def committed(self) -> tuple[str, ...]:
        """Clients whose whole result is in the aggregate, in commit order."""
        with self._lock:
            return tuple(self._committed)

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Clients with tensors added but neither committed nor discarded."""
        with self._lock:
            return tuple(c for c in self._added if c not in self._discarded and c not in self._committed)

    def _scratch_for(self) -> np.ndarray:
        buf = self._scratch.buf
        if buf is None:
            buf = np.empty(BLOCK, np.float32)
            self._scratch.buf = buf
        return buf

    def _mask_for(self) -> np.ndarray:
        mask = self._scratch.mask
        if mask is None:
            mask = np.empty(BLOCK, np.bool_)
            self._scratch.mask = mask
        return mask

    # -- the aggregation protocol ----------------------------------------------

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        """Add one tensor of one client's result.

        Returns False (and ignores the array) when the client was already
        discarded: a download that finishes after the server gave up on the
        client is stale. Raises InvalidResultError when the array does not fit
        the global model or the weight differs from the client's earlier one,
        AggregationError when used after commit/finish (a bug in the caller).
        While another client's first contribution to the tensor is being
        received straight into the accumulator (``intake``), waits for it.
        """
        return self._add(client, name, array, float(weight), None, None)

    def _add(
        self, client: str, name: str, array: np.ndarray, weight: float, finite: bool | None,
        abort: threading.Event | None, sq: float | None = None,
    ) -> bool:  # fmt: skip
        spec = check_tensor(self.spec, client, name, array, weight)
        if spec.is_float and not (all_finite(array) if finite is None else finite):
            # Checked before folding: one diverged client must not turn everyone's model into NaN.
            raise non_finite(client, name)
        sq = self.distance(spec, array) if sq is None else sq
        if self.staged:
            with self._lock:
                return self._register(client, name, weight, array, sq)
        tensor = self._tensors[name]
        with tensor.lock:
            tensor.wait_unclaimed(abort, self._is_discarded)
            with self._lock:
                if not self._register(client, name, weight, None, sq):
                    return False
            tensor.fold(client, array, weight, self._scratch_for(), self.clip_of(client, spec))
        return True

    def distance(self, spec: TensorSpec, array: np.ndarray) -> float | None:
        """``‖array - reference‖²`` of a float tensor (None without a reference, or for integer tensors)."""
        ref = self.reference[spec.name] if self.reference is not None and spec.is_float else None
        return None if ref is None else squared_distance(array, ref, self._scratch_for())

    def clip_of(self, client: str, spec: TensorSpec) -> tuple[np.ndarray, float] | None:
        """(global tensor, factor) that ``client``'s tensor is clipped with when folded, or None: as it is."""
        scale = self._scale.get(client)
        if scale is None or self.reference is None or not spec.is_float:
            return None
        return self.reference[spec.name], scale

    def prescale(self, client: str, sq: Mapping[str, float], scale_of: Callable[[float], float]) -> float:
        """Set ``client``'s update norm from a pre-pass over its whole result, before any of its tensors is added.

        ``sq``: tensor -> ``‖x - reference‖²`` for every float tensor. Returns the clip factor ``scale_of(norm)``;
        every add of the client then folds its tensors clipped, so ``rescale`` (refolding others) is never needed
        (``fedkube.server.prepass``); each add is measured again and refused (``prepass.drift``) when its update
        norm exceeds the pre-pass's. Tensors an earlier attempt left (``reopen``) were folded by that attempt.
        """
        with self._lock:
            early = self._added.get(client, set()) - self._kept.get(client, set())
            if self.reference is None or client in self._discarded or client in self._committed or early:
                raise AggregationError(f"prescale({client!r}) needs a reference model and comes before the "
                                       "client's first add")
            self._sq[client] = dict(sq)
            scale = scale_of(math.sqrt(sum(self._sq[client].values())))
            self._prescaled.add(client)
            if scale < 1.0:
                self._scale[client] = scale
            return scale

    def prescaled(self, client: str) -> bool:
        """Whether ``client``'s norm came from a pre-pass (its clip, if any, is already in its folds)."""
        with self._lock:
            return client in self._prescaled

    def _register(self, client: str, name: str, weight: float, staged: np.ndarray | None, sq: float | None) -> bool:
        """Record that ``client`` delivered ``name``; False when it must be ignored. Caller holds self._lock."""
        if self._finished:
            raise AggregationError(f"add({client!r}, {name!r}) after finish(); the round is over")
        if client in self._discarded:
            log.debug("ignoring tensor %s of discarded client %s", name, client)
            return False
        if client in self._committed:
            raise AggregationError(f"add({client!r}, {name!r}) after commit({client!r})")
        if name in self._kept.get(client, ()):
            # An earlier attempt of this client already delivered this tensor; count it once.
            return False
        known = self._weights.setdefault(client, weight)
        if known != weight:
            raise InvalidResultError(client, f"weight changed from {known} to {weight} within one result")
        added = self._added.setdefault(client, set())
        if name in added:
            raise InvalidResultError(client, f"tensor {name!r} was added twice")
        if sq is not None and client in self._prescaled:
            drift(client, name, self._sq[client].get(name), sq)  # before it is folded: the pre-pass's bytes or less
        added.add(name)
        if sq is not None and client not in self._prescaled:
            self._sq.setdefault(client, {})[name] = sq
        if staged is not None:
            self._staged.setdefault(client, {})[name] = staged
        return True

    def _is_discarded(self, client: str) -> bool:
        with self._lock:
            return client in self._discarded

    def _may_claim(self, client: str, name: str) -> bool:
        with self._lock:
            return not (
                self._finished
                or client in self._discarded
                or client in self._committed
                or name in self._kept.get(client, ())
                or name in self._added.get(client, ())
            )

    def intake(
        self, client: str, name: str, dtype: str, shape: tuple[int, ...], weight: float, *,
        abort: threading.Event | None = None, claim: bool = True,
    ) -> Intake:  # fmt: skip
        """Prepare to receive one tensor of one client's result (wire ``dtype`` name and ``shape`` as announced).

        The returned :class:`Intake` says where to receive the bytes
        (``target``: the tensor's accumulator-to-be when no client has
        contributed to it yet and this intake claimed it; else None, receive
        into your own buffer) and carries a :class:`FiniteCheck` to hand to the
        fetcher. Then call ``Intake.add`` with the verified array, and always
        ``Intake.close`` (a ``with`` block does), which gives an unpublished
        claim back: the tensor is then as if never claimed. ``abort`` bounds
        the wait of a later contribution for an open claim (FoldAbortedError);
        ``claim=False`` never claims (the caller keeps receiving into its buffer).
        Announced dtype/shape that do not fit the model get neither a claim
        nor a check; ``add`` then raises the usual InvalidResultError.
        """
        weight = float(weight)
        spec = self.spec.get(name)
        tensor = self._tensors.get(name)
        intake = Intake(self, client, name, weight, tensor, abort)
        if spec is None or tensor is None:
            return intake
        if dtype != spec.dtype or tuple(shape) != spec.shape or not spec.is_float:
            return intake
        dt = spec.np_dtype
        intake.check = FiniteCheck(dt, spec.nbytes, mask=self._mask_for(), widened=self._scratch_for(),
                                   reference=None if self.reference is None else self.reference[name])  # fmt: skip
        if not claim or self.staged or accumulator_dtype(spec) != dt:
            return intake  # staged keeps arrays; half precision accumulates in float32, so no aliasing
        with tensor.lock:
            if tensor.acc is None and tensor.claim is None and self._may_claim(client, name):
                tensor.claim = intake
                intake.target = tensor.take_accumulator()
        return intake

    def commit(self, client: str) -> None:
        """Mark a client's result complete; every tensor of the model must have been added."""
        with self._lock:
            if client in self._discarded:
                raise AggregationError(f"commit({client!r}) after discard({client!r})")
            if client in self._committed:
                raise AggregationError(f"commit({client!r}) called twice")
            added = self._added.get(client, set())
            missing = [n for n in self.spec.names if n not in added]
            if missing:
                raise InvalidResultError(
                    client, f"result incomplete: {len(missing)} tensor(s) never added, first {missing[0]!r}"
                )
            self._committed.append(client)
            staged = self._staged.pop(client, {})
            weight = self._weights[client]
        # Fold staged tensors in model order so the result does not depend on download order.
        for name in self.spec.names if staged else ():
            tensor = self._tensors[name]
            array = staged.pop(name)
            with tensor.lock:
                tensor.fold(client, array, weight, self._scratch_for(), self.clip_of(client, tensor.spec))

    def discard(self, client: str, *, rebuild: bool = True) -> DiscardOutcome:
        """Drop a client from the round; later adds from it are ignored.

        Streaming mode: each tensor the client already contributed to is
        emptied (``TensorAccumulator.reset``) and its other contributors are
        returned in ``DiscardOutcome.rebuild``: the caller fetches their
        tensors again and hands them to ``refold``; ``means`` refuses to end
        the round until every one was refolded. Subtracting the contribution
        instead is not exact in floating point (and a huge rejected value
        would wipe out the others' precision). ``rebuild=False`` keeps the
        contribution instead (``kept_tensors``): only for a retry of the very
        same result, followed by ``reopen``.
        """
        with self._lock:
            if client in self._committed:
                raise AggregationError(f"discard({client!r}) after commit({client!r}); its result is already in")
            self._discarded.add(client)
            self._staged.pop(client, None)
            added = self._added.get(client, set())
            for name, owed in self._owed.items():
                if client in owed:
                    # Emptied by an earlier discard and not refolded: nothing of it is in the tensor.
                    owed.discard(client)
                    added.discard(name)
            touched = () if self.staged else tuple(n for n in self.spec.names if n in added)
        if not rebuild:
            if touched:
                log.info("client %s discarded after %d of %d tensors; kept for its next attempt", client,
                         len(touched), len(self.spec))
            return DiscardOutcome(client, touched)
        again: dict[str, tuple[str, ...]] = {}
        for name in touched:
            tensor = self._tensors[name]
            with tensor.lock, self._lock:
                if client not in tensor.contributors:
                    continue
                others = tuple(c for c in tensor.contributors if c != client and c not in self._discarded)
                tensor.reset(client)
                self._owed.setdefault(name, set()).update(others)
                again[name] = others
        with self._lock:
            self._added.get(client, set()).difference_update(touched)  # nothing of it is left to keep
        if again:
            log.info("client %s discarded after %d of its tensors were folded; they are rebuilt from the other "
                     "contributors", client, len(again))
        return DiscardOutcome(client, rebuild=again)

    def refold(self, client: str, name: str, array: np.ndarray, *, abort: threading.Event | None = None) -> bool:
        """Fold ``client``'s tensor ``name`` again after a ``discard`` emptied it (``DiscardOutcome.rebuild``).

        ``array`` must be the same verified bytes as the first time (the
        caller fetches them against the same checksum); the weight is the one
        the client's result had. Returns False when nothing is owed (the
        client was discarded meanwhile, or already refolded).
        """
        tensor = self._tensors[name]
        with tensor.lock:
            tensor.wait_unclaimed(abort, self._is_discarded)
            with self._lock:
                if self._finished:
                    raise AggregationError(f"refold({client!r}, {name!r}) after finish(); the round is over")
                owed = self._owed.get(name, set())
                if client not in owed or client in self._discarded:
                    return False
                weight = self._kept_weight[client] if name in self._kept.get(client, ()) else self._weights[client]
            check_tensor(self.spec, client, name, array, weight)
            with self._lock:
                owed.discard(client)
            tensor.fold(client, array, weight, self._scratch_for(), self.clip_of(client, self.spec[name]))
        return True

    def update_norm(self, client: str) -> float | None:
        """L2 norm of ``client``'s update over the float tensors it delivered (None without a reference)."""
        with self._lock:
            return None if self.reference is None else math.sqrt(sum(self._sq.get(client, {}).values()))

    def rescale(self, client: str, scale: float) -> dict[str, tuple[str, ...]]:
        """Count ``client``'s update as ``scale·(result - reference)``; after its last add, before commit.

        Staged mode folds it scaled at ``commit``. Streaming mode folded it unscaled, so each float tensor
        holding it is emptied as by ``discard`` and all its contributors (``client`` too) are owed to
        ``refold``, which folds ``client``'s scaled. Returns tensor -> contributors to fold again.
        """
        with self._lock:
            if self.reference is None or not (0.0 <= scale < 1.0) or client in self._committed + list(self._discarded):
                raise AggregationError(f"rescale({client!r}, {scale}) needs a reference model, a factor in [0, 1) "
                                       "and a result neither committed nor discarded")
            self._scale[client] = scale
        again: dict[str, tuple[str, ...]] = {}
        # Integer tensors take a value some client produced: clipping does not apply to them.
        for spec in () if self.staged else [t for t in self.spec if t.is_float]:
            tensor = self._tensors[spec.name]
            with tensor.lock, self._lock:
                if client not in tensor.contributors:
                    continue
                others = tuple(c for c in tensor.contributors if c not in self._discarded)
                tensor.reset(client)
                self._owed.setdefault(spec.name, set()).update(others)
                again[spec.name] = others
        return again

    def owed(self) -> dict[str, tuple[str, ...]]:
        """Tensor -> clients whose contribution was emptied by a discard and is not refolded yet."""
        with self._lock:
            return {n: tuple(sorted(c)) for n, c in self._owed.items() if c}

    def reopen(self, client: str, new_key: str | None = None) -> tuple[str, ...]:
        """Accept a new attempt of a discarded client's result (e.g. its task was re-sent after a reconnect).

        Returns the tensors earlier attempts left in the aggregate (streaming
        mode): the new attempt's adds of those are ignored (add returns
        False), so each tensor counts a client at most once, and ``commit``
        needs only the others. The new attempt may carry a new weight. In
        staged mode nothing was kept and the attempt starts afresh.

        With ``new_key`` the new attempt is added under that key and
        ``client`` stays discarded, so a late add from the old attempt's
        download (still winding down) is ignored rather than mixed into the
        new one; without it the same key is reused.
        """
        key = client if new_key is None else new_key
        with self._lock:
            if client not in self._discarded:
                raise AggregationError(f"reopen({client!r}) of a client that was not discarded")
            if key != client and (key in self._added or key in self._discarded or key in self._committed):
                raise AggregationError(f"reopen({client!r}, {key!r}): key {key!r} was already used this round")
            kept = set() if self.staged else set(self._added.get(client, set()))
            if key == client:
                self._discarded.discard(client)
            self._weights.pop(key, None)
            self._kept[key] = kept
            self._added[key] = set(kept)
            measured = self._sq.pop(client, {}) if key != client else self._sq.get(client, {})
            self._sq[key] = {n: v for n, v in measured.items() if n in kept}
            if kept and client in self._scale:  # the kept tensors were folded clipped: a rebuild folds them so
                self._scale[key] = self._scale[client]
        if key != client:
            # The kept contributions are the new attempt's now: discarding it must take them out too.
            for name in kept:
                tensor = self._tensors[name]
                with tensor.lock:
                    tensor.contributors = [key if c == client else c for c in tensor.contributors]
            with self._lock:
                if kept:
                    self._kept_weight[key] = self._weights[client]
        return tuple(n for n in self.spec.names if n in kept)

    def means(self) -> dict[str, np.ndarray]:
        """End the round: per-tensor means in accumulator precision (float tensors) or the chosen value.

        Raises AggregationError when no client was committed or a client is
        still in flight (neither committed nor discarded).
        """
        with self._lock:
            if self._finished:
                raise AggregationError("finish() called twice")
            in_flight = [c for c in self._added if c not in self._discarded and c not in self._committed]
            if in_flight:
                raise AggregationError(
                    f"clients {in_flight} have tensors added but were neither committed nor discarded"
                )
            if not self._committed:
                raise AggregationError("no client result was committed this round; nothing to aggregate")
            owed = {n: sorted(c) for n, c in self._owed.items() if c}
            if owed:
                raise AggregationError(
                    f"tensors {sorted(owed)} were emptied to take a discarded client out and still wait for "
                    f"{owed} to be refolded; the round cannot end before they are (or fails)"
                )
            self._finished = True
        return {name: t.mean() for name, t in self._tensors.items()}

    def contributors(self, name: str) -> tuple[str, ...]:
        """Clients whose value of tensor ``name`` is in the aggregate, in fold order."""
        tensor = self._tensors[name]
        with tensor.lock:
            return tuple(tensor.contributors)


def cast_to(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """Cast an aggregated value to the global dtype once; no copy when it already has it."""
    if value.dtype == spec.np_dtype:
        return value
    return value.astype(spec.np_dtype)


def weighted_metrics(results: Mapping[str, tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """Weighted mean of client metrics by num_examples; a metric only some clients report uses theirs.

    ``results`` maps client -> (num_examples, metrics). Non-finite values are
    skipped, so one client's NaN loss does not erase the round's metric.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for _client, (num_examples, metrics) in sorted(results.items()):
        w = float(num_examples)
        if not (math.isfinite(w) and w > 0):
            continue
        for key, value in metrics.items():
            v = float(value)
            if not math.isfinite(v):
                continue
            sums[key] = sums.get(key, 0.0) + w * v
            weights[key] = weights.get(key, 0.0) + w
    return {k: sums[k] / weights[k] for k in sorted(sums)}

