"""Fault 1: the trainer is SIGKILLed while the server downloads its result.

DESIGN.md §5: "trainer exits before its result was downloaded → client Failed
(ExitedBeforeDownload)"; the job goes on while ≥ minClients remain. The kill
lands mid-transfer by construction (the knob trainer dies when the server asks
for its third result chunk, of 16), so the test does not race the upload.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.support import LocalJob, assert_knob_aggregate, clients_of, job_doc, knob_steps

pytestmark = pytest.mark.timeout(90)

CHUNK = 16 << 10
SIZE = 16 * CHUNK // 4  # tensor w: 16 chunks of float32


def test_trainer_killed_mid_upload_fails_that_client_and_the_job_succeeds(tmp_path: Path) -> None:
    # The server pulls each client's tensors from that client's own starting point (by site name order);
    # the killed site comes first by name, so it is pulled in the published order: w (16 chunks) before
    # the one-element b, and the kill lands inside w before any of its tensors was verified.
    doc = job_doc(
        "f01", ("site-a", "site-b", "site-0"), rounds=2, min_clients=2, checkpoint=True,
        transfer={"chunkBytes": CHUNK}, env={"FAULT_SIZE": str(SIZE)},
        site_env={**knob_steps(),
                  "site-0": {"FAULT_STEP": "100", "FAULT_KILL_IN_UPLOAD_AT_ROUND": "1",
                             "FAULT_KILL_AFTER_CHUNKS": "2"}},
    )
    with LocalJob(doc, tmp_path) as job:
        # The early exit is counted on the server's /metrics, and site-0's live status says why.
        live = job.until_failed("site-0", "ExitedBeforeDownload")
        assert "downloading its result" in live["message"], live
        job.open_gate()  # site-a and site-b held round 2's result until now
        outcome, summary = job.succeeded(rounds=2)

    # The kill happened mid-upload: two of w's sixteen chunks had been served.
    assert "[site-0 trainer] fault: SIGKILL after 2 result chunks were served" in job.output.text()
    site_0 = next(r for name, r in outcome.pods.items() if name.endswith("site-0"))
    trainer = next(c for c in site_0.containers if c.name.endswith("trainer"))
    assert trainer.exit_code == 128 + 9, site_0  # as Kubernetes reports a SIGKILL

    clients = clients_of(summary)
    assert (clients["site-0"]["state"], clients["site-0"]["reason"]) == ("Failed", "ExitedBeforeDownload")
    assert {clients[s]["state"] for s in ("site-a", "site-b")} == {"Done"}
    # Nothing of the partial upload reached an aggregate: both rounds are site-a and site-b only.
    assert_knob_aggregate(job.checkpoint(), rounds=2)
