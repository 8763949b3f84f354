"""Fault 8: the trainer exits non-zero right after its final result was downloaded.

DESIGN.md §5 and LESSONS.md 19: "trainer exits non-zero after its final result
was downloaded → teardown noise: logged, job status unaffected". site-b exits
with code 3 as soon as its last ``send()`` returned, while site-a still holds
its own last result: the server hears of the exit mid-job and must neither fail
the client nor count a failure.

Then site-b's pod winds down the way Kubernetes ends a pod whose main container
exited: its (native) sidecar gets SIGTERM. The server stops hearing from site-b
while site-a still works; a client with nothing left to do is not Lost.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.faults.support import CLIENTS, FAILURES, LocalJob, clients_of, job_doc

pytestmark = pytest.mark.timeout(90)

HEARTBEAT_S = 5.0  # long enough that site-a, heartbeating every 1.7 s, is safe on a loaded box


def test_nonzero_exit_after_the_final_download_is_teardown_noise(tmp_path: Path) -> None:
    doc = job_doc("f08", ("site-a", "site-b"), rounds=2, min_clients=2, timeouts={"heartbeatSeconds": HEARTBEAT_S},
                  site_env={"site-b": {"FAULT_EXIT_AFTER_LAST": "3", "FAULT_HOLD_ROUND": "-1"}})
    with LocalJob(doc, tmp_path) as job:
        # site-a holds round 2's result at the gate; site-b delivered it and exited with code 3.
        job.until(lambda: "site-b: trainer exited after its final result was delivered; not a failure (teardown "
                  "noise)" in job.log("server", "server"), "the server to log site-b's exit as teardown noise")
        # The sidecar saw the trainer go (its metric says so) and reported it; the server did not promote it.
        sidecar = job.scrape("site-b")
        assert sidecar.by("fedkube_sidecar_trainer_state", "state", site="site-b")["Exited"] == 1
        m = job.scrape()
        assert {r: v for r, v in m.by(FAILURES, "reason").items() if v} == {}
        assert m.value(CLIENTS, state="Done") == 1 and m.value(CLIENTS, state="Failed") == 0
        status = job.status()
        assert status["phase"] == "Running" and status["round"] == 2
        b = clients_of(status)["site-b"]
        assert b["state"] == "Done" and "reason" not in b, b

        job.sidecar_process("site-b").send_signal(signal.SIGTERM)
        job.until(lambda: re.search(r"site site-b conn \d+ disconnected", job.log("server", "server")),
                  "the server to see site-b's sidecar hang up")
        # Silent for well past heartbeatSeconds (the server looks several times a second) ...
        time.sleep(HEARTBEAT_S + 1.5)
        m = job.scrape()
        assert m.value(FAILURES, reason="Lost") == 0 and m.value(CLIENTS, state="Lost") == 0
        b = clients_of(job.status())["site-b"]
        assert b["state"] == "Done" and "reason" not in b, b  # ... and still Done, not Lost
        a = clients_of(job.status())["site-a"]
        assert a["state"] == "Training", a  # site-a, still heartbeating, was never in doubt
        job.open_gate()
        outcome, summary = job.succeeded(rounds=2)

    assert "[site-b trainer] site-b: exiting with code 3 after the last result was delivered" in job.output.text()
    assert "reason" not in summary
    clients = clients_of(summary)
    assert {s: (c["state"], c["roundsCompleted"]) for s, c in clients.items()} == {
        "site-a": ("Done", 2), "site-b": ("Done", 2)}
    # The runtime reports the exit code, and says it is not a failure.
    assert any(n.startswith("site-b trainer: exited with code 3") and "not a job failure" in n
               for n in outcome.notes), outcome.notes
