"""The outbox is the one place the server builds control-stream messages; each builder sets exactly its field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedkube.protocol import INIT_TASK, TRAIN_TASK, ResultTimeouts, task_kind
from fedkube.server import outbox
from fedkube.transfer.refs import TensorRef
from fedkube.wire.v1 import control_pb2

SERVER = Path(__file__).resolve().parents[3] / "fedkube" / "server"


def _ref(name: str) -> TensorRef:
    return TensorRef.for_array(
        np.zeros(3, np.float32),
        source="server",
        transaction_id="t1",
        ref_id=f"r-{name}",
        name=name,
        checksum="xxh3_64:" + "0" * 16,
    )


def _wire(msg: control_pb2.ServerMessage) -> control_pb2.ServerMessage:
    """What the client decodes: every builder's message survives serialization unchanged."""
    return control_pb2.ServerMessage.FromString(msg.SerializeToString())


@pytest.mark.parametrize("kind", [TRAIN_TASK, INIT_TASK])
def test_task_carries_its_round_refs_and_kind(kind: str) -> None:
    refs = [_ref("w"), _ref("b")] if kind == TRAIN_TASK else []
    timeouts = ResultTimeouts.for_job(idle_timeout_s=60, chunk_timeout_s=10, round_timeout_s=600)
    msg = _wire(outbox.task("job-r2-x-site-a", 2, kind, refs, total_rounds=5, timeouts=timeouts))
    assert msg.WhichOneof("msg") == "task"
    assert (msg.task.task_id, msg.task.round, msg.task.total_rounds) == ("job-r2-x-site-a", 2, 5)
    assert msg.task.kind == task_kind(kind)
    assert dict(msg.task.config) == timeouts.to_config()
    assert [TensorRef.from_proto(r) for r in msg.task.refs] == refs


@pytest.mark.parametrize(
    ("msg", "field", "expected"),
    [
        (outbox.result_received("t9", False, "InvalidResult", "NaN in w"), "result_received",
         {"task_id": "t9", "ok": False, "reason": "InvalidResult", "message": "NaN in w"}),
        (outbox.result_received("t9", True), "result_received", {"task_id": "t9", "ok": True, "reason": ""}),
        (outbox.stop(True, "Succeeded", "completed 3 round(s)"), "stop",
         {"success": True, "reason": "Succeeded", "message": "completed 3 round(s)"}),
        (outbox.cancel_upload("u7"), "cancel_upload", {"request_id": "u7"}),
        (outbox.registered("job", 2000), "registered", {"job": "job", "heartbeat_interval_ms": 2000}),
        (outbox.rejected("BadToken", "wrong token"), "rejected", {"reason": "BadToken", "message": "wrong token"}),
    ],
)  # fmt: skip
def test_each_builder_sets_only_its_field(msg: control_pb2.ServerMessage, field: str, expected: dict) -> None:
    got = _wire(msg)
    assert got.WhichOneof("msg") == field
    body = getattr(got, field)
    assert {k: getattr(body, k) for k in expected} == expected


def test_upload_request_names_the_tensor_and_where_to_resume() -> None:
    ref = _ref("w")
    msg = _wire(outbox.upload_request("u1", ref, offset=1024, max_chunk_bytes=4096))
    assert msg.WhichOneof("msg") == "upload"
    assert (msg.upload.request_id, msg.upload.offset, msg.upload.max_chunk_bytes) == ("u1", 1024, 4096)
    assert TensorRef.from_proto(msg.upload.ref) == ref


def test_no_other_server_module_builds_a_server_message() -> None:
    allowed = {"outbox.py"}
    builders = sorted(
        p.name
        for p in SERVER.glob("*.py")
        if p.name not in allowed and "ServerMessage(" in p.read_text(encoding="utf-8")
    )
    assert builders == [], f"{builders} build control messages; add a builder to fedkube/server/outbox.py"
