"""The site's place in the job, as its sidecar knows it: kept, served on ``/status``, left as the final word.

:class:`SitePlace` follows the control stream (registered, a task of round N, the result announced and received,
the server's Stop) and the site's own decisions (a refusal of the job's terms, a withdrawal) in one
:class:`fedkube.siteview.SiteView`. :class:`SiteStatusServer` serves it as JSON on ``GET /status`` for the site
operator (bounded, no secrets: the view holds states, a round and reasons only); :func:`write_final` leaves it in
the termination-message file when the sidecar exits.

``POST /leave`` is how the site's own controller ends the site's participation (the site operator, when its admin
deletes the FLSite, before the pod goes): the sidecar sends ``Leave`` on its control stream. Only a caller holding
the site's bearer token may (the operator made the Secret holding it; whoever holds it can act as the site anyway).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from fedkube.errors import ConfigError
from fedkube.httpserve import BoundedHTTPServer, Refusals
from fedkube.protocol import STATUS_CONNECTION_LIMIT, STATUS_DEADLINE
from fedkube.siteview import SiteView
from fedkube.terms import JobTerms, Refusal
from fedkube.wire.v1 import control_pb2

log = logging.getLogger(__name__)

POLICY_REFUSED = "PolicyRefused"  # fedkube.status.Reason.POLICY_REFUSED, as the server reads a Leave
WITHDRAWN = "Withdrawn"  # fedkube.status.Reason.WITHDRAWN
#: The most bytes of a /leave request's body (its message for the server) that are read.
LEAVE_BODY_LIMIT = 1024
#: Who calls this port: the site operator and a kubelet probe; a handful at once.
MAX_CONNECTIONS = 16
#: A connection still open this long after its accept is closed (a GET /status or POST /leave takes milliseconds).
DEADLINE_S = 5.0


def terms_of(registered: control_pb2.Registered) -> JobTerms:
    """The job's terms from ``Registered`` (proto -> domain); a term the server did not send is None."""
    if not registered.HasField("terms"):
        return JobTerms()
    terms = registered.terms
    return JobTerms(strategy=terms.strategy or None, total_rounds=terms.total_rounds or None)


class SitePlace:
    """The one SiteView of this sidecar, changed by events from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._view = SiteView()

    @property
    def view(self) -> SiteView:
        with self._lock:
            return self._view

    def _change(self, **changes: Any) -> None:
        with self._lock:
            if self._view.state in ("Refused", "Withdrawn", "Stopped"):
                return  # the site's or the server's last word stands
            self._view = dataclasses.replace(self._view, **changes)

    def registered(self) -> None:
        with self._lock:
            connecting = self._view.state == "Connecting"
        if connecting:
            self._change(state="Registered")

    def task(self, round: int) -> None:
        self._change(state="Training", round=round)

    def uploading(self) -> None:
        self._change(state="Uploading")

    def received(self, ok: bool) -> None:
        self._change(state="Done" if ok else "Training")

    def stopped(self, stop: control_pb2.Stop) -> None:
        self._change(state="Stopped", reason=stop.reason or ("Succeeded" if stop.success else ""),
                     message=stop.message)

    def refused(self, refusal: Refusal) -> None:
        self._change(state="Refused", reason=POLICY_REFUSED, message=refusal.message, term=refusal.reason)

    def withdrawn(self, message: str) -> None:
        self._change(state="Withdrawn", reason=WITHDRAWN, message=message)


def write_final(path: Path | None, view: SiteView) -> None:
    """Leave ``view`` as the sidecar's termination message (best effort: exiting must not fail on it)."""
    if path is None:
        return
    try:
        path.write_text(view.to_json())
    except OSError as exc:
        log.warning("cannot write the site view to %s: %s", path, exc)


class _Handler(BaseHTTPRequestHandler):
    place: SitePlace
    token: str
    leave: Callable[[str], bool]

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/leave":
            self.send_error(404, "only /leave takes a POST here")
            return
        given = self.headers.get("Authorization", "")
        if not self.token or not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            self.send_error(401, "POST /leave needs the site's bearer token")
            return
        try:
            length = min(int(self.headers.get("Content-Length") or 0), LEAVE_BODY_LIMIT)
        except ValueError:
            length = 0
        message = self.rfile.read(max(0, length)).decode(errors="replace").strip()
        self.send_response(202 if self.leave(message) else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/status":
            self.send_error(404, "only /status is served here")
            return
        body = self.place.view.to_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("site status: " + format, *args)


class SiteStatusServer:
    """``GET /status`` of the site's view and ``POST /leave`` on ``host:port`` (0: any free port), from a daemon
    thread."""

    def __init__(self, place: SitePlace, host: str, port: int, *, token: str = "",
                 leave: Callable[[str], bool] = lambda message: False, max_connections: int = MAX_CONNECTIONS,
                 deadline_s: float = DEADLINE_S, on_refused: Callable[[str], None] | None = None) -> None:  # fmt: skip
        """``leave(message)`` ends the site's participation (True: it did now); ``token`` guards it. At most
        ``max_connections`` are served at once, each closed ``deadline_s`` after its accept; ``on_refused(reason)``
        is told each one closed ("StatusConnectionLimit", "StatusDeadline")."""
        handler = type("SiteStatusHandler", (_Handler,), {"place": place, "token": token,
                                                          "leave": staticmethod(leave)})
        try:
            self._httpd = BoundedHTTPServer(
                (host, port), handler, name="site status endpoint", max_connections=max_connections,
                deadline_s=deadline_s, refusals=Refusals(STATUS_CONNECTION_LIMIT, STATUS_DEADLINE),
                on_refused=on_refused,
            )  # fmt: skip
        except OSError as exc:
            raise ConfigError(f"cannot serve the site's /status on {host}:{port}: {exc}; fix: choose a free "
                              "FEDKUBE_STATUS_PORT (0 picks one)") from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="site-status", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._httpd.shutdown()
            self._httpd.server_close()
        self._thread.join(2.0)
