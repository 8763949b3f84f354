"""What a task carries besides the model: its kind (Task.kind) and how long the trainer's send() may wait."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.protocol import ResultTimeouts
from fedkube.server.config import TransferSettings
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply, add_value

pytestmark = pytest.mark.timeout(60)


def test_tasks_carry_their_kind_and_the_jobs_result_timeouts(harness: Harness) -> None:
    transfer = TransferSettings(chunk_bytes=64 * 1024, chunk_timeout_s=2.0, idle_timeout_s=7.0, max_attempts=3)
    cfg = make_config(("site-a",), rounds=2, model_source="firstClient", model_path=None, transfer=transfer,
                      round_timeout_s=20.0)
    initial = {"w": np.ones(10, np.float32)}

    def trainer(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        if task.kind == control_pb2.TASK_KIND_INIT:
            return Reply({k: v.copy() for k, v in initial.items()})
        return add_value(1.0)(task, params)

    srv = harness.server(cfg)
    a = harness.sidecar(srv, "site-a", trainer)
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome
    assert [(t.round, t.kind) for t in a.tasks] == [
        (0, control_pb2.TASK_KIND_INIT), (1, control_pb2.TASK_KIND_TRAIN), (2, control_pb2.TASK_KIND_TRAIN),
    ]
    # The job's transfer and round settings reach the trainer with every task.
    expected = ResultTimeouts.for_job(idle_timeout_s=7.0, chunk_timeout_s=2.0, round_timeout_s=20.0)
    assert expected.idle_s == 7.0 + 2.0 + 5.0
    unset = ResultTimeouts(idle_s=1.0, start_s=1.0, ttl_s=1.0)
    for task in a.tasks:
        assert ResultTimeouts.from_config(dict(task.config), unset) == expected
