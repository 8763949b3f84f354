"""Where fedkube's connections are made: the one place TLS plugs in.

Every TCP socket of the bulk protocol is dialed by :func:`dial` and every
listening one is made by :func:`listen`; the gRPC channel a sidecar opens to
the server comes from :func:`channel` and the server's gRPC port is bound by
:func:`add_port`. Today all are plain (the cluster network is trusted,
docs/protocol.md).

For TLS, the links between pods are what needs wrapping: the server's gRPC
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
from collections.abc import Sequence
from typing import Any

import grpc


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError with the fix otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bulk address {address!r} is not host:port (e.g. 127.0.0.1:8471)")
    return host.strip("[]"), int(port)


def dial(address: str, timeout_s: float) -> socket.socket:
    """A connected TCP socket to ``host:port`` with Nagle off (frames are written whole)."""
    sock = socket.create_connection(parse_address(address), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


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


def channel(address: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    """A gRPC channel to ``address`` (a sidecar's to its server)."""
    return grpc.insecure_channel(address, options=list(options))


def add_port(server: grpc.Server, address: str) -> int:
    """Bind ``server`` to ``address``; the port bound, 0 when it could not bind (gRPC's convention)."""
    return server.add_insecure_port(address)


__all__ = ["add_port", "channel", "close_socket", "dial", "listen", "parse_address"]
