"""The enrollment port's wire format and the site's side of it (``fedkube join`` calls :func:`enroll`/:func:`renew`).

Why not gRPC: the port must take clients without a certificate (enroll) and with one (renew), which one
``ssl`` context with ``CERT_OPTIONAL`` does, while grpc's Python server credentials either require a client
certificate or ignore it; and one small request per connection needs no HTTP/2 framing, only tight bounds. So:
TLS 1.3, then one frame each way, a frame being a 4-byte big-endian length and a JSON object:

* request ``{"op": "enroll", "namespace", "job", "site", "token", "csr"}`` (no client certificate) or
  ``{"op": "renew", "csr"}`` (the site's current certificate as the TLS client certificate);
* answer ``{"ok": true, "certificate", "ca", "siteToken", "notAfter"}`` or ``{"ok": false, "reason", "message"}``.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedkube.errors import FedkubeError
from fedkube.security import enroll

MAX_REQUEST_BYTES = 8 << 10
MAX_ANSWER_BYTES = 64 << 10
_LEN = struct.Struct(">I")


class EnrollmentError(FedkubeError):
    """The server refused, or could not be reached; ``reason`` is the server's label (or ``unreachable``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the peer did not send a whole frame in time")
        sock.settimeout(left)  # each read gets only what is left: trickling does not extend the deadline
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the peer closed the connection mid-frame")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, limit: int, deadline: float) -> dict[str, Any]:
    """One frame of at most ``limit`` bytes by ``deadline``; ValueError for an oversized or non-object frame."""
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size, deadline))
    if size > limit:
        raise ValueError(f"a frame of {size} bytes is above the limit of {limit}")
    obj = json.loads(_recv_exact(sock, size, deadline))
    if not isinstance(obj, dict):
        raise ValueError("a frame must hold a JSON object")
    return obj


# --- the site's side ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """What the server returned: the site certificate (PEM), the job CA, the site's bearer token, expiry."""

    certificate: bytes
    ca: bytes
    site_token: str
    not_after: str


def client_context(ca_pem: str, *, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """TLS 1.3 to the server, trusting only the bundle's job CA; with ``cert``/``key`` presenting them (renew)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem)
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _exchange(address: tuple[str, int], ctx: ssl.SSLContext, server_name: str, request: dict[str, Any],
              timeout_s: float) -> Issued:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    where = f"{address[0]}:{address[1]}"
    try:
        with socket.create_connection(address, timeout=timeout_s) as raw, ctx.wrap_socket(
            raw, server_hostname=server_name) as sock:
            send_frame(sock, request)
            answer = recv_frame(sock, MAX_ANSWER_BYTES, deadline)
    except ssl.SSLCertVerificationError as exc:
        raise EnrollmentError("server_not_trusted", f"the server at {where} is not the job's server: "
                              f"{exc.verify_message}; nothing was sent; fix: check the bundle's address and "
                              f"server name ({server_name}) with the job owner") from exc
    except (OSError, ValueError, EOFError) as exc:
        raise EnrollmentError("unreachable", f"enrollment at {where} failed: {exc}; fix: check that the server's "
                              "enroll port is reachable from this site (firewall, ingress passthrough)") from exc
    if not answer.get("ok"):
        raise EnrollmentError(str(answer.get("reason", "refused")), f"the server refused: {answer.get('message')}")
    try:
        return Issued(str(answer["certificate"]).encode(), str(answer["ca"]).encode(), str(answer["siteToken"]),
                      str(answer["notAfter"]))
    except KeyError as exc:
        raise EnrollmentError("bad_answer", f"the server's answer lacks {exc}") from exc


def enroll_site(bundle: enroll.JoinBundle, key: ec.EllipticCurvePrivateKey, address: tuple[str, int],
                *, timeout_s: float = 10.0) -> Issued:  # fmt: skip
    """Send the site's CSR with the bundle's token to the enrollment port at ``address``."""
    request = {"op": "enroll", "namespace": bundle.namespace, "job": bundle.job, "site": bundle.site,
               "token": bundle.token, "csr": enroll.make_csr(key, bundle.site).decode()}  # fmt: skip
    return _exchange(address, client_context(bundle.ca_pem), bundle.server_name, request, timeout_s)


def renew_site(bundle: enroll.JoinBundle, key: ec.EllipticCurvePrivateKey, cert: Path, key_file: Path,
               address: tuple[str, int], *, timeout_s: float = 10.0) -> Issued:  # fmt: skip
    """Ask for a fresh certificate for ``key``, authenticated by the site's current certificate."""
    request = {"op": "renew", "csr": enroll.make_csr(key, bundle.site).decode()}
    ctx = client_context(bundle.ca_pem, cert=cert, key=key_file)
    return _exchange(address, ctx, bundle.server_name, request, timeout_s)
