"""LESSONS.md 10-12 over real gRPC: callbacks cannot starve fetches, chunk production is
not serialized by a lock, and nothing re-enters a lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedkube.transfer import (
    CheckedLock,
    DownloadService,
    Fetcher,
    FetchSettings,
    GrpcChunkSource,
    TransferEvent,
    insecure_channel,
    serve,
)
from fedkube.transfer import service as service_module
from fedkube.transfer.service import RECEIVER_FINISHED

FAST = FetchSettings(
    chunk_timeout_s=10, idle_timeout_s=20, backoff_base_s=0.01, backoff_max_s=0.05, max_chunk_bytes=64 << 10
)


@pytest.fixture
def small_server() -> Iterator[tuple[DownloadService, grpc.Channel]]:
    """Only 3 gRPC workers: anything that parks one of them shows up as starvation."""
    service = DownloadService("server", chunk_bytes=64 << 10)
    server, port = serve(service, max_workers=3)
    channel = insecure_channel(f"127.0.0.1:{port}")
    yield service, channel
    channel.close()
    server.stop(grace=None).wait(5)
    service.close()


def test_lesson11_a_blocking_completion_callback_does_not_starve_fetches(
    small_server: tuple[DownloadService, grpc.Channel],
) -> None:
    service, channel = small_server
    gate = threading.Event()
    callback_threads: list[str] = []

    def blocking_listener(event: TransferEvent) -> None:
        if event.kind == RECEIVER_FINISHED:
            callback_threads.append(threading.current_thread().name)
            gate.wait(30)  # e.g. a slow aggregation step hooked on "download finished"

    service.add_listener(blocking_listener)
    model = {"w": np.arange(300_000, dtype=np.float32)}
    receivers = [f"c{i}" for i in range(6)]
    txn = service.publish(model, receivers=receivers, ttl_s=60)
    try:
        # Each fetch_transaction ends with a Complete RPC whose event blocks the listener.
        # Were callbacks run on gRPC workers, the 3 workers would be parked by the 3rd one.
        for r in receivers:
            arrays = Fetcher(GrpcChunkSource(channel, r, chunk_timeout_s=5), FAST).fetch_transaction(txn.refs)
            assert np.array_equal(arrays["w"], model["w"])
        assert txn.wait(5)
        assert callback_threads and all("fedkube-transfer-events" in t for t in callback_threads)
    finally:
        gate.set()


def test_lesson12_a_slow_chunk_for_one_receiver_does_not_delay_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunk production for a slow receiver runs outside the transaction lock: a fast
    receiver of the same transaction finishes while the slow one is mid-chunk."""
    service = DownloadService("server", chunk_bytes=64 << 10)
    server, port = serve(service, max_workers=8)
    channel = insecure_channel(f"127.0.0.1:{port}")
    slow_inside = threading.Event()
    release_slow = threading.Event()
    held: list[str] = []
    real_encode = service_module.encode_chunk

    def encode(offset: int, data: memoryview) -> bytes:
        # Instrumentation, not a stand-in: the real encoder runs. Record any lock held here.
        locks = [service._lock] + [t._lock for t in service.transactions()]
        held.extend(lock.name for lock in locks if lock.held_by_current_thread())
        if threading.current_thread().name.startswith("fedkube-download") and offset == 0 and slow_mode.is_set():
            slow_mode.clear()
            slow_inside.set()
            release_slow.wait(10)
        return real_encode(offset, data)

    slow_mode = threading.Event()
    monkeypatch.setattr(service_module, "encode_chunk", encode)
    try:
        a = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
        txn = service.publish({"a": a}, receivers=["slow", "fast"], ttl_s=60)
        slow_mode.set()
        result: list[bytes] = []
        slow = threading.Thread(
            target=lambda: result.append(
                Fetcher(GrpcChunkSource(channel, "slow", chunk_timeout_s=15), FAST).fetch_into(txn.refs[0]).tobytes()
            )
        )
        slow.start()
        assert slow_inside.wait(5)
        fast = Fetcher(GrpcChunkSource(channel, "fast", chunk_timeout_s=5), FAST).fetch_into(txn.refs[0])
        assert fast.tobytes() == a.tobytes()
        assert txn.progress()["fast"] == a.nbytes and txn.progress()["slow"] <= 64 << 10
        release_slow.set()
        slow.join(10)
        assert result == [a.tobytes()]
        assert held == [], f"chunks were produced while holding {held}"
    finally:
        release_slow.set()
        channel.close()
        server.stop(grace=None).wait(5)
        service.close()


def test_lesson10_the_checked_lock_catches_the_self_deadlock_pattern() -> None:
    """The buggy pattern from the lesson (stop() called under the lock stop() takes) fails fast."""
    lock = CheckedLock("worker state")

    def stop() -> None:
        with lock:
            pass

    def buggy_cleanup() -> None:
        with lock:
            stop()

    started = time.monotonic()
    with pytest.raises(Exception, match="re-entered"):
        buggy_cleanup()
    assert time.monotonic() - started < 5  # raised, did not hang
