"""One site cannot hold the job server's gRPC workers: each runs at most CALLS_PER_SITE calls (issue 12, item 5).

The attacker is site-a with its own certificate and token (with mutual TLS nobody else gets past the
handshake): it opens more calls than a sidecar ever needs, on one connection and on many, and holds them.
Its calls above the budget are refused at once (RESOURCE_EXHAUSTED, counted as SiteCallBudget), while
site-b registers and downloads as usual; what site-a lets go of is its again.
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
from fedkube.server.admission import CALLS_PER_SITE
from fedkube.server.app import FedkubeServer
from fedkube.transfer import endpoints
from fedkube.transfer.wire import SERVICE_NAME
from fedkube.wire.v1 import tensor_pb2, tensor_pb2_grpc
from tests.integration.server.conftest import Harness, client_tls, make_config, rejected, token_of
from tests.integration.server.fakes import add_value
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(30)

CONNECT = "/fedkube.v1.Control/Connect"
OVER = 2 * CALLS_PER_SITE  # calls the attacker opens beyond its budget


def _credentials(site: str, token_site: str | None = None) -> tuple[tuple[str, str], ...]:
    return (SITE_METADATA, site), (AUTH_METADATA, BEARER + token_of(token_site or site))


def _connection(srv: FedkubeServer, site: str) -> grpc.Channel:
    """A channel with a connection of its own, as ``site``'s certificate (TLS) or plaintext."""
    return endpoints.channel(f"127.0.0.1:{srv.grpc_port}", [("grpc.use_local_subchannel_pool", 1)],
                             client_tls(srv, site))


def _server(harness: Harness, *, tls: bool = True) -> FedkubeServer:
    config = make_config(rounds=1, registration_timeout_s=30.0, tls=tls)
    return harness.server(dataclasses.replace(config, register_timeout_s=20.0), {"w": np.zeros(16, np.float32)})


@contextlib.contextmanager
def _held_open(channels: list[grpc.Channel], method: str, count: int, metadata: tuple[tuple[str, str], ...],
               timeout: float = 15) -> Iterator[list[grpc.Future]]:  # fmt: skip
    """``count`` calls of ``method`` over ``channels`` that send headers, then nothing; cancelled at the end."""
    never = threading.Event()

    def silent() -> Iterator[bytes]:
        never.wait(timeout)  # bounded: the call ends when the test does at the latest
        yield b""

    calls = [channels[i % len(channels)].stream_stream(method)(silent(), metadata=metadata, timeout=timeout)
             for i in range(count)]  # fmt: skip
    try:
        yield calls
    finally:
        never.set()
        for call in calls:
            call.cancel()


def _code(call: grpc.Future) -> grpc.StatusCode:
    """How ``call`` ended, after reading what it answered (a refused Connect answers Rejected first)."""
    with contextlib.suppress(grpc.RpcError):
        for _ in call:
            pass
    return call.code()


def _site_b_registers_and_downloads(harness: Harness, srv: FedkubeServer) -> None:
    txn = srv.downloads.publish({"w": np.arange(64, dtype=np.float32)}, receivers=["site-b"], ttl_s=60.0)
    harness.sidecar(srv, "site-b", add_value(1.0))
    until(lambda: srv.sessions.current("site-b") is not None, "site-b's Register beside the attacker", 5)
    with _connection(srv, "site-b") as channel:
        stub = tensor_pb2_grpc.DownloadStub(channel)
        fetch = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id=txn.refs[0].ref_id, receiver="site-b")
        data = b"".join(c.data for c in stub.Fetch(fetch, metadata=_credentials("site-b"), timeout=5))
    assert data == np.arange(64, dtype=np.float32).tobytes()


def test_a_site_flooding_one_connection_is_refused_fast_and_others_download(harness: Harness) -> None:
    """Fetches of a model the attacker never reads: the first CALLS_PER_SITE stall on flow control and hold
    their workers; every further one gets RESOURCE_EXHAUSTED at its headers (its 2 s deadline would turn a
    wait into DEADLINE_EXCEEDED), counted, and site-b's Register and Download go through."""
    srv = _server(harness)
    big = srv.downloads.publish({"w": np.zeros(8 << 20, np.float32)}, receivers=["site-a"], ttl_s=60.0)
    stall = tensor_pb2.FetchRequest(transaction_id=big.id, ref_id=big.refs[0].ref_id, receiver="site-a")
    with _connection(srv, "site-a") as channel:
        stub = tensor_pb2_grpc.DownloadStub(channel)
        held = [stub.Fetch(stall, metadata=_credentials("site-a"), timeout=20) for _ in range(CALLS_PER_SITE)]
        try:
            for call in held:  # each sent its first chunk: it runs, and holds a slot
                next(call)
            assert srv.site_calls.held("site-a") == CALLS_PER_SITE
            over = [stub.Fetch(stall, metadata=_credentials("site-a"), timeout=2) for _ in range(OVER)]
            codes = []
            for call in over:
                with pytest.raises(grpc.RpcError) as info:
                    next(call)
                codes.append(info.value.code())
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * OVER
            assert "site 'site-a' already runs 8 calls" in str(info.value.details())
            assert rejected(srv, "SiteCallBudget", "grpc") == OVER
            assert rejected(srv, "DownloadBudget") == 0  # refused by its own budget before the shared one
            _site_b_registers_and_downloads(harness, srv)
        finally:
            for call in held:
                call.cancel()
    until(lambda: srv.site_calls.held("site-a") == 0, "site-a's cancelled fetches giving their slots back", 5)


def test_a_site_holding_calls_on_many_connections_cannot_starve_another(harness: Harness) -> None:
    """Control streams that never send Register wait for it in a worker (up to the register timeout): spread
    over a connection each, 3 x CALLS_PER_SITE of them hold CALLS_PER_SITE workers and no more. Cancelled,
    they give the slots back and the site can use its whole budget again."""
    srv = _server(harness)
    attacker = [_connection(srv, "site-a") for _ in range(CALLS_PER_SITE + OVER)]
    with contextlib.ExitStack() as stack:
        for channel in attacker:
            stack.enter_context(channel)
        with _held_open(attacker, CONNECT, CALLS_PER_SITE + OVER, _credentials("site-a")) as calls:
            refused = until(lambda: [c for c in calls if c.done()] if sum(c.done() for c in calls) >= OVER else None,
                            "site-a's over-budget calls ending", 10)
            assert srv.site_calls.held("site-a") == CALLS_PER_SITE
            assert rejected(srv, "SiteCallBudget", "grpc") == OVER
            assert len(refused) == OVER and {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            _site_b_registers_and_downloads(harness, srv)
        until(lambda: srv.site_calls.held("site-a") == 0, "site-a's cancelled streams giving their slots back", 5)
        # What was given back is usable: the site holds its whole budget again, and no more.
        with _held_open(attacker, CONNECT, CALLS_PER_SITE, _credentials("site-a")):
            until(lambda: srv.site_calls.held("site-a") == CALLS_PER_SITE, "site-a's budget, taken again", 5)
            assert rejected(srv, "SiteCallBudget") == OVER


@pytest.mark.parametrize("tls", [True, False], ids=["mtls", "plaintext"])
def test_refused_callers_hold_no_slot_of_the_site_they_name(harness: Harness, tls: bool) -> None:
    """A wrong token (plaintext), or another site's token with one's own certificate (TLS): refused at the
    headers, and none of the named site's slots taken, so the real site still has its whole budget."""
    srv = _server(harness, tls=tls)
    # With TLS the caller is site-a by its certificate and presents site-b's name and token.
    caller, metadata = ("site-a", _credentials("site-b")) if tls else ("site-b", ((SITE_METADATA, "site-b"),
                                                                                  (AUTH_METADATA, BEARER + "guess")))
    expected = grpc.StatusCode.PERMISSION_DENIED if tls else grpc.StatusCode.UNAUTHENTICATED
    with _connection(srv, caller) as channel:
        for method in (f"/{SERVICE_NAME}/Fetch", CONNECT):
            with _held_open([channel], method, CALLS_PER_SITE + OVER, metadata, timeout=10) as calls:
                codes = {_code(call) for call in calls}  # each ends at its headers, without a request
                assert codes == {expected}, (method, codes)
                assert srv.site_calls.held("site-b") == 0
    assert rejected(srv, "SiteCallBudget") == 0
    _site_b_registers_and_downloads(harness, srv)
