"""The bulk plane over mutual TLS: relay and push through a TLS server hop, and handshakes inside the port's limits."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedkube.transfer import endpoints
from fedkube.transfer.bulk import BulkChunkSource, BulkRelay, BulkServer, read_status, relay, send_request
from fedkube.transfer.bulk.frames import MAGIC
from fedkube.transfer.endpoints import TlsHandshakeError
from fedkube.transfer.fetch import Fetcher, FetchSettings
from fedkube.transfer.route import Path, choose_route, handoff_enabled
from fedkube.transfer.service import DownloadService
from fedkube.wire.v1 import tensor_pb2
from tests.support.tls import session_pki
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)
FAST = FetchSettings(chunk_timeout_s=5, idle_timeout_s=10, backoff_base_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def service() -> Iterator[DownloadService]:
    svc = DownloadService("server", chunk_bytes=256 << 10)
    yield svc
    svc.close()


def test_a_fetch_through_the_relay_crosses_tls_and_the_pump_copies(
    service: DownloadService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # splice(2) on the TLS socket would move ciphertext to the trainer: the checksums would catch it.
    monkeypatch.setattr(relay, "USE_SPLICE", relay.USE_SPLICE)
    sites: list[str | None] = []

    def authorize(site: str, token: str, receiver: str | None, **tls: str) -> tuple[grpc.StatusCode | None, str]:
        sites.append(tls.get("cert_site"))
        return None, ""

    srv = BulkServer(service, authorize=authorize, tls=session_pki().server_tls(), frame_bytes=128 << 10).start()
    fwd = BulkRelay(srv.address, site="site-a", token="t", tls=session_pki().client_tls("site-a")).start()
    try:
        model = {"w": np.random.default_rng(0).standard_normal((700, 300)).astype(np.float32),
                 "b": np.arange(1000, dtype=np.int64)}  # fmt: skip
        txn = service.publish(model, receivers=["site-a"], ttl_s=60)
        got = Fetcher(BulkChunkSource(fwd.address, "site-a", chunk_timeout_s=5), FAST).fetch_transaction(txn.refs)
        for name, arr in model.items():
            np.testing.assert_array_equal(got[name], arr)
        assert sites and set(sites) == {"site-a"}  # the certificate's site reached the authorizer
        assert srv.bytes_sent >= sum(a.nbytes for a in model.values())
    finally:
        fwd.stop()
        srv.stop()


def test_no_handoff_is_offered_or_chosen_when_the_server_hop_is_tls() -> None:
    assert not handoff_enabled(True, server_tls=True)
    assert choose_route(bulk="127.0.0.1:1", handoff="@x", server_tls=True) == choose_route(bulk="127.0.0.1:1")
    assert choose_route(bulk="127.0.0.1:1", handoff="@x", server_tls=True).path is Path.BULK


def test_the_sidecar_refuses_a_server_of_another_ca_naming_it_and_the_fix(service: DownloadService) -> None:
    # A server presenting its real certificate under a name the sidecar does not expect, and one of another CA.
    srv = BulkServer(service, tls=session_pki().server_tls()).start()
    try:
        with pytest.raises(TlsHandshakeError, match=rf"server at {srv.address} failed TLS verification.*fix:"):
            endpoints.dial(srv.address, 5, session_pki().client_tls("site-a", server_name="job2-server.default.svc"))
        other = session_pki("job2").client_tls("site-a")
        with pytest.raises(TlsHandshakeError, match=r"failed TLS verification \(self-signed certificate in"):
            endpoints.dial(srv.address, 5, other)
    finally:
        srv.stop()


def test_handshakes_count_against_the_unauthenticated_slots_and_the_absolute_deadline(
    service: DownloadService,
) -> None:
    refused: list[str] = []
    srv = BulkServer(service, tls=session_pki().server_tls(), request_timeout_s=1.0, max_connections=8,
                     max_unauthenticated=4, max_per_peer=2, on_refused=refused.append).start()  # fmt: skip
    host, port = "127.0.0.1", srv.port
    silent = [socket.create_connection((host, port), timeout=5) for _ in range(2)]
    try:
        # Two connections that never start their handshake hold this peer's two unauthenticated slots.
        until(lambda: refused.count("PeerConnectionLimit") >= 1 or _third_refused(host, port), what="a 3rd refused")
        # And they are dropped at the deadline, like a request that never arrives.
        until(lambda: refused.count("RequestDeadline") == 2, what="both silent handshakes timed out", timeout=5)
        # A handshake trickled a byte at a time is bound by the same absolute deadline, not reset per byte.
        trickler = socket.create_connection((host, port), timeout=5)
        started, closed = time.monotonic(), threading.Event()

        def trickle() -> None:
            try:
                for byte in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 10:
                    trickler.send(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass
            closed.set()

        threading.Thread(target=trickle, daemon=True).start()
        until(lambda: refused.count("RequestDeadline") == 3, what="the trickled handshake timed out", timeout=5)
        assert time.monotonic() - started < 3.0
        trickler.close()
        # A real site still gets in afterwards.
        with endpoints.dial(srv.address, 5, session_pki().client_tls("site-a")) as ok:
            assert ok.version() == "TLSv1.3"
    finally:
        for s in silent:
            s.close()
        srv.stop()


def _third_refused(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=5) as third:
        third.settimeout(2)
        try:
            return third.recv(1024) != b""  # the busy status, sent in plaintext before closing
        except OSError:
            return False



def test_garbage_after_a_good_handshake_is_refused_and_the_site_still_completes(service: DownloadService) -> None:
    # The request parser behind TLS sees what it saw in plaintext: random and hostile bytes from a peer that
    # holds a valid site certificate each get a refusal, and the same site's next request works.
    srv = BulkServer(service, tls=session_pki().server_tls(), request_timeout_s=0.5).start()
    rng = np.random.default_rng(12)
    payloads = [MAGIC + struct.pack("<I", 1 << 30), MAGIC + struct.pack("<I", 3) + b"\xff\xff\xff",
                b"GET / HTTP/1.1\r\n\r\n", *(MAGIC + rng.bytes(int(n)) for n in rng.integers(1, 300, 20))]
    try:
        for payload in payloads:
            with endpoints.dial(srv.address, 5, session_pki().client_tls("a")) as sock:
                sock.sendall(payload)
                try:
                    code, _ = read_status(sock)
                except (EOFError, OSError):
                    continue  # closed without a status: refused all the same
                assert code != grpc.StatusCode.OK, payload
        txn = service.publish({"w": np.ones(5, np.float32)}, receivers=["a"], ttl_s=30)
        with endpoints.dial(srv.address, 5, session_pki().client_tls("a")) as sock:
            send_request(sock, tensor_pb2.BulkRequest(site="a", complete=tensor_pb2.CompleteRequest(
                transaction_id=txn.id, receiver="a", ok=True)))  # fmt: skip
            assert read_status(sock)[0] == grpc.StatusCode.OK
        assert txn.done_receivers == {"a"}
    finally:
        srv.stop()
