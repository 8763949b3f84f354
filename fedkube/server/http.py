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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


class StatusServer:
    """Serves status JSON produced by ``status_json`` on a background thread.

    ``status_json`` is called on an HTTP worker thread for every request; it must
    be cheap and thread-safe (the workflow hands out an immutable snapshot).
    """

    def __init__(
        self,
        status_json: Callable[[], str],
        ready: Callable[[], bool],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        handler = _make_handler(status_json, ready)
        # ThreadingHTTPServer takes a plain host; "[::]" is gRPC's spelling of "every interface".
        bind = "0.0.0.0" if host in ("[::]", "") else host.strip("[]")
        self._httpd = ThreadingHTTPServer((bind, port), handler)
        self._httpd.daemon_threads = True
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
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            # Probes hit this every few seconds; keep them out of INFO logs.
            log.debug("http %s - %s", self.address_string(), format % args)

    return Handler
