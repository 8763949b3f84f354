"""Fault 5: the stream between a sidecar and the server stalls (a TCP proxy stops forwarding).

Documented outcome (DESIGN.md §2-3 and §5, LESSONS.md 3): a temporary stall
trips the per-chunk timeout, the server's fetch of the result resumes from its
offset once bytes flow again, the job succeeds and the retry is counted; a
permanent stall fails that client for the round (TransferFailed) after bounded
retries, within the idle timeout, while the job goes on with the others.
"""

from __future__ import annotations

import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.faults._procs_b import DOWN, UP, LocalJob, TcpProxy, scrape, value, wait_for, write_job

# Weights 1:3 and dyadic values: the running mean is exact, so the aggregate is known bit for bit.
SCRIPT = textwrap.dedent("""
    import os
    import time
    from pathlib import Path

    import numpy as np
    import fedkube.trainer_sdk as fk

    fk.init()
    site = os.environ["FEDKUBE_SITE"]
    gate = Path(os.environ["GATE_DIR"])
    k = {"site-a": 1.0, "site-b": 2.0}[site]
    while fk.is_running():
        model = fk.receive()
        params = {n: v + np.float32(k) for n, v in model.params.items()}
        if site == "site-a" and os.environ.get("HOLD") == "1":  # keeps round 1 open for the test to look at
            deadline = time.monotonic() + 60
            while not (gate / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        fk.send(fk.FLModel(params=params, num_examples=1 if site == "site-a" else 3))
""")
NBYTES = 4 << 20
INITIAL = {"w": np.arange(NBYTES // 4, dtype=np.float32) / 1024}
TRANSFER = {"chunkBytes": 256 << 10, "chunkTimeoutSeconds": 1.0, "maxAttempts": 20}


def _job(tmp_path: Path, *, idle_s: float, hold: bool, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {"GATE_DIR": str(gate), "HOLD": "1" if hold else "0"}
    job = write_job(tmp_path / "job", SCRIPT, name="f05", rounds=1, min_clients=1, initial=INITIAL,
                    checkpoint_enabled=True, client_env={"site-a": env, "site-b": env},
                    transfer={**TRANSFER, "idleTimeoutSeconds": idle_s}, timeouts=extra)
    return job, gate


@pytest.mark.timeout(60)
def test_temporary_stall_resumes_from_the_offset_and_the_job_succeeds(tmp_path: Path) -> None:
    job_file, _ = _job(tmp_path, idle_s=20.0, hold=False)
    with LocalJob(job_file, tmp_path / "run", proxied_sites=["site-b"]) as job:
        proxy = job.proxy("site-b")
        # Nothing but small control messages goes up before site-b's 4 MiB result: this stops it mid-upload.
        proxy.pause_at(1 << 20, UP)
        wait_for(lambda: proxy.paused, 30, "site-b's result upload to reach 1 MiB and the proxy to stop it")
        stalled_at = proxy.bytes[UP]
        url = job.server_metrics_url()
        # The per-chunk timeout (1 s) fires while nothing moves; the server counts the retry.
        wait_for(lambda: value(scrape(url), "fedkube_server_download_retries_total") >= 1, 15,
                 "the server to retry the stalled fetch")
        during = scrape(url)
        status = job.status()
        proxy.resume()
        result = job.wait_server(30)
        assert result.phase == "Succeeded", job.log_text(None, "server")[-3000:]
        summary = job.summary()
        ck = job.checkpoint()
    # (a) the job succeeded with both results; the aggregate is exact.
    assert summary["phase"] == "Succeeded" and "reason" not in summary
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}
    np.testing.assert_array_equal(ck.model["w"], INITIAL["w"] + np.float32(1.75))
    # Resumed, not restarted: what went up in all is the result once plus less than a refetch of it.
    assert proxy.bytes[UP] < 2 * NBYTES, proxy.bytes
    assert stalled_at < NBYTES
    # (b) during the stall site-b was still in the round, not failed.
    states = {c["name"]: c for c in status["clients"]}
    assert states["site-b"]["state"] not in ("Failed", "Lost") and not states["site-b"].get("reason"), states
    # (c) the retry was counted; nothing was declared stalled for good or failed.
    assert value(during, "fedkube_server_download_retries_total") >= 1
    assert value(during, "fedkube_server_stalls_total") == 0
    assert value(during, "fedkube_server_client_failures_total") == 0


@pytest.mark.timeout(60)
def test_permanent_stall_fails_the_client_for_the_round_in_bounded_time(tmp_path: Path) -> None:
    idle_s = 4.0
    job_file, gate = _job(tmp_path, idle_s=idle_s, hold=True)
    with LocalJob(job_file, tmp_path / "run", proxied_sites=["site-b"]) as job:
        proxy = job.proxy("site-b")
        proxy.pause_at(1 << 20, UP)  # and never resumed
        wait_for(lambda: proxy.paused, 30, "site-b's result upload to reach 1 MiB and the proxy to stop it")
        t0 = time.monotonic()
        # site-a holds round 1 open, so site-b's state stays what the stall made of it.
        wait_for(lambda: _client(job.status(), "site-b")["state"] == "Failed", idle_s + 15,
                 "the server to give up on site-b's stalled upload")
        gave_up_s = time.monotonic() - t0
        metrics = scrape(job.server_metrics_url())
        b = _client(job.status(), "site-b")
        # The stall stays (new connections stall too); closing the dead ones only spares the
        # server its wait for site-b at the job's end.
        proxy.drop_connections()
        (gate / "go").touch()
        result = job.wait_server(30)
        assert result.phase == "Succeeded", job.log_text(None, "server")[-3000:]
        summary = job.summary()
        ck = job.checkpoint()
    # (d) bounded: given up after the idle timeout plus backoff slack, not at the round deadline (120 s).
    assert gave_up_s < idle_s + 10, gave_up_s
    # (b) site-b failed for the round with the transfer reason and a message that says it stalled.
    assert b["reason"] == "TransferFailed", b
    assert "no progress" in b["message"], b
    # (c) the stall and the retries before it are counted, and the failure by its reason.
    assert value(metrics, "fedkube_server_stalls_total", direction="from_clients") == 1
    assert value(metrics, "fedkube_server_download_retries_total") >= 1
    assert value(metrics, "fedkube_server_client_failures_total", reason="TransferFailed") == 1
    # (a) the job went on with site-a: its result alone is the aggregate; site-b ends Failed with the reason.
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == 1
    assert _client(summary, "site-b")["reason"] == "TransferFailed"
    np.testing.assert_array_equal(ck.model["w"], INITIAL["w"] + np.float32(1.0))


def _client(doc: dict[str, Any], site: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in doc["clients"] if c["name"] == site)
    return found


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
            wait_for(lambda: proxy.paused, 5, "pause_at to trip")
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
