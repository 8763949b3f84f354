"""The relay over real gRPC: publisher <- relay <- receiver (the sidecar's forward path)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from fedkube.transfer import (
    Fetcher,
    FetchSettings,
    GrpcChunkSource,
    ReceiverNotExpectedError,
    RefNotFoundError,
    RelayServicer,
    insecure_channel,
)
from fedkube.transfer.wire import FETCH_METHOD, relay_channel_options, server_options
from fedkube.wire.v1 import tensor_pb2
from tests.integration.transfer.conftest import Publisher
from tests.integration.transfer.helpers import Faults, FaultyServicer, start_server

CHUNK = 64 << 10
FAST = FetchSettings(chunk_timeout_s=5, idle_timeout_s=10, backoff_base_s=0.01, backoff_max_s=0.05)


def _relay(upstream_address: str, window: int = 4) -> tuple[grpc.Server, grpc.Channel, grpc.Channel]:
    upstream = grpc.insecure_channel(upstream_address, options=relay_channel_options())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=server_options())
    RelayServicer(upstream, window_chunks=window).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, upstream, insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
def relay(publisher: Publisher) -> Iterator[grpc.Channel]:
    server, upstream, downstream = _relay(publisher.address)
    yield downstream
    downstream.close()
    server.stop(grace=None).wait(5)
    upstream.close()


def _settled_progress(txn: object, receiver: str, timeout: float = 10, quiet_s: float = 1.0) -> int:
    """Bytes served once the publisher stopped producing for ``quiet_s`` (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = txn.progress()[receiver]  # type: ignore[attr-defined]
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = txn.progress()[receiver]  # type: ignore[attr-defined]
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            break
    return last


def test_fetch_through_the_relay_and_complete_is_forwarded(publisher: Publisher, relay: grpc.Channel) -> None:
    rng = np.random.default_rng(0)
    model: dict[str, np.ndarray] = {
        "w": rng.standard_normal((512, 300)).astype(np.float32),
        "b": rng.standard_normal(300),
    }
    txn = publisher.service.publish(model, receivers=["site-a"], ttl_s=60)
    arrays = Fetcher(GrpcChunkSource(relay, "site-a", chunk_timeout_s=5), FAST).fetch_transaction(txn.refs)
    for name, original in model.items():
        assert np.array_equal(arrays[name], original)
    assert txn.wait(5) and txn.done_receivers == {"site-a"}


def test_errors_pass_through_with_their_status(publisher: Publisher, relay: grpc.Channel) -> None:
    txn = publisher.service.publish({"w": np.zeros(10)}, receivers=["site-a"], ttl_s=60)
    with pytest.raises(ReceiverNotExpectedError, match=r"PERMISSION_DENIED.*not an expected receiver"):
        Fetcher(GrpcChunkSource(relay, "eve", chunk_timeout_s=5), FAST).fetch_into(txn.refs[0])
    with pytest.raises(RefNotFoundError, match="NOT_FOUND"):
        GrpcChunkSource(relay, "site-a", chunk_timeout_s=5).complete("no-such-tx", ok=True)


def test_lesson4_a_slow_downstream_slows_the_upstream(publisher: Publisher, relay: grpc.Channel) -> None:
    """The relay holds a bounded window: while the receiver reads nothing, the publisher
    stops producing after a bounded amount (window + transport buffers), not the whole tensor."""
    size = 48 << 20
    txn = publisher.service.publish({"w": np.zeros(size, dtype=np.uint8)}, receivers=["c1"], ttl_s=60)
    fetch = relay.unary_stream(FETCH_METHOD, request_serializer=tensor_pb2.FetchRequest.SerializeToString)
    call = fetch(tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="c1", max_chunk_bytes=CHUNK))
    next(call)
    stalled_at = _settled_progress(txn, "c1")
    assert stalled_at < size // 2, f"publisher produced {stalled_at} of {size} bytes for a paused receiver"
    received = CHUNK + sum(tensor_pb2.Chunk.FromString(raw).data.__len__() for raw in call)
    assert received == size


def test_cancel_propagates_from_downstream_to_upstream(publisher: Publisher, relay: grpc.Channel) -> None:
    size = 48 << 20
    txn = publisher.service.publish({"w": np.zeros(size, dtype=np.uint8)}, receivers=["c1"], ttl_s=60)
    fetch = relay.unary_stream(FETCH_METHOD, request_serializer=tensor_pb2.FetchRequest.SerializeToString)
    call = fetch(tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="c1", max_chunk_bytes=CHUNK))
    next(call)
    call.cancel()
    stopped_at = _settled_progress(txn, "c1")
    time.sleep(0.5)
    assert txn.progress()["c1"] == stopped_at < size


def test_cancel_propagates_from_upstream_to_downstream() -> None:
    """The publisher drops the stream: the relay ends the downstream call with the same status,
    and the fetcher behind the relay resumes through it."""
    from fedkube.transfer import DownloadService

    service = DownloadService("server", chunk_bytes=CHUNK)
    server, port = start_server(FaultyServicer(service, Faults(drop_calls=2, drop_after=3)))
    relay_server, upstream, downstream = _relay(f"127.0.0.1:{port}")
    try:
        a = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
        txn = service.publish({"a": a}, receivers=["c1"], ttl_s=60)
        fetch = downstream.unary_stream(FETCH_METHOD, request_serializer=tensor_pb2.FetchRequest.SerializeToString)
        with pytest.raises(grpc.RpcError) as info:
            list(fetch(tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="c1")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "injected fault" in (info.value.details() or "")
        settings = FetchSettings(
            chunk_timeout_s=5, idle_timeout_s=10, backoff_base_s=0.01, backoff_max_s=0.05, max_chunk_bytes=CHUNK
        )
        fetcher = Fetcher(GrpcChunkSource(downstream, "c1", chunk_timeout_s=5), settings)
        assert fetcher.fetch_into(txn.refs[0]).tobytes() == a.tobytes()
        assert fetcher.attempts == 2
    finally:
        downstream.close()
        relay_server.stop(grace=None).wait(5)
        upstream.close()
        server.stop(grace=None).wait(5)
        service.close()
