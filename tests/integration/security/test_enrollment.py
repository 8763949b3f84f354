"""The enrollment port under attack, with real TLS on 127.0.0.1: every refusal names its reason and counts it.

One server per test (a fresh ledger), the job PKI of conftest; remote sites remote-a and remote-b.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry

from fedkube.metrics.server import ServerMetrics
from fedkube.security import enroll, pki
from fedkube.security.enroll_wire import EnrollmentError, enroll_site, renew_site
from fedkube.server.enrollment import Enroller, EnrollmentServer, EnrollSettings, Ledger, server_context
from tests.integration.security.conftest import JOB, NS, JobPki

REMOTE = ("remote-a", "remote-b")
TTL_S = 3600.0


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    server: EnrollmentServer
    registry: CollectorRegistry
    clock: Clock
    bundles: dict[str, enroll.JoinBundle]
    ledger_dir: Path
    job_pki: JobPki

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.port)

    def count(self, outcome: str) -> float:
        value = self.registry.get_sample_value("fedkube_server_enrollments_total",
                                               {"fljob": JOB, "reason": outcome})
        return value or 0.0


def _bundle(job_pki: JobPki, site: str, token: str) -> enroll.JoinBundle:
    return enroll.JoinBundle(
        namespace=NS, job=JOB, site=site, server_name="localhost", addresses=("127.0.0.1",), grpc_port=0,
        bulk_port=0, enroll_port=0, ca_pem=job_pki.ca.cert_pem().decode(), ca_sha256=enroll.fingerprint(
            job_pki.ca.cert), token=token, expires_at="",
    )  # fmt: skip


def _start(job_pki: JobPki, ledger_dir: Path, clock: Clock, registry: CollectorRegistry) -> EnrollmentServer:
    tokens = {s: enroll.derive_token(job_pki.ca, NS, JOB, s, "1") for s in REMOTE}
    records = {s: enroll.TokenRecord(enroll.token_hash(t), clock.now + TTL_S) for s, t in tokens.items()}
    settings = EnrollSettings(ca=job_pki.ca, records=records, port=0)
    enroller = Enroller(NS, JOB, settings, Ledger.open(ledger_dir), {s: f"bearer-{s}".encode() for s in REMOTE},
                        clock=clock)
    metrics = ServerMetrics(registry, JOB)
    return EnrollmentServer(enroller, server_context(job_pki.server), host="127.0.0.1", port=0,
                            count=metrics.enrollment, request_timeout_s=2.0).start()


@pytest.fixture
def env(job_pki: JobPki, tmp_path: Path) -> Iterator[Env]:
    clock, registry = Clock(dt.datetime.now(dt.timezone.utc).timestamp()), CollectorRegistry()
    server = _start(job_pki, tmp_path, clock, registry)
    bundles = {s: _bundle(job_pki, s, enroll.derive_token(job_pki.ca, NS, JOB, s, "1")) for s in REMOTE}
    yield Env(server, registry, clock, bundles, tmp_path, job_pki)
    server.stop()


def _refused(env: Env, bundle: enroll.JoinBundle, reason: str, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    with pytest.raises(EnrollmentError) as caught:
        enroll_site(bundle, key or enroll.new_site_key(), env.address, timeout_s=2.0)
    assert caught.value.reason == reason, str(caught.value)
    assert env.count(reason) == 1
    return str(caught.value)


def _site_uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _write(directory: Path, key: ec.EllipticCurvePrivateKey, cert_pem: bytes) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key_file = directory / "tls.crt", directory / "tls.key"
    cert.write_bytes(cert_pem)
    key_file.write_bytes(pki.Issued(x509.load_pem_x509_certificate(cert_pem), key).key_pem())
    return cert, key_file


def test_enroll_renew_and_a_replaced_certificate_cannot_renew(env: Env, tmp_path: Path) -> None:
    key = enroll.new_site_key()
    issued = enroll_site(env.bundles["remote-a"], key, env.address, timeout_s=2.0)
    cert = x509.load_pem_x509_certificate(issued.certificate)
    cert.verify_directly_issued_by(env.job_pki.ca.cert)
    assert cert.public_key() == key.public_key()  # the site's own key: it never left
    assert _site_uris(cert) == [pki.site_uri(NS, JOB, "remote-a")]
    assert issued.site_token == "bearer-remote-a" and issued.ca == env.job_pki.ca.cert_pem()
    assert env.count("enrolled") == 1
    old_cert, old_key = _write(tmp_path / "old", key, issued.certificate)

    new_key = enroll.new_site_key()
    renewed = renew_site(env.bundles["remote-a"], new_key, old_cert, old_key, env.address, timeout_s=2.0)
    fresh = x509.load_pem_x509_certificate(renewed.certificate)
    assert fresh.public_key() == new_key.public_key() and fresh.serial_number != cert.serial_number
    assert _site_uris(fresh) == [pki.site_uri(NS, JOB, "remote-a")]
    assert env.count("renewed") == 1
    # The replaced certificate is revoked for renewal: a thief of the old key cannot keep the identity alive.
    with pytest.raises(EnrollmentError) as caught:
        renew_site(env.bundles["remote-a"], enroll.new_site_key(), old_cert, old_key, env.address, timeout_s=2.0)
    assert caught.value.reason == enroll.RENEW_REVOKED


def test_a_spent_token_stays_spent_across_a_server_restart(env: Env) -> None:
    enroll_site(env.bundles["remote-a"], enroll.new_site_key(), env.address, timeout_s=2.0)
    _refused(env, env.bundles["remote-a"], enroll.TOKEN_REPLAYED)
    env.server.stop()
    registry = CollectorRegistry()
    env.server, env.registry = _start(env.job_pki, env.ledger_dir, env.clock, registry), registry
    _refused(env, env.bundles["remote-a"], enroll.TOKEN_REPLAYED)
    enroll_site(env.bundles["remote-b"], enroll.new_site_key(), env.address, timeout_s=2.0)  # others unaffected


def test_an_expired_token_is_refused(env: Env) -> None:
    env.clock.now += TTL_S + 1
    assert "expired" in _refused(env, env.bundles["remote-a"], enroll.TOKEN_EXPIRED)


def test_tokens_of_another_site_or_job_are_refused(env: Env, job_pki: JobPki) -> None:
    a, b = env.bundles["remote-a"], env.bundles["remote-b"]
    _refused(env, replace(b, token=a.token), enroll.TOKEN_WRONG_SITE)
    other_job = enroll.derive_token(job_pki.ca, NS, "other-job", "remote-a", "1")
    _refused(env, replace(a, token=other_job), enroll.TOKEN_OTHER_JOB)
    # The right names with a guessed secret, and a site that is not remote.
    _refused(env, replace(a, token=a.token[:-4] + "AAAA"), enroll.TOKEN_INVALID)
    in_cluster = enroll.derive_token(job_pki.ca, NS, JOB, "site-a", "1")
    _refused(env, replace(a, site="site-a", token=in_cluster), enroll.TOKEN_UNKNOWN_SITE)
    _refused(env, replace(a, token=""), enroll.NO_TOKEN)
    _refused(env, replace(a, token="not-a-token"), enroll.TOKEN_MALFORMED)
    enroll_site(a, enroll.new_site_key(), env.address, timeout_s=2.0)  # none of them spent remote-a's token


def _send(env: Env, request: bytes) -> dict[str, object]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=env.job_pki.ca.cert_pem().decode())
    raw = socket.create_connection(env.address, timeout=2)
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(struct.pack(">I", len(request)) + request)
        size = struct.unpack(">I", s.recv(4))[0]
        data = b""
        while len(data) < size:
            data += s.recv(size - len(data))
    answer: dict[str, object] = json.loads(data)
    return answer


def test_the_certificate_names_the_tokens_site_whatever_the_csr_asks(env: Env) -> None:
    key = enroll.new_site_key()
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "remote-b")]))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(pki.site_uri(NS, JOB, "remote-b")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    b = env.bundles["remote-a"]
    answer = _send(env, json.dumps({"op": "enroll", "namespace": NS, "job": JOB, "site": "remote-a",
                                    "token": b.token, "csr": greedy.public_bytes(serialization.Encoding.PEM).decode()
                                    }).encode())  # fmt: skip
    assert answer["ok"] is True
    cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
    assert _site_uris(cert) == [pki.site_uri(NS, JOB, "remote-a")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


def test_bad_csrs_and_oversized_requests_are_refused(env: Env) -> None:
    b = env.bundles["remote-a"]

    def request(csr: str) -> dict[str, object]:
        return _send(env, json.dumps({"op": "enroll", "namespace": NS, "job": JOB, "site": "remote-a",
                                      "token": b.token, "csr": csr}).encode())

    assert request("x" * (enroll.MAX_CSR_BYTES + 1))["reason"] == enroll.CSR_TOO_LARGE
    assert request("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")[
        "reason"] == enroll.CSR_INVALID
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    rsa_csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(rsa_key, hashes.SHA256())
    assert request(rsa_csr.public_bytes(serialization.Encoding.PEM).decode())["reason"] == enroll.CSR_KEY
    huge = _send(env, json.dumps({"op": "enroll", "csr": "x" * 10_000}).encode())
    assert huge["ok"] is False and huge["reason"] == enroll.BAD_REQUEST
    assert env.count(enroll.CSR_TOO_LARGE) == env.count(enroll.CSR_KEY) == env.count(enroll.BAD_REQUEST) == 1
    enroll_site(b, enroll.new_site_key(), env.address, timeout_s=2.0)  # the token is still good


def test_renewal_needs_a_current_remote_site_certificate_of_the_job_ca(env: Env, job_pki: JobPki) -> None:
    b = env.bundles["remote-a"]
    key = enroll.new_site_key()
    with pytest.raises(EnrollmentError) as caught:  # no client certificate at all
        renew_site(b, key, None, None, env.address, timeout_s=2.0)  # type: ignore[arg-type]
    assert caught.value.reason == enroll.RENEW_NO_CERT
    in_cluster = job_pki.sites["site-a"]
    with pytest.raises(EnrollmentError) as caught:
        renew_site(b, key, in_cluster.cert, in_cluster.key, env.address, timeout_s=2.0)
    assert caught.value.reason == enroll.RENEW_NOT_REMOTE
    with pytest.raises(EnrollmentError) as caught:  # another CA: the handshake itself fails
        renew_site(b, key, job_pki.rogue_site.cert, job_pki.rogue_site.key, env.address, timeout_s=2.0)
    assert caught.value.reason == "unreachable"
    assert env.count("unknown_ca") == 1


def test_the_site_shows_its_token_only_to_the_job_server(job_pki: JobPki, tmp_path: Path) -> None:
    clock, registry = Clock(dt.datetime.now(dt.timezone.utc).timestamp()), CollectorRegistry()
    impostor = _start(job_pki, tmp_path, clock, registry)
    impostor._ctx = server_context(job_pki.rogue_server)  # same names, another CA's key
    try:
        bundle = _bundle(job_pki, "remote-a", enroll.derive_token(job_pki.ca, NS, JOB, "remote-a", "1"))
        with pytest.raises(EnrollmentError) as caught:
            enroll_site(bundle, enroll.new_site_key(), ("127.0.0.1", impostor.port), timeout_s=2.0)
        assert caught.value.reason == "server_not_trusted"
        assert registry.get_sample_value("fedkube_server_enrollments_total",
                                         {"fljob": JOB, "reason": "enrolled"}) is None
    finally:
        impostor.stop()


def test_a_silent_connection_is_dropped_at_the_deadline(env: Env) -> None:
    with socket.create_connection(env.address, timeout=5) as raw:
        raw.settimeout(5)
        assert raw.recv(1) == b""  # closed by the server after request_timeout_s (2 s), not held
    assert env.count("request_deadline") + env.count("RequestDeadline") == 1


def test_join_enrolls_once_reuses_and_renews_when_a_third_is_left(env: Env, tmp_path: Path) -> None:
    from fedkube.runtime.join import Endpoints, ensure_identity

    state, ends = tmp_path / "state", Endpoints("127.0.0.1", 0, 0, env.server.port)
    bundle = env.bundles["remote-a"]
    assert ensure_identity(bundle, state, ends, timeout_s=2.0) == "enrolled"
    first = (state / "tls.crt").read_bytes()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert {stat.S_IMODE((state / f).stat().st_mode) for f in ("tls.key", "token")} == {0o600}
    assert ensure_identity(bundle, state, ends, timeout_s=2.0) == "reused"  # a restart: no new token needed
    cert = x509.load_pem_x509_certificate(first)
    later = cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) * 0.8
    env.clock.now = later.timestamp()
    assert ensure_identity(bundle, state, ends, timeout_s=2.0, now=later) == "renewed"
    assert (state / "tls.crt").read_bytes() != first
    assert env.count("enrolled") == env.count("renewed") == 1
    # A bundle of another job CA (the job was recreated): the stored identity is not reused but enrolled anew.
    other = replace(bundle, ca_sha256="sha256:" + "0" * 64)
    with pytest.raises(EnrollmentError):
        ensure_identity(other, state, ends, timeout_s=2.0, now=later)  # the token is spent: refused, not reused


def test_join_renews_while_the_site_runs_and_the_next_connection_presents_the_new_certificate(
    env: Env, tmp_path: Path,
) -> None:  # fmt: skip
    import threading

    from fedkube.runtime.join import Endpoints, ensure_identity, refresh_identity
    from fedkube.runtime.renewal import RenewalLoop
    from fedkube.security import contexts
    from fedkube.security.material import files_in
    from fedkube.transfer import endpoints
    from tests.support.waiting import until

    state, ends = tmp_path / "state", Endpoints("127.0.0.1", 0, 0, env.server.port)
    bundle = env.bundles["remote-a"]
    ensure_identity(bundle, state, ends, timeout_s=2.0)
    first = x509.load_pem_x509_certificate((state / "tls.crt").read_bytes()).serial_number
    # What the sidecar holds (its credentials are read from the state directory), and a server that answers each
    # new TLS connection with the serial of the client certificate it saw.
    tls = endpoints.ClientTls.from_files(files_in(state), "localhost")
    listener = socket.create_server(("127.0.0.1", 0))
    server_ctx = contexts.server_ssl_context(env.job_pki.server)

    def answer(conn: socket.socket) -> None:
        with conn, server_ctx.wrap_socket(conn, server_side=True) as sock:
            while sock.recv(1):  # one answer per byte received, for as long as the connection lasts
                der = sock.getpeercert(binary_form=True) or b""
                sock.sendall(struct.pack(">Q", x509.load_der_x509_certificate(der).serial_number >> 96))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def seen(sock: socket.socket) -> int:
        sock.sendall(b"?")
        return int(struct.unpack(">Q", sock.recv(8))[0])

    opened = endpoints.dial(address, 2.0, tls)
    assert seen(opened) == first >> 96
    # The first attempt fails (the server unreachable), the retry renews: the loop keeps going.
    attempts: list[str] = []

    def renew() -> str:
        attempts.append("x")
        if len(attempts) == 1:
            raise EnrollmentError("unreachable", "the enrollment port did not answer")
        return refresh_identity(bundle, state, ends, renew=True, timeout_s=2.0)

    loop = RenewalLoop("remote-a", state, renew, delay=lambda cert, now, rng: 0.0 if not attempts else 3600.0,
                       retry=lambda failures, cert, now, rng: 0.05).start()
    try:
        until(lambda: loop.renewals == 1, timeout=5.0, what="the renewal")
    finally:
        loop.stop()
    second = x509.load_pem_x509_certificate((state / "tls.crt").read_bytes()).serial_number
    assert second != first and len(attempts) == 2 and env.count("renewed") == 1
    with endpoints.dial(address, 2.0, tls) as fresh:
        assert seen(fresh) == second >> 96  # the next connection presents the renewed certificate
    assert seen(opened) == first >> 96  # the one open across the renewal stays up with the old one
    opened.close()
    listener.close()
