"""Real gRPC over mutual TLS on 127.0.0.1: a one-method server binds each call to the caller's site."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from fedkube.security.contexts import (
    grpc_channel_credentials,
    grpc_channel_options,
    grpc_peer_site_identity,
    grpc_server_credentials,
)
from fedkube.security.identity import PeerIdentityError
from fedkube.security.pki import TlsFiles
from tests.integration.security.conftest import JOB, NS, SERVER_NAME, JobPki

METHOD = "/fedkube.test.Identity/WhoAmI"


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    try:
        ident = grpc_peer_site_identity(context, namespace=NS, job=JOB)
    except PeerIdentityError as exc:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{exc.reason}: {exc}")
    return f"{ident.namespace}/{ident.job}/{ident.site}".encode()


def _serve(creds: grpc.ServerCredentials) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "fedkube.test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def port(job_pki: JobPki) -> Iterator[int]:
    server, port = _serve(grpc_server_credentials(job_pki.server))
    yield port
    server.stop(None)


def _call(port: int, creds: grpc.ChannelCredentials, server_name: str = SERVER_NAME) -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=grpc_channel_options(server_name)) as channel:
        return channel.unary_unary(METHOD)(b"", timeout=5)  # type: ignore[no-any-return]


def _refused(port: int, creds: grpc.ChannelCredentials, code: grpc.StatusCode, server_name: str = SERVER_NAME) -> str:
    with pytest.raises(grpc.RpcError) as err:
        _call(port, creds, server_name)
    assert err.value.code() == code, err.value
    return str(err.value.details())


def test_the_call_is_bound_to_the_callers_site(port: int, job_pki: JobPki) -> None:
    assert _call(port, grpc_channel_credentials(job_pki.sites["site-a"])) == b"team-a/mnist/site-a"
    assert _call(port, grpc_channel_credentials(job_pki.sites["site-b"])) == b"team-a/mnist/site-b"


def test_local_mode_names_are_accepted(port: int, job_pki: JobPki) -> None:
    assert _call(port, grpc_channel_credentials(job_pki.sites["site-a"]), "localhost") == b"team-a/mnist/site-a"


@pytest.mark.parametrize("kind", ["rogue_site", "expired", "future", "server"])
def test_a_certificate_tls_refuses_never_reaches_the_method(port: int, job_pki: JobPki, kind: str) -> None:
    # The server refuses during the handshake; a TLS 1.3 client only sees the connection closed ("Socket closed"),
    # and the same server answering site-a and site-b above shows that it works.
    files: TlsFiles = {
        "rogue_site": job_pki.rogue_site, "expired": job_pki.sites["expired"], "future": job_pki.sites["future"],
        "server": job_pki.server,
    }[kind]
    _refused(port, grpc_channel_credentials(files), grpc.StatusCode.UNAVAILABLE)


def test_a_client_without_certificate_is_refused(port: int, job_pki: JobPki) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=job_pki.server.ca.read_bytes())
    _refused(port, creds, grpc.StatusCode.UNAVAILABLE)


def test_a_certificate_of_another_job_is_refused_by_the_identity_check(port: int, job_pki: JobPki) -> None:
    details = _refused(port, grpc_channel_credentials(job_pki.other_job_site), grpc.StatusCode.PERMISSION_DENIED)
    assert details.startswith("other_job:") and "team-a/other-job" in details


def test_a_server_certificate_with_the_wrong_name_is_refused(port: int, job_pki: JobPki) -> None:
    details = _refused(
        port, grpc_channel_credentials(job_pki.sites["site-a"]), grpc.StatusCode.UNAVAILABLE,
        "other-job-server.team-a.svc",
    )
    assert "Hostname Verification" in details


def test_a_server_of_another_ca_is_refused(job_pki: JobPki) -> None:
    server, rogue_port = _serve(grpc_server_credentials(job_pki.rogue_server))
    try:
        details = _refused(rogue_port, grpc_channel_credentials(job_pki.sites["site-a"]), grpc.StatusCode.UNAVAILABLE)
        assert "CERTIFICATE_VERIFY_FAILED" in details
    finally:
        server.stop(None)
