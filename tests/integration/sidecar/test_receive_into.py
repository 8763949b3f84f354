"""``receive(into=...)``: the global model lands in the caller's own buffers, over real server, sidecar and sockets.

A loop that hands last round's arrays (or a network's state_dict) back gets
the new model written into that same memory, on the bulk relay and on gRPC;
whatever cannot be written in place (missing, wrong shape or dtype,
non-contiguous, read-only, memory shared with another tensor) arrives in a
fresh array, and one log line names it and why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from fedkube.trainer_sdk import FLModel
from fedkube.trainer_sdk._session import Session
from tests.integration.sidecar.one_site import OneSite, Script

pytestmark = pytest.mark.timeout(60)

ROUNDS = 3


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((300, 257)).astype(np.float32),  # several bulk frames
        "b16": rng.standard_normal(1000).astype(ml_dtypes.bfloat16),
        "step": np.array([7], dtype=np.int64),
    }


def _expected(round_index: int) -> dict[str, np.ndarray]:
    """The global model of round ``round_index`` (0-based): the trainer adds 1 to everything each round."""
    model = _model()
    for _ in range(round_index):  # one +1 per round, rounded as the trainer rounds it
        model = {k: v + np.ones((), dtype=v.dtype) for k, v in model.items()}
    return model


@pytest.fixture
def stack() -> Iterator[OneSite]:
    s = OneSite(_model, ROUNDS)
    try:
        yield s
    finally:
        s.close()


def _run(stack: OneSite, script: Script, bulk: bool = True) -> None:
    stack.start(script, "on" if bulk else "off").finish()
    assert stack.session is not None
    assert (stack.session.model.bulk_fetcher is not None) == bulk  # the path under test was the one used


def _equal(got: Any, want: np.ndarray) -> None:
    if isinstance(got, torch.Tensor):
        got = got.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if got.dtype == torch.bfloat16 else got.numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc"])
def test_numpy_buffers_handed_back_are_written_in_place_every_round(stack: OneSite, bulk: bool) -> None:
    seen: list[dict[str, int]] = []

    def script(session: Session, index: int, last: FLModel | None) -> FLModel:
        model = session.receive(into=last)
        assert model.params is not None
        for name, arr in model.params.items():
            _equal(arr, _expected(index)[name])
            if last is not None:
                assert last.params is not None and arr is last.params[name]  # the same object, not a copy
        seen.append({name: arr.ctypes.data for name, arr in model.params.items()})
        for arr in model.params.values():
            arr += np.ones((), dtype=arr.dtype)
        result = FLModel(params=model.params, num_examples=10)
        session.send(result)
        return result

    _run(stack, script, bulk)
    assert len(seen) == ROUNDS
    assert seen[1] == seen[0] and seen[2] == seen[0]  # one set of buffers for the whole job


def test_a_state_dict_is_overwritten_in_place_including_bfloat16(stack: OneSite) -> None:
    net = torch.nn.Linear(257, 300)  # weight (300, 257) float32, bias unused by the global model
    extra = torch.zeros(1000, dtype=torch.bfloat16)
    step = torch.zeros(1, dtype=torch.int64)
    owned = {"w": net.weight, "b16": extra, "step": step}

    def script(session: Session, index: int, _: Any) -> None:
        state = {"w": net.state_dict()["weight"], "b16": extra, "step": step, "bias": net.state_dict()["bias"]}
        model = session.receive(into=state)
        assert model.params is not None and set(model.params) == set(_model())
        for name, value in model.params.items():
            assert value is state[name]  # the caller's own tensors come back
            _equal(owned[name].detach(), _expected(index)[name])  # the network itself holds the new weights
        with torch.no_grad():
            for t in owned.values():
                t += 1
        session.send(FLModel(params=owned, num_examples=10))

    _run(stack, script)


def test_buffers_that_cannot_take_a_tensor_get_fresh_arrays_and_a_log_line(
    stack: OneSite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedkube.trainer_sdk")
    shared = np.zeros(1000 * 2, dtype=np.uint8)

    def script(session: Session, index: int, _: Any) -> None:
        readonly = np.zeros(1, dtype=np.int64)
        readonly.flags.writeable = False
        wide = np.zeros((257, 300), dtype=np.float32).T  # right shape, but a transposed (non-contiguous) view
        cases: list[dict[str, Any]] = [
            {"w": np.zeros((300, 256), np.float32), "b16": np.zeros(1000, np.float32), "step": readonly},
            {"w": wide, "b16": torch.zeros(1000, dtype=torch.float16), "step": "not an array"},
            # "w" and "b16" alias the same bytes: only one of them can be written
            {"w": np.zeros((300, 257), np.float32), "b16": shared.view(ml_dtypes.bfloat16)[:1000]},
        ]
        into = cases[index]
        if index == 2:
            into["step"] = shared[:8].view(np.int64)  # overlaps b16's first bytes
        model = session.receive(into=into)
        assert model.params is not None
        for name, value in model.params.items():
            _equal(value, _expected(index)[name])
        if index == 2:
            assert model.params["w"] is into["w"]
            written = [n for n in ("b16", "step") if model.params[n] is into[n]]
            assert len(written) == 1, written  # the other one got a fresh array
        else:
            assert all(model.params[n] is not into[n] for n in model.params)
        for arr in model.params.values():
            arr += np.ones((), dtype=arr.dtype)
        session.send(FLModel(params=model.params, num_examples=10))

    _run(stack, script)
    lines = [r.getMessage() for r in caplog.records if "fresh arrays instead of into" in r.getMessage()]
    assert len(lines) == ROUNDS, lines
    assert "3 of 3 tensors" in lines[0]
    assert "w (it is float32[300, 256], the tensor is float32[300, 257])" in lines[0]
    assert "b16 (it is float32[1000], the tensor is bfloat16[1000])" in lines[0]
    assert "step (it is read-only)" in lines[0]
    assert "w (it is not C-contiguous)" in lines[1]
    assert "b16 (it is float16[1000], the tensor is bfloat16[1000])" in lines[1]
    assert "step (it is a str, not an array or tensor)" in lines[1]
    assert "1 of 3 tensors" in lines[2] and "overlaps another tensor's" in lines[2]


def test_into_must_be_a_model_or_a_mapping(stack: OneSite) -> None:
    failures: list[str] = []

    def script(session: Session, index: int, _: Any) -> None:
        try:
            session.receive(into=[np.zeros(3)])
        except Exception as exc:
            failures.append(str(exc))
        model = session.receive()
        assert model.params is not None
        session.send(FLModel(params={k: v + 1 for k, v in model.params.items()}, num_examples=10))

    _run(stack, script)
    assert failures and "receive(into=...) takes an FLModel or a dict" in failures[0]
