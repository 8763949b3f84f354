"""Fetching over real gRPC on localhost: data, bad input, many receivers."""

from __future__ import annotations

import threading

import grpc
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedkube.transfer import (
    Fetcher,
    FetchSettings,
    GrpcChunkSource,
    InvalidRefError,
    ReceiverNotExpectedError,
    RefNotFoundError,
    TensorRef,
    TransactionExpiredError,
)
from fedkube.transfer.wire import FETCH_METHOD, MAX_CHUNK_BYTES
from fedkube.wire.v1 import tensor_pb2, tensor_pb2_grpc
from tests.integration.transfer.conftest import Publisher

FAST = FetchSettings(chunk_timeout_s=5, idle_timeout_s=10, backoff_base_s=0.01, backoff_max_s=0.05)


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((64, 3, 7, 7)).astype(np.float32),
        "fc.weight": rng.standard_normal((300, 513)).astype(ml_dtypes.bfloat16),
        "fc.bias": rng.standard_normal(513).astype(np.float16),
        "embed": rng.integers(-(2**62), 2**62, size=(1000, 17), dtype=np.int64),
        "mask": rng.integers(0, 2, size=(77,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 5), dtype=np.int8),
        "transposed": rng.standard_normal((40, 30)).astype(np.float32).T,
    }


def test_fetch_transaction_round_trips_every_tensor_bit_exactly(publisher: Publisher, channel: grpc.Channel) -> None:
    model = _model()
    txn = publisher.service.publish(model, receivers=["site-a"], ttl_s=60)
    wire_refs = [tensor_pb2.TensorRef.FromString(r.to_proto().SerializeToString()) for r in txn.refs]
    refs = [TensorRef.from_proto(m) for m in wire_refs]
    seen: dict[str, int] = {}
    fetcher = Fetcher(GrpcChunkSource(channel, "site-a", chunk_timeout_s=5), FAST)
    arrays = fetcher.fetch_transaction(refs, progress=lambda name, done: seen.__setitem__(name, done))
    for name, original in model.items():
        got = arrays[name]
        assert got.dtype == original.dtype and got.shape == original.shape, name
        assert got.tobytes() == np.ascontiguousarray(original).tobytes(), name
    assert seen["fc.weight"] == model["fc.weight"].nbytes
    assert txn.wait(5) and txn.released and txn.done_receivers == {"site-a"}


def test_fetch_into_a_preallocated_array(publisher: Publisher, channel: grpc.Channel) -> None:
    a = np.arange(100_000, dtype=np.float32)
    txn = publisher.service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    out = np.empty_like(a)
    fetcher = Fetcher(GrpcChunkSource(channel, "c1", chunk_timeout_s=5), FAST)
    assert fetcher.fetch_array(txn.refs[0], out) is out
    assert np.array_equal(out, a)
    with pytest.raises(Exception, match="output array is float64"):
        fetcher.fetch_array(txn.refs[0], np.empty(100_000, dtype=np.float64))
    with pytest.raises(Exception, match="read-only"):
        fetcher.fetch_into(txn.refs[0], bytes(a.nbytes))


def test_generated_stub_parses_the_chunks_we_send(publisher: Publisher, channel: grpc.Channel) -> None:
    a = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8)
    txn = publisher.service.publish({"a": a}, receivers=["c1"], ttl_s=60)
    stub = tensor_pb2_grpc.DownloadStub(channel)
    got = bytearray()
    for chunk in stub.Fetch(tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="c1", offset=7)):
        assert chunk.offset == 7 + len(got)
        got += chunk.data
    assert bytes(got) == a.tobytes()[7:]
    stub.Complete(tensor_pb2.CompleteRequest(transaction_id=txn.id, receiver="c1", ok=True))
    assert txn.wait(5)


def test_eight_concurrent_receivers_of_one_transaction(publisher: Publisher, channel: grpc.Channel) -> None:
    model = _model(1)
    receivers = [f"site-{i}" for i in range(8)]
    txn = publisher.service.publish(model, receivers=receivers, ttl_s=60)
    results: dict[str, dict[str, np.ndarray]] = {}
    errors: list[BaseException] = []

    def receive(name: str) -> None:
        try:
            results[name] = Fetcher(GrpcChunkSource(channel, name, chunk_timeout_s=5), FAST).fetch_transaction(txn.refs)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(r,)) for r in receivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert txn.wait(5) and txn.done_receivers == set(receivers)
    for r in receivers:
        for name, original in model.items():
            assert results[r][name].tobytes() == np.ascontiguousarray(original).tobytes()
    # Served once per receiver from the same buffers, no retries needed.
    assert txn.progress() == dict.fromkeys(receivers, txn.nbytes)


def _fetch_raw(channel: grpc.Channel, request: tensor_pb2.FetchRequest) -> grpc.RpcError:
    call = channel.unary_stream(FETCH_METHOD, request_serializer=tensor_pb2.FetchRequest.SerializeToString)
    with pytest.raises(grpc.RpcError) as info:
        list(call(request, timeout=5))
    return info.value


def test_bad_requests_get_specific_status_codes_and_others_keep_being_served(
    publisher: Publisher, channel: grpc.Channel
) -> None:
    a = np.arange(200_000, dtype=np.uint8)
    txn = publisher.service.publish({"a": a}, receivers=["good", "c2"], ttl_s=60)
    gone = publisher.service.publish({"a": a}, receivers=["c2"], ttl_s=60)
    publisher.service.release(gone.id)
    fetcher = Fetcher(GrpcChunkSource(channel, "good", chunk_timeout_s=5), FAST)
    big = MAX_CHUNK_BYTES + 1
    nf, fp, oor, pd, ia = (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    cases: list[tuple[dict[str, object], grpc.StatusCode, str]] = [
        ({"transaction_id": "unknown-tx", "ref_id": "t0", "receiver": "c2"}, nf, "unknown transaction"),
        ({"transaction_id": txn.id, "ref_id": "t9", "receiver": "c2"}, nf, "unknown ref"),
        ({"transaction_id": gone.id, "ref_id": "t0", "receiver": "c2"}, fp, "released"),
        ({"transaction_id": txn.id, "ref_id": "t0", "receiver": "c2", "offset": 200_001}, oor, "beyond"),
        ({"transaction_id": txn.id, "ref_id": "t0", "receiver": "eve"}, pd, "not an expected"),
        ({"transaction_id": txn.id, "ref_id": "t0", "receiver": "c2", "max_chunk_bytes": big}, ia, "max_chunk"),
        ({"transaction_id": "../etc", "ref_id": "t0", "receiver": "c2"}, ia, "not a valid id"),
    ]
    for kwargs, code, fragment in cases:
        err = _fetch_raw(channel, tensor_pb2.FetchRequest(**kwargs))  # type: ignore[arg-type]
        assert err.code() == code, (kwargs, err.details())
        details = err.details() or ""
        assert fragment in details
        assert f"transaction {kwargs['transaction_id']!r}" in details and f"receiver {kwargs['receiver']!r}" in details
        # The good receiver is served between every bad request.
        assert fetcher.fetch_into(txn.refs[0]).tobytes() == a.tobytes()


def test_client_errors_are_classified_and_not_retried(publisher: Publisher, channel: grpc.Channel) -> None:
    txn = publisher.service.publish({"a": np.zeros(10)}, receivers=["c1"], ttl_s=60)
    intruder = Fetcher(GrpcChunkSource(channel, "eve", chunk_timeout_s=5), FAST)
    with pytest.raises(ReceiverNotExpectedError, match="PERMISSION_DENIED"):
        intruder.fetch_into(txn.refs[0])
    assert intruder.attempts == 1
    publisher.service.release(txn.id)
    late = Fetcher(GrpcChunkSource(channel, "c1", chunk_timeout_s=5), FAST)
    with pytest.raises(TransactionExpiredError):
        late.fetch_into(txn.refs[0])
    bogus = TensorRef(**{**txn.refs[0].__dict__, "transaction_id": "never-published"})
    with pytest.raises(RefNotFoundError):
        late.fetch_into(bogus)
    assert late.attempts == 2


def test_oversized_request_is_rejected_and_the_server_keeps_serving(
    publisher: Publisher, channel: grpc.Channel
) -> None:
    txn = publisher.service.publish({"a": np.ones(1000)}, receivers=["c1"], ttl_s=60)
    err = _fetch_raw(channel, tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="x" * (2 << 20)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fetcher = Fetcher(GrpcChunkSource(channel, "c1", chunk_timeout_s=5), FAST)
    assert np.array_equal(fetcher.fetch_array(txn.refs[0]), np.ones(1000))


_ids = st.one_of(st.text(max_size=20), st.sampled_from(["t0", "c1", "tx-live"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tid=_ids,
    ref_id=_ids,
    receiver=_ids,
    offset=st.integers(0, 2**64 - 1),
    max_chunk=st.integers(0, 2**32 - 1),
)
def test_fuzz_fetch_requests_over_grpc(
    publisher: Publisher, channel: grpc.Channel, tid: str, ref_id: str, receiver: str, offset: int, max_chunk: int
) -> None:
    data = np.arange(1000, dtype=np.uint8)
    if publisher.service.transaction("tx-live") is None:
        publisher.service.publish({"a": data}, receivers=["c1"], ttl_s=600, transaction_id="tx-live")
    request = tensor_pb2.FetchRequest(
        transaction_id=tid, ref_id=ref_id, receiver=receiver, offset=offset, max_chunk_bytes=max_chunk
    )
    call = channel.unary_stream(FETCH_METHOD, request_serializer=tensor_pb2.FetchRequest.SerializeToString)
    try:
        got = b"".join(tensor_pb2.Chunk.FromString(raw).data for raw in call(request, timeout=5))
    except grpc.RpcError as exc:
        assert exc.code() in {
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.INVALID_ARGUMENT,
        }, exc
        return
    assert (tid, ref_id, receiver) == ("tx-live", "t0", "c1") and offset <= 1000
    assert got == data.tobytes()[offset:]


@pytest.mark.parametrize(("shape", "fragment"), [((2000,), "ends at byte 4000"), ((500,), "longer than the reference")])
def test_a_ref_inconsistent_with_the_published_tensor_fails_without_retrying(
    publisher: Publisher, channel: grpc.Channel, shape: tuple[int, ...], fragment: str
) -> None:
    txn = publisher.service.publish({"a": np.arange(1000, dtype=np.float32)}, receivers=["c1"], ttl_s=60)
    real = txn.refs[0]
    forged = TensorRef(**{**real.__dict__, "shape": shape, "nbytes": shape[0] * 4})
    fetcher = Fetcher(GrpcChunkSource(channel, "c1", chunk_timeout_s=5), FAST)
    with pytest.raises(InvalidRefError, match=fragment) as info:
        fetcher.fetch_into(forged)
    assert f"transaction {txn.id!r}, ref 't0', receiver 'c1'" in str(info.value)
    assert fetcher.attempts == 1
