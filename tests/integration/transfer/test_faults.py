"""Fault tolerance over real gRPC: broken streams resume, corruption is refetched,
stalls time out on idleness (not on total duration), abort is prompt."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from fedkube.transfer import (
    ChecksumMismatchError,
    DownloadService,
    Fetcher,
    FetchSettings,
    GrpcChunkSource,
    TransferAbortedError,
    TransferStalledError,
    insecure_channel,
)
from fedkube.transfer.wire import add_download_servicer, server_options
from tests.integration.transfer.helpers import CuttingProxy, Faults, FaultyServicer, start_server

CHUNK = 64 << 10
FAST = FetchSettings(
    chunk_timeout_s=5, idle_timeout_s=10, backoff_base_s=0.01, backoff_max_s=0.05, max_chunk_bytes=CHUNK
)


class Rig:
    def __init__(self, faults: Faults, *, chunk_timeout_s: float = 5) -> None:
        self.service = DownloadService("server", chunk_bytes=CHUNK)
        self.faults = faults
        self.server, self.port = start_server(FaultyServicer(self.service, faults))
        self.channel = insecure_channel(f"127.0.0.1:{self.port}")
        self.chunk_timeout_s = chunk_timeout_s

    def source(self, receiver: str = "c1") -> GrpcChunkSource:
        return GrpcChunkSource(self.channel, receiver, chunk_timeout_s=self.chunk_timeout_s)

    def close(self) -> None:
        self.faults.unstall.set()
        self.channel.close()
        self.server.stop(grace=None).wait(5)
        self.service.close()


def _rig(request: pytest.FixtureRequest, faults: Faults, **kwargs: float) -> Rig:
    rig = Rig(faults, **kwargs)
    request.addfinalizer(rig.close)
    return rig


def _tensor(nbytes: int = 1 << 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def test_resume_after_the_server_drops_the_stream_mid_tensor(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(drop_calls=3, drop_after=4))
    a = _tensor()
    txn = rig.service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    done: list[int] = []
    fetcher = Fetcher(rig.source(), FAST)
    out = fetcher.fetch_into(txn.refs[0], progress=done.append)
    assert out.tobytes() == a.tobytes()
    assert fetcher.attempts == 4  # three drops, then the rest
    # Resumed, not restarted: progress never went backwards, and the publisher sent
    # each byte once (4 chunks per dropped call were delivered and kept).
    assert done == sorted(done) and done[-1] == a.nbytes
    assert txn.progress()["c1"] <= a.nbytes + 3 * CHUNK


def test_resume_after_the_tcp_connection_is_cut(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults())
    a = _tensor(2 << 20, seed=1)
    txn = rig.service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    proxy = CuttingProxy(rig.port, cut_after=700_000, cuts=2)
    request.addfinalizer(proxy.close)
    channel = insecure_channel(f"127.0.0.1:{proxy.port}")
    request.addfinalizer(channel.close)
    fetcher = Fetcher(GrpcChunkSource(channel, "c1", chunk_timeout_s=5), FAST)
    assert fetcher.fetch_into(txn.refs[0]).tobytes() == a.tobytes()
    assert fetcher.attempts >= 2


def test_lesson6_retries_reuse_the_same_transaction_and_bytes(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(drop_calls=2, drop_after=1, corrupt_calls=3))
    a = _tensor(300_000, seed=2)
    txn = rig.service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    published_view = txn._views["t0"]
    fetcher = Fetcher(rig.source(), FAST)
    arrays = fetcher.fetch_transaction(txn.refs)
    assert arrays["a"].tobytes() == a.tobytes()
    assert fetcher.attempts > 3
    # One transaction for all attempts, served from the caller's array, released once, at the end.
    assert rig.service.transactions() == [] and txn.released and txn.release_reason == "completed"
    assert np.shares_memory(np.frombuffer(published_view, dtype=np.uint8), a)
    assert txn.progress()["c1"] > a.nbytes  # resent bytes came from the same buffer


def test_checksum_corruption_is_detected_and_refetched(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(corrupt_calls=1))
    a = _tensor(500_000, seed=3)
    txn = rig.service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    progress: list[int] = []
    fetcher = Fetcher(rig.source(), FAST)
    assert fetcher.fetch_into(txn.refs[0], progress=progress.append).tobytes() == a.tobytes()
    assert fetcher.attempts == 2
    assert progress.count(0) == 1  # the refetch restarted from 0 and said so
    assert txn.progress()["c1"] == 2 * a.nbytes


def test_persistent_corruption_fails_and_the_publisher_is_told(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(corrupt_calls=100))
    txn = rig.service.publish({"a": _tensor(100_000)}, receivers=["c1"], ttl_s=60)
    fetcher = Fetcher(rig.source(), FAST)
    with pytest.raises(ChecksumMismatchError, match=rf"transaction '{txn.id}', ref 't0', receiver 'c1': checksum"):
        fetcher.fetch_transaction(txn.refs)
    assert fetcher.attempts == 1 + FAST.max_checksum_retries
    assert txn.wait(5) is True
    assert "checksum" in txn.failed_receivers["c1"]


def test_a_stalled_chunk_times_out_and_the_fetch_resumes(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(stall_calls=1, stall_after=3), chunk_timeout_s=0.3)
    a = _tensor(600_000, seed=4)
    txn = rig.service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    settings = FetchSettings(
        chunk_timeout_s=0.3, idle_timeout_s=5, backoff_base_s=0.01, backoff_max_s=0.05, max_chunk_bytes=CHUNK
    )
    fetcher = Fetcher(rig.source(), settings)
    assert fetcher.fetch_into(txn.refs[0]).tobytes() == a.tobytes()
    # At least the stalled stream was cancelled and resumed (a loaded machine may time out more chunks).
    assert fetcher.attempts >= 2


def test_no_progress_fails_after_the_idle_timeout(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(stall_calls=1000, stall_after=0), chunk_timeout_s=0.2)
    txn = rig.service.publish({"a": _tensor(300_000)}, receivers=["c1"], ttl_s=60)
    settings = FetchSettings(
        chunk_timeout_s=0.2, idle_timeout_s=1.0, backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=1000
    )
    fetcher = Fetcher(rig.source(), settings)
    with pytest.raises(TransferStalledError, match=r"no progress for .*idle timeout 1\.0s"):
        fetcher.fetch_into(txn.refs[0])
    assert fetcher.attempts >= 3


def test_consecutive_failures_without_progress_are_bounded(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(drop_calls=1000, drop_after=0))
    txn = rig.service.publish({"a": _tensor(300_000)}, receivers=["c1"], ttl_s=60)
    fetcher = Fetcher(rig.source(), FetchSettings(**{**FAST.__dict__, "max_attempts": 4}))
    with pytest.raises(TransferStalledError, match="gave up after 4 attempts without progress"):
        fetcher.fetch_into(txn.refs[0])
    assert fetcher.attempts == 4


class _SlowSource:
    """A ChunkSource (the protocol the server's reverse path implements too) that
    makes slow but steady progress and breaks often."""

    receiver = "c1"

    def __init__(self, data: bytes, delay_s: float, break_every: int) -> None:
        self.data = data
        self.delay_s = delay_s
        self.break_every = break_every
        self.completed: list[tuple[str, bool]] = []

    def stream(self, ref: object, offset: int, max_chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
        from fedkube.transfer import StreamBrokenError

        for n, pos in enumerate(range(offset, len(self.data), 1000)):
            if n == self.break_every:
                raise StreamBrokenError("flaky link")
            time.sleep(self.delay_s)
            yield pos, self.data[pos : pos + 1000]

    def complete(self, transaction_id: str, ok: bool, error: str = "") -> None:
        self.completed.append((transaction_id, ok))


def test_lesson3_a_slow_transfer_outlives_the_idle_timeout_while_bytes_move() -> None:
    """Total duration well above idle_timeout and above max_attempts breaks: still succeeds."""
    from fedkube.transfer import TensorRef, checksum_of

    data = _tensor(40_000, seed=5).tobytes()
    ref = TensorRef("site", "tx", "t0", "a", "uint8", (len(data),), len(data), checksum_of(data))
    source = _SlowSource(data, delay_s=0.01, break_every=3)
    settings = FetchSettings(
        chunk_timeout_s=0.1, idle_timeout_s=0.2, max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02
    )
    fetcher = Fetcher(source, settings)
    start = time.monotonic()
    assert fetcher.fetch_into(ref).tobytes() == data
    assert time.monotonic() - start > settings.idle_timeout_s  # longer than the idle timeout, and fine
    assert fetcher.attempts > settings.max_attempts


def test_abort_stops_a_blocked_fetch_promptly(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(stall_calls=1, stall_after=2), chunk_timeout_s=30)
    txn = rig.service.publish({"a": _tensor(600_000)}, receivers=["c1"], ttl_s=60)
    abort = threading.Event()
    settings = FetchSettings(chunk_timeout_s=30, idle_timeout_s=60, max_chunk_bytes=CHUNK)
    fetcher = Fetcher(rig.source(), settings, abort=abort)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fetcher.fetch_into(txn.refs[0])
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 5
    while txn.progress()["c1"] < 2 * CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)
    abort.set()
    t.join(5)  # far below the 30 s chunk timeout: the abort cancelled the call
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], TransferAbortedError)
    assert "receiver 'c1'" in str(errors[0])


def test_abort_during_backoff(request: pytest.FixtureRequest) -> None:
    rig = _rig(request, Faults(drop_calls=1000, drop_after=0))
    txn = rig.service.publish({"a": _tensor(100_000)}, receivers=["c1"], ttl_s=60)
    abort = threading.Event()
    settings = FetchSettings(chunk_timeout_s=5, idle_timeout_s=100, backoff_base_s=20, backoff_max_s=30)
    fetcher = Fetcher(rig.source(), settings, abort=abort)
    threading.Timer(0.3, abort.set).start()
    with pytest.raises(TransferAbortedError):
        fetcher.fetch_into(txn.refs[0])
    assert fetcher.attempts == 1


def test_unreachable_source_is_retried_then_reported(request: pytest.FixtureRequest) -> None:
    channel = insecure_channel("127.0.0.1:1")
    request.addfinalizer(channel.close)
    from fedkube.transfer import TensorRef, checksum_of

    ref = TensorRef("server", "tx", "t0", "a", "uint8", (3,), 3, checksum_of(b"abc"))
    settings = FetchSettings(
        chunk_timeout_s=1, idle_timeout_s=5, max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02
    )
    fetcher = Fetcher(GrpcChunkSource(channel, "c1", chunk_timeout_s=1), settings)
    with pytest.raises(TransferStalledError, match="UNAVAILABLE"):
        fetcher.fetch_into(ref)
    assert fetcher.attempts == 3


def test_server_restart_mid_transfer_resumes_on_the_same_port(request: pytest.FixtureRequest) -> None:
    """The publisher's gRPC server goes away and comes back (same service, same transaction)."""
    service = DownloadService("server", chunk_bytes=CHUNK)
    request.addfinalizer(service.close)
    faults = Faults(stall_calls=1, stall_after=3)
    server, port = start_server(FaultyServicer(service, faults))
    a = _tensor(1 << 20, seed=6)
    txn = service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    channel = insecure_channel(f"127.0.0.1:{port}")
    request.addfinalizer(channel.close)
    settings = FetchSettings(
        chunk_timeout_s=2, idle_timeout_s=10, backoff_base_s=0.05, backoff_max_s=0.2, max_chunk_bytes=CHUNK
    )
    fetcher = Fetcher(GrpcChunkSource(channel, "c1", chunk_timeout_s=2), settings)
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(fetcher.fetch_into(txn.refs[0]).tobytes()))
    t.start()
    deadline = time.monotonic() + 5
    while txn.progress()["c1"] < 3 * CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop(grace=None).wait(5)
    faults.unstall.set()
    server2 = grpc.server(futures.ThreadPoolExecutor(8), options=server_options())
    add_download_servicer(server2, service.servicer())
    assert server2.add_insecure_port(f"127.0.0.1:{port}") == port
    server2.start()
    request.addfinalizer(lambda: server2.stop(grace=None).wait(5))
    t.join(30)
    assert result and result[0] == a.tobytes()
    assert fetcher.attempts >= 2
