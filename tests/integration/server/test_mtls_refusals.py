"""Issue 12, "Bad input": the real server refuses every bad TLS peer on both planes; the job's sites are unaffected.

Each attacker trusts the real job CA (its certificate is public) and presents what it has: a certificate of
another CA, an expired or not yet valid one, one of another job or namespace, the server's own, none at all,
plaintext, TLS 1.2, or a valid site certificate with another site's token or name. After all of them, site-a
and site-b run the job's round over the same server.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from fedkube.protocol import AUTH_METADATA, BEARER, PROTOCOL_VERSION, SITE_METADATA
from fedkube.security.contexts import client_ssl_context, grpc_channel_options
from fedkube.security.material import files_in
from fedkube.server.app import FedkubeServer
from fedkube.transfer import endpoints
from fedkube.transfer.bulk import read_status, send_request
from fedkube.transfer.endpoints import ClientTls
from fedkube.wire.v1 import control_pb2, control_pb2_grpc, tensor_pb2
from tests.integration.server.conftest import JOB, Harness, dial_bulk, make_config, rejected, token_of
from tests.integration.server.fakes import add_value
from tests.support.tls import SERVER_NAME, session_pki
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(harness: Harness) -> FedkubeServer:
    config = dataclasses.replace(make_config(rounds=1, registration_timeout_s=30.0), bulk_port=0)
    return harness.server(config, {"w": np.zeros(16, np.float32)})


def _attacker(kind: str) -> ClientTls:
    return ClientTls.from_files(files_in(session_pki().attacker_dir(kind)), SERVER_NAME)


def _connect(channel: grpc.Channel, site: str = "site-a", token_site: str = "site-a") -> grpc.RpcError:
    """Open a control stream as ``site`` with ``token_site``'s token; the error the server ends it with."""
    reg = control_pb2.ClientMessage(register=control_pb2.Register(
        job=JOB, site=site, session_id="attacker", protocol_version=PROTOCOL_VERSION))  # fmt: skip
    md = ((SITE_METADATA, site), (AUTH_METADATA, BEARER + token_of(token_site)))
    with pytest.raises(grpc.RpcError) as info:
        list(control_pb2_grpc.ControlStub(channel).Connect(iter([reg]), metadata=md, timeout=10))
    return info.value


def _round_still_runs(harness: Harness, srv: FedkubeServer) -> None:
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome


# --- gRPC (7070) ------------------------------------------------------------------------------------

HANDSHAKE_REFUSED: dict[str, Callable[[str], grpc.Channel]] = {
    # gRPC's core refuses these in the handshake: the call never reaches fedkube, the client sees UNAVAILABLE.
    "other_ca": lambda a: endpoints.channel(a, [], _attacker("other_ca")),
    "expired": lambda a: endpoints.channel(a, [], _attacker("expired")),
    "not_yet_valid": lambda a: endpoints.channel(a, [], _attacker("not_yet_valid")),
    "server_as_client": lambda a: endpoints.channel(a, [], _attacker("server_as_client")),
    "no_client_cert": lambda a: grpc.secure_channel(
        a, grpc.ssl_channel_credentials(root_certificates=session_pki().tls.for_server().ca_pem),
        options=grpc_channel_options(SERVER_NAME)),
    "plaintext": lambda a: grpc.insecure_channel(a),
}


def test_grpc_refuses_every_bad_peer_and_the_sites_still_run_their_round(
    harness: Harness, server: FedkubeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedkube.server")
    address = f"127.0.0.1:{server.grpc_port}"
    for kind, make in HANDSHAKE_REFUSED.items():
        with make(address) as channel:
            err = _connect(channel)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (kind, err)
    # Chained to the job CA, but naming no site of this job: refused by the identity check, logged and counted.
    for kind in ("other_job", "other_namespace"):
        with endpoints.channel(address, [], _attacker(kind)) as channel:
            err = _connect(channel)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "not of this job default/job1" in str(
            err.details()), (kind, err)  # fmt: skip
    assert rejected(server, "other_job", "grpc") == 2
    # A real site-a certificate with site-b's token, claiming site-b or itself: the token must be the cert's site's.
    with endpoints.channel(address, [], session_pki().client_tls("site-a")) as channel:
        for claimed in ("site-b", "site-a"):
            err = _connect(channel, site=claimed, token_site="site-b")
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (claimed, err)
    assert rejected(server, "token_site_mismatch", "grpc") == 2
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("reason other_job, peer ipv4:127.0.0.1" in m and "job default/job1-other" in m for m in lines), lines
    assert any("reason token_site_mismatch" in m and "site 'site-a''s but the caller names site 'site-b'" in m
               for m in lines), lines
    _round_still_runs(harness, server)


def test_grpc_download_is_bound_to_the_certificate_not_the_headers(server: FedkubeServer) -> None:
    txn = server.downloads.publish({"w": np.arange(8, dtype=np.float32)}, receivers=["site-a", "site-b"], ttl_s=60)
    fetch = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id=txn.refs[0].ref_id, receiver="site-b")
    md = ((SITE_METADATA, "site-b"), (AUTH_METADATA, BEARER + token_of("site-b")))
    with endpoints.channel(f"127.0.0.1:{server.grpc_port}", [], session_pki().client_tls("site-a")) as channel:
        stub = channel.unary_stream("/fedkube.v1.Download/Fetch", request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(stub(fetch, metadata=md, timeout=10))
    # site-a stole site-b's token and asked for site-b's copy: its certificate still says site-a.
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rejected(server, "token_site_mismatch", "grpc") == 1 and not txn.done_receivers


# --- bulk (8471) ------------------------------------------------------------------------------------


def _bulk_attempt(port: int, ctx: ssl.SSLContext | None, request: tensor_pb2.BulkRequest) -> object:
    """Dial, (TLS-)handshake, send ``request``: the status the server answers, or the error the client saw."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            sock: socket.socket = raw if ctx is None else ctx.wrap_socket(raw, server_hostname=SERVER_NAME)
            send_request(sock, request)
            return read_status(sock)
    except (OSError, EOFError) as exc:
        return exc


def _fetch(site: str = "site-a", token_site: str = "site-a") -> tensor_pb2.BulkRequest:
    return tensor_pb2.BulkRequest(site=site, token=token_of(token_site), fetch=tensor_pb2.FetchRequest(
        transaction_id="no-such-tx", ref_id="w", receiver=site))  # fmt: skip


def _tls12(files_kind: str = "site-a") -> ssl.SSLContext:
    ctx = client_ssl_context(files_in(session_pki().site_dir(files_kind)))
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _no_cert() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(files_in(session_pki().server_dir()).ca))
    return ctx


BULK_REFUSALS: list[tuple[str, Callable[[], ssl.SSLContext | None], str]] = [
    ("plaintext", lambda: None, "not_tls"),
    ("tls12", _tls12, "tls_version"),
    ("no_client_cert", _no_cert, "no_client_certificate"),
    ("other_ca", lambda: _attacker("other_ca").ssl_context, "unknown_ca"),
    ("expired", lambda: _attacker("expired").ssl_context, "cert_expired"),
    ("not_yet_valid", lambda: _attacker("not_yet_valid").ssl_context, "cert_not_yet_valid"),
    ("server_as_client", lambda: _attacker("server_as_client").ssl_context, "cert_wrong_purpose"),
    ("other_job", lambda: _attacker("other_job").ssl_context, "other_job"),
    ("other_namespace", lambda: _attacker("other_namespace").ssl_context, "other_job"),
]


def test_bulk_refuses_every_bad_peer_with_a_reason_and_the_sites_still_run_their_round(
    harness: Harness, server: FedkubeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedkube.transfer")
    for kind, make, reason in BULK_REFUSALS:
        before = rejected(server, reason, "bulk")
        outcome = _bulk_attempt(server.bulk_port, make(), _fetch())
        assert not (isinstance(outcome, tuple) and outcome[0] == grpc.StatusCode.NOT_FOUND), (kind, outcome)
        until(lambda r=reason, b=before: rejected(server, r, "bulk") == b + 1, what=f"{kind} counted as {reason}")  # type: ignore[misc]
    lines = [r.getMessage() for r in caplog.records if "refused a connection from 127.0.0.1" in r.getMessage()]
    for reason in ("not_tls", "tls_version", "unknown_ca", "cert_expired", "cert_wrong_purpose", "other_job"):
        assert any(m.endswith(f"(reason {reason})") for m in lines), (reason, lines)
    # Real certificates, wrong token or name: token_site_mismatch, before anything is looked up.
    for site, token_site in (("site-b", "site-b"), ("site-a", "site-b")):
        code, message = _bulk_attempt(server.bulk_port, session_pki().client_tls("site-a").ssl_context,
                                      _fetch(site, token_site))  # type: ignore[misc]
        assert code == grpc.StatusCode.PERMISSION_DENIED, (site, token_site, message)
    assert rejected(server, "token_site_mismatch", "bulk") == 2
    # The right certificate, name and token get past every check: the server answers about the transaction.
    with dial_bulk(server, "site-a") as sock:
        send_request(sock, _fetch())
        code, message = read_status(sock)
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-tx" in message
    _round_still_runs(harness, server)
