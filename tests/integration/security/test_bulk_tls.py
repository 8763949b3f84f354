"""Real TLS handshakes on 127.0.0.1 with the bulk plane's contexts, each test playing one attacker.

The server thread records what it concluded about its peer (a SiteIdentity, or the error that refused it);
refusals are asserted on the server side, where the decision is made, and the client must get no reply.
"""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from fedkube.security.contexts import client_ssl_context, peer_site_identity, server_ssl_context
from fedkube.security.identity import PeerIdentityError, SiteIdentity
from fedkube.security.pki import TlsFiles
from tests.integration.security.conftest import JOB, NS, SERVER_NAME, JobPki

Outcome = SiteIdentity | BaseException


class OneShotTlsServer:
    """Accepts one connection, handshakes, binds the peer to a site and answers `ok <site>`."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._outcome: Outcome | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.settimeout(5)
        try:
            with self._ctx.wrap_socket(conn, server_side=True) as tls:
                ident = peer_site_identity(tls, namespace=NS, job=JOB)
                self._outcome = ident
                tls.sendall(f"ok {ident.site}".encode())
        except (OSError, PeerIdentityError) as exc:  # ssl.SSLError is an OSError
            self._outcome = exc
        finally:
            conn.close()
            self._listener.close()

    def outcome(self) -> Outcome:
        self._thread.join(10)
        assert self._outcome is not None, "the server never finished the connection"
        return self._outcome


def _client(ctx: ssl.SSLContext, port: int, server_hostname: str = SERVER_NAME) -> bytes | BaseException:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(
            raw, server_hostname=server_hostname
        ) as tls:
            # TLS 1.3: a client whose certificate the server refuses learns it at the first read, not the handshake.
            return tls.recv(64)
    except OSError as exc:
        return exc


def _connect(job_pki: JobPki, client: TlsFiles, server_hostname: str = SERVER_NAME) -> tuple[Outcome, object]:
    server = OneShotTlsServer(server_ssl_context(job_pki.server))
    reply = _client(client_ssl_context(client), server.port, server_hostname)
    return server.outcome(), reply


@pytest.mark.parametrize("name", [SERVER_NAME, f"{JOB}-server", f"{JOB}-server.{NS}", "localhost", "127.0.0.1"])
def test_a_site_of_the_job_is_bound_to_its_identity(job_pki: JobPki, name: str) -> None:
    outcome, reply = _connect(job_pki, job_pki.sites["site-a"], name)
    assert outcome == SiteIdentity(NS, JOB, "site-a")
    assert reply == b"ok site-a"


def test_another_sites_certificate_yields_that_other_site(job_pki: JobPki) -> None:
    outcome, reply = _connect(job_pki, job_pki.sites["site-b"])
    assert outcome == SiteIdentity(NS, JOB, "site-b")
    assert reply == b"ok site-b"


def _refused(outcome: Outcome, reply: object, reason: str) -> None:
    assert isinstance(outcome, BaseException), f"the server accepted {outcome}"
    assert reason in str(outcome), f"refused for another reason than {reason!r}: {outcome!r}"
    assert not isinstance(reply, bytes) or reply == b"", f"the refused client got {reply!r}"


def test_a_client_certificate_from_another_ca_is_refused(job_pki: JobPki) -> None:
    # A certificate with the right identity and the right issuer *name*: only the CA's key tells it apart.
    _refused(*_connect(job_pki, job_pki.rogue_site), "certificate verify failed")


def test_an_expired_client_certificate_is_refused(job_pki: JobPki) -> None:
    _refused(*_connect(job_pki, job_pki.sites["expired"]), "certificate has expired")


def test_a_not_yet_valid_client_certificate_is_refused(job_pki: JobPki) -> None:
    _refused(*_connect(job_pki, job_pki.sites["future"]), "certificate is not yet valid")


def test_the_server_certificate_cannot_act_as_a_site(job_pki: JobPki) -> None:
    # Only serverAuth in its EKU: OpenSSL refuses it as a client certificate before identity.py sees it.
    _refused(*_connect(job_pki, job_pki.server), "unsuitable certificate purpose")


def test_a_certificate_of_another_job_from_a_shared_ca_is_refused_by_identity(job_pki: JobPki) -> None:
    outcome, reply = _connect(job_pki, job_pki.other_job_site)
    _refused(outcome, reply, "of job team-a/other-job, not of this job team-a/mnist")
    assert isinstance(outcome, PeerIdentityError) and outcome.reason == "other_job"


def test_a_client_without_certificate_is_refused(job_pki: JobPki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(job_pki.server.ca))
    server = OneShotTlsServer(server_ssl_context(job_pki.server))
    reply = _client(ctx, server.port)
    _refused(server.outcome(), reply, "peer did not return a certificate")


def test_a_tls12_only_client_is_refused(job_pki: JobPki) -> None:
    ctx = client_ssl_context(job_pki.sites["site-a"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server = OneShotTlsServer(server_ssl_context(job_pki.server))
    reply = _client(ctx, server.port)
    _refused(server.outcome(), reply, "unsupported protocol")


def test_a_plaintext_client_is_refused(job_pki: JobPki) -> None:
    server = OneShotTlsServer(server_ssl_context(job_pki.server))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"\x00\x00\x00\x10fedkube-bulk-req")
        try:
            reply = raw.recv(64)
        except ConnectionResetError:
            reply = b""
    outcome = server.outcome()
    assert isinstance(outcome, ssl.SSLError), outcome
    assert b"ok" not in reply


def test_a_server_certificate_with_the_wrong_name_is_refused_by_the_client(job_pki: JobPki) -> None:
    # A valid certificate of this job's server, presented for another name (e.g. a redirect to another job).
    server = OneShotTlsServer(server_ssl_context(job_pki.server))
    reply = _client(client_ssl_context(job_pki.sites["site-a"]), server.port, "other-job-server.team-a.svc")
    assert isinstance(reply, ssl.SSLCertVerificationError), reply
    assert "Hostname mismatch" in str(reply)
    assert isinstance(server.outcome(), OSError)


def test_a_server_of_another_ca_is_refused_by_the_client(job_pki: JobPki) -> None:
    server = OneShotTlsServer(server_ssl_context(job_pki.rogue_server))
    reply = _client(client_ssl_context(job_pki.sites["site-a"]), server.port)
    assert isinstance(reply, ssl.SSLCertVerificationError), reply
    assert "certificate verify failed" in str(reply)
    assert isinstance(server.outcome(), OSError)


def test_a_tls12_only_server_is_refused_by_the_client(job_pki: JobPki) -> None:
    ctx = server_ssl_context(job_pki.server)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server = OneShotTlsServer(ctx)
    reply = _client(client_ssl_context(job_pki.sites["site-a"]), server.port)
    assert isinstance(reply, ssl.SSLError), reply
    assert isinstance(server.outcome(), OSError)


def test_both_sides_trust_the_job_ca_only(job_pki: JobPki) -> None:
    for ctx in (server_ssl_context(job_pki.server), client_ssl_context(job_pki.sites["site-a"])):
        anchors = ctx.get_ca_certs(binary_form=True)
        assert anchors == [job_pki.ca.cert.public_bytes(Encoding.DER)]
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
