"""Which path a transfer takes: socket handoff, bulk TCP or gRPC. Decided here and only here.

Each step skips work: gRPC copies every message twice in Python, bulk TCP
lets the kernel do the copies, and a handoff (:mod:`fedkube.transfer.handoff`)
also skips the sidecar's second hop. So the fastest path both sides offer is
taken, and an empty offer falls back to the next one. gRPC always works.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedkube.transfer import handoff


class Path(enum.Enum):
    GRPC = "grpc"
    BULK = "bulk"
    HANDOFF = "handoff"


@dataclass(frozen=True)
class Route:
    """The chosen path and the endpoint to use on it ("" for gRPC: the caller's channel)."""

    path: Path
    address: str = ""


GRPC = Route(Path.GRPC)


def handoff_enabled(wanted: bool, *, server_tls: bool = False) -> bool:
    """Whether this process may offer or take handed-over sockets: wanted by its settings, and possible here.

    Never with ``server_tls`` (the sidecar's hop to the server is TLS): a TLS session's state lives in the
    process that made it (no kTLS here) and the site's key must never reach the trainer, so the sidecar
    terminates TLS and relays plaintext to the trainer over the pod-local socket (DESIGN.md section 9,
    option (a)).
    """
    return wanted and handoff.AVAILABLE and not server_tls


def choose_route(
    *, bulk: str, handoff: str = "", bulk_ok: bool = True, handoff_ok: bool = True, server_tls: bool = False
) -> Route:
    """The route for one transfer, from the endpoints the other side offers.

    ``bulk``: its bulk TCP address ("" when none); ``handoff``: its handoff
    name ("" when none). ``bulk_ok`` is False while bulk must not be used
    (this side has no bulk path, or it failed lately): then gRPC, whatever is
    offered. ``handoff_ok`` is False when this side will not hand sockets
    over (switched off, or not this platform); ``server_tls`` is True when the
    connection that would be handed over is TLS to the server (then never).
    """
    if not bulk_ok:
        return GRPC
    if handoff and handoff_enabled(handoff_ok, server_tls=server_tls):
        return Route(Path.HANDOFF, handoff)
    if bulk:
        return Route(Path.BULK, bulk)
    return GRPC


__all__ = ["GRPC", "Path", "Route", "choose_route", "handoff_enabled"]
