"""A server restarted after the last round's checkpoint finishes the job (fedkube.server.resumed_end): the final
evaluation the first server did not finish, the final model delivered again byte for byte, the status of the whole
job; no round is trained again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedkube.formats import safetensors
from fedkube.server import checkpoint
from fedkube.server.checkpoint import completion_message
from fedkube.server.dp import spent_epsilon
from fedkube.server.influence import Influence
from fedkube.server.strategies import FedAvg, build_strategy
from fedkube.spec.evaluation import Evaluation
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import JOB, Harness, make_config
from tests.integration.server.fakes import Reply
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

EVALUATE = control_pb2.TASK_KIND_EVALUATE
SIGMA = 2.0


def _config(tmp_path: Path, rounds: int, evaluation: Evaluation | None):  # type: ignore[no-untyped-def]
    cfg = make_config(("site-a",), rounds=rounds, checkpoint_dir=tmp_path / "ckpt", registration_timeout_s=5.0)
    settings = dataclasses.replace(cfg.settings, evaluation=evaluation)
    return dataclasses.replace(cfg, settings=settings, output_dir=tmp_path / "out")


def test_a_server_restarted_during_the_final_evaluation_evaluates_delivers_and_reports_the_whole_job(
    harness: Harness, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, 2, Evaluation(every=1))

    def site(final_evaluation: bool):  # type: ignore[no-untyped-def]
        def behave(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
            if task.kind == EVALUATE:
                if task.round == 2 and not final_evaluation:
                    return Reply(None)  # the first server dies while it waits for this
                return Reply({}, 10, {"acc": float(params["w"][0])})  # the global w after round r is r
            return Reply({"w": params["w"] + 1}, 5, {"loss": float(task.round)})
        return behave

    first = harness.server(cfg, {"w": np.zeros(4, np.float32)})
    a1 = harness.sidecar(first, "site-a", site(final_evaluation=False))
    out = tmp_path / "out"
    final = out / f"{JOB}.safetensors"
    until(lambda: final.exists() and (2, EVALUATE) in [(t.round, t.kind) for t in a1.tasks],
          "round 2's checkpoint and model written, and its evaluation under way")
    first.request_stop("test: the server dies during the final evaluation")
    out1 = first.wait(10)
    assert out1 is not None and not out1.success and out1.rounds_completed == 2, out1
    first.shutdown(grace_s=0.5)
    delivered = final.read_bytes()
    for p in out.iterdir():
        p.unlink()  # as if the first server had died before its output write
    ck_dir = tmp_path / "ckpt" / JOB
    rounds_kept = sorted(p.name for p in ck_dir.iterdir())

    second = harness.server(cfg, {"w": np.full(4, 99, np.float32)})  # not used: the checkpoint is resumed
    a2 = harness.sidecar(second, "site-a", site(final_evaluation=True))
    out2 = second.wait(20)
    assert out2 is not None and out2.success, out2
    assert (out2.rounds_completed, out2.message) == (2, completion_message(2, 3)), out2
    # Only the owed evaluation ran: no round was trained again, and no checkpoint was added.
    assert [(t.round, t.kind) for t in a2.tasks] == [(2, EVALUATE)]
    assert sorted(p.name for p in ck_dir.iterdir()) == rounds_kept
    # The final model delivered again is byte for byte the first server's, and the summary names it.
    assert final.read_bytes() == delivered
    sha = hashlib.sha256(delivered).hexdigest()
    assert json.loads((out / f"{JOB}.json").read_text())["sha256"] == sha
    summary = second.summary()
    assert (summary.model_file, summary.model_sha256) == (final.name, sha)
    kept = checkpoint.load_latest(tmp_path / "ckpt", JOB)
    assert kept is not None and kept.round == 2 and kept.model["w"].tobytes() == np.full(4, 2, np.float32).tobytes()
    # The status of the whole job: both rounds, round 2's metrics, the curve completed by the final evaluation.
    doc = json.loads(second.status_json())
    assert (doc["phase"], doc["round"], doc["completedRounds"]) == ("Succeeded", 2, 2), doc
    assert doc["metrics"] == {"loss": 2.0}
    assert [(p["round"], p["metrics"]["acc"]) for p in doc["evaluation"]] == [(1, 1.0), (2, 2.0)], doc["evaluation"]
    labels = {"fljob": JOB}
    assert second.metrics_registry.get_sample_value("fedkube_server_last_completed_round", labels) == 2
    assert second.metrics_registry.get_sample_value("fedkube_server_last_evaluated_round", labels) == 2


def test_without_evaluation_the_resumed_end_is_immediate_reports_the_spent_epsilon_and_a_lost_model_fails(
    harness: Harness, tmp_path: Path
) -> None:
    """No spec.evaluation and no site: the job ends at once from the checkpoint; an unwritable output fails it."""
    options = {"privacy": {"targetEpsilon": 50.0, "targetDelta": 1e-5, "noiseMultiplier": SIGMA}}
    strategy = build_strategy("fedavg", options, Influence("equal", None, 1.0))
    assert isinstance(strategy, FedAvg) and strategy.privacy is not None
    strategy.privacy.history = [(SIGMA, 1)]  # the account of the checkpoint's one noised round
    model = {"w": np.arange(3, dtype=np.float32)}
    checkpoint.save(tmp_path / "ckpt", JOB, 1, model, strategy.state(), metrics={"loss": 0.5})
    cfg = _config(tmp_path, 1, None)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(
        cfg.settings, strategy_options=options, influence=Influence("equal", None, 1.0)))
    srv = harness.server(cfg, model)
    outcome = srv.wait(10)
    assert outcome is not None and outcome.success and outcome.rounds_completed == 1, outcome
    assert srv.workflow.status().privacy_epsilon == pytest.approx(spent_epsilon([(SIGMA, 1)], 1e-5))
    assert srv.workflow.status().metrics == {"loss": 0.5}
    written, meta = safetensors.load_file(tmp_path / "out" / f"{JOB}.safetensors")
    assert written["w"].tobytes() == model["w"].tobytes() and meta["metric.loss"] == "0.5", meta

    out = tmp_path / "out"
    for p in out.iterdir():
        p.unlink()
    os.symlink("/dev/full", out / f".tmp-{JOB}.safetensors")  # every write there fails with ENOSPC
    again = harness.server(cfg, model)
    outcome = again.wait(10)
    assert outcome is not None and not outcome.success and outcome.reason == "CheckpointFailed", outcome
    assert outcome.rounds_completed == 1
    assert f"could not be written to {out}" in outcome.message and "the volume is full" in outcome.message, outcome
    assert checkpoint.load_latest(tmp_path / "ckpt", JOB).round == 1  # type: ignore[union-attr]
