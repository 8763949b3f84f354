"""The server authenticates Download callers from their headers and binds the receiver to them (issue 12, item 5).

The attacker is site-a with its own valid token: it asks for site-b's copy of
the round's model and reports site-b finished, which (before the receiver was
bound to the authenticated site) released the model before site-b had it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedkube.protocol import AUTH_METADATA, BEARER, SITE_METADATA
from fedkube.server.app import FedkubeServer
from fedkube.transfer import endpoints
from fedkube.transfer.bulk import read_status, send_request
from fedkube.transfer.service import Transaction
from fedkube.transfer.wire import SERVICE_NAME, STREAMS_PER_CONNECTION
from fedkube.wire.v1 import tensor_pb2, tensor_pb2_grpc
from tests.integration.server.conftest import (
    Harness,
    client_tls,
    dial_bulk,
    grpc_channel,
    make_config,
    rejected,
    token_of,
)
from tests.integration.server.fakes import add_value
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server(harness: Harness) -> FedkubeServer:
    config = dataclasses.replace(make_config(rounds=1, registration_timeout_s=30.0), bulk_port=0)
    return harness.server(config, {"w": np.zeros(16, np.float32)})


def _publish(srv: FedkubeServer) -> Transaction:
    return srv.downloads.publish({"w": np.arange(64, dtype=np.float32)}, receivers=["site-a", "site-b"], ttl_s=60.0)


def _credentials(site: str) -> tuple[tuple[str, str], ...]:
    return (SITE_METADATA, site), (AUTH_METADATA, BEARER + token_of(site))


def _rejected(srv: FedkubeServer, reason: str) -> float:
    return rejected(srv, reason)


def _own_connection(srv: FedkubeServer, site: str = "site-a") -> grpc.Channel:
    """A connected channel with a connection of its own (channels with equal arguments share one by default).

    One call has been answered on it first: calls sent before the server's SETTINGS frame arrives do not
    know the stream cap yet, and those above it are refused (UNAVAILABLE, retryable) instead of queued.
    A sidecar's first call is its one control stream, and its other calls follow the server's answer.
    """
    channel = endpoints.channel(f"127.0.0.1:{srv.grpc_port}", [("grpc.use_local_subchannel_pool", 1)],
                                client_tls(srv, site))
    with pytest.raises(grpc.RpcError):  # no token: refused at the headers, a round trip all the same
        channel.unary_unary(f"/{SERVICE_NAME}/Complete")(b"", timeout=5)
    return channel


def test_grpc_fetch_and_complete_as_another_site_are_refused(server: FedkubeServer) -> None:
    txn = _publish(server)
    ref_id = txn.refs[0].ref_id
    with grpc_channel(server) as channel:
        stub = tensor_pb2_grpc.DownloadStub(channel)
        fetch_b = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id=ref_id, receiver="site-b")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Fetch(fetch_b, metadata=_credentials("site-a"), timeout=5))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "site 'site-a' asked as receiver 'site-b'" in str(info.value.details())
        with pytest.raises(grpc.RpcError) as info:
            stub.Complete(tensor_pb2.CompleteRequest(transaction_id=txn.id, receiver="site-b", ok=True),
                          metadata=_credentials("site-a"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert txn.done_receivers == frozenset() and not txn.released
        assert _rejected(server, "ReceiverMismatch") == 2
        # site-a's own copy and its own completion still work.
        fetch_a = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id=ref_id, receiver="site-a")
        assert list(stub.Fetch(fetch_a, metadata=_credentials("site-a"), timeout=5))
        stub.Complete(tensor_pb2.CompleteRequest(transaction_id=txn.id, receiver="site-a", ok=True),
                      metadata=_credentials("site-a"), timeout=5)
    assert txn.done_receivers == frozenset({"site-a"}) and not txn.released


def _ask(srv: FedkubeServer, request: tensor_pb2.BulkRequest) -> tuple[grpc.StatusCode, str]:
    with dial_bulk(srv, request.site or "site-a") as sock:
        send_request(sock, request)
        return read_status(sock)


def test_bulk_fetch_and_complete_as_another_site_are_refused(server: FedkubeServer) -> None:
    txn = _publish(server)
    as_a = {"site": "site-a", "token": token_of("site-a")}
    fetch_b = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id=txn.refs[0].ref_id, receiver="site-b")
    code, message = _ask(server, tensor_pb2.BulkRequest(fetch=fetch_b, **as_a))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "asked as receiver 'site-b'" in message
    complete_b = tensor_pb2.CompleteRequest(transaction_id=txn.id, receiver="site-b", ok=True)
    code, _ = _ask(server, tensor_pb2.BulkRequest(complete=complete_b, **as_a))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert txn.done_receivers == frozenset() and not txn.released
    assert _rejected(server, "ReceiverMismatch") == 2
    complete_a = tensor_pb2.CompleteRequest(transaction_id=txn.id, receiver="site-a", ok=True)
    assert _ask(server, tensor_pb2.BulkRequest(complete=complete_a, **as_a))[0] == grpc.StatusCode.OK
    assert txn.done_receivers == frozenset({"site-a"})


def test_half_open_unauthenticated_calls_do_not_hold_the_servers_slots(server: FedkubeServer) -> None:
    """Calls that send headers but never a request message are refused at once, so they hold no worker.

    Before, each one waited for its message in a worker while counting against
    ``maximum_concurrent_rpcs`` (16 here): the real client below got RESOURCE_EXHAUSTED.
    """
    txn = _publish(server)
    never = threading.Event()

    def silent() -> Iterator[bytes]:
        never.wait(20)  # bounded: the call ends when the test does at the latest
        yield b""

    calls = []
    with _own_connection(server) as channel:
        half_open = channel.stream_stream(f"/{SERVICE_NAME}/Fetch")
        try:
            calls = [half_open(silent(), metadata=((SITE_METADATA, "site-a"),), timeout=15) for _ in range(24)]
            codes = [call.code() for call in calls]  # blocks until each call ended
            # Above the connection's stream cap a call queues; a denied call whose request side the client still
            # holds open may briefly count on the server as a stream, and then one more is refused with
            # REFUSED_STREAM (UNAVAILABLE, retryable) instead. Never RESOURCE_EXHAUSTED: no slot is held.
            assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE}, codes
            assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= STREAMS_PER_CONNECTION, codes
            # A real sidecar is a connection of its own: the calls above are the attacker's connection's problem.
            with _own_connection(server) as real:
                tensor_pb2_grpc.DownloadStub(real).Complete(
                    tensor_pb2.CompleteRequest(transaction_id=txn.id, receiver="site-a", ok=True),
                    metadata=_credentials("site-a"), timeout=5)  # fmt: skip
        finally:
            never.set()
            for call in calls:
                call.cancel()
    assert txn.done_receivers == frozenset({"site-a"})


def test_stalled_fetches_leave_control_its_workers(harness: Harness, server: FedkubeServer) -> None:
    """Fetches that never read (stalled or hostile sites) used to take every worker: Connect was refused.

    Download calls now get half the server's workers (12 of 24 for 2 clients); the rest are refused
    retryably, and a sidecar still connects. Each site stays within its own budget (8 calls), so both
    sites' fetches are needed to reach the Download budget.
    """
    big = server.downloads.publish({"w": np.zeros(8 << 20, np.float32)}, receivers=["site-a", "site-b"], ttl_s=60.0)
    stalled = []
    with contextlib.ExitStack() as stack:
        for site in ("site-a", "site-b"):
            request = tensor_pb2.FetchRequest(transaction_id=big.id, ref_id=big.refs[0].ref_id, receiver=site)
            stub = tensor_pb2_grpc.DownloadStub(stack.enter_context(_own_connection(server, site)))
            stalled += [stub.Fetch(request, metadata=_credentials(site), timeout=20) for _ in range(8)]
        try:
            until(lambda: _rejected(server, "DownloadBudget") >= 4, "the Download budget's refusals", 10)
            assert _rejected(server, "DownloadBudget") == 4  # 16 fetches, 24 workers for 2 clients: 12 for Download
            assert _rejected(server, "SiteCallBudget") == 0
            harness.sidecar(server, "site-b", add_value(1.0))
            until(lambda: server.sessions.live() == 1, "site-b's Connect (it found no worker)", 10)
        finally:
            for call in stalled:
                call.cancel()


def test_a_site_holding_half_open_fetches_leaves_control_its_workers(harness: Harness, server: FedkubeServer) -> None:
    """A site with a valid token opens 16 fetches and never sends their request message.

    They wait within its own budget (8 calls: the rest are refused at their headers), not in the slots
    another sidecar's Connect needs.
    """
    never = threading.Event()

    def silent() -> Iterator[bytes]:
        never.wait(20)
        yield b""

    calls = []
    channels = [_own_connection(server) for _ in range(16 // STREAMS_PER_CONNECTION)]
    with contextlib.ExitStack() as stack:
        half_open = [stack.enter_context(c).stream_stream(f"/{SERVICE_NAME}/Fetch") for c in channels]
        try:
            calls = [half_open[i % len(half_open)](silent(), metadata=_credentials("site-a"), timeout=15)
                     for i in range(16)]  # fmt: skip
            until(lambda: _rejected(server, "SiteCallBudget") >= 8, "site-a's over-budget refusals", 10)
            assert _rejected(server, "SiteCallBudget") == 8 and server.site_calls.held("site-a") == 8
            harness.sidecar(server, "site-b", add_value(1.0))
            until(lambda: server.sessions.live() == 1, "site-b's Connect (it found no worker)", 10)
        finally:
            never.set()
            for call in calls:
                call.cancel()
