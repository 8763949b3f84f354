"""Fault 13: the server process stalls (SIGSTOP, as a VM pause or a long GC would) longer than heartbeatSeconds.

Issue 11 §2.2. While the server is stopped it reads no heartbeat, so the
silence it measures afterwards is its own. Documented outcome
(fedkube.server.registry, "Heartbeats"): the server notices the gap in its own
loop, gives every client a fresh heartbeat timeout from the moment it resumed,
judges them on what arrives after that, and the job succeeds with nobody Lost.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.faults.support import PodJob, job_doc, knob_steps

pytestmark = pytest.mark.timeout(90)

HEARTBEAT_S = 6.0
STALL_S = 14.0  # more than twice the heartbeat timeout: every client's last heartbeat looks stale on resume


def test_server_stalled_past_the_heartbeat_timeout_blames_no_client_and_the_job_succeeds(tmp_path: Path) -> None:
    doc = job_doc("f13", ("site-a", "site-b"), rounds=2,
                  site_env={s: {**env, "FAULT_HOLD_ROUND": "1"} for s, env in knob_steps().items()},
                  timeouts={"heartbeatSeconds": HEARTBEAT_S, "roundSeconds": 60, "registrationSeconds": 20})
    with PodJob(doc, tmp_path) as job:
        # Both trainers hold round 1's result: the clients are healthy and heartbeating when the server stops.
        job.until(lambda: len(list(job.gate.glob("holding-*"))) == 2, "both trainers to hold round 1", 30)
        server = job.process(None, "server")
        server.signal_group(signal.SIGSTOP)
        try:
            time.sleep(STALL_S)
        finally:
            server.signal_group(signal.SIGCONT)
        # One heartbeat timeout after the resume: a client blamed for the stall would be Lost by now
        # (and with both Lost the job would have failed: QuorumLost).
        time.sleep(HEARTBEAT_S + 1)
        assert job.server is not None and not job.server.finished(), job.log("server", "server")[-3000:]
        status = job.status()
        job.open_gate()
        summary = job.server_succeeded(45)
        server_log = job.log("server", "server")
    assert {c["name"]: c["state"] for c in status["clients"]} == {"site-a": "Training", "site-b": "Training"}, status
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == 2, summary
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}, summary
    assert " lost: " not in server_log, server_log[-3000:]
    # The server says what happened: it was the one that stalled.
    assert "the server itself did not run" in server_log, server_log[-3000:]
