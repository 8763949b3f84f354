"""Where fedkube's connections are made: the one place TLS plugs in.

Every TCP socket of the bulk protocol is dialed by :func:`dial` and every
listening one is made by :func:`listen`; the gRPC channel a sidecar opens to
the server comes from :func:`channel` and the server's gRPC port is bound by
:func:`add_port`. Each takes this party's TLS (:class:`ClientTls`,
:class:`ServerTls`, built from :class:`~fedkube.security.settings.TlsSettings`)
or None for plaintext (``security.tls: disabled``).

The links between pods are what is wrapped: the server's gRPC
port (:func:`add_port` in ``fedkube.server.app``) and bulk listener
(:class:`~fedkube.transfer.bulk.BulkServer` on the server's bind address),
and their dialers, the sidecar's channel (:func:`channel`) and its dials to
the server's bulk port (:class:`~fedkube.transfer.bulk.ForwardEndpoint`, the
server leg of :func:`~fedkube.transfer.bulk.push_upload`). Pod-local links
(127.0.0.1, abstract handoff sockets) need none. A TLS socket's state lives in
the process that holds it, so it can neither be spliced nor handed to another
process: with TLS on the server hop, :func:`fedkube.transfer.route.choose_route`
is where the handoff is turned off and the relay's pump must copy.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from fedkube.security import contexts
from fedkube.security.pki import TlsFiles
from fedkube.security.settings import TlsSettings
from fedkube.transfer.rechannel import ReloadingChannel
from fedkube.transfer.reload import ReloadingCredentials


class TlsHandshakeError(OSError):
    """A TLS handshake with the server failed; the message names the server and the fix."""


@dataclass(frozen=True)
class ClientTls:
    """A site's side of both planes: its credentials and the name the server's certificate must carry.

    The credentials are read again when their files change (a renewal): every new connection, bulk dial or
    gRPC channel, presents the newest matching certificate and key (:mod:`fedkube.transfer.reload`).
    """

    credentials: ReloadingCredentials
    server_name: str

    @classmethod
    def from_files(cls, files: TlsFiles, server_name: str) -> ClientTls:
        return cls(ReloadingCredentials(files), server_name)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The bulk plane's context for a new connection."""
        return self.credentials.current().ssl_context

    @classmethod
    def from_settings(cls, settings: TlsSettings) -> ClientTls | None:
        """None when TLS is off."""
        return None if settings.files is None else cls.from_files(settings.files, settings.server_name)


@dataclass(frozen=True)
class ServerTls:
    """The server's side of both planes; ``namespace``/``job`` are what a site certificate must name."""

    ssl_context: ssl.SSLContext
    grpc_credentials: grpc.ServerCredentials
    namespace: str
    job: str

    @classmethod
    def from_files(cls, files: TlsFiles, *, namespace: str, job: str) -> ServerTls:
        return cls(contexts.server_ssl_context(files), contexts.grpc_server_credentials(files), namespace, job)


#: TCP keepalive of every bulk socket (both ends): the first probe after 30 s idle, then every 10 s, the
#: connection dead after 3 unanswered. The same 30 s as gRPC's keepalive (``wire._KEEPALIVE``): below the
#: idle limits of the load balancers and NATs a remote site's path may cross (many L7 proxies 60 s,
#: GCP/Azure ~240 s, AWS NLB 350 s), so a connection that waits (a fetch before the model is published,
#: an upload between chunks) is not dropped silently, and a peer that vanished is noticed in ~60 s.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3


def set_keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with :data:`KEEPALIVE_IDLE_S` / ``_INTERVAL_S`` / ``_PROBES`` (Linux's knobs)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):  # fmt: skip
        option = getattr(socket, name, None)  # absent off Linux: the system's defaults apply there
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError with the fix otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bulk address {address!r} is not host:port (e.g. 127.0.0.1:8471)")
    return host.strip("[]"), int(port)


def dial(address: str, timeout_s: float, tls: ClientTls | None = None) -> socket.socket:
    """A connected TCP socket to ``host:port`` with Nagle off (frames are written whole).

    With ``tls`` the socket is a TLS 1.3 client whose handshake is done (within ``timeout_s`` of the dial):
    the server's certificate was verified against the job CA and ``tls.server_name``. A failed handshake
    raises :class:`TlsHandshakeError` naming the server and the fix.
    """
    deadline = time.monotonic() + timeout_s
    sock = socket.create_connection(parse_address(address), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_keepalive(sock)
    if tls is None:
        return sock
    try:
        tls_sock = tls.ssl_context.wrap_socket(sock, server_hostname=tls.server_name, do_handshake_on_connect=False)
    except (OSError, ValueError):
        sock.close()
        raise
    try:
        tls_sock.settimeout(max(0.001, deadline - time.monotonic()))
        tls_sock.do_handshake()
        tls_sock.settimeout(timeout_s)
    except ssl.SSLCertVerificationError as exc:
        tls_sock.close()
        raise TlsHandshakeError(
            f"the server at {address} failed TLS verification ({exc.verify_message}): its certificate must be "
            f"issued by this job's CA for the name {tls.server_name!r}; fix: point the sidecar at its own job's "
            "server, or set FEDKUBE_TLS_SERVER_NAME to a name the server certificate carries"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        tls_sock.close()
        if isinstance(exc, TimeoutError | socket.timeout):
            raise
        raise TlsHandshakeError(
            f"TLS handshake with the server at {address} failed: {exc}; fix: check that the address is the "
            "server's TLS bulk port and that this site's certificate is of this job and valid now"
        ) from None
    return tls_sock


def accept_tls(conn: socket.socket, tls: ServerTls) -> ssl.SSLSocket:
    """``conn`` (accepted) as a server-side TLS socket whose handshake has not run yet (no I/O here).

    The caller runs :meth:`ssl.SSLSocket.do_handshake` under its own deadline: a handshake counts as part of
    the request, so a peer that trickles or stalls it is bound by the same absolute deadline and slot limits.
    """
    return tls.ssl_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``"::"`` means every address, IPv4 included."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # create_server alone would make "::" IPv6-only; a dual-stack pod network needs both.
    dual = host == "::" and socket.has_dualstack_ipv6()
    return socket.create_server((host, port), family=family, backlog=backlog, dualstack_ipv6=dual)


def close_socket(sock: socket.socket | None) -> None:
    """Shut ``sock`` down both ways (waking any thread blocked on it) and close it; None is fine."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def channel(address: str, options: Sequence[tuple[str, Any]], tls: ClientTls | None = None) -> grpc.Channel:
    """A gRPC channel to ``address`` (a sidecar's to its server); mutual TLS with ``tls``."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    opts = list(options) + contexts.grpc_channel_options(tls.server_name) if tls.server_name else list(options)
    return ReloadingChannel(tls.credentials, lambda creds: grpc.secure_channel(address, creds, options=opts))


def add_port(server: grpc.Server, address: str, tls: ServerTls | None = None) -> int:
    """Bind ``server`` to ``address``; the port bound, 0 when it could not bind (gRPC's convention).

    With ``tls`` the port takes TLS only, and only clients with a certificate from the job CA.
    """
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.grpc_credentials)


__all__ = [
    "ClientTls", "ServerTls", "TlsHandshakeError", "accept_tls", "add_port", "channel", "close_socket", "dial",
    "listen", "parse_address", "set_keepalive",
]  # fmt: skip
