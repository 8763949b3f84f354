"""The status port under hostile clients: idle and trickling connections are closed, threads stay bounded.

The stdlib server it is built on starts a thread per connection and waits
forever for a request: 300 idle connections were 300 threads (issue 12, item 5).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections import Counter

import pytest

from fedkube.server.http import StatusServer

pytestmark = pytest.mark.timeout(30)

CAP = 8
DEADLINE_S = 1.0


@pytest.fixture
def status() -> tuple[StatusServer, Counter[str]]:
    refused: Counter[str] = Counter()
    srv = StatusServer(lambda: '{"phase": "Running"}', lambda: True, max_connections=CAP,
                       idle_timeout_s=DEADLINE_S, on_refused=lambda reason: refused.update([reason]))
    srv.start()
    yield srv, refused
    srv.stop()


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _healthz(srv: StatusServer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=5) as reply:
        return int(reply.status)


def test_idle_connections_are_capped_and_dropped(status: tuple[StatusServer, Counter[str]]) -> None:
    srv, refused = status
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(60)]
    try:
        time.sleep(0.3)
        assert threading.active_count() <= before + CAP, "one thread per idle connection, without a cap"
        # Every idle one is closed: those over the cap at once, the others at their deadline.
        assert all(_closed_by_peer(s, 3 * DEADLINE_S + 1) for s in idle)
        assert refused["StatusConnectionLimit"] == 60 - CAP
    finally:
        for s in idle:
            s.close()
    assert _healthz(srv) == 200


def test_a_trickling_client_is_closed_at_the_deadline(status: tuple[StatusServer, Counter[str]]) -> None:
    srv, refused = status
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        start = time.monotonic()
        closed = False
        for byte in b"GET /status HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            # Each byte well inside the per-read timeout; the whole request never within the deadline.
            with contextlib.suppress(OSError):
                sock.sendall(bytes([byte]))
            if _closed_by_peer(sock, DEADLINE_S / 4):
                closed = True
                break
            if time.monotonic() - start > 4 * DEADLINE_S:
                break
        assert closed, "a byte every quarter of the timeout kept the connection open"
        assert time.monotonic() - start < 3 * DEADLINE_S
    assert refused["StatusDeadline"] == 1
    assert _healthz(srv) == 200
