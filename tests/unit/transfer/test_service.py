"""DownloadService without a network: transactions, release, events and the concurrency rules."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator

import numpy as np
import pytest

from fedkube.transfer import (
    DownloadService,
    InvalidRequestError,
    OffsetOutOfRangeError,
    ReceiverNotExpectedError,
    RefNotFoundError,
    TransactionExistsError,
    TransactionExpiredError,
    TransferEvent,
    as_bytes,
    checksum_of,
)
from fedkube.transfer.service import RECEIVER_FINISHED, TRANSACTION_RELEASED


@pytest.fixture
def service() -> Iterator[DownloadService]:
    svc = DownloadService("server", chunk_bytes=1000)
    yield svc
    svc.close()


def _read_all(svc: DownloadService, tid: str, ref_id: str, receiver: str, offset: int = 0) -> bytes:
    out = bytearray()
    for pos, piece in svc.open_stream(tid, ref_id, receiver, offset):
        assert pos == offset + len(out)
        out += piece
    return bytes(out)


class _Events:
    def __init__(self) -> None:
        self.items: list[TransferEvent] = []
        self.threads: list[str] = []
        self.cond = threading.Condition()

    def __call__(self, event: TransferEvent) -> None:
        with self.cond:
            self.items.append(event)
            self.threads.append(threading.current_thread().name)
            self.cond.notify_all()

    def wait_for(self, kind: str, timeout: float = 5) -> TransferEvent:
        with self.cond:
            assert self.cond.wait_for(lambda: any(e.kind == kind for e in self.items), timeout), self.items
            return next(e for e in self.items if e.kind == kind)


def test_publish_serves_every_receiver_from_the_same_buffer(service: DownloadService) -> None:
    a = np.arange(2500, dtype=np.float32)
    b = np.ones((3, 4), dtype=np.int64)
    txn = service.publish({"a": a, "b": b}, receivers=["c1", "c2"], ttl_s=60)
    assert [r.name for r in txn.refs] == ["a", "b"]
    assert txn.refs[0].checksum == checksum_of(as_bytes(a))
    streams = [service.open_stream(txn.id, "t0", r) for r in ("c1", "c2")]
    pieces = [next(s)[1] for s in streams]
    # Zero-copy: both receivers' chunks are views into the caller's own array.
    for piece in pieces:
        assert np.shares_memory(np.frombuffer(piece, dtype=np.uint8), a)
    assert _read_all(service, txn.id, "t0", "c1", offset=4000) == a.tobytes()[4000:]
    assert _read_all(service, txn.id, "t1", "c2") == b.tobytes()


def test_chunks_honour_requested_size_and_offset(service: DownloadService) -> None:
    txn = service.publish({"x": np.zeros(10_000, dtype=np.uint8)}, receivers=["c1"], ttl_s=60)
    sizes = [p.nbytes for _, p in service.open_stream(txn.id, "t0", "c1", 1, 3000)]
    assert sizes == [3000, 3000, 3000, 999]
    assert list(service.open_stream(txn.id, "t0", "c1", 10_000)) == []


def test_bad_requests_raise_specific_errors_naming_ids(service: DownloadService) -> None:
    txn = service.publish({"x": np.zeros(100, dtype=np.uint8)}, receivers=["c1"], ttl_s=60)
    with pytest.raises(RefNotFoundError, match=r"transaction 'nope', ref 't0', receiver 'c1': unknown transaction"):
        service.open_stream("nope", "t0", "c1")
    with pytest.raises(RefNotFoundError, match=r"ref 't7'.*unknown ref in this transaction \(it has t0\)"):
        service.open_stream(txn.id, "t7", "c1")
    with pytest.raises(ReceiverNotExpectedError, match=r"receiver 'intruder'.*expected: c1"):
        service.open_stream(txn.id, "t0", "intruder")
    with pytest.raises(OffsetOutOfRangeError, match="offset 101 is beyond the tensor's 100 bytes"):
        service.open_stream(txn.id, "t0", "c1", 101)
    with pytest.raises(InvalidRequestError, match="max_chunk_bytes"):
        service.open_stream(txn.id, "t0", "c1", 0, 1 << 30)
    with pytest.raises(InvalidRequestError, match="ref id 'a b' is not a valid id"):
        service.open_stream(txn.id, "a b", "c1")
    service.release(txn.id)
    with pytest.raises(TransactionExpiredError, match="was released \\(released\\)"):
        service.open_stream(txn.id, "t0", "c1")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"receivers": []}, "no expected receivers"),
        ({"receivers": ["ok", "not ok"]}, "receiver 'not ok'"),
        ({"ttl_s": 0}, "ttl_s must be"),
        ({"ttl_s": float("inf")}, "ttl_s must be"),
        ({"transaction_id": "x/y"}, "transaction id 'x/y'"),
    ],
)
def test_publish_refuses_bad_arguments(service: DownloadService, kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {"receivers": ["c1"], "ttl_s": 10.0}
    args.update(kwargs)
    with pytest.raises(InvalidRequestError, match=fragment):
        service.publish({"x": np.zeros(3)}, **args)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"not a numpy\.ndarray"):
        service.publish({"x": [1, 2]}, receivers=["c1"], ttl_s=1)  # type: ignore[dict-item]
    with pytest.raises(InvalidRequestError, match="complex"):
        service.publish({"x": np.zeros(2, dtype=np.complex64)}, receivers=["c1"], ttl_s=1)


def test_lesson6_republishing_reuses_the_transaction_and_bytes(service: DownloadService) -> None:
    a = np.arange(10, dtype=np.float32)
    first = service.publish({"a": a}, receivers=["c1"], ttl_s=60, transaction_id="round-3-result")
    again = service.publish({"a": a}, receivers=["c1"], ttl_s=60, transaction_id="round-3-result")
    assert again is first and len(service.transactions()) == 1
    with pytest.raises(TransactionExistsError, match="already published with other tensors"):
        service.publish({"a": a.copy()}, receivers=["c1"], ttl_s=60, transaction_id="round-3-result")
    service.release(first.id)
    with pytest.raises(TransactionExistsError, match="released"):
        service.publish({"a": a}, receivers=["c1"], ttl_s=60, transaction_id="round-3-result")


def test_lesson2_transaction_without_tensors_is_finished_at_once(service: DownloadService) -> None:
    txn = service.publish({}, receivers=["server"], ttl_s=3600)
    assert txn.wait(timeout=0) is True
    assert txn.released and txn.release_reason == "empty"


def test_lesson7_lives_until_every_expected_receiver_finished(service: DownloadService) -> None:
    a = np.arange(5000, dtype=np.uint8)
    txn = service.publish({"a": a}, receivers=["c1", "c2", "c3"], ttl_s=60)
    service.complete(txn.id, "c1", ok=True)
    service.complete(txn.id, "c2", ok=False, error="disk full")
    # A secondary download still running after others finished must not see "no ref found".
    assert _read_all(service, txn.id, "t0", "c3") == a.tobytes()
    assert not txn.released and txn.wait(0) is False
    assert txn.done_receivers == {"c1"} and txn.failed_receivers == {"c2": "disk full"}
    service.complete(txn.id, "c3", ok=True)
    assert txn.wait(0) is True and txn.released and txn.release_reason == "completed"
    service.complete(txn.id, "c3", ok=True)  # late duplicate: harmless
    with pytest.raises(ReceiverNotExpectedError):
        service.complete(service.publish({"a": a}, receivers=["c1"], ttl_s=5).id, "c9", ok=True)


def test_release_drops_every_reference_so_memory_returns(service: DownloadService) -> None:
    a = np.arange(100_000, dtype=np.float64)
    alive = weakref.ref(a)
    txn = service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    del a
    _read_all(service, txn.id, "t0", "c1")
    gc.collect()
    assert alive() is not None  # still published
    service.complete(txn.id, "c1", ok=True)
    gc.collect()
    assert alive() is None


def test_ttl_expiry_releases_memory_and_a_running_stream_stops() -> None:
    with DownloadService("server", chunk_bytes=1000) as svc:
        events = _Events()
        svc.add_listener(events)
        a = np.zeros(50_000, dtype=np.uint8)
        alive = weakref.ref(a)
        txn = svc.publish({"a": a}, receivers=["c1", "c2"], ttl_s=0.3)
        del a
        stream = svc.open_stream(txn.id, "t0", "c1")
        next(stream)
        assert txn.wait(timeout=5) is False  # released by the TTL, not by the receivers
        assert txn.release_reason == "ttl_expired"
        assert events.wait_for(TRANSACTION_RELEASED).reason == "ttl_expired"
        with pytest.raises(TransactionExpiredError, match="during the fetch"):
            list(stream)
        del stream
        gc.collect()
        assert alive() is None
        with pytest.raises(TransactionExpiredError, match="ttl_expired"):
            svc.open_stream(txn.id, "t0", "c2")


def test_reaper_honours_the_earliest_deadline_among_many() -> None:
    with DownloadService("server") as svc:
        long = svc.publish({"a": np.zeros(4)}, receivers=["c1"], ttl_s=60)
        short = svc.publish({"a": np.zeros(4)}, receivers=["c1"], ttl_s=0.2)
        assert short.wait(5) is False and short.released
        assert not long.released


def test_lesson10_listener_may_call_back_into_the_service(service: DownloadService) -> None:
    """Events are emitted after locks are released: a listener that publishes or releases
    must neither deadlock nor trip the re-entry check (CheckedLock raises on re-entry)."""
    done = threading.Event()
    errors: list[BaseException] = []

    def listener(event: TransferEvent) -> None:
        try:
            if event.kind == RECEIVER_FINISHED:
                service.release(event.transaction_id)
                service.publish({"next": np.zeros(2)}, receivers=["c1"], ttl_s=5)
                done.set()
        except BaseException as exc:
            errors.append(exc)
            done.set()

    service.add_listener(listener)
    txn = service.publish({"a": np.zeros(8)}, receivers=["c1", "c2"], ttl_s=60)
    service.complete(txn.id, "c1", ok=True)
    assert done.wait(5) and not errors
    assert txn.released


def test_lesson10_completing_the_last_receiver_releases_without_reentry(service: DownloadService) -> None:
    """The release that complete() triggers takes the same locks: it must run after they are released."""
    txn = service.publish({"a": np.zeros(8)}, receivers=["c1"], ttl_s=60)
    service.complete(txn.id, "c1", ok=True)  # would raise LockReentryError if release ran under the lock
    assert txn.released


def test_lesson11_listeners_run_on_the_service_executor(service: DownloadService) -> None:
    events = _Events()
    service.add_listener(events)
    txn = service.publish({"a": np.zeros(8)}, receivers=["c1"], ttl_s=60)
    service.complete(txn.id, "c1", ok=True)
    events.wait_for(TRANSACTION_RELEASED)
    assert events.threads and all(t.startswith("fedkube-transfer-events-server") for t in events.threads)
    assert [e.kind for e in events.items] == [RECEIVER_FINISHED, TRANSACTION_RELEASED]


def test_a_failing_listener_does_not_stop_the_others(service: DownloadService) -> None:
    events = _Events()

    def broken(event: TransferEvent) -> None:
        raise RuntimeError("listener bug")

    service.add_listener(broken)
    service.add_listener(events)
    txn = service.publish({"a": np.zeros(8)}, receivers=["c1"], ttl_s=60)
    service.complete(txn.id, "c1", ok=True)
    assert events.wait_for(TRANSACTION_RELEASED).transaction_id == txn.id


def test_lesson12_chunks_are_produced_outside_every_lock(service: DownloadService) -> None:
    """While one receiver holds a chunk (its consumer is slow), others progress and
    the transaction's bookkeeping stays available: no lock is held across a yield."""
    txn = service.publish({"a": np.zeros(100_000, dtype=np.uint8)}, receivers=["slow", "fast"], ttl_s=60)
    slow = service.open_stream(txn.id, "t0", "slow")
    next(slow)  # suspended mid-stream, as a gRPC worker blocked on a slow network would be
    assert not txn._lock.held_by_current_thread() and not service._lock.held_by_current_thread()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(len(_read_all(service, txn.id, "t0", "fast"))))
    t.start()
    t.join(5)
    assert result == [100_000]
    assert txn.progress()["fast"] == 100_000
    del slow


def test_close_releases_everything() -> None:
    svc = DownloadService("server")
    txn = svc.publish({"a": np.zeros(8)}, receivers=["c1"], ttl_s=60)
    svc.close()
    assert txn.released and txn.release_reason == "closed"
    with pytest.raises(InvalidRequestError, match="closed"):
        svc.publish({"a": np.zeros(8)}, receivers=["c1"], ttl_s=60)


def test_concurrent_publish_and_fetch_stress(service: DownloadService) -> None:
    """Many threads publishing, fetching, completing at once: no deadlock, no re-entry, all data right."""
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(20):
                a = np.full(3000 + j, i, dtype=np.uint8)
                txn = service.publish({"a": a}, receivers=["r1", "r2"], ttl_s=30)
                for r in ("r1", "r2"):
                    assert _read_all(service, txn.id, "t0", r) == a.tobytes()
                    service.complete(txn.id, r, ok=True)
                assert txn.wait(5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock: workers still running"
    assert not errors, errors[0]
    assert not service.transactions()
