"""Handing the connected bulk socket to the trainer (SCM_RIGHTS over abstract Unix sockets), both ways.

Real sockets on localhost: a real BulkServer as the server, the sidecar's
BulkHandoff and push_upload, the trainer's BulkHandoffServer. The bytes never
pass through the sidecar, yet it still stamps the identity, refuses a
foreign receiver, counts every byte, and can abort an upload it handed over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedkube.transfer import (
    DownloadService,
    Fetcher,
    FetchSettings,
    ReceiverNotExpectedError,
    SourceUnavailableError,
    TransferAbortedError,
    handoff,
)
from fedkube.transfer.bulk import (
    BulkChunkSource,
    BulkHandoff,
    BulkHandoffServer,
    BulkServer,
    push_upload,
    send_request,
)
from fedkube.wire.v1 import tensor_pb2
from tests.integration.transfer.helpers import Uploads

pytestmark = [
    pytest.mark.skipif(not handoff.AVAILABLE, reason="socket handoff needs Linux (abstract sockets, SCM_RIGHTS)"),
    pytest.mark.timeout(60),
]

FAST = FetchSettings(chunk_timeout_s=2.0, idle_timeout_s=6.0, max_attempts=4, backoff_base_s=0.02, backoff_max_s=0.1)


@pytest.fixture
def service() -> Iterator[DownloadService]:
    svc = DownloadService("server")
    yield svc
    svc.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_for(check: object, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(check())  # type: ignore[operator]


def test_a_fetch_reads_the_servers_socket_and_the_sidecar_counts_every_frame(service: DownloadService) -> None:
    seen: list[tuple[str, str]] = []

    def authorize(site: str, token: str, receiver: str | None) -> tuple[grpc.StatusCode | None, str]:
        seen.append((site, token))
        return (None, "") if (site, token) == ("site-a", "tok-a") else (grpc.StatusCode.UNAUTHENTICATED, "bad")

    srv = BulkServer(service, authorize=authorize, frame_bytes=128 << 10).start()
    counted: list[int] = []
    sidecar = BulkHandoff(srv.address, site="site-a", token="tok-a", on_bytes=counted.append).start()
    try:
        w = np.random.default_rng(1).standard_normal(400_000).astype(np.float32)  # 1.6 MB: 13 frames
        txn = service.publish({"w": w, "i": np.arange(3)}, receivers=["site-a"], ttl_s=30)
        source = BulkChunkSource(sidecar.address, "site-a", chunk_timeout_s=2)  # no token: the trainer holds none
        got = Fetcher(source, FAST).fetch_transaction(txn.refs)
        np.testing.assert_array_equal(got["w"], w)
        np.testing.assert_array_equal(got["i"], np.arange(3))
        assert txn.done_receivers == {"site-a"}  # completion went through the handoff too
        assert sidecar.handed == 3 and seen == [("site-a", "tok-a")] * 3
        assert _wait_for(lambda: sum(counted) == w.nbytes + 3 * 8)  # every data byte, no framing
        assert sidecar.buffer_bytes_in_use == 0
        assert srv.bytes_sent == w.nbytes + 3 * 8  # the server's own bytes: the same ones, sent once
    finally:
        sidecar.stop()
        srv.stop()


def test_a_foreign_receiver_is_refused_with_a_status_and_no_socket(service: DownloadService) -> None:
    srv = BulkServer(service).start()
    sidecar = BulkHandoff(srv.address, site="site-a", token="t").start()
    try:
        txn = service.publish({"w": np.ones(8, np.float32)}, receivers=["site-a", "site-b"], ttl_s=30)
        before = _open_fds()
        with pytest.raises(ReceiverNotExpectedError, match="not this pod's site"):
            Fetcher(BulkChunkSource(sidecar.address, "site-b", chunk_timeout_s=2), FAST).fetch_into(txn.refs[0])
        assert sidecar.handed == 0
        assert _wait_for(lambda: _open_fds() <= before)  # nothing leaked on the refused path
    finally:
        sidecar.stop()
        srv.stop()


def test_no_sidecar_listening_is_a_retryable_unavailable() -> None:
    svc = DownloadService("x")
    try:
        txn = svc.publish({"w": np.ones(8, np.float32)}, receivers=["a"], ttl_s=30)
        with pytest.raises(SourceUnavailableError, match="no connection handed over") as info:
            BulkChunkSource(handoff.new_name("nobody"), "a", chunk_timeout_s=2).stream_into(
                txn.refs[0], 0, memoryview(bytearray(32))
            )
        assert info.value.retryable
    finally:
        svc.close()


@pytest.fixture
def trainer() -> Iterator[tuple[DownloadService, BulkServer, BulkHandoffServer]]:
    svc = DownloadService("site-a")
    results = BulkServer(svc, frame_bytes=64 << 10).start()
    taker = BulkHandoffServer(results).start()
    yield svc, results, taker
    taker.stop()
    results.stop()
    svc.close()


def test_push_upload_hands_the_servers_socket_to_the_trainer_which_writes_its_tensor(
    trainer: tuple[DownloadService, BulkServer, BulkHandoffServer],
) -> None:
    svc, results, taker = trainer
    w = np.random.default_rng(3).standard_normal(300_000).astype(np.float32)
    txn = svc.publish({"w": w}, receivers=["server"], ttl_s=30)
    uploads = Uploads(txn.refs[0], w.nbytes)
    server = BulkServer(None, on_upload=uploads.on_upload).start()
    counted: list[int] = []
    try:
        fetch = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="server")
        moved = push_upload(
            server.address, site="site-a", token="t", upload_id="up-1", source_address=taker.address,
            fetch=fetch, chunk_timeout_s=2, on_bytes=counted.append,
        )  # fmt: skip
        assert uploads.done.wait(5) and uploads.error is None
        assert bytes(uploads.buf) == w.tobytes()
        assert moved == sum(counted) == w.nbytes  # 19 frames of 64 KiB, reported in one batch
        assert taker.served == 1 and results.bytes_sent == w.nbytes
    finally:
        server.stop()


def test_abort_cuts_a_handed_over_upload_that_the_server_stopped_reading(
    trainer: tuple[DownloadService, BulkServer, BulkHandoffServer],
) -> None:
    svc, _, taker = trainer
    big = np.ones(16 << 20, np.uint8)  # far more than the socket buffers hold
    txn = svc.publish({"w": big}, receivers=["server"], ttl_s=30)
    parked: list[socket.socket] = []

    def on_upload(site: str, upload_id: str, sock: socket.socket) -> tuple[grpc.StatusCode | None, str]:
        parked.append(sock)  # the server takes the socket and never reads it
        return None, ""

    server = BulkServer(None, on_upload=on_upload).start()
    abort = threading.Event()
    outcome: list[BaseException | int] = []

    def push() -> None:
        try:
            outcome.append(push_upload(
                server.address, site="site-a", token="t", upload_id="up-1", source_address=taker.address,
                fetch=tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="server"),
                chunk_timeout_s=30, abort=abort,
            ))  # fmt: skip
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=push, daemon=True)
    t.start()
    try:
        assert _wait_for(lambda: taker.served == 1)
        time.sleep(0.2)
        assert not outcome  # blocked: the trainer's writes wait for the server
        abort.set()
        t.join(5)
        assert not t.is_alive() and isinstance(outcome[0], TransferAbortedError)
        # The trainer's write failed on the shut-down socket: its handler is free again.
        assert _wait_for(lambda: not taker._conns)
    finally:
        for sock in parked:
            sock.close()
        server.stop()


def test_the_trainers_taker_shrugs_off_garbage_and_keeps_serving(
    trainer: tuple[DownloadService, BulkServer, BulkHandoffServer], caplog: pytest.LogCaptureFixture
) -> None:
    svc, _, taker = trainer
    caplog.set_level(logging.WARNING)
    # Bytes without a socket, a request without a socket, and a socket without a request.
    with contextlib.closing(handoff.connect(taker.address, 2)) as c:
        c.sendall(b"hello")
    with contextlib.closing(handoff.connect(taker.address, 2)) as c:
        send_request(c, tensor_pb2.BulkRequest(upload_id="x"))
    a, b = socket.socketpair()
    with a, b, contextlib.closing(handoff.connect(taker.address, 2)) as c:
        handoff.send_socket(c, a)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""  # it hung up
    assert _wait_for(lambda: sum("not a handed-over request" in r.getMessage() for r in caplog.records) == 3)
    # ... and still serves a real one.
    w = np.arange(1000, dtype=np.float32)
    txn = svc.publish({"w": w}, receivers=["server"], ttl_s=30)
    uploads = Uploads(txn.refs[0], w.nbytes)
    server = BulkServer(None, on_upload=uploads.on_upload).start()
    try:
        push_upload(
            server.address, site="site-a", token="t", upload_id="up-1", source_address=taker.address,
            fetch=tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="server"), chunk_timeout_s=2,
        )  # fmt: skip
        assert uploads.done.wait(5) and uploads.error is None and bytes(uploads.buf) == w.tobytes()
    finally:
        server.stop()


def test_recv_socket_tells_a_socket_a_status_and_garbage_apart() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    x, y = socket.socketpair()
    with a, b, x, y:
        handoff.send_socket(a, x)
        got = handoff.recv_socket(b)
        assert got is not None
        with got:
            got.sendall(b"via the copy")
            assert y.recv(64) == b"via the copy"  # the same connection
        handoff.send_refusal(a, b"\x00\x00\x00\x00")
        assert handoff.recv_socket(b) is None and b.recv(4) == b"\x00\x00\x00\x00"
        a.sendall(b"?")
        with pytest.raises(ValueError, match="not a handoff answer"):
            handoff.recv_socket(b)
        a.close()
        with pytest.raises(EOFError):
            handoff.recv_socket(b)


def test_names_must_be_abstract() -> None:
    assert handoff.is_handoff(handoff.new_name("x")) and not handoff.is_handoff("127.0.0.1:80")
    with pytest.raises(ValueError, match="not an abstract socket name"):
        handoff.listen("/tmp/some.sock")


def test_the_reporter_batches_by_bytes_and_by_time() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        r = handoff.Reporter(a, every_bytes=100, every_s=60)
        r.add(60)
        r.add(60)  # over 100: sent as one count
        r.add(5)
        r.flush()
        r.flush()  # nothing pending: nothing sent
        slow = handoff.Reporter(a, every_bytes=1 << 30, every_s=0.05)
        slow.add(1)
        time.sleep(0.06)
        slow.add(2)  # the interval passed: sent although far below every_bytes
        a.shutdown(socket.SHUT_WR)
        got: list[int] = []
        assert handoff.read_counts(b, got.append) == 128
        assert got == [120, 5, 3]
