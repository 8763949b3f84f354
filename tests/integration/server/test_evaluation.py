"""Federated evaluation through a real server (spec.evaluation): evaluate tasks after every 2nd round and after
the last, metrics-only results weighted by num_examples (capped by maxExamplesPerSite), a result carrying tensors
refused without failing its site, a site outside spec.evaluation.sites never asked, and the curve in the status
document and the Prometheus metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from fedkube.server.influence import Influence
from fedkube.spec.evaluation import Evaluation
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)


def test_evaluations_follow_every_second_round_and_the_last_and_refuse_a_result_with_tensors(
    harness: Harness,
) -> None:
    cfg = make_config(("site-a", "site-b", "site-c"), rounds=3)
    settings = dataclasses.replace(cfg.settings, evaluation=Evaluation(every=2, sites=["site-a", "site-b"]),
                                   influence=Influence(max_examples=100))
    srv = harness.server(dataclasses.replace(cfg, settings=settings), {"w": np.zeros(4, np.float32)})

    def site_a(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        if task.kind == control_pb2.TASK_KIND_EVALUATE:
            return Reply({}, 10, {"acc": 0.5 + float(params["w"][0])})  # the evaluated model is the new global one
        return Reply({"w": params["w"] + 1}, 5, {"loss": 2.0})

    def site_b(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        if task.kind == control_pb2.TASK_KIND_EVALUATE and task.round == 3:
            return Reply({"w": params["w"]}, 30, {"acc": 9.0})  # tensors on an evaluate task: refused
        if task.kind == control_pb2.TASK_KIND_EVALUATE:
            return Reply({}, 1000, {"acc": 1.0 + float(params["w"][0])})  # claims 1000, counts as 100
        return Reply({"w": params["w"] + 1}, 5, {"loss": 4.0})

    a = harness.sidecar(srv, "site-a", site_a)
    b = harness.sidecar(srv, "site-b", site_b)
    c = harness.sidecar(srv, "site-c", lambda task, params: Reply({"w": params["w"] + 1}, 5, {"loss": 3.0}))
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome

    kinds = [(t.round, t.kind) for t in a.tasks]
    evaluate, train = control_pb2.TASK_KIND_EVALUATE, control_pb2.TASK_KIND_TRAIN
    assert kinds == [(1, train), (2, train), (2, evaluate), (3, train), (3, evaluate)], kinds
    assert [t.kind for t in c.tasks] == [train] * 3  # not among spec.evaluation.sites
    refused = b.received[b.tasks[-1].task_id]
    assert not refused.ok and refused.reason == "InvalidResult" and "metrics only" in refused.message, refused
    assert a.received[a.tasks[2].task_id].ok

    doc = json.loads(srv.status_json())
    assert [c["state"] for c in doc["clients"]] == ["Done"] * 3, doc["clients"]  # b not failed
    assert [c["roundsCompleted"] for c in doc["clients"]] == [3] * 3
    points = doc["evaluation"]
    assert [(p["round"], p["sites"], p["examples"]) for p in points] == [(2, 2, 110), (3, 1, 10)], points
    # After round 2 the global w is 2: a measures 2.5 on 10 examples, b 3.0 on 100 (its 1000 capped).
    assert points[0]["metrics"]["acc"] == pytest.approx((10 * 2.5 + 100 * 3.0) / 110)
    assert points[1]["metrics"] == {"acc": 3.5}  # b's refused result is not in the average
    assert doc["metrics"] == {"loss": 3.0}  # the training rounds' metrics stay their own

    exported = generate_latest(srv.metrics_registry).decode()
    job = srv.config.job
    assert f'fedkube_server_round_metric{{fljob="{job}",name="acc",phase="evaluate"}} 3.5' in exported
    assert f'fedkube_server_round_metric{{fljob="{job}",name="loss",phase="train"}} 3.0' in exported
    assert f'fedkube_server_last_evaluated_round{{fljob="{job}"}} 3.0' in exported


def test_without_spec_evaluation_no_evaluate_task_is_sent(harness: Harness) -> None:
    srv = harness.server(make_config(("site-a",), rounds=2), {"w": np.zeros(4, np.float32)})
    a = harness.sidecar(srv, "site-a", lambda task, params: Reply({"w": params["w"] + 1}))
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome
    assert [t.kind for t in a.tasks] == [control_pb2.TASK_KIND_TRAIN] * 2
    assert "evaluation" not in json.loads(srv.status_json())


def test_a_site_that_never_answers_its_evaluation_is_left_out_and_the_job_succeeds(harness: Harness) -> None:
    cfg = make_config(("site-a",), rounds=1, round_timeout_s=1.0)
    settings = dataclasses.replace(cfg.settings, evaluation=Evaluation(every=1))
    srv = harness.server(dataclasses.replace(cfg, settings=settings), {"w": np.zeros(4, np.float32)})

    def silent_evaluator(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        if task.kind == control_pb2.TASK_KIND_EVALUATE:
            return Reply(None)  # never answers
        return Reply({"w": params["w"] + 1}, 5, {"loss": 1.0})

    a = harness.sidecar(srv, "site-a", silent_evaluator)
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    assert [t.kind for t in a.tasks] == [control_pb2.TASK_KIND_TRAIN, control_pb2.TASK_KIND_EVALUATE]
    doc = json.loads(srv.status_json())
    assert doc["evaluation"] == [{"round": 1, "metrics": {}, "sites": 0, "examples": 0}]
    assert doc["clients"][0]["state"] == "Done"


def test_a_resumed_job_keeps_its_evaluation_curve_and_evaluates_the_round_it_resumed_after(
    harness: Harness, tmp_path: Path
) -> None:
    cfg = make_config(("site-a",), rounds=3, checkpoint_dir=tmp_path)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, evaluation=Evaluation(every=1)))
    evaluate, train = control_pb2.TASK_KIND_EVALUATE, control_pb2.TASK_KIND_TRAIN

    def site(stop_at: int):  # type: ignore[no-untyped-def]
        def behave(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
            if task.kind == evaluate:
                return Reply({}, 10, {"acc": float(params["w"][0])})  # the global w after round r is r
            if task.round >= stop_at:
                return Reply(None)  # the first server is stopped during this round
            return Reply({"w": params["w"] + 1}, 5, {"loss": 1.0})
        return behave

    first = harness.server(cfg, {"w": np.zeros(4, np.float32)})
    harness.sidecar(first, "site-a", site(stop_at=3))
    until(lambda: len(first.workflow.status().evaluation) == 2, "the evaluation after round 2")
    first.request_stop("test: simulated restart")
    out1 = first.wait(10)
    assert out1 is not None and not out1.success and out1.rounds_completed == 2, out1
    first.shutdown(grace_s=0.5)

    second = harness.server(cfg, {"w": np.zeros(4, np.float32)})
    a = harness.sidecar(second, "site-a", site(stop_at=99))
    out2 = second.wait(20)
    assert out2 is not None and out2.success, out2
    # Round 2's checkpoint was written before round 2's evaluation, so the resumed server runs that one again.
    assert [(t.round, t.kind) for t in a.tasks] == [(2, evaluate), (3, train), (3, evaluate)]
    points = json.loads(second.status_json())["evaluation"]
    assert [(p["round"], p["metrics"]["acc"]) for p in points] == [(1, 1.0), (2, 2.0), (3, 3.0)], points
