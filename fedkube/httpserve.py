"""Small HTTP endpoints a hostile peer cannot exhaust: the server's and the sidecar's status ports, every /metrics.

The stdlib's ``ThreadingHTTPServer`` (and prometheus_client's ``start_http_server``, built the same way) starts
one thread per connection with no limit, and its handlers wait forever for a request: 300 idle connections were
300 threads (issue 12, item 5). :class:`BoundedHTTPServer` runs at most ``max_connections`` connection threads,
closes one more at once, and ends every connection still open ``deadline_s`` after it was accepted, whatever it
sent: a per-read timeout alone lets a client trickling a byte just inside it keep its thread forever.

stdlib only: the server, the sidecar and the operator all serve through it, so it imports nothing of theirs.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

#: Who polls these ports: an operator, kubelet probes and a Prometheus scrape or two; a handful at once.
MAX_CONNECTIONS = 16
#: A connection still open this long after its accept is closed (a probe or a scrape takes milliseconds;
#: Prometheus's own scrape timeout defaults to 10 s).
DEADLINE_S = 10.0
#: Refusals of one reason are logged at most once per this many seconds (an attack is thousands of connects).
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class Refusals:
    """The ``reason`` labels under which an endpoint reports the connections it closes."""

    connection_limit: str  # every connection thread taken
    deadline: str  # still open at its deadline


class _RateLimitedLog:
    """One warning per reason and period, saying how many more there were since the last one."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, reason: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self._every_s:
                self._quiet[reason] = self._quiet.get(reason, 0) + 1
                return
            self._last[reason] = now
            quiet = self._quiet.pop(reason, 0)
        suffix = f" ({quiet} more since the last such warning)" if quiet else ""
        log.warning(msg + suffix, *args)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with at most ``max_connections`` connection threads and a deadline per connection.

    ``on_refused(reason)`` is told each connection closed over the cap or at its deadline, with the labels of
    ``refusals``; ``name`` says which endpoint in the log. A handler needs no ``timeout`` of its own.
    """

    daemon_threads = True
    request_queue_size = 128  # the stdlib's 5 makes a burst of connects wait for SYN retries, seconds each

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, name: str, refusals: Refusals,
        max_connections: int = MAX_CONNECTIONS, deadline_s: float = DEADLINE_S,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        if max_connections < 1 or deadline_s <= 0:
            raise ValueError(f"{name}: max_connections must be >= 1 and deadline_s > 0, "
                             f"got {max_connections} and {deadline_s}")
        self.name = name
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max = max_connections
        self._deadline_s = deadline_s
        self._refusals = refusals
        self._on_refused = on_refused
        self._log = _RateLimitedLog(LOG_EVERY_S)
        self._open: dict[socket.socket, float] = {}  # connection -> when it must be done
        self._lock = threading.Lock()
        self._closing = threading.Event()
        # An IPv6 address ("::") needs an AF_INET6 socket; the class default is AF_INET.
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0][0]
        super().__init__(address, handler)
        self._reaper = threading.Thread(target=self._reap, name=f"fedkube-{name.replace(' ', '-')}-reaper",
                                        daemon=True)
        self._reaper.start()

    def _refused(self, reason: str) -> None:
        if self._on_refused is None:
            return
        try:
            self._on_refused(reason)
        except Exception:  # a counting bug must not end the reaper, and with it every deadline
            log.exception("%s: counting a refused connection (%s) failed", self.name, reason)

    def _reap(self) -> None:
        while not self._closing.wait(min(1.0, self._deadline_s / 4)):
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, deadline in self._open.items() if deadline <= now]
                for conn in late:  # counted once, even if its thread is slow to notice
                    del self._open[conn]
            for conn in late:
                self._log.warning(self._refusals.deadline, "%s: closing a connection still open after %.1fs",
                                  self.name, self._deadline_s)
                self._refused(self._refusals.deadline)
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; a peer that hung up (or was cut off at its deadline) before
        # its answer was written is no error of ours.
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("%s: connection from %s ended early", self.name, client_address, exc_info=True)
        else:
            log.exception("%s: a request from %s failed", self.name, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._log.warning(self._refusals.connection_limit, "%s: %d connections open; closing one more from %s",
                              self.name, self._max, client_address[0] if client_address else "?")
            self._refused(self._refusals.connection_limit)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # The reaper ends (and counts) a connection at its deadline; the socket timeout is only a backstop.
        request.settimeout(2 * self._deadline_s)
        with self._lock:
            self._open[request] = time.monotonic() + self._deadline_s
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(request, None)
            self._slots.release()


def bind_host(host: str) -> str:
    """``host`` as a socket takes it: "[::]" (gRPC's spelling of every interface) and "" mean 0.0.0.0."""
    return "0.0.0.0" if host in ("[::]", "") else host.strip("[]")
