"""Fault 2: the training script raises in user code.

DESIGN.md §5: "trainer raised in user code → client Failed for the job; job
proceeds while ≥ minClients remain", else QuorumLost naming the client. The
sidecar reports kind ``exception`` (not a bare exit code), the server counts
it under ``fedkube_server_client_failures_total{reason="Exception"}``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkube.runtime.local import summary_document
from tests.faults.support import FAILURES, LocalJob, assert_knob_aggregate, clients_of, job_doc, knob_steps

pytestmark = pytest.mark.timeout(90)

INJECTED = "injected failure in user code at round 1"


def test_exception_above_quorum_fails_that_client_and_the_job_succeeds(tmp_path: Path) -> None:
    doc = job_doc(
        "f02-above", ("site-a", "site-b", "site-c"), rounds=2, min_clients=2, checkpoint=True,
        site_env={**knob_steps(),
                  "site-c": {"FAULT_STEP": "100", "FAULT_RAISE_AT_ROUND": "1"}},
    )
    with LocalJob(doc, tmp_path) as job:
        # The healthy sites hold round 2's result at the gate: the job is live while the test looks.
        live = job.until_failed("site-c", "Exception")
        assert INJECTED in live["message"]
        job.open_gate()
        _, summary = job.succeeded(rounds=2)

    clients = clients_of(summary)
    assert (clients["site-c"]["state"], clients["site-c"]["reason"]) == ("Failed", "Exception")
    assert INJECTED in clients["site-c"]["message"]
    assert {clients[s]["state"] for s in ("site-a", "site-b")} == {"Done"}
    # The user still sees the traceback, once (LESSONS.md 21).
    assert job.output.text().count(f"[site-c trainer] RuntimeError: {INJECTED} of site-c") == 1
    # The crashed site's step (100) is in no round's aggregate.
    assert_knob_aggregate(job.checkpoint(), rounds=2)


def test_exception_below_quorum_fails_the_job_with_quorum_lost_naming_the_client(tmp_path: Path) -> None:
    holding = tmp_path / "gate" / "holding-site-a"  # in LocalJob's gate: site-a holds its result
    doc = job_doc(
        "f02-below", ("site-a", "site-b"), rounds=2, min_clients=2,
        # site-a holds its round-1 result: its sidecar then waits for it after Stop, and the server,
        # waiting for that sidecar to hang up, still answers /status and /metrics once the job failed.
        # site-b raises only once site-a holds (else site-a may still be fetching round 1's model).
        site_env={"site-a": {"FAULT_HOLD_ROUND": "1", "FAULT_GATE_THEN": "exit"},
                  "site-b": {"FAULT_RAISE_AT_ROUND": "1", "FAULT_RAISE_WHEN": str(holding)}},
    )
    with LocalJob(doc, tmp_path) as job:
        status = job.until_status(lambda s: s["phase"] == "Failed", "the job failed")
        m = job.scrape()
        job.open_gate()
        outcome = job.result()

    assert status["reason"] == "QuorumLost"
    assert "site-b: Exception" in status["message"] and INJECTED in status["message"], status["message"]
    assert {r: v for r, v in m.by(FAILURES, "reason").items() if v} == {"Exception": 1.0}
    assert outcome.exit_code == 1
    assert outcome.summary is not None
    summary = summary_document(outcome.summary)
    assert summary["phase"] == "Failed" and summary["reason"] == "QuorumLost"
    assert "site-b: Exception" in summary["message"]
    b = clients_of(summary)["site-b"]
    assert (b["state"], b["reason"]) == ("Failed", "Exception")
