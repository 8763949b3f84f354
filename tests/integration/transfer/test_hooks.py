"""The transports' public byte hooks: what a meter sees, without subclassing or reaching into a relay."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from fedkube.transfer import (
    DownloadService,
    Fetcher,
    FetchSettings,
    GrpcChunkSource,
    RelayServicer,
    handoff,
    serve,
)
from fedkube.transfer.bulk import BulkChunkSource, BulkHandoff, BulkRelay, BulkServer
from fedkube.transfer.handoff import REPORT_BYTES
from fedkube.transfer.wire import relay_channel_options, server_options
from tests.support.waiting import until

FAST = FetchSettings(chunk_timeout_s=5.0, idle_timeout_s=10.0, max_attempts=2, backoff_base_s=0.02, backoff_max_s=0.1)


@pytest.fixture
def service() -> Iterator[DownloadService]:
    svc = DownloadService("server")
    yield svc
    svc.close()


def test_bulk_relay_reports_bytes_per_piece_and_its_buffer_while_held(service: DownloadService) -> None:
    w = np.arange(600_000, dtype=np.float32)
    txn = service.publish({"w": w}, receivers=["site-a"], ttl_s=30)
    srv = BulkServer(service, frame_bytes=256 << 10).start()
    moved: list[int] = []
    held: list[int] = []
    relay = BulkRelay(srv.address, site="site-a", token="", buffer_bytes=64 << 10, on_bytes=moved.append,
                      on_buffer=held.append).start()
    try:
        out = Fetcher(BulkChunkSource(relay.address, "site-a", chunk_timeout_s=5), FAST).fetch_into(txn.refs[0])
        assert out.tobytes() == w.tobytes()
        # Every byte of the answer (frames and their headers) reached the hook, in pieces of at most one buffer.
        # The hook runs after a piece is sent on, so the last pieces may be counted after the fetch returned.
        until(lambda: sum(moved) >= w.nbytes, "the relay counted every byte it moved", timeout=10)
        assert max(moved) <= 64 << 10
        # The buffer counted while the answer was pumped, and released after: held is a gauge, not a sum.
        # The relay's pump ends on its own thread once the server closed, possibly after the fetch returned.
        until(lambda: held[-1] == 0 and relay.buffer_bytes_in_use == 0, "the relay released its buffer", timeout=10)
        assert held[0] == 64 << 10
    finally:
        relay.stop()
        srv.stop()


@pytest.mark.skipif(not handoff.AVAILABLE, reason="Linux only")
def test_bulk_handoff_reports_what_the_trainer_read_in_batches(service: DownloadService) -> None:
    w = np.zeros(20 << 20, dtype=np.uint8)  # 20 MiB in 4 MiB frames: under one reporting batch
    txn = service.publish({"w": w}, receivers=["site-a"], ttl_s=30)
    srv = BulkServer(service).start()
    moved: list[int] = []
    held: list[int] = []
    sidecar = BulkHandoff(srv.address, site="site-a", token="", on_bytes=moved.append, on_buffer=held.append).start()
    try:
        Fetcher(BulkChunkSource(sidecar.address, "site-a", chunk_timeout_s=5), FAST).fetch_into(txn.refs[0])
        deadline = time.monotonic() + 5
        while sum(moved) < w.nbytes and time.monotonic() < deadline:  # the last batch arrives as the trainer closes
            time.sleep(0.01)
        assert sum(moved) == w.nbytes
        # Batched (32 MiB or 0.5 s), not one call per 4 MiB frame; and no buffer is ever held here.
        assert len(moved) <= 1 + w.nbytes // REPORT_BYTES + 2
        assert held == []
    finally:
        sidecar.stop()
        srv.stop()


class _Hook:
    """A StreamHook that counts."""

    def __init__(self) -> None:
        self.nread = 0
        self.nsent = 0
        self.closed = threading.Event()

    def read(self, nbytes: int) -> None:
        self.nread += nbytes  # one relay reader thread per stream

    def sent(self, nbytes: int) -> None:
        self.nsent += nbytes  # the handler's thread

    def close(self) -> None:
        self.closed.set()


def test_grpc_relay_gives_each_fetch_its_stream_hook(service: DownloadService) -> None:
    w = np.arange(300_000, dtype=np.float32)
    txn = service.publish({"w": w}, receivers=["site-a"], ttl_s=30)
    upstream_server, upstream_port = serve(service, "127.0.0.1:0")
    upstream = grpc.insecure_channel(f"127.0.0.1:{upstream_port}", options=relay_channel_options())
    hooks: list[_Hook] = []

    def on_stream() -> _Hook:
        hooks.append(_Hook())
        return hooks[-1]

    relay_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options())
    RelayServicer(upstream, window_chunks=2, on_stream=on_stream).add_to_server(relay_server)
    port = relay_server.add_insecure_port("127.0.0.1:0")
    relay_server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=relay_channel_options())
    try:
        out = Fetcher(GrpcChunkSource(channel, "site-a", chunk_timeout_s=5), FAST).fetch_into(txn.refs[0])
        assert out.tobytes() == w.tobytes()
        assert len(hooks) == 1
        hook = hooks[0]
        assert hook.closed.wait(5)
        # Whole chunk messages (payload and framing) went through the window and out.
        assert hook.nread == hook.nsent and hook.nsent > w.nbytes
    finally:
        channel.close()
        relay_server.stop(0)
        upstream.close()
        upstream_server.stop(0)
