"""Round workflow against a real server: aggregation, quorum, stragglers, invalid results, auth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedkube.server import checkpoint
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply, add_value

pytestmark = pytest.mark.timeout(60)


def model() -> dict[str, np.ndarray]:
    return {
        "fc.weight": np.zeros((64, 300), np.float32),  # 75 KiB: several chunks of 64 KiB
        "fc.bias": np.arange(8, dtype=np.float32),
        "steps": np.array([7], np.int64),
    }


def test_two_clients_fedavg_exact_aggregate(harness: Harness) -> None:
    srv = harness.server(make_config(rounds=2), model())
    live_at_round: dict[int, list[str]] = {}

    def on_task(task: control_pb2.Task) -> None:
        live_at_round[task.round] = [t.id for t in srv.downloads.transactions()]

    a = harness.sidecar(srv, "site-a", add_value(1.0, num_examples=1, metrics={"loss": 2.0}), start=False)
    a.task_hook = on_task
    a.start()
    b = harness.sidecar(srv, "site-b", add_value(4.0, num_examples=3, metrics={"loss": 1.0}))
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome
    assert outcome.rounds_completed == 2
    # Round 2's global model, as fetched by each client, is round 1's weighted mean: (1*1 + 3*4)/4 = 3.25.
    for sc in (a, b):
        g2 = sc.globals[2]
        assert g2["fc.weight"].dtype == np.float32
        np.testing.assert_array_equal(g2["fc.weight"], np.full((64, 300), 3.25, np.float32))
        np.testing.assert_array_equal(g2["fc.bias"], np.arange(8, dtype=np.float32) + 3.25)
        np.testing.assert_array_equal(g2["steps"], [7])
        assert sc.wait_stop().success  # Stop follows every ResultReceived on the same stream
        assert all(r.ok for r in sc.received.values()) and len(sc.received) == 2
    # Serialize once, serve many: one transaction per round, round 1's released before round 2 started.
    assert [tid.split("-")[1] for tid in live_at_round[2]] == ["r2"]
    assert srv.downloads.transactions() == []
    status = srv.workflow.status()
    assert status.phase.value == "Succeeded"
    assert status.metrics == {"loss": pytest.approx((2.0 * 1 + 1.0 * 3) / 4)}
    assert [c.rounds_completed for c in status.clients] == [2, 2]
    reg, job = srv.metrics_registry, {"fljob": "job1"}
    nbytes = sum(v.nbytes for v in model().values())
    assert reg.get_sample_value("fedkube_server_rounds_completed_total", job) == 2
    assert reg.get_sample_value("fedkube_server_last_completed_round", job) == 2
    assert reg.get_sample_value("fedkube_server_transfer_bytes_total", {**job, "direction": "from_clients"}) == (
        2 * 2 * nbytes
    )
    assert reg.get_sample_value("fedkube_server_clients", {**job, "state": "Done"}) == 2


def three(**kw: object) -> tuple[str, ...]:
    return ("site-a", "site-b", "site-c")


def test_never_registered_client_is_excluded_by_name_and_quorum_proceeds(harness: Harness) -> None:
    cfg = make_config(three(), min_clients=2, registration_timeout_s=1.0)
    srv = harness.server(cfg, model())
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    clients = {c.name: c for c in srv.workflow.status().clients}
    assert clients["site-c"].state == "Pending"
    assert clients["site-c"].reason == "NotRegistered"  # never seen: not "Lost"
    assert clients["site-a"].state == "Done" and clients["site-a"].rounds_completed == 1
    failures = "fedkube_server_client_failures_total"
    reg, job = srv.metrics_registry, {"fljob": "job1"}
    assert reg.get_sample_value(failures, {**job, "reason": "NotRegistered"}) == 1  # the one round it missed
    assert reg.get_sample_value(failures, {**job, "reason": "Lost"}) == 0


def test_straggler_is_excluded_at_the_deadline_and_the_others_aggregate(harness: Harness, tmp_path: Path) -> None:
    cfg = make_config(three(), rounds=2, min_clients=2, round_timeout_s=1.5, checkpoint_dir=tmp_path)
    srv = harness.server(cfg, model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    c = harness.sidecar(srv, "site-c", lambda task, params: Reply(None))  # trains forever
    c.wait_for(lambda: len(c.tasks) == 2, what="round 2's task")
    # Round 1's result arrives late, during round 2: answered, never counted (LESSONS.md 13).
    late = c.tasks[0]
    c.announce(late, add_value(1000.0, num_examples=1000)(late, c.globals[1]))
    c.wait_for(lambda: late.task_id in c.received, what="the answer to the late result")
    assert not c.received[late.task_id].ok and c.received[late.task_id].reason == "RoundTimeout"
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    np.testing.assert_array_equal(a.globals[2]["fc.bias"], np.arange(8, dtype=np.float32) + 2.0)
    final = checkpoint.load_latest(tmp_path, "job1")
    assert final is not None and final.round == 2
    np.testing.assert_array_equal(final.model["fc.bias"], np.arange(8, dtype=np.float32) + 4.0)
    status = {cl.name: cl for cl in srv.workflow.status().clients}
    assert status["site-c"].reason == "RoundTimeout" and "roundSeconds" in status["site-c"].message
    assert status["site-c"].rounds_completed == 0
    assert len(c.tasks) == 2  # excluded for the round only: it got round 2's task too


def test_invalid_result_excludes_that_client_and_the_others_aggregate(harness: Harness) -> None:
    def wrong_shape(task: object, params: dict[str, np.ndarray]) -> Reply:
        bad = model()
        bad["fc.weight"] = np.ones((64, 301), np.float32)
        return Reply(bad, 5)

    cfg = make_config(three(), rounds=2, min_clients=2)
    srv = harness.server(cfg, model())
    live_at_round: dict[int, list[str]] = {}

    def on_task(task: control_pb2.Task) -> None:
        live_at_round[task.round] = [t.id.split("-")[1] for t in srv.downloads.transactions()]

    a = harness.sidecar(srv, "site-a", add_value(1.0), start=False)
    a.task_hook = on_task
    a.start()
    b = harness.sidecar(srv, "site-b", wrong_shape, start=False)
    b.fetch_globals = False  # round 1's transaction never completes by itself
    b.start()
    harness.sidecar(srv, "site-c", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    # Round 1's transaction was released when round 1 closed, before round 2 started (LESSONS.md 14).
    assert live_at_round == {1: ["r1"], 2: ["r2"]}
    answers = list(b.received.values())
    assert answers and not answers[0].ok and answers[0].reason == "InvalidResult"
    assert "'fc.weight' has shape (64, 301), the global model has (64, 300)" in answers[0].message
    assert b.uploads_served == 0  # nothing was downloaded from it
    np.testing.assert_array_equal(a.globals[2]["fc.weight"], np.full((64, 300), 2.0, np.float32))


def test_trainer_exception_fails_the_client_and_quorum_lost_names_each_missing_client(harness: Harness) -> None:
    from fedkube.wire.v1 import control_pb2

    crash = control_pb2.TrainerState(
        phase=control_pb2.TRAINER_PHASE_FAILED, kind=control_pb2.FAILURE_KIND_EXCEPTION,
        message="ValueError: bad batch", exit_code=1,
    )
    cfg = make_config(three(), min_clients=2, registration_timeout_s=1.0)
    srv = harness.server(cfg, model())
    harness.sidecar(srv, "site-a", add_value(1.0))
    b = harness.sidecar(srv, "site-b", lambda task, params: Reply(None, trainer_state=crash))
    outcome = srv.wait(20)
    assert outcome is not None and not outcome.success
    assert outcome.reason == "QuorumLost"
    # site-c never connected, site-b's trainer raised: both named, each with its reason.
    assert "site-c: NotRegistered" in outcome.message
    assert "site-b: Exception (ValueError: bad batch" in outcome.message
    assert b.wait_stop().success is False
    summary = srv.summary()
    assert summary.exit_code == 1 and summary.reason == "QuorumLost"


def test_config_error_from_one_trainer_fails_the_job(harness: Harness) -> None:
    from fedkube.wire.v1 import control_pb2

    bad = control_pb2.TrainerState(
        phase=control_pb2.TRAINER_PHASE_FAILED, kind=control_pb2.FAILURE_KIND_CONFIG_ERROR,
        message="FEDKUBE_DATA is not set",
    )
    srv = harness.server(make_config(), model())
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", lambda task, params: Reply(None, trainer_state=bad))
    outcome = srv.wait(20)
    assert outcome is not None and not outcome.success
    assert outcome.reason == "ConfigError" and "FEDKUBE_DATA is not set" in outcome.message


def test_first_client_provides_the_initial_model(harness: Harness) -> None:
    init = {"w": np.full((100,), 2.0, np.float32), "n": np.array([1], np.int32)}

    def trainer(task: object, params: dict[str, np.ndarray]) -> Reply:
        from fedkube.wire.v1 import control_pb2

        assert isinstance(task, control_pb2.Task)
        if task.kind == control_pb2.TASK_KIND_INIT:
            assert task.round == 0 and not params
            return Reply({k: v.copy() for k, v in init.items()})
        return add_value(1.0)(task, params)

    cfg = make_config(rounds=2, model_source="firstClient", model_path=None)
    srv = harness.server(cfg)
    a = harness.sidecar(srv, "site-a", trainer)
    b = harness.sidecar(srv, "site-b", trainer)
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    assert [t.round for t in a.tasks] == [0, 1, 2]  # the first client by name did the init task
    assert [t.round for t in b.tasks] == [1, 2]
    np.testing.assert_array_equal(b.globals[1]["w"], init["w"])
    np.testing.assert_array_equal(b.globals[2]["w"], init["w"] + 1.0)
