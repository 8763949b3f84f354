"""Pod-local endpoints refuse processes of another user (fedkube.transfer.peercred), played as the attacker.

Real sockets: a BulkServer as the server, the sidecar's BulkHandoff (abstract
Unix socket) and BulkRelay (TCP on 127.0.0.1), the trainer's BulkHandoffServer.
The attacker is a forked child that dropped to uid 65534 (nobody) and speaks
the endpoints' own protocol; before the check, the handoff gave it a server
connection on which the site's token had already been sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from fedkube.transfer import DownloadService, handoff, peercred
from fedkube.transfer.bulk import BulkHandoff, BulkHandoffServer, BulkRelay, BulkServer, send_request
from fedkube.transfer.bulk.frames import read_status
from fedkube.transfer.service import serve
from fedkube.wire.v1 import tensor_pb2, tensor_pb2_grpc

NOBODY = 65534

pytestmark = [
    pytest.mark.skipif(not handoff.AVAILABLE, reason="abstract sockets and SO_PEERCRED need Linux"),
    pytest.mark.skipif(os.geteuid() != 0, reason="playing another user needs root (setuid in a forked child)"),
    pytest.mark.timeout(60),
]


def _as_nobody(attack: Callable[[], str]) -> str:
    """Run ``attack`` in a forked child as uid/gid 65534; what it returns (or the exception it raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child touches only plain sockets, then leaves without running any cleanup
        os.close(r)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = attack()
        except BaseException as exc:
            out = f"raised {type(exc).__name__}: {exc}"
        os.write(w, out.encode()[:4000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def _fetch(receiver: str, txn: str) -> tensor_pb2.BulkRequest:
    return tensor_pb2.BulkRequest(fetch=tensor_pb2.FetchRequest(transaction_id=txn, ref_id="t0", receiver=receiver))


@pytest.fixture
def published() -> Iterator[tuple[DownloadService, str]]:
    svc = DownloadService("server")
    txn = svc.publish({"w": np.arange(1000, dtype=np.float32)}, receivers=["site-a"], ttl_s=30)
    yield svc, txn.id
    svc.close()


@pytest.fixture
def counted() -> Iterator[list[str]]:
    seen: list[str] = []
    peercred.observe(seen.append)
    yield seen
    peercred.unobserve(seen.append)


def test_another_user_gets_no_server_connection_from_the_sidecars_handoff(
    published: tuple[DownloadService, str], counted: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    svc, txn = published
    tokens: list[str] = []

    def authorize(site: str, token: str, receiver: str | None) -> tuple[grpc.StatusCode | None, str]:
        tokens.append(token)
        return None, ""

    srv = BulkServer(svc, authorize=authorize).start()
    sidecar = BulkHandoff(srv.address, site="site-a", token="tok-a").start()

    def attack() -> str:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(5)
        conn.connect("\0" + sidecar.address[1:])  # what any local user can do: the name is in /proc/net/unix
        try:
            send_request(conn, _fetch("site-a", txn))
            got = handoff.recv_socket(conn)
        except (EOFError, OSError):
            return "closed"
        return "handed a server connection" if got is not None else "a status"

    try:
        with caplog.at_level("WARNING", logger="fedkube.transfer.peercred"):
            assert _as_nobody(attack) == "closed"
        assert sidecar.handed == 0 and tokens == []  # nothing went upstream with the site's token
        assert counted == [peercred.PEER_UID_MISMATCH]
        assert "uid 65534" in caplog.text and peercred.PEER_UID_MISMATCH in caplog.text
        # The pod's own trainer (this process's user) is still served.
        conn = handoff.connect(sidecar.address, 5)
        send_request(conn, _fetch("site-a", txn))
        sock = handoff.recv_socket(conn)
        assert sock is not None
        sock.settimeout(5)
        assert read_status(sock)[0] == grpc.StatusCode.OK
        sock.close()
        conn.close()
        assert tokens == ["tok-a"]
    finally:
        sidecar.stop()
        srv.stop()


def test_another_user_cannot_fetch_through_the_sidecars_tcp_relay(
    published: tuple[DownloadService, str], counted: list[str], lookup: str
) -> None:
    svc, txn = published
    srv = BulkServer(svc).start()
    relay = BulkRelay(srv.address, site="site-a", token="tok-a").start()
    port = relay.port

    def attack() -> str:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            send_request(conn, _fetch("site-a", txn))
            data = conn.recv(64)
        except OSError:
            return "closed"
        return "closed" if not data else f"answered {data[:8]!r}"

    try:
        assert _as_nobody(attack) == "closed"
        assert srv.bytes_sent == 0 and counted == [peercred.PEER_UID_MISMATCH]
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)  # this user: served
        send_request(conn, _fetch("site-a", txn))
        assert read_status(conn)[0] == grpc.StatusCode.OK
        conn.close()
    finally:
        relay.stop()
        srv.stop()


def test_another_user_cannot_make_the_trainer_write_its_update_into_a_socket_of_its_own() -> None:
    svc = DownloadService("site-a")
    update = svc.publish({"w": np.arange(1000, dtype=np.float32)}, receivers=["server"], ttl_s=30)
    results = BulkServer(svc).start()
    taker = BulkHandoffServer(results).start()

    def attack() -> str:
        mine, theirs = socket.socketpair()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(5)
        conn.connect("\0" + taker.address[1:])
        try:
            handoff.send_socket(conn, theirs)
            send_request(conn, _fetch("server", update.id))
        except OSError:
            return "closed"
        mine.settimeout(2)
        try:
            data = mine.recv(1 << 16)
        except OSError:
            return "closed"
        return f"got {len(data)} bytes of the update" if data else "closed"

    try:
        assert _as_nobody(attack) == "closed"
        assert taker.served == 0 and results.bytes_sent == 0
    finally:
        taker.stop()
        results.stop()
        svc.close()


def test_a_trainer_does_not_use_a_handoff_name_another_user_took() -> None:
    name = handoff.new_name("squatted")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the squatter: listens on the name a restarted sidecar left behind
        os.close(r)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sock = handoff.listen(name)
            os.write(w, b"listening")
            sock.settimeout(10)
            conn, _ = sock.accept()
            conn.recv(1)  # hold it until the trainer hangs up
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 64) == b"listening"
        with pytest.raises(PermissionError, match="uid 65534"):
            handoff.connect(name, 5)
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_a_loopback_server_port_counts_the_refusal_under_its_own_metric_hook(
    published: tuple[DownloadService, str],
) -> None:
    svc, txn = published
    reasons: list[str] = []
    srv = BulkServer(svc, on_refused=reasons.append).start()  # 127.0.0.1, as under fedkube run

    def attack() -> str:
        conn = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        try:
            send_request(conn, _fetch("site-a", txn))
            data = conn.recv(64)
        except OSError:
            return "closed"
        return "closed" if not data else "answered"

    try:
        assert _as_nobody(attack) == "closed"
        assert reasons == [peercred.PEER_UID_MISMATCH]
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("host", "pod_local"),
    [("@fedkube-x", True), ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("server.ns.svc", False)],
)
def test_which_listeners_are_pod_local(host: str, pod_local: bool) -> None:
    assert peercred.own_user_only(host) is pod_local


@pytest.fixture(params=["sock_diag", "proc_scan"])
def lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way of telling a TCP peer's user: netlink, and the /proc scan used where netlink is refused."""
    if request.param == "proc_scan":
        def refused(*args: object) -> int:
            raise PermissionError(1, "netlink refused")

        monkeypatch.setattr(peercred, "_diag_owner", refused)
    return str(request.param)


def test_a_tcp_peer_of_this_user_is_told_by_its_uid(lookup: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        conn, _ = lsock.accept()
        with client, conn:
            peer = peercred.peer_of(conn)
            assert peer is not None and peer.uid == os.geteuid()


class _Context:
    """What admit_grpc reads of a gRPC call: the peer as gRPC spells it."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def test_a_loopback_grpc_port_tells_a_connection_of_another_user_by_its_uid(lookup: str) -> None:
    svc = DownloadService("site-a")
    server, port = serve(svc, "127.0.0.1:0", max_workers=2)  # the trainer's results, as the SDK serves them
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a raw TCP connection (grpc is not fork-safe): enough for the kernel to list its owner
        os.close(r)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            os.write(w, str(conn.getsockname()[1]).encode())
            os.close(w)
            conn.recv(1)  # held open until the server goes away
        finally:
            os._exit(0)
    os.close(w)
    try:
        child_port = int(os.read(r, 16))
        theirs = _Context(f"ipv4:127.0.0.1:{child_port}")
        assert not peercred.admit_grpc(theirs, port, "download service")  # type: ignore[arg-type]
        with socket.create_connection(("127.0.0.1", port)) as conn:
            mine = conn.getsockname()[1]
            for spelling in (f"ipv4:127.0.0.1:{mine}", f"ipv6:%5B::ffff:127.0.0.1%5D:{mine}"):
                assert peercred.admit_grpc(_Context(spelling), port, "download service")  # type: ignore[arg-type]
            # What cannot be a peer of a loopback port is refused, not waved through.
            for spelling in ("unix:/tmp/x", f"ipv4:10.0.0.1:{mine}", "garbage"):
                assert not peercred.admit_grpc(_Context(spelling), port, "download service")  # type: ignore[arg-type]
    finally:
        os.close(r)
        server.stop(0)
        os.waitpid(pid, 0)
        svc.close()


def test_a_call_from_another_user_on_a_loopback_grpc_port_is_denied_before_its_handler(
    monkeypatch: pytest.MonkeyPatch, counted: list[str]
) -> None:
    svc = DownloadService("site-a")
    txn = svc.publish({"w": np.ones(8, np.float32)}, receivers=["server"], ttl_s=30)
    server, port = serve(svc, "127.0.0.1:0", max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            fetch = tensor_pb2_grpc.DownloadStub(channel).Fetch
            request = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id=txn.refs[0].ref_id, receiver="server")
            assert list(fetch(request, timeout=5))  # this user: served
            monkeypatch.setattr(peercred.os, "geteuid", lambda: 4242)  # now this process is "another user"
            with pytest.raises(grpc.RpcError) as info:
                list(fetch(request, timeout=5))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert counted == [peercred.PEER_UID_MISMATCH]
    finally:
        server.stop(0)
        svc.close()


def test_the_sidecar_metric_spells_the_reason_as_peercred_does() -> None:
    from prometheus_client import CollectorRegistry

    from fedkube.metrics.sidecar import SidecarMetrics

    registry = CollectorRegistry()
    SidecarMetrics(registry, "j", "s")
    labels = {"fljob": "j", "site": "s", "reason": peercred.PEER_UID_MISMATCH}
    assert registry.get_sample_value("fedkube_sidecar_rejected_local_connections_total", labels) == 0
