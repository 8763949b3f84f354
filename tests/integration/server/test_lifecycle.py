"""Server lifecycle: checkpoint and resume, status endpoint, auth, reconnects, process exit codes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply, add_value
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((3000,), np.float32), "b": np.ones((4,), np.float32)}


def test_checkpoint_then_restart_resumes_at_the_next_round(harness: Harness, tmp_path: Path) -> None:
    cfg = make_config(rounds=3, checkpoint_dir=tmp_path)

    def trainer(value: float):  # type: ignore[no-untyped-def]
        def behave(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
            if task.round >= 2:
                return Reply(None)  # the first server is stopped during round 2
            return add_value(value)(task, params)
        return behave

    first = harness.server(cfg, model())
    harness.sidecar(first, "site-a", trainer(1.0))
    harness.sidecar(first, "site-b", trainer(3.0))
    until(lambda: first.workflow.status().completed_rounds == 1, "round 1's checkpoint")
    first.request_stop("test: simulated restart")
    out1 = first.wait(10)
    assert out1 is not None and not out1.success and out1.reason == "Terminated"
    first.shutdown(grace_s=0.5)

    second = harness.server(cfg, model())
    a = harness.sidecar(second, "site-a", add_value(1.0))
    harness.sidecar(second, "site-b", add_value(3.0))
    out2 = second.wait(20)
    assert out2 is not None and out2.success, out2
    assert out2.rounds_completed == 3
    assert [t.round for t in a.tasks] == [2, 3]  # resumed at round k+1, round 1 not redone
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((3000,), 2.0, np.float32))
    np.testing.assert_array_equal(a.globals[3]["b"], np.full((4,), 5.0, np.float32))


def test_status_endpoint_serves_json_over_http(harness: Harness) -> None:
    srv = harness.server(make_config(rounds=1, registration_timeout_s=30.0), model())
    base = f"http://127.0.0.1:{srv.status_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{base}/status", timeout=5) as r:
        assert r.headers["Content-Type"] == "application/json"
        doc = json.loads(r.read())
    assert doc["job"] == "job1" and doc["phase"] == "Pending" and doc["rounds"] == 1
    assert [c["state"] for c in doc["clients"]] == ["Pending", "Pending"]
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(2.0))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success
    with urllib.request.urlopen(f"{base}/status", timeout=5) as r:
        doc = json.loads(r.read())
    assert doc["phase"] == "Succeeded" and doc["completedRounds"] == 1
    assert {c["name"]: c["state"] for c in doc["clients"]} == {"site-a": "Done", "site-b": "Done"}
    assert "startTime" in doc and "finishTime" in doc
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/nope", timeout=5)
    assert err.value.code == 404


def test_wrong_token_and_unknown_site_are_rejected_while_others_proceed(harness: Harness) -> None:
    srv = harness.server(make_config(rounds=2), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    intruder = harness.sidecar(srv, "site-b", add_value(100.0), token="guess")
    stranger = harness.sidecar(srv, "site-x", add_value(100.0), token="whatever")
    intruder.wait_for(lambda: intruder.error is not None, what="the refusal")
    stranger.wait_for(lambda: stranger.error is not None, what="the refusal")
    assert intruder.rejected is not None and intruder.rejected.reason == "BadToken"
    assert intruder.error is not None and intruder.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stranger.error is not None and stranger.error.code() == grpc.StatusCode.PERMISSION_DENIED
    # The global model cannot be fetched without the site's token either.
    b = harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((3000,), 2.0, np.float32))
    assert b.wait_stop().success


def test_oversized_push_is_refused_and_the_server_keeps_serving(harness: Harness) -> None:
    srv = harness.server(make_config(rounds=1), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    limit = srv.config.message_limit()
    huge = control_pb2.PushedChunk(request_id="up-x", offset=0, data=b"\0" * (limit + 1024))
    with pytest.raises(grpc.RpcError) as err:
        a.stub.Push(iter([huge]), metadata=a.md, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome


def test_reconnect_resumes_or_resends_the_task_and_never_counts_twice(harness: Harness) -> None:
    srv = harness.server(make_config(rounds=1, round_timeout_s=20.0), model())

    def held(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        return Reply(None)  # answers only when the test announces by hand

    a = harness.sidecar(srv, "site-a", held, session_id="sess-a")
    b = harness.sidecar(srv, "site-b", add_value(3.0))
    a.wait_for(lambda: len(a.tasks) == 1, what="round 1 task")
    task = a.tasks[0]
    # The same sidecar reconnects resuming its task: nothing is re-sent.
    a.disconnect()
    a2 = harness.sidecar(srv, "site-a", held, session_id="sess-a", start=False)
    a2.start(resume_task_id=task.task_id)
    a2.wait_for(lambda: any(m.WhichOneof("msg") == "registered" for m in a2.messages), what="registration")
    time.sleep(0.3)
    assert a2.tasks == []
    # A restarted sidecar (no resume) gets the same task again.
    a2.disconnect()
    a3 = harness.sidecar(srv, "site-a", held)
    a3.wait_for(lambda: len(a3.tasks) == 1, what="the re-sent task")
    assert a3.tasks[0].task_id == task.task_id
    a3.wait_for(lambda: 1 in a3.globals, what="global model")
    params = a3.globals[1]
    reply = add_value(1.0)(task, params)
    a3.announce(task, reply)
    a3.announce(task, reply)  # a duplicate announcement is not counted twice
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    assert a3.wait_stop().success  # Stop follows the ResultReceived on the same stream
    np.testing.assert_array_equal(b.globals[1]["w"], np.zeros((3000,), np.float32))
    status = {c.name: c for c in srv.workflow.status().clients}
    assert status["site-a"].rounds_completed == 1
    ok = [m.result_received for m in a3.messages if m.WhichOneof("msg") == "result_received"]
    assert ok and all(r.ok for r in ok)


def test_trainer_exit_after_its_final_result_is_teardown_noise(harness: Harness) -> None:
    srv = harness.server(make_config(rounds=1), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", lambda task, params: add_value(3.0, delay_s=1.0)(task, params))
    a.wait_for(lambda: bool(a.received), what="a's ResultReceived")
    # The job is still running (b is slow); a's trainer ends non-zero after its final result was delivered.
    a.send(control_pb2.ClientMessage(trainer_state=control_pb2.TrainerState(
        phase=control_pb2.TRAINER_PHASE_EXITED, exit_code=1, message="segfault in teardown")))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    status = {c.name: c for c in srv.workflow.status().clients}
    assert status["site-a"].state == "Done" and status["site-a"].reason == ""


def test_a_newer_stream_replaces_the_older_one(harness: Harness) -> None:
    srv = harness.server(make_config(rounds=1, registration_timeout_s=30.0), model())
    old = harness.sidecar(srv, "site-a", add_value(1.0))
    old.wait_for(lambda: any(m.WhichOneof("msg") == "registered" for m in old.messages), what="registration")
    new = harness.sidecar(srv, "site-a", add_value(1.0))
    # The server ends the replaced stream; only the new one gets the task.
    old.wait_for(lambda: old.error is not None or old.finished, what="the old stream to end")
    harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    assert old.tasks == [] and len(new.tasks) == 1
