"""Federated evaluation through the real server, sidecar and trainer SDK (spec.evaluation, every round).

The SDK tells the script the task's kind (``model.kind``, ``session.is_evaluate()``). A script that evaluates
sends metrics only; a script unaware of evaluation trains on the evaluate task and sends its weights, and the SDK
drops them so the server takes its metrics instead of refusing the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fedkube.spec.evaluation import Evaluation
from fedkube.trainer_sdk import FLModel
from fedkube.trainer_sdk._session import Session
from tests.integration.sidecar.one_site import OneSite

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def stack() -> Iterator[OneSite]:
    s = OneSite(lambda: {"w": np.zeros(8, np.float32)}, 2, Evaluation(every=1))
    try:
        yield s
    finally:
        s.close()


def test_the_script_learns_the_kind_and_an_evaluate_result_carries_metrics_only(stack: OneSite) -> None:
    seen: list[tuple[int, str, bool, float]] = []

    def script(session: Session, index: int, _: Any) -> None:
        model = session.receive()
        assert model.params is not None
        w = float(model.params["w"][0])
        seen.append((model.round, model.kind, session.is_evaluate(), w))
        if model.kind == "evaluate" and model.round == 2:  # a script that evaluates: metrics only
            session.send(FLModel(num_examples=4, metrics={"acc": 10.0 + w}))
            return
        # Round 1's evaluate task goes to a script unaware of evaluation: it trains and sends weights.
        assert session.send(FLModel(params={"w": model.params["w"] + 1}, num_examples=3, metrics={"acc": w}))

    stack.start(script).finish()
    assert seen == [(1, "train", False, 0.0), (1, "evaluate", True, 1.0), (2, "train", False, 1.0),
                    (2, "evaluate", True, 2.0)], seen
    assert stack.server is not None
    status = stack.server.workflow.status()
    assert status.completed_rounds == 2 and [c.state for c in status.clients] == ["Done"]
    assert [(p.round, p.sites, p.examples, p.metrics) for p in status.evaluation] == [
        (1, 1, 3, {"acc": 1.0}), (2, 1, 4, {"acc": 12.0})]
