"""How many calls one site may hold on the job server's gRPC port at once.

Every running call holds one of the server's workers (and a
``maximum_concurrent_rpcs`` slot) until its handler returns. Without a limit
per caller, one site, authenticated and so past the TLS handshake and the
token check, could open calls until the server had no worker left for the
other sites' Register (the first message of ``Connect``) or Download. A
per-connection HTTP/2 stream cap does not stop that (the site opens more
connections) and refuses a legitimate client's calls when they burst
(docs/networking.md, "Streams per connection"); so the limit is per
*identity*: :class:`SiteAdmission` counts each authenticated site's running
calls, on all its connections together, and refuses the one above
:data:`CALLS_PER_SITE` at the headers with RESOURCE_EXHAUSTED (reason
:data:`~fedkube.protocol.SITE_CALL_BUDGET`), before it waits for anything.

A slot is held while the call's handler runs, which is while it holds a
worker: a call cancelled by its client gives its slot back as soon as the
handler notices (a control stream at once, a fetch at its next chunk), and a
handler that outlives its call keeps the slot as long as it keeps the worker.
Callers whose credentials do not check out take no slot: they are refused at
the headers by the Download interceptor or the Control servicer, which log
and count them.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

from fedkube.protocol import SITE_CALL_BUDGET
from fedkube.server.auth import Authenticator, AuthError
from fedkube.server.callgate import CallGate, gated

# What one legitimate sidecar runs on the server at once, on one connection:
#   1  Connect, its control stream (sidecar/upstream.py: one, replaced on reconnect);
#   1  Push (sidecar/reverse.py): a site whose pushes come over gRPC has its result pulled one tensor
#      at a time (server/downloads.py; bulk answers hold no call and go FETCH_WIDTH wide);
#   1  Fetch or Complete relayed for the trainer (trainer_sdk/_receive.py fetches tensor after
#      tensor, then completes the transaction; the relay forwards each call as it comes);
#   1  spare: a retried push or fetch whose replaced call has not ended on the server yet.
# = 4 per connection, the server's own sizing per client (its workers are 4 per client + 8). Twice
# that, because a sidecar that reconnects after its connection died opens its new calls while the
# server may still run the dead connection's calls (until it sees the connection gone: at once for a
# reset, after the keepalive timeout for a silent break).
CALLS_PER_SITE = 8
# Workers above the sites' budgets together: calls refused at the headers (bad tokens, over budget)
# still run a handler for an instant, and must find a worker that no site's budget can hold.
SPARE_WORKERS = 8


def server_workers(sites: int) -> int:
    """The gRPC server's workers (and ``maximum_concurrent_rpcs``) for a job of ``sites`` clients.

    Every site may hold its whole budget at once and a spare remains, so no site staying within
    its budget can take another's worker.
    """
    return CALLS_PER_SITE * max(1, sites) + SPARE_WORKERS


class SiteCalls:
    """Running calls per site, at most ``limit`` each; thread-safe."""

    def __init__(self, limit: int = CALLS_PER_SITE) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()

    def take(self, site: str) -> bool:
        """Reserve one of ``site``'s slots; False when it holds ``limit`` already."""
        with self._lock:
            if self._held[site] >= self.limit:
                return False
            self._held[site] += 1
            return True

    def give_back(self, site: str) -> None:
        with self._lock:
            self._held[site] -= 1
            if self._held[site] <= 0:
                del self._held[site]

    def held(self, site: str) -> int:
        """How many calls of ``site`` are running now."""
        with self._lock:
            return self._held[site]


class SiteAdmission(grpc.ServerInterceptor, CallGate[str | None]):
    """Runs each authenticated site's calls within its :class:`SiteCalls` budget (the outermost interceptor).

    The check runs when the call starts, on its headers (:func:`~fedkube.server.callgate.gated`), and a
    refusal ends the call before any other interceptor or servicer sees it.
    """

    def __init__(self, auth: Authenticator, calls: SiteCalls) -> None:
        self._auth = auth
        self.calls = calls

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        return gated(handler, self)

    def admit(self, context: grpc.ServicerContext) -> str | None:
        """The site whose slot this call holds; None for a caller the inner handler refuses."""
        site = self._auth.verified_site(context.invocation_metadata(), context)
        if site is None:
            return None
        if not self.calls.take(site):
            busy = AuthError(site, grpc.StatusCode.RESOURCE_EXHAUSTED, SITE_CALL_BUDGET, (
                f"site {site!r} already runs {self.calls.limit} calls on this server, the most one site may "
                "hold at once; fix: end calls the site no longer needs (a fedkube sidecar stays below it and "
                "retries this refusal with backoff)"
            ))  # fmt: skip
            self._auth.refuse(busy, "a call", context.peer())
            context.abort(busy.code, busy.message)
        return site

    def release(self, admitted: str | None) -> None:
        if admitted is not None:
            self.calls.give_back(admitted)


__all__ = ["CALLS_PER_SITE", "SPARE_WORKERS", "SiteAdmission", "SiteCalls", "server_workers"]
