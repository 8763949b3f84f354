"""Fault 3: a sidecar SIGKILLed mid-round and restarted (as a kubelet restarts a native sidecar).

Documented outcome (DESIGN.md §5, issue 4): the restarted sidecar registers
again, the server keeps or re-sends the round's task, the job succeeds, and the
round's aggregate counts that client's result exactly once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from tests.faults.support import CLIENTS, FAILURES, ROUNDS_DONE, PodJob, job_doc, save_model, trainer_script

# Round r: site-a adds 1*r, site-b 2*r, weights 10:30. site-b holds its round-1 result until the test says go;
# both sites hold round 2's until go-2, so the test can scrape the live server after the faulted round.
BODY = """
    k = {"site-a": 1.0, "site-b": 2.0}[site]
    while fk.is_running():
        model = fk.receive()
        params = {n: v + np.float32(k * model.round) for n, v in model.params.items()}
        if site == "site-b" and model.round == 1:
            with open(gate / "received-1", "a") as f:  # one line per time the trainer is handed round 1
                f.write(f"{os.getpid()} ")
            hold("go")
        if model.round == 2:  # both sites: nothing of round 2 moves before the test has read round 1's metrics
            hold("go-2")
        fk.send(fk.FLModel(params=params, num_examples=10 if site == "site-a" else 30))
"""
NBYTES = 4000
INITIAL = np.arange(1000, dtype=np.float32)


@pytest.mark.timeout(90)
def test_sidecar_killed_mid_round_reconnects_and_its_result_counts_once(tmp_path: Path) -> None:
    doc = job_doc("f03", ("site-a", "site-b"), rounds=2, roomy=True, checkpoint=True,
                  trainer=trainer_script(tmp_path, BODY), initial=save_model(tmp_path / "initial.npz", {"w": INITIAL}))
    with PodJob(doc, tmp_path) as job:
        gate = job.gate
        job.until(lambda: (gate / "received-1").exists(), "site-b's trainer to hold round 1's model", 30)
        old = job.sidecar("site-b")
        old_pid = old.pid
        old.signal_group(signal.SIGKILL)  # mid-round: the trainer has the task and has not sent its result
        assert old.wait(10) == -signal.SIGKILL
        # The pod supervisor restarts it (restartPolicy Always) with the same command and env.
        job.until(lambda: job.sidecar("site-b").pid != old_pid, "the pod to restart site-b's sidecar", 20)
        job.until_metrics(lambda m: m.total("fedkube_sidecar_upstream_connected") == 1.0,
                          "the restarted sidecar to register with the server", "site-b", 20)
        job.open_gate("go")
        job.until_metrics(lambda m: m.total(ROUNDS_DONE) == 1.0, "round 1 to complete", timeout=30)
        server = job.scrape()
        sidecar = job.scrape("site-b")
        job.open_gate("go-2")
        summary = job.server_succeeded(60)
        ck = job.checkpoint()
        site_b = job.clients["site-b"].wait(30)  # its sidecar leaves after the job's Stop
        assert site_b is not None and site_b.phase == "Succeeded", site_b
        sidecar_result = site_b.container("sidecar")
        assert sidecar_result is not None and sidecar_result.restarts == 1
    # (c) metrics: round 1 pulled exactly two results' bytes (site-b's once, through its new sidecar), no failure.
    assert server.total("fedkube_server_transfer_bytes_total", direction="from_clients") == 2 * NBYTES
    assert server.total(FAILURES) == 0
    assert server.total(CLIENTS, state="Failed") == 0
    assert server.total(CLIENTS, state="Lost") == 0
    # Once: the relay counts what it pumps, the result plus a few bytes of bulk framing (status, frame headers).
    assert NBYTES <= sidecar.total("fedkube_sidecar_relayed_bytes_total", direction="to_server") < NBYTES + 64
    assert sidecar.total("fedkube_sidecar_upstream_connected") == 1.0
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



# site-b sends round 1 and waits for round 2's task (inside is_running()'s NextTask long poll) while site-a holds
# round 1 open; the test kills site-b's sidecar there.
IDLE_BODY = """
    k = {"site-a": 1.0, "site-b": 2.0}[site]
    while fk.is_running():
        model = fk.receive()
        params = {n: v + np.float32(k * model.round) for n, v in model.params.items()}
        if site == "site-a" and model.round == 1:
            hold("go")
        fk.send(fk.FLModel(params=params, num_examples=10 if site == "site-a" else 30))
        if site == "site-b" and model.round == 1:
            (gate / "sent-1").touch()
"""


@pytest.mark.timeout(90)
def test_sidecar_killed_while_its_trainer_waits_for_a_task_the_trainer_carries_on(tmp_path: Path) -> None:
    doc = job_doc("f03b", ("site-a", "site-b"), rounds=2, roomy=True, checkpoint=True,
                  trainer=trainer_script(tmp_path, IDLE_BODY),
                  initial=save_model(tmp_path / "initial.npz", {"w": INITIAL}))
    with PodJob(doc, tmp_path) as job:
        job.until(lambda: (job.gate / "sent-1").exists(), "site-b to send round 1 and wait for a task", 30)
        old = job.sidecar("site-b")
        old_pid = old.pid
        old.signal_group(signal.SIGKILL)  # the trainer is blocked in NextTask on this sidecar
        assert old.wait(10) == -signal.SIGKILL
        job.until(lambda: job.sidecar("site-b").pid != old_pid, "the pod to restart site-b's sidecar", 20)
        job.until_metrics(lambda m: m.total("fedkube_sidecar_upstream_connected") == 1.0,
                          "the restarted sidecar to register with the server", "site-b", 20)
        job.open_gate("go")
        summary = job.server_succeeded(60)
        ck = job.checkpoint()
        site_b = job.clients["site-b"].wait(30)
        assert site_b is not None and site_b.phase == "Succeeded", site_b
        trainer = site_b.container("trainer")
        assert trainer is not None and trainer.exit_code == 0, trainer  # it rode out the restart, no crash
    assert {c["name"]: (c["state"], c.get("roundsCompleted")) for c in summary["clients"]} == {
        "site-a": ("Done", 2), "site-b": ("Done", 2)}
    np.testing.assert_array_equal(ck.model["w"], INITIAL + np.float32(1.75) + np.float32(3.5))
