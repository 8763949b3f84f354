"""The publisher side: transactions of tensors served to their expected receivers.

A process publishes a set of tensors once (:meth:`DownloadService.publish`);
the service keeps zero-copy views of the caller's arrays and serves every
expected receiver from those same buffers, chunk by chunk, from any offset.
The transaction lives until every expected receiver reported completion or its
TTL expired (LESSONS.md 7); then the service drops every reference to the
arrays, so their memory returns as soon as the caller drops its own.

Concurrency rules (LESSONS.md 10-12): locks are :class:`CheckedLock` and guard
only dictionary/counter updates; nothing is called while one is held (events
are handed to the listener executor after the lock is released); chunk
production (slicing, encoding, copying into the message) runs outside every
lock, so receivers never serialize on each other.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from fedkube.transfer import peercred
from fedkube.transfer.errors import (
    InvalidRequestError,
    OffsetOutOfRangeError,
    ReceiverNotExpectedError,
    RefNotFoundError,
    TransactionExistsError,
    TransactionExpiredError,
    TransferError,
)
from fedkube.transfer.locks import CheckedLock
from fedkube.transfer.refs import TensorRef, as_bytes, check_id, checksum_of
from fedkube.transfer.wire import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    add_download_servicer,
    encode_chunk,
    server_options,
    status_code_for,
)
from fedkube.wire.v1 import tensor_pb2

log = logging.getLogger(__name__)

RECEIVER_FINISHED = "receiver_finished"
TRANSACTION_RELEASED = "transaction_released"

# How many released transaction ids are remembered, so a late fetch gets
# "expired" (FAILED_PRECONDITION) rather than "unknown" (NOT_FOUND).
_REMEMBER_RELEASED = 4096


@dataclass(frozen=True)
class TransferEvent:
    """What listeners receive: a receiver finished, or a transaction was released.

    ``reason`` of a release is "completed" (every receiver finished),
    "ttl_expired", "released" (by :meth:`DownloadService.release`), "empty"
    (nothing to download) or "closed" (service closed).
    """

    kind: str
    transaction_id: str
    receiver: str | None = None
    ok: bool | None = None
    error: str = ""
    reason: str = ""


class Transaction:
    """One published set of tensors; returned by :meth:`DownloadService.publish`."""

    def __init__(
        self,
        transaction_id: str,
        refs: list[TensorRef],
        views: dict[str, memoryview],
        receivers: tuple[str, ...],
        ttl_s: float,
        fingerprint: tuple[tuple[str, int], ...],
    ) -> None:
        self.id = transaction_id
        self.refs = refs
        self.receivers = frozenset(receivers)
        self.ttl_s = ttl_s
        self.deadline = time.monotonic() + ttl_s
        self._fingerprint = fingerprint
        self._lock = CheckedLock(f"transaction {transaction_id}")
        self._views = views
        self._served = dict.fromkeys(receivers, 0)
        self._done: set[str] = set()
        self._failed: dict[str, str] = {}
        self._released = False
        self._release_reason = ""
        self._finished = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every expected receiver finished (True) or the transaction was
        released without that / ``timeout`` passed (False)."""
        self._finished.wait(timeout)
        with self._lock:
            return self._all_finished_locked()

    def _all_finished_locked(self) -> bool:
        return (self._done | set(self._failed)) >= self.receivers

    def progress(self) -> dict[str, int]:
        """Bytes served so far to each expected receiver (resent bytes count again)."""
        with self._lock:
            return dict(self._served)

    @property
    def done_receivers(self) -> frozenset[str]:
        """Receivers that reported success."""
        with self._lock:
            return frozenset(self._done)

    @property
    def failed_receivers(self) -> dict[str, str]:
        """Receivers that reported giving up, with their error."""
        with self._lock:
            return dict(self._failed)

    @property
    def released(self) -> bool:
        return self._released

    @property
    def release_reason(self) -> str:
        return self._release_reason

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.refs)

    def __repr__(self) -> str:
        return f"Transaction(id={self.id!r}, refs={len(self.refs)}, receivers={sorted(self.receivers)})"


class DownloadService:
    """Publishes transactions and serves their chunks; thread-safe.

    ``source`` is this process's name as receivers know it ("server" or a site
    name); it goes into every :class:`TensorRef`. Listener callbacks run on an
    executor of ``callback_workers`` threads owned by the service.
    """

    def __init__(self, source: str, *, callback_workers: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        problem = check_id("source", source)
        if problem:
            raise InvalidRequestError(problem)
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise InvalidRequestError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        self.source = source
        self.chunk_bytes = chunk_bytes
        self._lock = CheckedLock(f"download service {source}")
        self._txns: dict[str, Transaction] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._listeners: list[Callable[[TransferEvent], None]] = []
        self._executor = futures.ThreadPoolExecutor(
            max_workers=callback_workers, thread_name_prefix=f"fedkube-transfer-events-{source}"
        )
        self._wake = threading.Event()
        self._closed = False
        self._reaper: threading.Thread | None = None

    # --- publishing -------------------------------------------------------------

    def publish(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        receivers: Iterable[str],
        ttl_s: float,
        transaction_id: str | None = None,
    ) -> Transaction:
        """Publish ``tensors`` for ``receivers`` until they all finish or ``ttl_s`` passes.

        Serialize once: the service holds zero-copy views of the given arrays
        (see :func:`as_bytes` for when it must copy), so do not modify them
        until the transaction is released. Publishing again under a live
        ``transaction_id`` with the same arrays returns the same transaction
        (a retried send reuses the bytes, LESSONS.md 6); with other arrays it
        raises :class:`TransactionExistsError`. A transaction with no tensors
        is finished at once (LESSONS.md 2).
        """
        expected = tuple(dict.fromkeys(receivers))
        tid = transaction_id if transaction_id is not None else uuid.uuid4().hex
        problems = [p for p in [check_id("transaction id", tid)] if p]
        problems += [p for p in (check_id("receiver", r) for r in expected) if p]
        if not expected:
            problems.append("no expected receivers: pass receivers=[...] naming who will fetch")
        if not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s > 0):
            problems.append(f"ttl_s must be a finite number of seconds > 0, got {ttl_s!r}")
        for name, array in tensors.items():
            if not isinstance(name, str):
                problems.append(f"tensor names must be strings, got {name!r}")
            if not isinstance(array, np.ndarray):
                problems.append(f"tensor {name!r} is a {type(array).__name__}, not a numpy.ndarray")
        if problems:
            raise InvalidRequestError("cannot publish: " + "; ".join(problems), transaction_id=tid)
        fingerprint = tuple((name, id(array)) for name, array in tensors.items())
        existing = self._existing(tid, fingerprint, expected)
        if existing is not None:
            return existing

        # Heavy work (views, checksums) before taking any lock.
        refs: list[TensorRef] = []
        views: dict[str, memoryview] = {}
        for index, (name, array) in enumerate(tensors.items()):
            ref_id = f"t{index}"
            try:
                view = as_bytes(array)
            except ValueError as exc:
                raise InvalidRequestError(f"tensor {name!r}: {exc}", transaction_id=tid, ref_id=ref_id) from None
            ref = TensorRef.for_array(
                array, source=self.source, transaction_id=tid, ref_id=ref_id, name=name, checksum=checksum_of(view)
            )
            refs.append(ref)
            views[ref_id] = view
        txn = Transaction(tid, refs, views, expected, float(ttl_s), fingerprint)

        with self._lock:
            if self._closed:
                raise InvalidRequestError("the download service is closed", transaction_id=tid)
            clash = tid in self._txns or tid in self._gone
            if not clash:
                self._txns[tid] = txn
        if clash:
            # Lost a publish race for the same id: the winner's transaction is the one to use.
            existing = self._existing(tid, fingerprint, expected)
            if existing is not None:
                return existing
            raise TransactionExistsError("was published concurrently with other tensors", transaction_id=tid)
        log.info(
            "transaction %s published: %d tensors, %d bytes, receivers %s, ttl %.1fs",
            tid,
            len(refs),
            txn.nbytes,
            ",".join(expected),
            ttl_s,
        )
        if not refs:
            with txn._lock:
                txn._done.update(expected)
            self._release(tid, "empty")
        else:
            self._ensure_reaper()
            self._wake.set()
        return txn

    def _existing(
        self, tid: str, fingerprint: tuple[tuple[str, int], ...], receivers: tuple[str, ...]
    ) -> Transaction | None:
        with self._lock:
            txn = self._txns.get(tid)
            gone = self._gone.get(tid)
        if txn is not None:
            if txn._fingerprint == fingerprint and txn.receivers == frozenset(receivers):
                log.info("transaction %s published again with the same tensors: reusing it", tid)
                return txn
            raise TransactionExistsError(
                "is already published with other tensors or receivers; publish under a new id", transaction_id=tid
            )
        if gone is not None:
            raise TransactionExistsError(
                f"was already published and then released ({gone}); publish under a new id", transaction_id=tid
            )
        return None

    def transaction(self, transaction_id: str) -> Transaction | None:
        """The live transaction with that id, if any."""
        with self._lock:
            return self._txns.get(transaction_id)

    def transactions(self) -> list[Transaction]:
        """Live transactions."""
        with self._lock:
            return list(self._txns.values())

    # --- releasing --------------------------------------------------------------

    def release(self, transaction_id: str) -> bool:
        """Drop a transaction and its buffers now; False when it was not live."""
        return self._release(transaction_id, "released")

    def _release(self, transaction_id: str, reason: str) -> bool:
        with self._lock:
            txn = self._txns.pop(transaction_id, None)
            if txn is None:
                return False
            self._gone[transaction_id] = reason
            while len(self._gone) > _REMEMBER_RELEASED:
                self._gone.popitem(last=False)
        with txn._lock:
            txn._released = True
            txn._release_reason = reason
            # Running streams hold their own slice until they notice; everything else goes now.
            txn._views = {}
            all_done = txn._all_finished_locked()
        txn._finished.set()
        log.info("transaction %s released (%s; all receivers finished: %s)", transaction_id, reason, all_done)
        self._emit(TransferEvent(TRANSACTION_RELEASED, transaction_id, reason=reason))
        return True

    def _ensure_reaper(self) -> None:
        with self._lock:
            if self._reaper is not None or self._closed:
                return
            self._reaper = threading.Thread(
                target=self._reap, name=f"fedkube-transfer-reaper-{self.source}", daemon=True
            )
            reaper = self._reaper
        reaper.start()

    def _reap(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                if self._closed:
                    return
                expired = [t.id for t in self._txns.values() if t.deadline <= now]
                upcoming = [t.deadline for t in self._txns.values() if t.deadline > now]
            for tid in expired:
                log.warning("transaction %s: TTL expired before every receiver finished; releasing it", tid)
                self._release(tid, "ttl_expired")
            self._wake.wait(min(upcoming) - now if upcoming else None)

    # --- receivers --------------------------------------------------------------

    def open_stream(
        self, transaction_id: str, ref_id: str, receiver: str, offset: int = 0, max_chunk_bytes: int = 0
    ) -> Iterator[tuple[int, memoryview]]:
        """Validate a fetch and return an iterator of (offset, bytes view) chunks.

        Transport-free: the gRPC servicer and any other transport (the server's
        reverse path) use this. Raises a :class:`TransferError` subclass for a
        bad request; the iterator raises :class:`TransactionExpiredError` if
        the transaction is released mid-stream.
        """
        ids = {"transaction_id": transaction_id, "ref_id": ref_id, "receiver": receiver}
        problems = [
            p
            for p in (
                check_id("transaction id", transaction_id),
                check_id("ref id", ref_id),
                check_id("receiver", receiver),
            )
            if p
        ]
        if problems:
            raise InvalidRequestError("malformed fetch request: " + "; ".join(problems), **ids)
        if max_chunk_bytes < 0 or max_chunk_bytes > MAX_CHUNK_BYTES:
            raise InvalidRequestError(
                f"max_chunk_bytes {max_chunk_bytes} is outside 0..{MAX_CHUNK_BYTES}; ask for less (0: server picks)",
                **ids,
            )
        if offset < 0:
            raise OffsetOutOfRangeError(f"offset {offset} is negative", **ids)
        chunk = max_chunk_bytes or self.chunk_bytes
        txn = self._live(transaction_id, ids)
        if receiver not in txn.receivers:
            raise ReceiverNotExpectedError(
                f"is not an expected receiver of this transaction (expected: {', '.join(sorted(txn.receivers))})", **ids
            )
        with txn._lock:
            view = txn._views.get(ref_id)
            released = txn._released
        if released:
            raise TransactionExpiredError(
                f"was released ({txn._release_reason}); ask the publisher to publish again", **ids
            )
        if view is None:
            raise RefNotFoundError(
                f"unknown ref in this transaction (it has {', '.join(r.ref_id for r in txn.refs)})", **ids
            )
        if offset > view.nbytes:
            raise OffsetOutOfRangeError(f"offset {offset} is beyond the tensor's {view.nbytes} bytes", **ids)
        log.debug("transaction %s ref %s: serving %s from offset %d", transaction_id, ref_id, receiver, offset)
        return self._chunks(txn, view, receiver, offset, chunk)

    def _live(self, transaction_id: str, ids: dict[str, Any]) -> Transaction:
        with self._lock:
            txn = self._txns.get(transaction_id)
            gone = self._gone.get(transaction_id)
        if txn is not None:
            return txn
        if gone is not None:
            raise TransactionExpiredError(
                f"was released ({gone}) before this request; the publisher must publish again", **ids
            )
        raise RefNotFoundError(f"unknown transaction at source {self.source!r}", **ids)

    @staticmethod
    def _chunks(
        txn: Transaction, view: memoryview, receiver: str, offset: int, chunk: int
    ) -> Iterator[tuple[int, memoryview]]:
        end = view.nbytes
        pos = offset
        while pos < end:
            if txn._released:
                raise TransactionExpiredError(
                    f"was released ({txn._release_reason}) during the fetch, at offset {pos}",
                    transaction_id=txn.id,
                    receiver=receiver,
                )
            piece = view[pos : pos + chunk]
            with txn._lock:
                txn._served[receiver] += piece.nbytes
            yield pos, piece
            pos += piece.nbytes

    def complete(self, transaction_id: str, receiver: str, ok: bool, error: str = "") -> None:
        """Record that ``receiver`` finished the transaction (or gave up, ``ok=False``).

        Idempotent; a completion that arrives after the release is ignored.
        """
        ids = {"transaction_id": transaction_id, "receiver": receiver}
        problems = [p for p in (check_id("transaction id", transaction_id), check_id("receiver", receiver)) if p]
        if problems:
            raise InvalidRequestError("malformed complete request: " + "; ".join(problems), **ids)
        with self._lock:
            txn = self._txns.get(transaction_id)
            gone = self._gone.get(transaction_id)
        if txn is None:
            if gone is not None:
                log.debug("transaction %s: late completion from %s after release (%s)", transaction_id, receiver, gone)
                return
            raise RefNotFoundError(f"unknown transaction at source {self.source!r}", **ids)
        if receiver not in txn.receivers:
            raise ReceiverNotExpectedError(
                f"is not an expected receiver of this transaction (expected: {', '.join(sorted(txn.receivers))})", **ids
            )
        with txn._lock:
            first = receiver not in txn._done and receiver not in txn._failed
            if ok:
                txn._done.add(receiver)
                txn._failed.pop(receiver, None)
            elif receiver not in txn._done:
                txn._failed[receiver] = error or "receiver gave up without a reason"
            all_finished = txn._all_finished_locked()
        if ok:
            log.info("transaction %s: receiver %s finished", transaction_id, receiver)
        else:
            log.warning("transaction %s: receiver %s gave up: %s", transaction_id, receiver, error)
        if first or ok:
            self._emit(TransferEvent(RECEIVER_FINISHED, transaction_id, receiver=receiver, ok=ok, error=error))
        if all_finished:
            self._release(transaction_id, "completed")

    # --- events -----------------------------------------------------------------

    def add_listener(self, callback: Callable[[TransferEvent], None]) -> None:
        """Call ``callback(event)`` for every receiver-finished / transaction-released event.

        Callbacks run one at a time per executor thread on the service's own
        executor, never on a gRPC worker and never under a lock, so a slow or
        blocking callback delays only other callbacks, never a fetch.
        """
        with self._lock:
            self._listeners.append(callback)

    def _emit(self, event: TransferEvent) -> None:
        with self._lock:
            listeners = list(self._listeners)
            closed = self._closed
        if not listeners or closed:
            return
        try:
            self._executor.submit(self._deliver, listeners, event)
        except RuntimeError:  # executor shut down by a concurrent close()
            log.debug("transaction %s: event %s dropped, service closed", event.transaction_id, event.kind)

    @staticmethod
    def _deliver(listeners: list[Callable[[TransferEvent], None]], event: TransferEvent) -> None:
        for callback in listeners:
            try:
                callback(event)
            except Exception:
                log.exception("transaction %s: listener %r failed on %s", event.transaction_id, callback, event.kind)

    # --- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        """Release every transaction, stop the reaper and the listener executor (waits for running callbacks)."""
        for txn in self.transactions():
            self._release(txn.id, "closed")
        with self._lock:
            self._closed = True
            reaper = self._reaper
        self._wake.set()
        if reaper is not None:
            reaper.join(timeout=10)
        self._executor.shutdown(wait=True)

    def __enter__(self) -> DownloadService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- gRPC -------------------------------------------------------------------

    def servicer(self) -> DownloadServicer:
        """The Download service for gRPC; register it with :meth:`add_to_server`."""
        return DownloadServicer(self)

    def add_to_server(self, server: grpc.Server) -> None:
        """Register this service's Download servicer (with its chunk serializer) on ``server``."""
        add_download_servicer(server, self.servicer())


class DownloadServicer:
    """Thin gRPC edge: FetchRequest -> encoded chunks, errors -> status codes."""

    def __init__(self, service: DownloadService) -> None:
        self._service = service

    def Fetch(self, request: tensor_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            stream = self._service.open_stream(
                request.transaction_id, request.ref_id, request.receiver, request.offset, request.max_chunk_bytes
            )
            for pos, piece in stream:
                yield encode_chunk(pos, piece)
        except TransferError as exc:
            log.warning("fetch refused: %s", exc)
            context.abort(status_code_for(exc), str(exc))

    def Complete(
        self, request: tensor_pb2.CompleteRequest, context: grpc.ServicerContext
    ) -> tensor_pb2.CompleteResponse:
        try:
            self._service.complete(request.transaction_id, request.receiver, request.ok, request.error)
        except TransferError as exc:
            log.warning("complete refused: %s", exc)
            context.abort(status_code_for(exc), str(exc))
        return tensor_pb2.CompleteResponse()


def serve(
    service: DownloadService,
    address: str = "127.0.0.1:0",
    *,
    max_workers: int = 32,
    extra_options: Sequence[tuple[str, Any]] = (),
) -> tuple[grpc.Server, int]:
    """Start a gRPC server serving ``service`` on ``address``; returns (server, bound port).

    Each running fetch holds one of the ``max_workers`` threads for its
    duration, so size it above the number of concurrent receivers.
    ``extra_options`` are appended to :func:`server_options`.
    """
    bound: list[int] = []
    # On loopback (the trainer's results, pulled by its sidecar): only this process's user may fetch them.
    guard = peercred.own_user_only(address.rpartition(":")[0])
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fedkube-download"),
        options=server_options(extra_options),
        interceptors=[peercred.SameUserInterceptor(f"download service {service.source}", lambda: bound[0])] if guard
        else None,
    )
    service.add_to_server(server)
    port = server.add_insecure_port(address)
    bound.append(port)
    if port == 0:
        raise InvalidRequestError(f"could not bind the download server to {address!r}; is the port in use?")
    server.start()
    log.info("download service %s listening on port %d", service.source, port)
    return server, port
