"""The progress display's reading of the server's status document, over real HTTP."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from fedkube.runtime.progress import ConsoleSink, ProgressDisplay, fetch_bytes_total, fetch_status, parse_status
from fedkube.status import STATUS_LIMIT, JobStatus

METRICS = """# HELP fedkube_server_result_bytes_total Verified result bytes pulled from clients.
# TYPE fedkube_server_result_bytes_total counter
fedkube_server_result_bytes_total{job="a b"} 1536.0
fedkube_server_result_bytes_created{job="a b"} 1.7e9
fedkube_server_rounds_completed_total{job="a b"} 3.0
"""

DOC = {
    "job": "quickstart-numpy",
    "phase": "Running",
    "round": 2,
    "rounds": 3,
    "clients": [
        {"name": "site-a", "state": "Training"},
        {"name": "site-b", "state": "Pending"},
        {"name": "site-c", "state": "Done"},
    ],
    "transfer": {"bytesSent": 1000, "bytesReceived": 24},
    "metrics": {"loss": 0.25, "flag": True},
}
# What the server really serves (DOC above also carries what parse_status tolerates but no server writes).
LIVE = {k: v for k, v in DOC.items() if k != "transfer"} | {"metrics": {"loss": 0.25}}


def test_parse_status_counts_ready_clients_and_bytes() -> None:
    view = parse_status(DOC)
    assert (view.phase, view.round, view.rounds) == ("Running", 2, 3)
    assert (view.clients_ready, view.clients_total) == (2, 3)
    assert view.bytes_transferred == 1024
    assert view.metrics == {"loss": 0.25}


def test_parse_status_tolerates_a_sparse_document() -> None:
    view = parse_status({"clients": {"site-a": {"state": "Registered"}}, "round": "x"})
    assert (view.phase, view.round, view.rounds) == ("?", 0, None)
    assert (view.clients_ready, view.clients_total, view.bytes_transferred) == (1, 1, None)
    assert parse_status({"clientsReady": 4, "clientsTotal": 5}).clients_ready == 4


@pytest.fixture
def status_url() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body = METRICS.encode()
            elif self.path == "/nested":
                body = b"[" * 100_000
            elif self.path == "/zombie":
                body = json.dumps(LIVE | {"clients": [{"name": "a", "state": "Zombie"}]}).encode()
            elif self.path == "/huge":
                body = json.dumps(DOC | {"message": "x" * STATUS_LIMIT}).encode()
            else:
                body = json.dumps(LIVE).encode() if self.path == "/status" else b"not json"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_status_over_http_and_none_when_unusable(status_url: str) -> None:
    assert fetch_status(status_url + "/status") == JobStatus.from_json(json.dumps(LIVE))
    assert fetch_status(status_url + "/other") is None  # not JSON
    assert fetch_status("http://127.0.0.1:1/status", timeout_s=0.5) is None  # nobody listening


def test_fetch_status_refuses_a_hostile_answer(status_url: str) -> None:
    assert fetch_status(status_url + "/nested") is None  # raised RecursionError out of the display's thread
    assert fetch_status(status_url + "/huge") is None  # larger than the operator would read either
    assert fetch_status(status_url + "/zombie") is None  # a state the operator would refuse


def test_display_polls_and_sink_prints_prefixed_lines(status_url: str) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with ProgressDisplay(console, interval_s=0.05) as display:
        display.watch(status_url + "/status")
        ConsoleSink(console).emit("site-a trainer", "hello [not markup]")
        for _ in range(100):
            if display.last is not None:
                break
            threading.Event().wait(0.05)
    assert display.last is not None and display.last.round == 2
    text = out.getvalue()
    assert "[site-a trainer]" in text and "hello [not markup]" in text
    assert "clients 2/3" in text
    assert "loss 0.25" in text


def test_bytes_come_from_the_servers_counters_when_the_status_has_none(status_url: str) -> None:
    assert fetch_bytes_total(status_url + "/metrics") == 1536
    assert fetch_bytes_total("http://127.0.0.1:1/metrics", timeout_s=0.5) is None
