"""Every small HTTP port under hostile clients: idle and trickling connections are closed, threads stay bounded.

One suite for each endpoint built on :class:`fedkube.httpserve.BoundedHTTPServer`: the server's status port, the
sidecar's site-status port (it holds the site's identity: ``POST /leave``; a wrong token is refused in
tests/integration/sidecar/test_site_policy.py) and a /metrics port. The stdlib server
(and prometheus_client's) starts a thread per connection and waits forever for a request: 300 idle connections
were 300 threads (issue 12, item 5).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedkube.metrics import ServerMetrics, new_registry, serve_metrics
from fedkube.server.http import StatusServer
from fedkube.sidecar.siteplace import SitePlace, SiteStatusServer

pytestmark = pytest.mark.timeout(30)

CAP = 8
DEADLINE_S = 1.0
TOKEN = "site-token"


@dataclass
class Endpoint:
    port: int
    refused: Callable[[], Counter[str]]  # reason -> connections closed so far
    served: Callable[[], bool]  # a real request (a probe, a scrape) is answered in full
    limit: str  # the refusal reasons this endpoint reports
    deadline: str


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        assert reply.status == 200
        return bytes(reply.read())


def _server_status() -> Iterator[Endpoint]:
    refused: Counter[str] = Counter()
    srv = StatusServer(lambda: '{"phase": "Running"}', lambda: True, max_connections=CAP,
                       idle_timeout_s=DEADLINE_S, on_refused=lambda reason: refused.update([reason]))
    srv.start()
    yield Endpoint(srv.port, lambda: refused, lambda: _get(srv.port, "/healthz") == b'{"ok": true}',
                   "StatusConnectionLimit", "StatusDeadline")
    srv.stop()


def _site_status() -> Iterator[Endpoint]:
    refused: Counter[str] = Counter()
    place = SitePlace()
    place.task(3)
    srv = SiteStatusServer(place, "127.0.0.1", 0, token=TOKEN, max_connections=CAP, deadline_s=DEADLINE_S,
                           on_refused=lambda reason: refused.update([reason]))
    yield Endpoint(srv.port, lambda: refused,
                   lambda: json.loads(_get(srv.port, "/status"))["round"] == 3,
                   "StatusConnectionLimit", "StatusDeadline")
    srv.close()


def _metrics() -> Iterator[Endpoint]:
    registry = new_registry()
    metrics = ServerMetrics(registry, "ports")
    metrics.round_completed(1.0, number=1)
    srv, port = serve_metrics(registry, 0, addr="127.0.0.1", max_connections=CAP, deadline_s=DEADLINE_S,
                              on_refused=lambda reason: metrics.connection_rejected(reason, "metrics"))

    def refused() -> Counter[str]:  # read back from the server's own counter, as Prometheus would
        fams = text_string_to_metric_families(_get(port, "/metrics").decode())
        return Counter({s.labels["reason"]: int(s.value) for f in fams for s in f.samples
                        if s.name == "fedkube_server_rejected_connections_total" and s.labels["plane"] == "metrics"})

    def scraped() -> bool:
        fams = {f.name: f for f in text_string_to_metric_families(_get(port, "/metrics").decode())}
        return fams["fedkube_server_rounds_completed"].samples[0].value == 1

    yield Endpoint(port, refused, scraped, "MetricsConnectionLimit", "MetricsDeadline")
    srv.close()


ENDPOINTS = {"server-status": _server_status, "site-status": _site_status, "metrics": _metrics}


@pytest.fixture(params=list(ENDPOINTS))
def endpoint(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    yield from ENDPOINTS[request.param]()


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_are_capped_and_dropped(endpoint: Endpoint, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedkube.httpserve")
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(60)]
    try:
        time.sleep(0.3)
        assert threading.active_count() <= before + CAP, "one thread per idle connection, without a cap"
        # Every idle one is closed: those over the cap at once, the others at their deadline.
        assert all(_closed_by_peer(s, 3 * DEADLINE_S + 1) for s in idle)
    finally:
        for s in idle:
            s.close()
    assert endpoint.served()
    refused = endpoint.refused()
    assert refused[endpoint.limit] == 60 - CAP
    assert refused[endpoint.deadline] == CAP
    # An attack is thousands of connects: one warning per reason, not one per connection.
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedkube.httpserve"]
    assert sum("connections open; closing one more" in w for w in warnings) == 1, warnings
    assert sum("still open after" in w for w in warnings) == 1, warnings


def test_a_trickling_client_is_closed_at_the_deadline(endpoint: Endpoint) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
        start = time.monotonic()
        closed = False
        for byte in b"GET /status HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            # Each byte well inside any per-read timeout; the whole request never within the deadline.
            with contextlib.suppress(OSError):
                sock.sendall(bytes([byte]))
            if _closed_by_peer(sock, DEADLINE_S / 4):
                closed = True
                break
            if time.monotonic() - start > 4 * DEADLINE_S:
                break
        assert closed, "a byte every quarter of the deadline kept the connection open"
        assert time.monotonic() - start < 3 * DEADLINE_S
    assert endpoint.refused()[endpoint.deadline] == 1
    assert endpoint.served()


def test_a_failing_refusal_counter_does_not_end_the_deadlines() -> None:
    def broken(reason: str) -> None:
        raise ValueError(f"no such label {reason}")

    place = SitePlace()
    srv = SiteStatusServer(place, "127.0.0.1", 0, max_connections=2, deadline_s=0.6, on_refused=broken)
    try:
        for _ in range(2):  # the second idle connection is closed by the same reaper the first one's count broke
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                # By the reaper (0.6-0.75 s), not the sockets' backstop timeout (twice the deadline).
                assert _closed_by_peer(sock, 1.0)
    finally:
        srv.close()
