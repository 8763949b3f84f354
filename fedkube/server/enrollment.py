"""The server's enrollment port: remote sites trade a one-time join token and a CSR for a site certificate.

* :class:`Ledger` remembers spent tokens and each remote site's current certificate serial, in
  ``enrollment.json`` (written before a certificate is returned, so a crash cannot unspend a token) on a
  PersistentVolumeClaim: the checkpoint claim when the job has one, else the small ``<job>-enrollment`` claim the
  operator makes for a job with remote sites (``FEDKUBE_ENROLL_LEDGER_DIR``). So a spent token stays spent, and a
  superseded certificate stays refused, across server restarts; without either (a server started by hand) the
  ledger lives in the checkpoint directory or, with none, in memory.
* :class:`Enroller` decides (no sockets): checks the token (:func:`fedkube.security.enroll.check_token`) or, for a
  renewal, the TLS client certificate, and signs the CSR's key for exactly the token's (or certificate's) site.
* :class:`EnrollmentServer` is the listener: TLS 1.3 with the server certificate, a client certificate optional
  (a renewal presents one; TLS still verifies it against the job CA), one request per connection within an
  absolute deadline, bounded frames, and the bulk port's slot limits (:class:`~fedkube.transfer.bulk.listener.
  Listener`).

Outcomes are counted in ``fedkube_server_enrollments_total{fljob, reason}``: ``enrolled``, ``renewed``, or the
refusal label (:data:`fedkube.security.enroll.REFUSALS`, the TLS labels, the port limits).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.protocol import PORT_REFUSALS, REQUEST_DEADLINE
from fedkube.security import contexts, enroll, pki
from fedkube.security.contexts import TLS_REFUSALS, handshake_refusal
from fedkube.security.enroll import EnrollmentRefused, TokenRecord
from fedkube.security.enroll_wire import MAX_REQUEST_BYTES, recv_frame, send_frame
from fedkube.security.identity import PeerIdentityError, site_identity
from fedkube.security.pki import TlsFiles
from fedkube.server.supersede import Supersession
from fedkube.transfer.bulk.listener import Listener

log = logging.getLogger(__name__)

LEDGER_FILE = "enrollment.json"
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32
MAX_PER_PEER = 4
ENROLLED, RENEWED = "enrolled", "renewed"


@dataclass(frozen=True)
class EnrollSettings:
    """``FEDKUBE_ENROLL_DIR`` (the job CA and tokens.json) and ``FEDKUBE_ENROLL_PORT``, read once."""

    ca: pki.Issued
    records: Mapping[str, TokenRecord]
    port: int
    ledger_dir: Path | None = None
    """``FEDKUBE_ENROLL_LEDGER_DIR``: a volume of its own for the ledger; None keeps it in the checkpoint directory."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EnrollSettings | None:
        raw = env.get(envvars.ENROLL_DIR, "").strip()
        if not raw:
            return None
        directory = Path(raw)
        try:
            ca = pki.load_issued((directory / "ca.crt").read_bytes(), (directory / "ca.key").read_bytes())
            table = json.loads((directory / "tokens.json").read_text())
            records = {str(site): TokenRecord.from_dict(rec) for site, rec in table.items()}
        except (OSError, ValueError, AttributeError, ConfigError) as exc:
            raise ConfigError(f"{envvars.ENROLL_DIR}={raw!r} does not hold a usable job CA (ca.crt, ca.key) and "
                              f"tokens.json: {exc}; fix: mount the job's <job>-ca and <job>-enroll Secrets there "
                              "(the operator does for a job with remote sites)") from exc
        port_raw = env.get(envvars.ENROLL_PORT, "").strip()
        port = envvars.parse_port(port_raw, envvars.ENROLL_PORT) if port_raw else 0
        ledger_raw = env.get(envvars.ENROLL_LEDGER_DIR, "").strip()
        return cls(ca=ca, records=records, port=port, ledger_dir=Path(ledger_raw) if ledger_raw else None)


@dataclass
class Ledger:
    """Spent token hashes and each remote site's current certificate serial; saved to ``path`` when given."""

    path: Path | None = None
    spent: set[str] = field(default_factory=set)
    current: dict[str, str] = field(default_factory=dict)  # site -> serial (hex) of its newest certificate

    @classmethod
    def open(cls, directory: Path | None) -> Ledger:
        if directory is None:
            return cls()
        path = directory / LEDGER_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path=path)
        except (OSError, ValueError) as exc:
            # Refusing to start is safer than forgetting which tokens were spent.
            raise ConfigError(f"the enrollment ledger {path} cannot be read ({exc}); fix: restore it, or delete "
                              "it to forget spent tokens (only do that once every join token has expired)") from exc
        return cls(path=path, spent=set(data.get("spent", [])), current=dict(data.get("current", {})))

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"spent": sorted(self.spent), "current": self.current}, sort_keys=True)
        pki.write_file(self.path, data.encode(), 0o600)


class Enroller:
    """Transport-free decisions of the enrollment port."""

    def __init__(
        self, namespace: str, job: str, settings: EnrollSettings, ledger: Ledger, site_tokens: Mapping[str, bytes],
        *, clock: Callable[[], float] = time.time, on_issued: Callable[[str, str | None, str], None] | None = None,
        revoked: Container[str] = frozenset(),
    ) -> None:  # fmt: skip
        """``on_issued(site, previous serial, new serial)`` runs before the ledger names the new certificate
        current (:meth:`fedkube.server.supersede.Supersession.issued`); ``revoked`` sites get no certificate."""
        self.namespace, self.job = namespace, job
        self._revoked = revoked
        self._on_issued = on_issued
        self._settings = settings
        self._ledger = ledger
        self._site_tokens = site_tokens
        self._clock = clock
        self._lock = threading.Lock()  # one decision at a time: a token is spent exactly once

    def answer(self, request: Mapping[str, Any], peer_cert: bytes | None) -> tuple[str, dict[str, Any]]:
        """(outcome label, answer frame) for one request; never raises for a bad request."""
        try:
            op = request.get("op")
            csr = enroll.load_csr(_text(request, "csr"))
            with self._lock:
                if op == "enroll":
                    site = self._check_enroll(request)
                    outcome = ENROLLED
                elif op == "renew":
                    site = self._check_renew(peer_cert)
                    outcome = RENEWED
                else:
                    raise EnrollmentRefused(enroll.BAD_REQUEST, f"unknown op {op!r}; fix: send enroll or renew")
                if site in self._revoked:  # checked after the token or certificate: it proves the site
                    raise EnrollmentRefused(enroll.SITE_REVOKED, f"site {site!r} is revoked (spec.revokedSites); "
                                            "it gets no certificate; fix: ask the job owner")
                cert = self._issue(site, csr, spend=request.get("token") if op == "enroll" else None)
        except EnrollmentRefused as exc:
            return exc.reason, {"ok": False, "reason": exc.reason, "message": str(exc)}
        token = self._site_tokens.get(site, b"").decode()
        return outcome, {
            "ok": True, "site": site, "certificate": cert.public_bytes(_PEM).decode(),
            "ca": self._settings.ca.cert_pem().decode(), "siteToken": token,
            "notAfter": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }  # fmt: skip

    def _check_enroll(self, request: Mapping[str, Any]) -> str:
        site = _text(request, "site")
        if (request.get("namespace"), request.get("job")) != (self.namespace, self.job):
            raise EnrollmentRefused(enroll.TOKEN_OTHER_JOB, f"the request enrolls into job {request.get('namespace')}"
                                    f"/{request.get('job')}, this server runs {self.namespace}/{self.job}; fix: use "
                                    "the bundle of this job")
        enroll.check_token(_text(request, "token", required=False), namespace=self.namespace, job=self.job,
                           site=site, records=self._settings.records, consumed=self._ledger.spent,
                           now=self._clock())  # fmt: skip
        return site

    def _check_renew(self, peer_cert: bytes | None) -> str:
        if not peer_cert:
            raise EnrollmentRefused(enroll.RENEW_NO_CERT, "a renewal needs the site's current certificate as the "
                                    "TLS client certificate; fix: enroll with the join token instead")
        try:
            ident = site_identity(peer_cert, namespace=self.namespace, job=self.job)
        except PeerIdentityError as exc:
            raise EnrollmentRefused(enroll.RENEW_NO_CERT, f"the client certificate names no site of this job: "
                                    f"{exc}") from exc
        if ident.site not in self._settings.records:
            raise EnrollmentRefused(enroll.RENEW_NOT_REMOTE, f"site {ident.site!r} is not a remote site of this "
                                    "job; its certificate comes from the operator and is renewed by it")
        serial = format(x509.load_der_x509_certificate(peer_cert).serial_number, "x")
        if self._ledger.current.get(ident.site) != serial:
            raise EnrollmentRefused(enroll.RENEW_REVOKED, f"the certificate {serial} of site {ident.site!r} is not "
                                    "its current one (revoked or replaced by a later enrollment or renewal); "
                                    "fix: renew with the newest certificate, or enroll again with a new bundle")
        return ident.site

    def _issue(self, site: str, csr: x509.CertificateSigningRequest, *, spend: Any) -> x509.Certificate:
        now = dt.datetime.fromtimestamp(self._clock(), dt.timezone.utc)
        cert = enroll.sign_site_csr(self._settings.ca, csr, self.namespace, self.job, site, now)
        if spend:
            self._ledger.spent.add(enroll.token_hash(str(spend)))
        serial = format(cert.serial_number, "x")
        if self._on_issued is not None:
            self._on_issued(site, self._ledger.current.get(site), serial)
        self._ledger.current[site] = serial
        self._ledger.save()  # before the answer leaves: a crash now leaves the token spent, never reusable
        return cert


def _text(request: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = request.get(key)
    if value in (None, "") and not required:
        return ""  # the caller names what is missing (check_token: no_token)
    if not isinstance(value, str) or not value:
        raise EnrollmentRefused(enroll.BAD_REQUEST if key != "csr" else enroll.CSR_INVALID,
                                f"the request's {key!r} is missing or not a string")
    return value


_PEM = serialization.Encoding.PEM


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """TLS 1.3 with the server certificate; a client certificate is optional but, when sent, must be the job CA's."""
    ctx = contexts.server_ssl_context(files)  # the bulk plane's context, whose client certificate is required
    ctx.verify_mode = ssl.CERT_OPTIONAL  # enrollment comes before a site has one; renewal presents it
    return ctx


class EnrollmentServer(Listener):
    """The enrollment listener; ``count(outcome)`` is called once per connection."""

    def __init__(
        self, enroller: Enroller, ctx: ssl.SSLContext, *, host: str, port: int, count: Callable[[str], None],
        request_timeout_s: float = REQUEST_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
        max_per_peer: int = MAX_PER_PEER,
    ) -> None:  # fmt: skip
        self._counter = count  # ServerMetrics.enrollment: fedkube_server_enrollments_total{reason}
        self._known = {ENROLLED, RENEWED, *enroll.REFUSALS, *TLS_REFUSALS, *PORT_REFUSALS}
        self.enroller = enroller
        self.request_timeout_s = request_timeout_s
        self._ctx = ctx
        super().__init__(host, port, f"job {enroller.job} enroll", max_connections, max_per_peer=max_per_peer,
                         on_refused=self._count)

    def _count(self, outcome: str) -> None:
        self._counter(outcome if outcome in self._known else "other")

    def start(self) -> EnrollmentServer:
        self._start()
        return self

    def wrap(self, conn: socket.socket) -> socket.socket:
        return self._ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)

    def handle(self, conn: socket.socket) -> bool:
        assert isinstance(conn, ssl.SSLSocket)
        deadline = time.monotonic() + self.request_timeout_s
        peer = _peer(conn)
        try:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.do_handshake()
            request = recv_frame(conn, MAX_REQUEST_BYTES, deadline)
        except TimeoutError:
            self.refuse(REQUEST_DEADLINE, peer, f"no request within {self.request_timeout_s:g} s")
            return False
        except ssl.SSLError as exc:
            self.refuse(handshake_refusal(exc), peer, f"TLS handshake failed: {exc}")
            return False
        except (ValueError, EOFError, OSError) as exc:
            self.refuse(enroll.BAD_REQUEST, peer, f"unreadable request: {exc}")
            with contextlib.suppress(OSError):
                send_frame(conn, {"ok": False, "reason": enroll.BAD_REQUEST, "message": f"unreadable request: {exc}"
                                  f"; at most {MAX_REQUEST_BYTES} bytes of JSON"})
            return False
        outcome, answer = self.enroller.answer(request, conn.getpeercert(binary_form=True))
        self._count(outcome)
        if answer["ok"]:
            log.info("job %s: %s site %s from %s (certificate until %s)", self.enroller.job, outcome, answer["site"],
                     peer, answer["notAfter"])
        else:
            log.warning("job %s: refused an enrollment request from %s: %s (reason %s)", self.enroller.job, peer,
                        answer["message"], outcome)
        with contextlib.suppress(OSError):
            conn.settimeout(max(0.5, deadline - time.monotonic()))
            send_frame(conn, answer)
        return False


def _peer(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return "a peer that has gone"


def start_enrollment(
    settings: EnrollSettings, *, tls_files: TlsFiles | None, namespace: str, job: str, host: str,
    site_tokens: Mapping[str, bytes], checkpoint_dir: Path | None, count: Callable[[str], None],
    supersession: Supersession | None = None, revoked: Container[str] = frozenset(),
) -> EnrollmentServer:  # fmt: skip
    """The running enrollment listener of a server (``FedkubeServer.start``); ConfigError when it cannot run.
    ``supersession`` is given the ledger's current serials and told of each new certificate."""
    if tls_files is None:
        raise ConfigError(f"{envvars.ENROLL_DIR} is set but TLS is disabled: remote sites enroll over TLS; fix: "
                          "enable spec.security.tls for a job with remote sites")
    ledger = Ledger.open(settings.ledger_dir or checkpoint_dir)
    if supersession is not None:
        supersession.attach(ledger.current)
    enroller = Enroller(namespace, job, settings, ledger, site_tokens,
                        on_issued=supersession.issued if supersession is not None else None, revoked=revoked)
    host = host.strip("[]")
    if host in ("", "::"):
        host = "::" if socket.has_dualstack_ipv6() else "0.0.0.0"
    try:
        return EnrollmentServer(enroller, server_context(tls_files), host=host, port=settings.port,
                                count=count).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{settings.port} for enrollment ({envvars.ENROLL_PORT}): {exc}; "
                          f"fix: pick a free {envvars.ENROLL_PORT}") from exc
