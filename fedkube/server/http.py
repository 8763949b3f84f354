"""The server's HTTP status endpoint (stdlib only).

* ``GET /status``  — the job's status document as JSON (what the operator polls).
* ``GET /healthz`` — 200 while the process serves HTTP at all (liveness).
* ``GET /readyz``  — 200 once the gRPC endpoint accepts clients, 503 before (readiness).

The server needs no Kubernetes API rights: this endpoint, its metrics and its
termination message are how it reports progress (DESIGN.md §4).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fedkube.protocol import STATUS_CONNECTION_LIMIT, STATUS_DEADLINE

log = logging.getLogger(__name__)


#: Who polls this port: the operator, kubelet probes and a Prometheus scrape or two; a handful at once.
MAX_CONNECTIONS = 32
#: A connection still open after this long is closed, whatever it sent (probes answer in milliseconds).
IDLE_TIMEOUT_S = 10.0


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with at most ``max_connections`` connection threads; one more is closed at once.

    The stdlib server starts a thread per connection with no limit, and its handlers wait forever for a
    request: 300 idle connections were 300 threads. With the handler's ``timeout`` an idle connection
    ends; with this cap they cannot pile up meanwhile.
    """

    daemon_threads = True
    request_queue_size = 128  # the stdlib's 5 makes a burst of connects wait for SYN retries, seconds each

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int,
        deadline_s: float, on_refused: Callable[[str], None] | None,
    ) -> None:  # fmt: skip
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max = max_connections
        self._deadline_s = deadline_s
        self._on_refused = on_refused
        self._open: dict[socket.socket, float] = {}  # connection -> when it must be done
        self._lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(address, handler)
        # The handler's socket timeout bounds each read, not the request: a client trickling a byte
        # just inside it would keep its thread forever. One reaper ends connections past their deadline.
        self._reaper = threading.Thread(target=self._reap, name="fedkube-status-reaper", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        while not self._closing.wait(min(1.0, self._deadline_s / 4)):
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, deadline in self._open.items() if deadline <= now]
            for conn in late:
                log.info("status endpoint: closing a connection still open after %.1fs", self._deadline_s)
                if self._on_refused is not None:
                    self._on_refused(STATUS_DEADLINE)
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("status endpoint: %d connections open; closing one more from %s", self._max, client_address)
            if self._on_refused is not None:
                self._on_refused(STATUS_CONNECTION_LIMIT)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open[request] = time.monotonic() + self._deadline_s
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(request, None)
            self._slots.release()


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
        handler = _make_handler(status_json, ready, idle_timeout_s)
        # ThreadingHTTPServer takes a plain host; "[::]" is gRPC's spelling of "every interface".
        bind = "0.0.0.0" if host in ("[::]", "") else host.strip("[]")
        self._httpd = _BoundedHTTPServer((bind, port), handler, max_connections, idle_timeout_s, on_refused)
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


def _make_handler(
    status_json: Callable[[], str], ready: Callable[[], bool], idle_timeout_s: float
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedkube-server"
        timeout = idle_timeout_s  # the socket timeout of every read: an idle connection ends

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
