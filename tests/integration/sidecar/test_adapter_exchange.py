"""Adapter-only exchange: the global model is a subset of each site's network (a LoRA adapter), never the base.

The base weights stay on the site; the server aggregates only the adapter's
tensors. ``receive(into=net.state_dict())`` writes the adapter into the
network in place and leaves every other tensor alone; ``send`` carries only the
adapter. Over the real server, sidecar and bulk relay.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fedkube.trainer_sdk import FLModel
from fedkube.trainer_sdk._session import Session
from tests.integration.sidecar.one_site import OneSite

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(60)

ROUNDS = 3


class LoraLinear(torch.nn.Module):  # type: ignore[misc]
    """A frozen base layer plus a rank-2 adapter, named as peft names its tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(128, 128)
        self.lora_A = torch.nn.Parameter(torch.zeros(2, 128))
        self.lora_B = torch.nn.Parameter(torch.zeros(128, 2))


def _adapter(net: LoraLinear) -> dict[str, Any]:
    return {k: v for k, v in net.state_dict().items() if "lora_" in k}


@pytest.fixture
def stack() -> Iterator[OneSite]:
    s = OneSite(lambda: {k: v.numpy().copy() for k, v in _adapter(LoraLinear()).items()}, ROUNDS)
    try:
        yield s
    finally:
        s.close()


def test_only_the_adapter_travels_and_is_written_into_the_network(stack: OneSite) -> None:
    net = LoraLinear()
    base_before = net.base.weight.detach().clone()
    received: list[set[str]] = []

    def script(session: Session, index: int, _: Any) -> None:
        state = net.state_dict()  # views of the network's own tensors
        model = session.receive(into=state)
        assert model.params is not None
        received.append(set(model.params))
        for name, value in model.params.items():
            assert value is state[name]  # written into the network itself
            np.testing.assert_array_equal(value.numpy(), np.full(value.shape, float(index), np.float32))
        with torch.no_grad():  # "training" moves only the adapter
            net.lora_A += 1
            net.lora_B += 1
        session.send(FLModel(params=_adapter(net), num_examples=10))

    stack.start(script).finish()
    assert received == [{"lora_A", "lora_B"}] * ROUNDS
    assert torch.equal(net.base.weight, base_before)  # the base never left the site nor was overwritten
    assert stack.server is not None
    assert stack.server.workflow.status().completed_rounds == ROUNDS
