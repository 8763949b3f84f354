"""Checkpoints are written in the background: the next round does not wait, the job's end does, failures show.

The seam is FedkubeServer's ``checkpoints`` argument: a store that writes real
checkpoints with fedkube.server.checkpoint but holds each write until the test
opens its gate, so a slow disk is simulated without a sleep in production code.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedkube.server import checkpoint
from fedkube.server.checkpoint import CheckpointError
from fedkube.server.jobs import Resumed
from fedkube.server.strategy_api import StrategyState
from fedkube.status import EvaluationPoint
from fedkube.transfer.refs import as_bytes, checksum_of
from tests.integration.server.conftest import JOB, Harness, make_config
from tests.integration.server.fakes import add_value
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

GATE_S = 30.0  # a gate never opened fails the write instead of hanging the test


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((3000,), np.float32), "b": np.ones((4,), np.float32)}


class GatedStore:
    """A CheckpointStore writing real checkpoints; the write of a gated round waits for its gate."""

    def __init__(self, directory: Path, gated: tuple[int, ...] = (), fail: tuple[int, ...] = ()) -> None:
        self.directory = directory
        self.gates = {r: threading.Event() for r in gated}
        self.fail = fail
        self.started: dict[int, threading.Event] = {}
        self.finished: set[int] = set()
        self.unchanged: dict[int, bool] = {}  # round -> its arrays were not modified during the write
        self.checksums: dict[int, Mapping[str, str] | None] = {}  # round -> what the workflow passed
        self._lock = threading.Lock()

    def _started(self, round_: int) -> threading.Event:
        with self._lock:
            return self.started.setdefault(round_, threading.Event())

    def load(self) -> Resumed | None:
        ck = checkpoint.load_latest(self.directory, JOB)
        return None if ck is None else Resumed(ck.round, dict(ck.model), ck.strategy_state)

    def save(
        self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None, evaluation: Sequence[EvaluationPoint] = (),
    ) -> None:
        self.checksums[round_] = checksums
        before = {k: v.copy() for k, v in [*model.items(), *(("state/" + k, a) for k, a in state.tensors.items())]}
        self._started(round_).set()
        gate = self.gates.get(round_)
        if gate is not None and not gate.wait(GATE_S):
            raise CheckpointError(f"test gate of round {round_} was never opened")
        after = {**model, **{"state/" + k: a for k, a in state.tensors.items()}}
        self.unchanged[round_] = all(np.array_equal(before[k], after[k]) for k in before)
        if round_ in self.fail:
            raise CheckpointError(f"job {JOB}: writing the checkpoint of round {round_} failed: disk full (test)")
        checkpoint.save(self.directory, JOB, round_, model, state, metrics=metrics, checksums=checksums)
        self.finished.add(round_)

    def wait_started(self, round_: int) -> None:
        assert self._started(round_).wait(10), f"the checkpoint of round {round_} was never started"


def test_next_round_runs_while_a_slow_write_is_in_flight_and_the_end_waits(harness: Harness, tmp_path: Path) -> None:
    store = GatedStore(tmp_path, gated=(1, 2))
    srv = harness.server(make_config(rounds=2), model(), checkpoints=store)
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    store.wait_started(1)
    # Round 2 is sent while round 1's checkpoint is still being written.
    a.wait_for(lambda: len(a.tasks) == 2, what="round 2's task while round 1's checkpoint is held")
    assert 1 not in store.finished
    store.gates[1].set()
    store.wait_started(2)
    # The job's end waits for the last write: no outcome while round 2's checkpoint is held.
    assert srv.wait(0.5) is None
    assert srv.workflow.status().completed_rounds == 2 and not srv.workflow.status().phase.finished
    store.gates[2].set()
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    assert store.finished == {1, 2} and store.unchanged == {1: True, 2: True}
    final = checkpoint.load_latest(tmp_path, JOB)
    assert final is not None and final.round == 2
    np.testing.assert_array_equal(final.model["w"], np.full((3000,), 4.0, np.float32))
    # Round 2 published round 1's model while its write was held: the write got those checksums
    # (the round's own checkpoint verified them on load); nothing published round 2's model.
    first = checkpoint.load(tmp_path / JOB / "round-000001")
    assert dict(store.checksums[1] or {}) == {n: checksum_of(as_bytes(a)) for n, a in first.model.items()}
    assert store.checksums[2] is not None and not store.checksums[2]
    status = srv.workflow.status()
    assert len(status.round_seconds) == 2 and all(x > 0 for x in status.round_seconds)
    assert status.last_round_seconds == status.round_seconds[-1]
    # Round 1 did not include its held checkpoint; round 2 waited for round 1's write before handing over its own.
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.status_port}/status", timeout=5) as r:
        doc = json.loads(r.read())
    assert doc["lastRoundSeconds"] == status.last_round_seconds and doc["roundSeconds"] == status.round_seconds


def test_stop_during_a_write_waits_for_it_and_resume_finds_it(harness: Harness, tmp_path: Path) -> None:
    store = GatedStore(tmp_path, gated=(1,))
    srv = harness.server(make_config(rounds=3), model(), checkpoints=store)
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    a.wait_for(lambda: len(a.tasks) == 2, what="round 2's task")
    srv.request_stop("test: SIGTERM while a checkpoint is written")
    assert srv.wait(0.5) is None  # held by the checkpoint in flight
    assert checkpoint.load_latest(tmp_path, JOB) is None  # an unfinished write is never visible
    store.gates[1].set()
    outcome = srv.wait(20)
    assert outcome is not None and outcome.reason == "Terminated", outcome
    ck = checkpoint.load_latest(tmp_path, JOB)
    assert ck is not None and ck.round == 1
    np.testing.assert_array_equal(ck.model["w"], np.full((3000,), 2.0, np.float32))


def test_a_failed_write_is_reported_and_a_later_one_clears_it(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = GatedStore(tmp_path, gated=(2,), fail=(1,))
    srv = harness.server(make_config(rounds=2), model(), checkpoints=store)
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    store.wait_started(2)  # round 1's write failed before round 2's could start
    until(lambda: "round 1 was not written" in srv.workflow.status().message, "the failure in the status")
    assert "disk full (test)" in srv.workflow.status().message
    assert any("writing the checkpoint failed" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    store.gates[2].set()
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome  # the last checkpoint is in place
    ck = checkpoint.load_latest(tmp_path, JOB)
    assert ck is not None and ck.round == 2


def test_a_failed_last_write_fails_the_job(harness: Harness, tmp_path: Path) -> None:
    store = GatedStore(tmp_path, fail=(1,))
    srv = harness.server(make_config(rounds=1), model(), checkpoints=store)
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and not outcome.success
    assert outcome.reason == "CheckpointFailed" and "disk full (test)" in outcome.message, outcome
    status = srv.workflow.status()
    assert status.reason == "CheckpointFailed" and status.phase.value == "Failed"


def test_fedadam_state_is_not_updated_while_it_is_written(harness: Harness, tmp_path: Path) -> None:
    store = GatedStore(tmp_path, gated=(1,))
    cfg = make_config(rounds=2, strategy="fedadam", strategy_options={"serverLr": 0.5})
    srv = harness.server(cfg, model(), checkpoints=store)
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    b = harness.sidecar(srv, "site-b", add_value(3.0))
    a.wait_for(lambda: len(a.tasks) == 2 and a.tasks[1].task_id in a.received, what="round 2's result received")
    b.wait_for(lambda: len(b.tasks) == 2 and b.tasks[1].task_id in b.received, what="round 2's result received")
    # Both results are folded: without the wait the round would finish (and update m, v) at once.
    # Bounded negative check: it must still be held by round 1's write.
    time.sleep(0.5)
    assert srv.workflow.status().completed_rounds == 1
    store.gates[1].set()
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    assert store.unchanged == {1: True, 2: True}
    ck = checkpoint.load_latest(tmp_path, JOB)
    assert ck is not None and ck.round == 2 and set(ck.strategy_state.tensors) == {"m/w", "m/b", "v/w", "v/b"}


def test_the_end_waits_for_a_write_only_so_long(harness: Harness, tmp_path: Path) -> None:
    store = GatedStore(tmp_path, gated=(1,))
    srv = harness.server(make_config(rounds=1), model(), checkpoints=store)
    srv.workflow._checkpointing.wait_s = 0.5  # the bound is CHECKPOINT_WAIT_S (minutes) in production
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    try:
        outcome = srv.wait(20)
        assert outcome is not None and not outcome.success and outcome.reason == "CheckpointFailed", outcome
        assert "still being written after 0.5 s" in outcome.message and "resumes from round 0" in outcome.message
        assert checkpoint.load_latest(tmp_path, JOB) is None  # the unfinished write is not mistaken for one
    finally:
        store.gates[1].set()
