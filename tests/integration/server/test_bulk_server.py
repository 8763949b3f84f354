"""The server's bulk port: the same token check as gRPC, refusals with a status and a metric, upload hand-off."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from fedkube.server.app import FedkubeServer
from fedkube.server.reverse import ReverseChunkSource
from fedkube.transfer.bulk import read_status, send_request, send_status
from fedkube.transfer.errors import SourceUnavailableError
from fedkube.transfer.refs import TensorRef, as_bytes, checksum_of
from fedkube.wire.v1 import tensor_pb2
from tests.integration.server.conftest import Harness, dial_bulk, make_config, rejected, token_of

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server(harness: Harness) -> FedkubeServer:
    config = dataclasses.replace(make_config(rounds=1, registration_timeout_s=30.0), bulk_port=0)
    srv = harness.server(config, {"w": np.zeros(16, np.float32)})
    assert srv.bulk_port > 0
    return srv


def _ask(srv: FedkubeServer, request: tensor_pb2.BulkRequest) -> tuple[grpc.StatusCode, str]:
    with dial_bulk(srv, request.site or "site-a") as sock:
        send_request(sock, request)
        return read_status(sock)


def tensor_ref(arr: np.ndarray, *, name: str, source: str, transaction_id: str, ref_id: str) -> TensorRef:
    return TensorRef.for_array(arr, source=source, transaction_id=transaction_id, ref_id=ref_id, name=name,
                               checksum=checksum_of(as_bytes(arr)))


def _rejected(srv: FedkubeServer, reason: str) -> float:
    return rejected(srv, reason)


def _fetch(site: str, token: str) -> tensor_pb2.BulkRequest:
    return tensor_pb2.BulkRequest(
        site=site, token=token, fetch=tensor_pb2.FetchRequest(transaction_id="no-such-tx", ref_id="r0", receiver=site)
    )


def test_bad_token_and_unknown_site_are_refused_and_counted(server: FedkubeServer) -> None:
    before = _rejected(server, "BadToken")
    code, message = _ask(server, _fetch("site-a", "not-the-token"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong token for site 'site-a'" in message
    code, _ = _ask(server, _fetch("site-a", ""))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert _rejected(server, "BadToken") == before + 2
    code, message = _ask(server, _fetch("site-x", token_of("site-a")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not a client of job" in message
    # The right token gets past the check: the server answers about the (unknown) transaction itself.
    code, message = _ask(server, _fetch("site-a", token_of("site-a")))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-tx" in message


def test_upload_answers_reach_only_their_request(server: FedkubeServer) -> None:
    arr = np.arange(8, dtype=np.float32)
    ref = tensor_ref(arr, name="w", source="site-b", transaction_id="r-1", ref_id="w")
    upload = server.broker.open("site-b", ref, window=4)
    try:
        code, message = _ask(server, tensor_pb2.BulkRequest(site="site-a", token=token_of("site-a"),
                                                             upload_id="up-unknown"))
        assert code == grpc.StatusCode.NOT_FOUND and "not outstanding" in message
        wrong = _rejected(server, "WrongSite")
        code, _ = _ask(server, tensor_pb2.BulkRequest(site="site-a", token=token_of("site-a"),
                                                      upload_id=upload.request_id))
        assert code == grpc.StatusCode.PERMISSION_DENIED and _rejected(server, "WrongSite") == wrong + 1
        with dial_bulk(server, "site-b") as sock:
            send_request(sock, tensor_pb2.BulkRequest(site="site-b", token=token_of("site-b"),
                                                      upload_id=upload.request_id))
            assert read_status(sock)[0] == grpc.StatusCode.OK
            # A second answer to the same request is refused while the first holds it.
            code, _ = _ask(server, tensor_pb2.BulkRequest(site="site-b", token=token_of("site-b"),
                                                          upload_id=upload.request_id))
            assert code == grpc.StatusCode.ALREADY_EXISTS
    finally:
        server.broker.close(upload.request_id)


def _reverse_fetch(server: FedkubeServer, error: str = "") -> bytes:
    """Pull a tensor of site-b through ReverseChunkSource.stream_into, answered on the bulk port."""
    arr = np.arange(1000, dtype=np.float32)
    ref = tensor_ref(arr, name="w", source="site-b", transaction_id="r-2", ref_id="w")
    sent: list[object] = []

    def send(site: str, msg: object) -> bool:
        sent.append(msg)
        if getattr(msg, "WhichOneof", lambda _: None)("msg") != "upload":
            return True
        req = msg.upload  # type: ignore[attr-defined]
        sock = dial_bulk(server, "site-b")
        send_request(sock, tensor_pb2.BulkRequest(site="site-b", token=token_of("site-b"), upload_id=req.request_id))
        assert read_status(sock)[0] == grpc.StatusCode.OK
        # What a sidecar pumps up unchanged from its trainer's bulk server: a status, frames, the end.
        if error:
            send_status(sock, grpc.StatusCode.UNAVAILABLE, error)
        else:
            send_status(sock, grpc.StatusCode.OK)
            data = arr.tobytes()[req.offset :]
            for i in range(0, len(data), 1024):
                piece = data[i : i + 1024]
                sock.sendall(len(piece).to_bytes(4, "little") + piece)
            sock.sendall((0).to_bytes(4, "little"))
        sock.close()
        return True

    source = ReverseChunkSource("site-b", server.broker, send, chunk_timeout_s=5.0)
    buf = bytearray(ref.nbytes)
    total = sum(source.stream_into(ref, 0, memoryview(buf)))
    assert total == ref.nbytes and source.bulk_bytes == ref.nbytes and source.pushed_bytes == 0
    assert server.broker.pending() == 0
    return bytes(buf)


def test_reverse_fetch_reads_a_bulk_answer_straight_into_the_buffer(server: FedkubeServer) -> None:
    assert _reverse_fetch(server) == np.arange(1000, dtype=np.float32).tobytes()


def test_reverse_fetch_reports_the_sidecars_error_status(server: FedkubeServer) -> None:
    with pytest.raises(SourceUnavailableError, match="trainer is gone"):
        _reverse_fetch(server, error="the trainer is gone")
