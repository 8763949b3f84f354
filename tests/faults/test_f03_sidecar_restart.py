"""Fault 3: a sidecar SIGKILLed mid-round and restarted (as a kubelet restarts a native sidecar).

Documented outcome (DESIGN.md §5, issue 4): the restarted sidecar registers
again, the server keeps or re-sends the round's task, the job succeeds, and the
round's aggregate counts that client's result exactly once.
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.faults._procs_b import LocalJob, scrape, try_scrape, value, wait_for, write_job

# Round r: site-a adds 1*r, site-b 2*r, weights 10:30. site-b holds its round-1 result until the test says go;
# site-a holds round 2's until go-2, so the test can scrape the live server after the faulted round.
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
        params = {n: v + np.float32(k * model.round) for n, v in model.params.items()}
        if site == "site-b" and model.round == 1:
            with open(gate / "received-1", "a") as f:  # one line per time the trainer is handed round 1
                f.write(f"{os.getpid()} ")
            deadline = time.monotonic() + 60
            while not (gate / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        if model.round == 2:  # both sites: nothing of round 2 moves before the test has read round 1's metrics
            deadline = time.monotonic() + 60
            while not (gate / "go-2").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        fk.send(fk.FLModel(params=params, num_examples=10 if site == "site-a" else 30))
""")
NBYTES = 4000
INITIAL = np.arange(1000, dtype=np.float32)


@pytest.mark.timeout(90)
def test_sidecar_killed_mid_round_reconnects_and_its_result_counts_once(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {"GATE_DIR": str(gate)}
    job_file = write_job(tmp_path / "job", SCRIPT, name="f03", rounds=2, initial={"w": INITIAL},
                         checkpoint_enabled=True, client_env={"site-a": env, "site-b": env},
                         timeouts={"heartbeatSeconds": 30})
    with LocalJob(job_file, tmp_path / "run") as job:
        wait_for(lambda: (gate / "received-1").exists(), 30, "site-b's trainer to hold round 1's model")
        old = job.sidecar("site-b")
        old_pid = old.pid
        old.signal_group(signal.SIGKILL)  # mid-round: the trainer has the task and has not sent its result
        assert old.wait(10) == -signal.SIGKILL
        # The pod supervisor restarts it (restartPolicy Always) with the same command and env.
        wait_for(lambda: job.sidecar("site-b").pid != old_pid, 20, "the pod to restart site-b's sidecar")
        url = job.sidecar_metrics_url("site-b")
        wait_for(lambda: value(try_scrape(url) or {}, "fedkube_sidecar_upstream_connected") == 1.0, 20,
                 "the restarted sidecar to register with the server")
        (gate / "go").touch()
        server_url = job.server_metrics_url()
        wait_for(lambda: value(scrape(server_url), "fedkube_server_rounds_completed_total") == 1.0, 30,
                 "round 1 to complete")
        server = scrape(server_url)
        sidecar = scrape(url)
        (gate / "go-2").touch()
        result = job.wait_server(60)
        assert result.phase == "Succeeded", job.log_text(None, "server")[-3000:]
        summary = job.summary()
        ck = job.checkpoint()
        site_b = job.clients["site-b"].wait(30)  # its sidecar leaves after the job's Stop
        assert site_b is not None and site_b.phase == "Succeeded", site_b
        sidecar_result = site_b.container("sidecar")
        assert sidecar_result is not None and sidecar_result.restarts == 1
    # (c) metrics: round 1 pulled exactly two results' bytes (site-b's once, through its new sidecar), no failure.
    assert value(server, "fedkube_server_transfer_bytes_total", direction="from_clients") == 2 * NBYTES
    assert value(server, "fedkube_server_client_failures_total") == 0
    assert value(server, "fedkube_server_clients", state="Failed") == 0
    assert value(server, "fedkube_server_clients", state="Lost") == 0
    # Once: the relay counts what it pumps, the result plus a few bytes of bulk framing (status, frame headers).
    assert NBYTES <= value(sidecar, "fedkube_sidecar_relayed_bytes_total", direction="to_server") < NBYTES + 64
    assert value(sidecar, "fedkube_sidecar_upstream_connected") == 1.0
    # (a) end state: succeeded, both clients Done with both rounds counted.
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == 2
    assert {c["name"]: (c["state"], c.get("roundsCompleted")) for c in summary["clients"]} == {
        "site-a": ("Done", 2), "site-b": ("Done", 2)}
    # (b) no failure reason anywhere: the restart is not a failure.
    assert "reason" not in summary and all("reason" not in c for c in summary["clients"])
    # exactly once: round r adds (10*1r + 30*2r) / 40 = 1.75 r; a second copy of site-b's result would change it.
    assert ck.round == 2
    np.testing.assert_array_equal(ck.model["w"], INITIAL + np.float32(1.75) + np.float32(3.5))
    # site-b's trainer was handed round 1 once: the re-sent copy of the task was not trained again.
    assert len((gate / "received-1").read_text().split()) == 1

