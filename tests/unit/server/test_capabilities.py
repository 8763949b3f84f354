"""The downloads' optional capability is a typed protocol: streaming aggregators offer it, staged ones do not."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.server.strategies import FedAdam, FedAvg
from fedkube.server.strategy_api import RoundAggregator, Strategy, StreamingAggregator


def _model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 4), np.float32), "steps": np.zeros((), np.int64)}


@pytest.mark.parametrize("strategy", [FedAvg(), FedAdam()], ids=["fedavg", "fedadam"])
def test_streaming_aggregator_receives_a_float_tensor_into_its_accumulator(strategy: Strategy) -> None:
    agg = strategy.begin_round(_model())
    assert isinstance(agg, RoundAggregator) and isinstance(agg, StreamingAggregator)
    with agg.intake("site-a#1", "w", "float32", (4, 4), 3.0) as intake:
        assert intake.target is not None  # the first contribution is received in place, no copy
        np.frombuffer(intake.target, np.float32)[:] = 2.0
        assert intake.add(np.frombuffer(intake.target, np.float32).reshape(4, 4))
    assert agg.add("site-a#1", "steps", np.ones((), np.int64), 3.0)
    agg.commit("site-a#1")
    new = agg.finish()
    assert set(new) == {"w", "steps"} and int(new["steps"]) == 1
    if strategy.name == "fedavg":  # FedAdam moves toward the mean by its learning rate instead
        np.testing.assert_array_equal(new["w"], np.full((4, 4), 2.0, np.float32))


@pytest.mark.parametrize("strategy", [FedAvg(staged=True), FedAdam(staged=True)], ids=["fedavg", "fedadam"])
def test_staged_aggregator_keeps_arrays_so_it_does_not_offer_the_capability(strategy: Strategy) -> None:
    agg = strategy.begin_round(_model())
    assert isinstance(agg, RoundAggregator)
    assert not isinstance(agg, StreamingAggregator)
