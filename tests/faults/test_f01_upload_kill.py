"""Fault 1: the trainer is SIGKILLed while the server downloads its result.

DESIGN.md §5: "trainer exits before its result was downloaded → client Failed
(ExitedBeforeDownload)"; the job goes on while ≥ minClients remain. The kill
lands mid-transfer by construction (the knob trainer dies when the server asks
for its third result chunk, of 16), so the test does not race the upload.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.faults.support import CLIENTS, FAILURES, LocalJob, clients_of, expected_fedavg, job_doc

pytestmark = pytest.mark.timeout(90)

CHUNK = 16 << 10
SIZE = 16 * CHUNK // 4  # tensor w: 16 chunks of float32


def test_trainer_killed_mid_upload_fails_that_client_and_the_job_succeeds(tmp_path: Path) -> None:
    doc = job_doc(
        "f01", ("site-a", "site-b", "site-c"), rounds=2, min_clients=2, checkpoint=True,
        transfer={"chunkBytes": CHUNK}, env={"FAULT_SIZE": str(SIZE)},
        site_env={"site-a": {"FAULT_STEP": "1", "FAULT_EXAMPLES": "10"},
                  "site-b": {"FAULT_STEP": "3", "FAULT_EXAMPLES": "30"},
                  "site-c": {"FAULT_STEP": "100", "FAULT_KILL_IN_UPLOAD_AT_ROUND": "1",
                             "FAULT_KILL_AFTER_CHUNKS": "2"}},
    )
    with LocalJob(doc, tmp_path) as job:
        m = job.until_metrics(lambda m: m.value(FAILURES, reason="ExitedBeforeDownload") == 1,
                              "the early exit counted on the server's /metrics")
        assert {r: v for r, v in m.by(FAILURES, "reason").items() if v} == {"ExitedBeforeDownload": 1.0}
        assert m.value(CLIENTS, state="Failed") == 1 and m.value(CLIENTS, state="Lost") == 0
        live = clients_of(job.status())["site-c"]
        assert (live["state"], live["reason"]) == ("Failed", "ExitedBeforeDownload"), live
        assert "downloading its result" in live["message"], live
        job.open_gate()  # site-a and site-b held round 2's result until now
        outcome = job.result()

    # The kill happened mid-upload: two of w's sixteen chunks had been served.
    assert "[site-c trainer] fault: SIGKILL after 2 result chunks were served" in job.output.text()
    site_c = next(r for name, r in outcome.pods.items() if name.endswith("site-c"))
    trainer = next(c for c in site_c.containers if c.name.endswith("trainer"))
    assert trainer.exit_code == 128 + 9, site_c  # as Kubernetes reports a SIGKILL

    assert outcome.exit_code == 0, outcome.notes
    summary = outcome.summary
    assert summary is not None and summary["phase"] == "Succeeded" and summary["completedRounds"] == 2
    clients = clients_of(summary)
    assert (clients["site-c"]["state"], clients["site-c"]["reason"]) == ("Failed", "ExitedBeforeDownload")
    assert {clients[s]["state"] for s in ("site-a", "site-b")} == {"Done"}
    # Nothing of the partial upload reached an aggregate: both rounds are site-a and site-b only.
    ck = job.checkpoint()
    assert ck.round == 2
    want = expected_fedavg(0.0, {"site-a": (1, 10), "site-b": (3, 30)}, rounds=2)
    for name in ("w", "b"):
        np.testing.assert_array_equal(ck.model[name], np.full_like(ck.model[name], want))
