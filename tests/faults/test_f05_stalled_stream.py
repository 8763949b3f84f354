"""Fault 5: the stream between a sidecar and the server stalls (a TCP proxy stops forwarding).

Documented outcome (DESIGN.md §2-3 and §5, LESSONS.md 3): a temporary stall
trips the per-chunk timeout, the server's fetch of the result resumes from its
offset once bytes flow again, the job succeeds and the retry is counted; a
permanent stall fails that client for the round (TransferFailed) after bounded
retries, within the idle timeout, while the job goes on with the others.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.faults.support import (
    DOWN,
    FAILURES,
    ONE_AND_TWO,
    UP,
    PodJob,
    TcpProxy,
    clients_of,
    job_doc,
    save_model,
    trainer_script,
    until,
)

NBYTES = 4 << 20
INITIAL = {"w": np.arange(NBYTES // 4, dtype=np.float32) / 1024}
RETRIES = "fedkube_server_download_retries_total"
STALLS = "fedkube_server_stalls_total"
TRANSFER = {"chunkBytes": 256 << 10, "chunkTimeoutSeconds": 1.0, "maxAttempts": 20}


def _job(tmp_path: Path, *, idle_s: float, hold: bool) -> dict[str, Any]:
    """site-a holding its result (``hold``) keeps round 1 open for the test to look at."""
    return job_doc("f05", ("site-a", "site-b"), rounds=1, min_clients=1, roomy=True, checkpoint=True,
                   trainer=trainer_script(tmp_path, ONE_AND_TWO), initial=save_model(tmp_path / "initial.npz", INITIAL),
                   env={"HOLD": "site-a" if hold else ""}, transfer={**TRANSFER, "idleTimeoutSeconds": idle_s})


@pytest.mark.timeout(60)
def test_temporary_stall_resumes_from_the_offset_and_the_job_succeeds(tmp_path: Path) -> None:
    with PodJob(_job(tmp_path, idle_s=20.0, hold=False), tmp_path, proxied_sites=["site-b"]) as job:
        proxy = job.proxy("site-b")
        # Nothing but small control messages goes up before site-b's 4 MiB result: this stops it mid-upload.
        proxy.pause_at(1 << 20, UP)
        job.until(lambda: proxy.paused, "site-b's result upload to reach 1 MiB and the proxy to stop it", 30)
        stalled_at = proxy.bytes[UP]
        # The per-chunk timeout (1 s) fires while nothing moves; the server counts the retry.
        during = job.until_metrics(lambda m: m.total(RETRIES) >= 1, "the server to retry the stalled fetch",
                                   timeout=15)
        status = job.status()
        proxy.resume()
        summary = job.server_succeeded(30)
        ck = job.checkpoint()
    # (a) the job succeeded with both results; the aggregate is exact.
    assert summary["phase"] == "Succeeded" and "reason" not in summary
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}
    np.testing.assert_array_equal(ck.model["w"], INITIAL["w"] + np.float32(1.75))
    # Resumed, not restarted: what went up in all is the result once plus less than a refetch of it.
    assert proxy.bytes[UP] < 2 * NBYTES, proxy.bytes
    assert stalled_at < NBYTES
    # (b) during the stall site-b was still in the round, not failed.
    states = clients_of(status)
    assert states["site-b"]["state"] not in ("Failed", "Lost") and not states["site-b"].get("reason"), states
    # (c) the retry was counted; nothing was declared stalled for good or failed.
    assert during.total(RETRIES) >= 1
    assert during.total(STALLS) == 0
    assert during.total(FAILURES) == 0


@pytest.mark.timeout(60)
def test_permanent_stall_fails_the_client_for_the_round_in_bounded_time(tmp_path: Path) -> None:
    idle_s = 4.0
    with PodJob(_job(tmp_path, idle_s=idle_s, hold=True), tmp_path, proxied_sites=["site-b"]) as job:
        proxy = job.proxy("site-b")
        proxy.pause_at(1 << 20, UP)  # and never resumed
        job.until(lambda: proxy.paused, "site-b's result upload to reach 1 MiB and the proxy to stop it", 30)
        t0 = time.monotonic()
        # site-a holds round 1 open, so site-b's state stays what the stall made of it.
        job.until(lambda: clients_of(job.status())["site-b"]["state"] == "Failed",
                  "the server to give up on site-b's stalled upload", idle_s + 15)
        gave_up_s = time.monotonic() - t0
        metrics = job.scrape()
        b = clients_of(job.status())["site-b"]
        # The stall stays (new connections stall too); closing the dead ones only spares the
        # server its wait for site-b at the job's end.
        proxy.drop_connections()
        job.open_gate()
        summary = job.server_succeeded(30)
        ck = job.checkpoint()
    # (d) bounded: given up after the idle timeout plus backoff slack, not at the round deadline (120 s).
    assert gave_up_s < idle_s + 10, gave_up_s
    # (b) site-b failed for the round with the transfer reason and a message that says it stalled.
    assert b["reason"] == "TransferFailed", b
    assert "no progress" in b["message"], b
    # (c) the stall and the retries before it are counted, and the failure by its reason.
    assert metrics.total(STALLS, direction="from_clients") == 1
    assert metrics.total(RETRIES) >= 1
    assert metrics.total(FAILURES, reason="TransferFailed") == 1
    # (a) the job went on with site-a: its result alone is the aggregate; site-b ends Failed with the reason.
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == 1
    assert clients_of(summary)["site-b"]["reason"] == "TransferFailed"
    np.testing.assert_array_equal(ck.model["w"], INITIAL["w"] + np.float32(1.0))


@pytest.mark.timeout(20)
def test_proxy_switches_do_what_they_say() -> None:
    """The proxy itself, against an echo server: counters, flip_byte_at, pause/resume, drop_connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_echo_one, args=(conn,), daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    proxy = TcpProxy(("127.0.0.1", port), name="echo").start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            c.sendall(b"abc")
            assert _recv(c, 3) == b"abc"
            proxy.flip_byte_at(4, UP)  # the second byte of the next send
            c.sendall(b"xyz")
            assert _recv(c, 3) == bytes([ord("x"), ord("y") ^ 0xFF, ord("z")])
            assert proxy.flipped == [(UP, 4)] and proxy.bytes == {UP: 6, DOWN: 6}
            proxy.pause()
            c.sendall(b"held")
            c.settimeout(0.3)
            with pytest.raises(TimeoutError):
                c.recv(10)
            c.settimeout(5)
            proxy.resume()
            assert _recv(c, 4) == b"held"
            proxy.pause_at(12, UP)
            c.sendall(b"ab")
            until(lambda: proxy.paused, "pause_at to trip", 5)
            proxy.resume()
            assert _recv(c, 2) == b"ab"
            proxy.drop_connections()
            assert c.recv(10) == b""
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c2:  # new connections still work
            c2.sendall(b"again")
            assert _recv(c2, 5) == b"again"
        assert proxy.connections == 2
    finally:
        proxy.close()
        listener.close()


def _echo_one(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out
