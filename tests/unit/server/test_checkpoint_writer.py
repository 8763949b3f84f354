"""CheckpointWriter: one background write at a time, in order, failures kept for the workflow."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from fedkube.server.checkpoint import CheckpointError
from fedkube.server.checkpointing import Checkpointing, CheckpointResult, CheckpointWriter
from fedkube.server.jobs import CHECKPOINT_FAILED, Outcome
from fedkube.server.strategy_api import StrategyState
from fedkube.status import EvaluationPoint
from fedkube.transfer.refs import TensorRef

pytestmark = pytest.mark.timeout(30)


class HeldStore:
    """Each save waits for its own gate; records the order of saves."""

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.saved: list[int] = []
        self.fail: set[int] = set()
        self.checksums: dict[int, dict[str, str]] = {}

    def load(self) -> None:
        return None

    def save(
        self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None, evaluation: Sequence[EvaluationPoint] = (),
    ) -> None:
        assert self.gates.setdefault(round_, threading.Event()).wait(20)
        if round_ in self.fail:
            raise CheckpointError(f"round {round_}: no space left (test)")
        self.saved.append(round_)
        self.checksums[round_] = dict(checksums or {})


def test_submit_returns_while_the_write_runs_and_the_next_waits_for_it() -> None:
    store = HeldStore()
    settled = threading.Semaphore(0)
    writer = CheckpointWriter(store, "job1", on_settled=settled.release)
    model = {"w": np.zeros(4, np.float32)}
    store.gates[1] = threading.Event()
    assert writer.submit(1, model, StrategyState("fedavg"), {}) < 1.0  # nothing in flight: no wait
    assert writer.busy() and not writer.wait(0.1)
    assert not writer.holds_strategy_tensors()
    second = threading.Thread(target=writer.submit, args=(2, model, StrategyState("fedavg"), {}))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # one write at a time: round 2 waits for round 1
    store.gates[1].set()
    second.join(10)
    assert not second.is_alive()
    store.gates[2].set()
    assert writer.wait(10)
    assert settled.acquire(timeout=5) and settled.acquire(timeout=5)
    assert store.saved == [1, 2]
    assert [(r.round, r.error) for r in writer.take_results()] == [(1, ""), (2, "")]
    assert writer.take_results() == []


def test_a_failed_write_is_a_result_with_the_error() -> None:
    store = HeldStore()
    store.fail.add(3)
    store.gates[3] = threading.Event()
    store.gates[3].set()
    writer = CheckpointWriter(store, "job1")
    state = StrategyState("fedadam", {}, {"m/w": np.zeros(4, np.float32)})
    writer.submit(3, {"w": np.zeros(4, np.float32)}, state, {"loss": 1.0})
    assert writer.wait(10)
    (result,) = writer.take_results()
    assert isinstance(result, CheckpointResult) and result.round == 3 and "no space left (test)" in result.error


def test_holds_strategy_tensors_only_while_such_a_write_runs() -> None:
    store = HeldStore()
    store.gates[1] = threading.Event()
    writer = CheckpointWriter(store, "job1")
    state = StrategyState("fedadam", {}, {"m/w": np.zeros(4, np.float32), "v/w": np.ones(4, np.float32)})
    writer.submit(1, {"w": np.zeros(4, np.float32)}, state, {})
    assert writer.holds_strategy_tensors()
    store.gates[1].set()
    assert writer.wait(10) and not writer.holds_strategy_tensors()


def _refs(model: Mapping[str, np.ndarray], tag: str) -> list[TensorRef]:
    return [TensorRef.for_array(a, source="server", transaction_id="t", ref_id=n, name=n,
                                checksum=f"xxh3_64:{tag:0>16}") for n, a in model.items()]


def test_the_next_rounds_published_checksums_reach_the_write_and_no_other_rounds_do() -> None:
    store = HeldStore()
    ckpt = Checkpointing(store, "job1", on_settled=lambda: None, on_status=lambda message, cleared: None)
    model = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
    store.gates[4] = threading.Event()
    ckpt.submit(4, model, StrategyState("fedavg"), {})
    ckpt.published(4, _refs(model, "aa"))  # a re-run of round 4 is not the model round 4's write holds
    ckpt.published(6, _refs(model, "bb"))
    ckpt.published(5, _refs(model, "cc"))  # round 5 publishes what round 4 produced
    store.gates[4].set()
    assert ckpt.finish(Outcome(True, "Succeeded", "done", 4), 4) == Outcome(True, "Succeeded", "done", 4)
    assert store.checksums[4] == {"w": "xxh3_64:" + "0" * 14 + "cc", "b": "xxh3_64:" + "0" * 14 + "cc"}
    assert ckpt.written_round == 4


def test_a_failed_write_is_reported_then_cleared_and_fails_the_job_only_when_it_was_the_last() -> None:
    store = HeldStore()
    store.fail.add(1)
    reports: list[tuple[str, str]] = []
    ckpt = Checkpointing(store, "job1", on_settled=lambda: None, on_status=lambda m, c: reports.append((m, c)))
    model = {"w": np.zeros(4, np.float32)}
    for r in (1, 2):
        store.gates[r] = threading.Event()
        store.gates[r].set()
    ckpt.submit(1, model, StrategyState("fedavg"), {})
    ckpt.before_strategy_update(2)  # holds no strategy tensors: returns at once
    assert ckpt.finish(Outcome(True, "Succeeded", "done", 1), 1).reason == CHECKPOINT_FAILED
    assert reports == [("the checkpoint of round 1 was not written: round 1: no space left (test)", "")]
    ckpt.submit(2, model, StrategyState("fedavg"), {})
    assert ckpt.finish(Outcome(True, "Succeeded", "done", 2), 2).success
    assert reports[-1] == ("", reports[0][0])
