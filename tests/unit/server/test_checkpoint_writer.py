"""CheckpointWriter: one background write at a time, in order, failures kept for the workflow."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import pytest

from fedkube.server.checkpoint import CheckpointError
from fedkube.server.strategies import StrategyState
from fedkube.server.workflow import CheckpointResult, CheckpointWriter

pytestmark = pytest.mark.timeout(30)


class HeldStore:
    """Each save waits for its own gate; records the order of saves."""

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.saved: list[int] = []
        self.fail: set[int] = set()

    def load(self) -> None:
        return None

    def save(
        self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None,
    ) -> None:
        assert self.gates.setdefault(round_, threading.Event()).wait(20)
        if round_ in self.fail:
            raise CheckpointError(f"round {round_}: no space left (test)")
        self.saved.append(round_)


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
