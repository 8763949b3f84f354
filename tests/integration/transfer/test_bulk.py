"""The bulk (plain-TCP) data plane: real sockets on localhost, the real DownloadService and Fetcher."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.transfer import (
    ChecksumMismatchError,
    DownloadService,
    Fetcher,
    FetchSettings,
    OffsetOutOfRangeError,
    ReceiverNotExpectedError,
    RefNotFoundError,
    SourceUnavailableError,
    TransactionExpiredError,
    TransferAbortedError,
    TransferError,
    TransferStalledError,
    handoff,
)
from fedkube.transfer.bulk import (
    MAGIC,
    BulkChunkSource,
    BulkHandoff,
    BulkRelay,
    BulkServer,
    Refused,
    push_upload,
    read_request,
    read_status,
    send_request,
)
from fedkube.transfer.bulk import relay as bulk_relay
from fedkube.wire.v1 import tensor_pb2
from tests.integration.transfer.helpers import CuttingProxy, Uploads

FAST = FetchSettings(chunk_timeout_s=2.0, idle_timeout_s=6.0, max_attempts=4, backoff_base_s=0.02, backoff_max_s=0.1)


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((300, 1000)).astype(np.float32),  # 1.2 MB: several frames at 256 KiB
        "b": rng.standard_normal(17).astype(ml_dtypes.bfloat16),
        "i": np.arange(5, dtype=np.int64),
        "m": np.array([True, False, True]),
    }


@pytest.fixture
def service() -> Iterator[DownloadService]:
    svc = DownloadService("server")
    yield svc
    svc.close()


@pytest.fixture
def server(service: DownloadService) -> Iterator[BulkServer]:
    srv = BulkServer(service, frame_bytes=256 << 10).start()
    yield srv
    srv.stop()


def _fetch_all(source: BulkChunkSource | object, refs: list, **kw: object) -> dict[str, np.ndarray]:
    return Fetcher(source, FAST, **kw).fetch_transaction(refs)  # type: ignore[arg-type]


def test_fetch_every_dtype_verified_and_completion_releases(service: DownloadService, server: BulkServer) -> None:
    model = _model()
    txn = service.publish(model, receivers=["site-a"], ttl_s=30)
    got = _fetch_all(BulkChunkSource(server.address, "site-a", chunk_timeout_s=2), txn.refs)
    for name, array in model.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        assert got[name].tobytes() == array.tobytes()
    assert txn.wait(5) and txn.release_reason == "completed"
    assert server.bytes_sent == sum(a.nbytes for a in model.values())


def test_fetch_into_writes_the_callers_array_in_place(service: DownloadService, server: BulkServer) -> None:
    w = np.arange(1 << 18, dtype=np.float32)
    (ref,) = service.publish({"w": w}, receivers=["a"], ttl_s=30).refs
    out = np.zeros_like(w)
    view = Fetcher(BulkChunkSource(server.address, "a", chunk_timeout_s=2), FAST).fetch_into(ref, out)
    assert np.array_equal(out, w)
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), out)


def test_refusals_carry_the_ids_and_the_server_keeps_serving(service: DownloadService, server: BulkServer) -> None:
    txn = service.publish({"w": np.ones(10, np.float32)}, receivers=["a"], ttl_s=30)
    ref = txn.refs[0]
    src = BulkChunkSource(server.address, "intruder", chunk_timeout_s=2)
    with pytest.raises(ReceiverNotExpectedError, match="intruder"):
        Fetcher(src, FAST).fetch_into(ref)
    bogus = ref.__class__(**{**ref.__dict__, "ref_id": "t9"})
    with pytest.raises(RefNotFoundError, match="t9"):
        Fetcher(BulkChunkSource(server.address, "a", chunk_timeout_s=2), FAST).fetch_into(bogus)
    stream = BulkChunkSource(server.address, "a", chunk_timeout_s=2).stream_into(ref, 41, memoryview(bytearray(40)))
    with pytest.raises(OffsetOutOfRangeError, match="offset 41"):
        next(iter(stream))
    stream.close()
    assert _fetch_all(BulkChunkSource(server.address, "a", chunk_timeout_s=2), txn.refs)["w"].sum() == 10


def test_authorize_refuses_a_wrong_token_before_looking_at_the_request(service: DownloadService) -> None:
    seen: list[tuple[str, str]] = []

    def authorize(site: str, token: str, receiver: str | None) -> tuple[grpc.StatusCode | None, str]:
        seen.append((site, token))
        if token != "s3cret":
            return grpc.StatusCode.UNAUTHENTICATED, f"wrong token for site {site!r}"
        return None, ""

    srv = BulkServer(service, authorize=authorize).start()
    try:
        txn = service.publish({"w": np.ones(4, np.float32)}, receivers=["a"], ttl_s=30)
        bad = BulkChunkSource(srv.address, "a", chunk_timeout_s=2, site="a", token="guess")
        with pytest.raises(TransferError, match=r"UNAUTHENTICATED.*wrong token for site 'a'") as info:
            Fetcher(bad, FAST).fetch_into(txn.refs[0])
        assert not info.value.retryable
        good = BulkChunkSource(srv.address, "a", chunk_timeout_s=2, site="a", token="s3cret")
        assert _fetch_all(good, txn.refs)["w"].sum() == 4
        assert ("a", "guess") in seen and ("a", "s3cret") in seen
    finally:
        srv.stop()


class DroppingService(DownloadService):
    """Its first ``drops`` fetch connections break (the server closes them) after ``after`` chunks."""

    def __init__(self, drops: int, after: int) -> None:
        super().__init__("server")
        self.drops = drops
        self.after = after
        self.offsets: list[int] = []

    def open_stream(self, transaction_id: str, ref_id: str, receiver: str, offset: int = 0, max_chunk_bytes: int = 0):  # type: ignore[no-untyped-def]
        self.offsets.append(offset)
        inner = super().open_stream(transaction_id, ref_id, receiver, offset, max_chunk_bytes)
        if len(self.offsets) > self.drops:
            return inner

        def broken():  # type: ignore[no-untyped-def]
            for index, item in enumerate(inner):
                if index == self.after:
                    raise ConnectionResetError("injected: connection dropped mid-tensor")
                yield item

        return broken()


def test_resume_after_the_connection_breaks_mid_tensor() -> None:
    svc = DroppingService(drops=2, after=3)
    srv = BulkServer(svc, frame_bytes=256 << 10).start()
    w = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)  # 4 MiB = 16 frames
    txn = svc.publish({"w": w}, receivers=["a"], ttl_s=30)
    retries: list[TransferError] = []
    try:
        fetcher = Fetcher(BulkChunkSource(srv.address, "a", chunk_timeout_s=2), FAST, on_retry=retries.append)
        out = fetcher.fetch_transaction(txn.refs)
    finally:
        srv.stop()
        svc.close()
    assert np.array_equal(out["w"], w)
    assert fetcher.attempts == 3 and len(retries) == 2
    # Each new connection asked from exactly where the broken one stopped: resumed, not restarted.
    assert svc.offsets == [0, 3 * (256 << 10), 6 * (256 << 10)]


def test_resume_through_a_proxy_that_resets_connections(service: DownloadService, server: BulkServer) -> None:
    w = np.random.default_rng(2).standard_normal(1 << 20).astype(np.float32)
    txn = service.publish({"w": w}, receivers=["a"], ttl_s=30)
    proxy = CuttingProxy(server.port, cut_after=1 << 20, cuts=2)  # RST: unread bytes are lost too
    try:
        fetcher = Fetcher(BulkChunkSource(f"127.0.0.1:{proxy.port}", "a", chunk_timeout_s=2), FAST)
        out = fetcher.fetch_transaction(txn.refs)
    finally:
        proxy.close()
    assert np.array_equal(out["w"], w) and fetcher.attempts == 3


class FlippingProxy:
    """Forwards to ``port``; on the first connection flips the byte at stream position ``at`` from the server."""

    def __init__(self, port: int, at: int) -> None:
        self.port_to = port
        self.at = at
        self.flipped = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.first = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.port_to))
            flip, self.first = self.first, False
            threading.Thread(target=self._pipe, args=(client, up, -1), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, self.at if flip else -1), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, at: int) -> None:
        pos = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if 0 <= at - pos < len(data):
                    b = bytearray(data)
                    b[at - pos] ^= 0x40
                    data = bytes(b)
                    self.flipped += 1
                pos += len(data)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_flipped_payload_byte_is_caught_by_the_checksum_and_refetched(
    service: DownloadService, server: BulkServer
) -> None:
    w = np.arange(200_000, dtype=np.float32)
    txn = service.publish({"w": w}, receivers=["a"], ttl_s=30)
    proxy = FlippingProxy(server.port, at=100_000)  # inside the first frame's payload
    retries: list[TransferError] = []
    try:
        got = _fetch_all(
            BulkChunkSource(f"127.0.0.1:{proxy.port}", "a", chunk_timeout_s=2), txn.refs, on_retry=retries.append
        )
    finally:
        proxy.close()
    assert proxy.flipped == 1
    assert np.array_equal(got["w"], w)
    assert [type(e) for e in retries] == [ChecksumMismatchError]


def test_a_transaction_released_mid_fetch_ends_with_its_status(service: DownloadService) -> None:
    srv = BulkServer(service, frame_bytes=64 << 10).start()
    try:
        w = np.zeros(1 << 20, np.float32)
        txn = service.publish({"w": w}, receivers=["a"], ttl_s=30)
        buf = memoryview(bytearray(w.nbytes))
        stream = BulkChunkSource(srv.address, "a", chunk_timeout_s=2).stream_into(txn.refs[0], 0, buf)
        it = iter(stream)
        next(it)  # the first frame arrived; the server is blocked on a full socket or sending
        service.release(txn.id)
        with pytest.raises(TransactionExpiredError, match="released"):
            for _ in it:
                pass
        stream.close()
    finally:
        srv.stop()


def test_abort_stops_a_fetch_from_a_silent_source_at_once() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        abort = threading.Event()
        ref_src = DownloadService("x")
        txn = ref_src.publish({"w": np.ones(8, np.float32)}, receivers=["a"], ttl_s=30)
        src = BulkChunkSource(f"127.0.0.1:{silent.getsockname()[1]}", "a", chunk_timeout_s=30)
        threading.Timer(0.3, abort.set).start()
        start = time.monotonic()
        with pytest.raises(TransferAbortedError):
            Fetcher(src, FAST.__class__(chunk_timeout_s=30, idle_timeout_s=60), abort=abort).fetch_into(txn.refs[0])
        assert time.monotonic() - start < 5
        ref_src.close()
    finally:
        silent.close()


def test_an_unreachable_source_is_retried_then_reported_as_stalled() -> None:
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    svc = DownloadService("x")
    txn = svc.publish({"w": np.ones(8, np.float32)}, receivers=["a"], ttl_s=30)
    retries: list[TransferError] = []
    with pytest.raises(TransferStalledError, match="cannot reach the bulk endpoint"):
        Fetcher(BulkChunkSource(f"127.0.0.1:{port}", "a", chunk_timeout_s=1), FAST, on_retry=retries.append).fetch_into(
            txn.refs[0]
        )
    assert retries and all(isinstance(e, SourceUnavailableError) for e in retries)
    svc.close()


# --- hostile input ---------------------------------------------------------------------------


def _raw_exchange(port: int, payload: bytes) -> tuple[grpc.StatusCode, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return read_status(s)


@pytest.mark.parametrize(
    ("payload", "expect"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a fedkube bulk connection"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "not a fedkube bulk connection"),
        (MAGIC + struct.pack("<I", 1 << 30), "over the 65536-byte limit"),
        (MAGIC + struct.pack("<I", 3) + b"\xff\xff\xff", "malformed BulkRequest"),
        (MAGIC + struct.pack("<I", 0), "names no operation"),
    ],
)
def test_garbage_is_refused_with_a_status_and_others_are_unaffected(
    service: DownloadService, server: BulkServer, payload: bytes, expect: str
) -> None:
    code, message = _raw_exchange(server.port, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and expect in message
    txn = service.publish({"w": np.ones(3, np.float32)}, receivers=["a"], ttl_s=30)
    assert _fetch_all(BulkChunkSource(server.address, "a", chunk_timeout_s=2), txn.refs)["w"].sum() == 3


def test_a_client_that_sends_nothing_is_dropped_after_the_request_timeout(service: DownloadService) -> None:
    srv = BulkServer(service, request_timeout_s=0.3).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            start = time.monotonic()
            code, _ = read_status(s)  # told why, then closed by the server, not by our timeout
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert s.recv(10) == b""
            assert time.monotonic() - start < 3
    finally:
        srv.stop()


def test_connections_over_the_limit_get_resource_exhausted(service: DownloadService) -> None:
    srv = BulkServer(service, max_connections=2, request_timeout_s=5).start()
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
    try:
        time.sleep(0.2)  # let the accept loop register both
        code, message = _raw_exchange(srv.port, b"")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "connection limit" in message
    finally:
        for s in held:
            s.close()
        srv.stop()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_read_request_never_fails_other_than_refusing(data: bytes) -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        b.settimeout(2)
        try:
            read_request(b)
        except EOFError:
            pass
        except Exception as exc:
            assert isinstance(exc, Refused), repr(exc)
    finally:
        a.close()
        b.close()


# --- relay and push -------------------------------------------------------------------------------


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_relay_stamps_identity_checks_the_receiver_and_frees_its_buffer(
    service: DownloadService, splice: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_relay, "USE_SPLICE", splice)
    tokens = {"site-a": "tok-a"}

    def authorize(site: str, token: str, receiver: str | None) -> tuple[grpc.StatusCode | None, str]:
        return (None, "") if tokens.get(site) == token else (grpc.StatusCode.UNAUTHENTICATED, f"bad token for {site!r}")

    srv = BulkServer(service, authorize=authorize, frame_bytes=128 << 10).start()
    moved: list[int] = []
    relay = BulkRelay(srv.address, site="site-a", token="tok-a", on_bytes=moved.append, buffer_bytes=64 << 10).start()
    try:
        model = _model()
        txn = service.publish(model, receivers=["site-a", "site-b"], ttl_s=30)
        got = _fetch_all(BulkChunkSource(relay.address, "site-a", chunk_timeout_s=2), txn.refs)
        assert all(got[k].tobytes() == v.tobytes() for k, v in model.items())
        assert sum(moved) >= sum(v.nbytes for v in model.values())
        assert txn.done_receivers == {"site-a"}
        with pytest.raises(ReceiverNotExpectedError, match="not this pod's site"):
            Fetcher(BulkChunkSource(relay.address, "site-b", chunk_timeout_s=2), FAST).fetch_into(txn.refs[0])
        deadline = time.monotonic() + 3
        while relay.buffer_bytes_in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.buffer_bytes_in_use == 0
    finally:
        relay.stop()
        srv.stop()


@pytest.mark.parametrize(
    "kind",
    [BulkRelay, pytest.param(BulkHandoff, marks=pytest.mark.skipif(not handoff.AVAILABLE, reason="Linux only"))],
    ids=["relay", "handoff"],
)
def test_relay_to_a_dead_server_answers_unavailable_which_is_retryable(kind: type[BulkRelay]) -> None:
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    relay = kind(f"127.0.0.1:{port}", site="a", token="t").start()
    svc = DownloadService("x")
    try:
        txn = svc.publish({"w": np.ones(8, np.float32)}, receivers=["a"], ttl_s=30)
        source = BulkChunkSource(relay.address, "a", chunk_timeout_s=2)
        with pytest.raises(SourceUnavailableError, match="cannot reach the server") as info:
            # The relay answers once the stream is read; the handoff refuses before handing anything over.
            stream = source.stream_into(txn.refs[0], 0, memoryview(bytearray(32)))
            try:
                next(iter(stream))
            finally:
                stream.close()
        assert info.value.retryable
    finally:
        relay.stop()
        svc.close()


def test_push_upload_pumps_the_trainers_bytes_to_the_server_unchanged() -> None:
    trainer_svc = DownloadService("site-a")
    trainer = BulkServer(trainer_svc).start()
    w = np.random.default_rng(3).standard_normal(300_000).astype(np.float32)
    txn = trainer_svc.publish({"w": w}, receivers=["server"], ttl_s=30)
    uploads = Uploads(txn.refs[0], w.nbytes)
    server = BulkServer(None, on_upload=uploads.on_upload).start()
    try:
        fetch = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="server")
        moved = push_upload(
            server.address, site="site-a", token="t", upload_id="up-1", source_address=trainer.address,
            fetch=fetch, chunk_timeout_s=2,
        )  # fmt: skip
        assert uploads.done.wait(5) and uploads.error is None
        assert bytes(uploads.buf) == w.tobytes() and moved > w.nbytes and uploads.sites == ["site-a"]
        with pytest.raises(RefNotFoundError, match="no upload 'nope'"):
            push_upload(
                server.address, site="site-a", token="t", upload_id="nope", source_address=trainer.address,
                fetch=fetch, chunk_timeout_s=2,
            )  # fmt: skip
    finally:
        server.stop()
        trainer.stop()
        trainer_svc.close()


@pytest.mark.parametrize(
    "kind",
    ["tcp", pytest.param("handoff", marks=pytest.mark.skipif(not handoff.AVAILABLE, reason="Linux only"))],
)
def test_push_upload_reports_an_unreachable_trainer_to_the_server(kind: str) -> None:
    if kind == "tcp":
        dead = socket.create_server(("127.0.0.1", 0))
        source = f"127.0.0.1:{dead.getsockname()[1]}"
        dead.close()
    else:
        source = handoff.new_name("gone")  # nobody listens there
    svc = DownloadService("site-a")
    txn = svc.publish({"w": np.ones(4, np.float32)}, receivers=["server"], ttl_s=30)
    uploads = Uploads(txn.refs[0], 16)
    server = BulkServer(None, on_upload=uploads.on_upload).start()
    try:
        fetch = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="server")
        moved = push_upload(
            server.address, site="site-a", token="t", upload_id="up-1", source_address=source, fetch=fetch,
            chunk_timeout_s=2,
        )  # fmt: skip
        assert moved == 0
        assert uploads.done.wait(5)
        assert isinstance(uploads.error, SourceUnavailableError) and "trainer's bulk server" in str(uploads.error)
    finally:
        server.stop()
        svc.close()


def test_request_round_trip_helpers() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_request(a, tensor_pb2.BulkRequest(site="s", upload_id="u"))
        req = read_request(b)
        assert req.site == "s" and req.WhichOneof("op") == "upload_id"
