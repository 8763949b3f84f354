"""The server's HTTP status endpoint (stdlib only).

* ``GET /status``  — the job's status document as JSON (what the operator polls).
* ``GET /healthz`` — 200 while the process serves HTTP at all (liveness).
* ``GET /readyz``  — 200 once the gRPC endpoint accepts clients, 503 before (readiness).

The server needs no Kubernetes API rights: this endpoint, its metrics and its
termination message are how it reports progress (DESIGN.md §4).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

from fedkube.httpserve import BoundedHTTPServer, Refusals, bind_host
from fedkube.protocol import STATUS_CONNECTION_LIMIT, STATUS_DEADLINE

log = logging.getLogger(__name__)


#: Who polls this port: the operator, kubelet probes and a Prometheus scrape or two; a handful at once.
MAX_CONNECTIONS = 32
#: A connection still open after this long is closed, whatever it sent (probes answer in milliseconds).
IDLE_TIMEOUT_S = 10.0


class StatusServer:
    """Serves status JSON produced by ``status_json`` on a background thread.

    ``status_json`` is called on an HTTP worker thread for every request; it must
    be cheap and thread-safe (the workflow hands out an immutable snapshot).
    At most ``max_connections`` are served at once; one still open after
    ``idle_timeout_s`` (a whole request and its answer take milliseconds) is
    closed. ``on_refused(reason)`` is told each connection closed over the cap
    ("StatusConnectionLimit") or at its deadline ("StatusDeadline").
    """

    def __init__(
        self,
        status_json: Callable[[], str],
        ready: Callable[[], bool],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._httpd = BoundedHTTPServer(
            (bind_host(host), port), _make_handler(status_json, ready), name="status endpoint",
            refusals=Refusals(STATUS_CONNECTION_LIMIT, STATUS_DEADLINE), max_connections=max_connections,
            deadline_s=idle_timeout_s, on_refused=on_refused,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fedkube-status-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("status endpoint listening on port %s (/status, /healthz, /readyz)", self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _make_handler(status_json: Callable[[], str], ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedkube-server"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/status":
                try:
                    body = status_json()
                except Exception:  # a status bug must not take the endpoint down
                    log.exception("building the status document failed")
                    self._send(500, '{"error": "status unavailable"}')
                    return
                self._send(200, body)
            elif path == "/healthz":
                self._send(200, '{"ok": true}')
            elif path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, '{"ready": %s}' % ("true" if ok else "false"))
            else:
                self._send(404, '{"error": "not found; try /status, /healthz or /readyz"}')

        def _send(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            try:
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                # A probe that hung up before reading its answer: nothing to answer, and not an error worth
                # the traceback socketserver would print to stderr.
                log.debug("http %s hung up before its %d answer was written", self.address_string(), code)

        def log_message(self, format: str, *args: object) -> None:
            # Probes hit this every few seconds; keep them out of INFO logs.
            log.debug("http %s - %s", self.address_string(), format % args)

    return Handler
