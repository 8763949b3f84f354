"""Sidecar between a real trainer SDK session and a scripted server, over real gRPC on localhost."""

from __future__ import annotations

import gc
import threading
import weakref

import ml_dtypes
import numpy as np
import pytest

from fedkube.sidecar.app import Sidecar
from fedkube.trainer_sdk import (
    FLModel,
    InvalidParamsError,
    ResultRejectedError,
    ResultTransferError,
    SendWithoutReceiveError,
)
from fedkube.trainer_sdk._session import Session
from fedkube.wire.v1 import control_pb2
from tests.integration.sidecar.conftest import JOB, SITE
from tests.integration.sidecar.fake_server import FakeServer

pytestmark = pytest.mark.timeout(60)


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((300, 257)).astype(np.float32),  # > 1 chunk of 256 KiB
        "b16": rng.standard_normal(1000).astype(ml_dtypes.bfloat16),
        "h": rng.standard_normal(33).astype(np.float16),
        "step": np.array([7], dtype=np.int64),
    }


def _send_in_thread(trainer: Session, model: FLModel) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            trainer.send(model)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_task_relay_forward_fetch_reverse_push_and_gating(
    server: FakeServer, sidecar: Sidecar, trainer: Session
) -> None:
    g = _global()
    server.publish_task(SITE, g, task_id="t1", round=1, total_rounds=3, config={"lr": "0.1"})
    server.wait_message("task_ack", lambda a: a.task_id == "t1")

    assert trainer.is_running()
    model = trainer.receive()
    assert (model.round, model.total_rounds, model.config["lr"]) == (1, 3, "0.1")
    assert model.params is not None
    for name, arr in g.items():
        got = model.params[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert got.tobytes() == arr.tobytes(), name  # bit-exact, bf16 and fp16 included
        assert got.flags.writeable
    # The trainer told the server's publisher it finished: the global transaction is released.
    txn = server.downloads.transaction("g-t1")
    assert txn is None or txn.wait(5)

    result = {k: (v + 1).astype(v.dtype) for k, v in model.params.items()}
    probe = weakref.ref(result["w"])
    received_probe = weakref.ref(model.params["w"])
    t, errors = _send_in_thread(trainer, FLModel(params=result, num_examples=12, metrics={"loss": 0.5}))
    ann = server.wait_message("result", lambda r: r.task_id == "t1")
    assert ann.num_examples == 12 and ann.metrics["loss"] == 0.5
    assert {r.source for r in ann.refs} == {SITE}
    pulled = server.pull(SITE, ann)
    for name, arr in result.items():
        assert pulled[name].tobytes() == arr.tobytes(), name
    # Gating: all bytes are at the server, but send() waits for ResultReceived.
    t.join(0.5)
    assert t.is_alive(), "send() returned before the server confirmed the result"
    server.result_received(SITE, "t1")
    t.join(10)
    assert not t.is_alive() and not errors, errors
    # The result the server took is still served until the next task: if the server excludes another
    # client's result this round, it pulls tensors of this one again to rebuild the aggregate exactly.
    again = server.pull(SITE, ann)
    for name, arr in result.items():
        assert again[name].tobytes() == arr.tobytes(), name
    # The next task (here: the job's Stop) ends that, before any next model is received (LESSONS.md 8).
    del result, model, pulled, again
    gc.collect()
    assert received_probe() is None, "the SDK kept a reference to a received array"
    assert trainer.service.transactions()
    server.send(SITE, control_pb2.ServerMessage(stop=control_pb2.Stop(success=True, reason="Completed")))
    assert not trainer.is_running()
    gc.collect()
    assert probe() is None, "the SDK kept a reference to a sent array"
    assert not trainer.service.transactions()


def test_result_without_tensors_returns_at_once(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    server.publish_task(SITE, {}, task_id="v1")
    trainer.receive()
    # No ResultReceived is ever sent: a metrics-only result must not wait for one (LESSONS.md 2).
    trainer.send(FLModel(params=None, num_examples=5, metrics={"acc": 0.9}))
    ann = server.wait_message("result", lambda r: r.task_id == "v1")
    assert not ann.refs and ann.metrics["acc"] == pytest.approx(0.9)


def test_init_task_has_no_params_and_send_without_receive_fails(
    server: FakeServer, sidecar: Sidecar, trainer: Session
) -> None:
    with pytest.raises(SendWithoutReceiveError, match="receive"):
        trainer.send(FLModel(params=None))
    server.publish_task(SITE, {}, task_id="init", round=0, kind=control_pb2.TASK_KIND_INIT)
    model = trainer.receive()
    assert model.params is None and model.round == 0
    t, errors = _send_in_thread(trainer, FLModel(params={"w": np.ones(4, np.float32)}, num_examples=1))
    ann = server.wait_message("result", lambda r: r.task_id == "init")
    assert server.pull(SITE, ann)["w"].tolist() == [1.0] * 4
    server.result_received(SITE, "init")
    t.join(10)
    assert not errors


def test_duplicate_task_is_acked_but_delivered_once(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    task = server.publish_task(SITE, {}, task_id="d1")
    server.send(SITE, control_pb2.ServerMessage(task=task))
    server.wait_for(lambda: len(server.of_kind("task_ack")) == 2)
    assert trainer.receive().config["fedkube.task"] == "train"  # the task's kind, as the SDK shows it to scripts
    trainer.send(FLModel(metrics={"a": 1.0}, num_examples=1))
    server.send(SITE, control_pb2.ServerMessage(stop=control_pb2.Stop(success=True, reason="Done")))
    assert not trainer.is_running()


def test_server_refusal_raises_result_rejected(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    server.publish_task(SITE, {"w": np.zeros(3, np.float32)}, task_id="r1")
    trainer.receive()
    t, errors = _send_in_thread(trainer, FLModel(params={"w": np.zeros(4, np.float32)}, num_examples=1))
    server.wait_message("result", lambda r: r.task_id == "r1")
    server.result_received(SITE, "r1", ok=False, reason="InvalidResult", message="w has shape [4], expected [3]")
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ResultRejectedError)
    assert errors[0].reason == "InvalidResult" and "expected [3]" in str(errors[0])


def test_round_scoped_refusal_returns_false_and_the_loop_goes_on(
    server: FakeServer, sidecar: Sidecar, trainer: Session
) -> None:
    """A straggler excluded for one round keeps its trainer: send() says False, the next task comes."""
    server.publish_task(SITE, {"w": np.zeros(3, np.float32)}, task_id="s1")
    trainer.receive()
    outcome: list[bool] = []
    t = threading.Thread(
        target=lambda: outcome.append(trainer.send(FLModel(params={"w": np.ones(3, np.float32)}, num_examples=1))),
        daemon=True,
    )
    t.start()
    server.wait_message("result", lambda r: r.task_id == "s1")
    server.result_received(SITE, "s1", ok=False, reason="RoundTimeout", message="past the round deadline")
    t.join(10)
    assert outcome == [False]
    server.publish_task(SITE, {"w": np.zeros(3, np.float32)}, task_id="s2", round=2)
    assert trainer.is_running()
    assert trainer.receive().round == 2


def test_sdk_timings_reach_the_sidecar_histograms(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    server.publish_task(SITE, {"w": np.zeros(1000, np.float32)}, task_id="m1")
    model = trainer.receive()
    assert model.params is not None
    t, errors = _send_in_thread(trainer, FLModel(params={"w": model.params["w"] + 1}, num_examples=1))
    ann = server.wait_message("result", lambda r: r.task_id == "m1")
    server.pull(SITE, ann)
    server.result_received(SITE, "m1")
    t.join(10)
    assert not t.is_alive() and not errors

    def observed(metric: str) -> float | None:
        return sidecar.registry.get_sample_value(f"{metric}_count", {"fljob": JOB, "site": SITE})

    # The timings are reported before receive()/send() return, so they are there now.
    assert observed("fedkube_trainer_receive_seconds") == 1
    assert observed("fedkube_trainer_send_seconds") == 1
    assert observed("fedkube_trainer_download_wait_seconds") == 1
    with pytest.raises(InvalidParamsError, match="reserved for fedkube's own timings"):
        trainer.log_metric("fedkube.receive_seconds", 1.0)


def test_trainer_state_and_metrics_forwarded(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    server.wait_message("trainer_state", lambda s: s.phase == control_pb2.TRAINER_PHASE_RUNNING)
    trainer.log_metric("train_loss", 0.25, round=2)
    m = server.wait_message("metrics", lambda m: "train_loss" in m.values)
    assert m.round == 2 and m.values["train_loss"] == 0.25
    trainer.report(control_pb2.TRAINER_PHASE_FINISHED, message="done")
    server.wait_message("trainer_state", lambda s: s.phase == control_pb2.TRAINER_PHASE_FINISHED)
    hb = server.wait_message("heartbeat", lambda h: h.trainer.phase == control_pb2.TRAINER_PHASE_FINISHED)
    assert hb.seq >= 1


def test_cancel_upload_stops_the_push(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    server.publish_task(SITE, {}, task_id="c1", kind=control_pb2.TASK_KIND_INIT)
    trainer.receive()
    big = np.zeros(8 << 20, np.uint8)
    t, errors = _send_in_thread(trainer, FLModel(params={"x": big}, num_examples=1))
    ann = server.wait_message("result", lambda r: r.task_id == "c1")
    import queue

    q: queue.Queue[control_pb2.PushedChunk | None] = queue.Queue()
    with server.push_lock:
        server.pushes["req-1"] = q
    server.send(
        SITE,
        control_pb2.ServerMessage(
            upload=control_pb2.UploadRequest(request_id="req-1", ref=ann.refs[0], offset=0, max_chunk_bytes=64 << 10)
        ),
    )
    first = q.get(timeout=10)
    assert first is not None and first.request_id == "req-1" and first.offset == 0
    server.send(SITE, control_pb2.ServerMessage(cancel_upload=control_pb2.CancelUpload(request_id="req-1")))
    got = 1
    while True:
        item = q.get(timeout=10)
        if item is None:
            break
        got += 1
    # The push ended early: far fewer than the 128 chunks of the tensor were relayed.
    assert got < 128
    server.result_received(SITE, "c1", ok=False, reason="TransferFailed", message="cancelled by test")
    t.join(10)
    assert not t.is_alive() and not errors  # a failed transfer sets this round's result aside; no exception


def _fast_timeouts(trainer: Session, *, idle: float, start: float) -> None:
    import dataclasses

    trainer.settings = dataclasses.replace(trainer.settings, result_idle_timeout_s=idle, result_start_timeout_s=start)


def test_send_fails_when_the_download_never_starts(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    _fast_timeouts(trainer, idle=30, start=0.8)
    server.publish_task(SITE, {}, task_id="n1", kind=control_pb2.TASK_KIND_INIT)
    trainer.receive()
    with pytest.raises(ResultTransferError, match=r"did not start downloading the result \(4000 bytes\) within 1 s"):
        trainer.send(FLModel(params={"w": np.zeros(1000, np.float32)}, num_examples=1))
    assert not trainer.service.transactions()  # the result's buffers were dropped


def test_send_fails_when_the_download_stalls(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    _fast_timeouts(trainer, idle=0.8, start=30)
    server.publish_task(SITE, {}, task_id="s1", kind=control_pb2.TASK_KIND_INIT)
    trainer.receive()
    t, errors = _send_in_thread(trainer, FLModel(params={"w": np.zeros(1 << 20, np.uint8)}, num_examples=1))
    ann = server.wait_message("result", lambda r: r.task_id == "s1")
    # The server pulls the first 64 KiB and then goes silent.
    import queue

    q: queue.Queue[control_pb2.PushedChunk | None] = queue.Queue()
    with server.push_lock:
        server.pushes["p1"] = q
    server.send(SITE, control_pb2.ServerMessage(upload=control_pb2.UploadRequest(
        request_id="p1", ref=ann.refs[0], offset=0, max_chunk_bytes=64 << 10)))
    assert q.get(timeout=10) is not None
    server.send(SITE, control_pb2.ServerMessage(cancel_upload=control_pb2.CancelUpload(request_id="p1")))
    t.join(15)
    assert len(errors) == 1 and isinstance(errors[0], ResultTransferError), errors
    assert "stalled at" in str(errors[0]) and "idle timeout" in str(errors[0])
