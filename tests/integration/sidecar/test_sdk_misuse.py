"""Script mistakes the SDK reports at once, with the fix: a second receive() without send(), a bad num_examples.

A fake server, a real sidecar and a trainer session: each mistake raises
before anything goes to the server, and the task it happened on can still be
answered correctly afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedkube.sidecar.app import Sidecar
from fedkube.trainer_sdk import FLModel, InvalidParamsError, ReceiveWithoutSendError
from fedkube.trainer_sdk._session import Session
from fedkube.wire.v1 import control_pb2
from tests.integration.sidecar.conftest import SITE
from tests.integration.sidecar.fake_server import FakeServer

pytestmark = pytest.mark.timeout(60)


def _within(seconds: float, call: Callable[[], Any]) -> BaseException | None:
    """Run ``call`` on a thread; what it raised, None if it returned; fails if it is still blocked."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert raised, f"still blocked after {seconds} s"
    return raised[0]


def _answer(server: FakeServer, trainer: Session, task_id: str, model: FLModel) -> control_pb2.ResultAnnouncement:
    """send() ``model`` and let the fake server accept it; the announcement it got."""
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(trainer.send(model)), daemon=True)
    t.start()
    ann = server.wait_message("result", lambda r: r.task_id == task_id)
    server.pull(SITE, ann)
    server.result_received(SITE, task_id)
    t.join(10)
    assert result == [True]
    return ann


def test_receive_twice_without_send_fails_at_once_and_the_task_stays_answerable(
    server: FakeServer, sidecar: Sidecar, trainer: Session
) -> None:
    server.publish_task(SITE, {"w": np.zeros(4, np.float32)}, task_id="t1", round=1, total_rounds=2)
    model = trainer.receive()
    # Without the check the second call waits for a task the server sends only after this result.
    for call in (trainer.receive, trainer.is_running):
        err = _within(5, call)
        assert isinstance(err, ReceiveWithoutSendError), err
        assert "task t1 of round 1 is still unanswered" in str(err) and "fix: call fk.send()" in str(err)
    assert model.params is not None
    ann = _answer(server, trainer, "t1", FLModel(params={"w": model.params["w"] + 1}, num_examples=3))
    assert ann.num_examples == 3
    server.publish_task(SITE, {"w": np.ones(4, np.float32)}, task_id="t2", round=2, total_rounds=2)
    assert trainer.is_running() and trainer.receive().round == 2


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (-5, r"num_examples is -5, outside 0\.\.2\*\*64-1; fix: pass how many examples"),
        (1 << 64, r"num_examples is 18446744073709551616, outside 0\.\.2\*\*64-1; fix:"),
        (2.5, r"num_examples is 2\.5 \(float\), not a whole number of examples; fix: pass an int"),
        (True, r"num_examples is True \(bool\), not a whole number"),
        ("7", r"num_examples is '7' \(str\)"),
    ],
)
def test_an_impossible_num_examples_is_refused_when_the_model_is_built(value: Any, says: str) -> None:
    with pytest.raises(InvalidParamsError, match=says):
        FLModel(params={"w": np.zeros(1)}, num_examples=value)


def test_num_examples_is_checked_again_at_send_and_the_task_stays_answerable(
    server: FakeServer, sidecar: Sidecar, trainer: Session
) -> None:
    server.publish_task(SITE, {"w": np.zeros(4, np.float32)}, task_id="t1")
    model = trainer.receive()
    assert model.params is not None
    result = FLModel(params={"w": model.params["w"] + 1}, num_examples=5)
    result.num_examples = -5  # a dataclass field can be changed after the check in __init__
    with pytest.raises(InvalidParamsError, match="num_examples is -5"):
        trainer.send(result)
    # A training result of weight 0 would be refused by the server (InvalidResult) and cost the round.
    result.num_examples = 0
    with pytest.raises(InvalidParamsError, match=r"num_examples is 0 in the result of a training task.*fix: pass"):
        trainer.send(result)
    assert not server.of_kind("result")  # nothing was announced
    result.num_examples = np.uint64(2**64 - 1)  # type: ignore[assignment]  # numpy ints count; all of uint64 travels
    assert _answer(server, trainer, "t1", result).num_examples == 2**64 - 1


def test_an_init_result_may_say_zero_examples(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    server.publish_task(SITE, {}, task_id="i0", round=0, kind=control_pb2.TASK_KIND_INIT)
    assert trainer.receive().params is None
    ann = _answer(server, trainer, "i0", FLModel(params={"w": np.zeros(4, np.float32)}))  # num_examples: 0
    assert ann.num_examples == 0
