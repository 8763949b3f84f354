"""fedkube.protocol: task kinds by name, and the result timeouts the server writes into Task.config."""

from __future__ import annotations

import pytest

from fedkube import protocol
from fedkube.errors import ConfigError
from fedkube.protocol import ResultTimeouts
from fedkube.wire.v1 import control_pb2


def test_task_kind_names_come_from_the_proto_enum() -> None:
    assert (protocol.INIT_TASK, protocol.TRAIN_TASK, protocol.EVALUATE_TASK) == ("init", "train", "evaluate")
    for value in control_pb2.TaskKind.values():
        assert protocol.task_kind(protocol.task_kind_name(value)) == value
    assert protocol.task_kind_name(0) == "unspecified"
    assert protocol.task_kind_name(99) == "kind 99"  # a newer server's kind is shown, not raised
    with pytest.raises(ValueError):
        protocol.task_kind("predict")


def test_result_timeouts_for_a_job_outlast_the_servers_own_verdict() -> None:
    t = ResultTimeouts.for_job(idle_timeout_s=10.0, chunk_timeout_s=3.0, round_timeout_s=100.0)
    # The server gives up on a stalled pull after idle + one chunk timeout; the trainer waits longer.
    assert t.idle_s == 10.0 + 3.0 + protocol.VERDICT_SLACK_S
    assert t.start_s == 100.0 + t.idle_s
    assert t.ttl_s == t.start_s + t.idle_s


def test_result_timeouts_travel_in_task_config() -> None:
    sent = ResultTimeouts(idle_s=2.5, start_s=7.0, ttl_s=30.0)
    task = control_pb2.Task(task_id="t", config=sent.to_config())
    defaults = ResultTimeouts(idle_s=300.0, start_s=900.0, ttl_s=10800.0)
    assert ResultTimeouts.from_config(dict(task.config), defaults) == sent
    # A task that sets nothing (an older server) leaves the SDK's defaults.
    assert ResultTimeouts.from_config({}, defaults) == defaults
    # The TTL never ends before a send() could give up.
    short_ttl = {**sent.to_config(), protocol.RESULT_TTL_KEY: "1"}
    assert ResultTimeouts.from_config(short_ttl, defaults).ttl_s == 2.5 + 7.0


@pytest.mark.parametrize("raw", ["soon", "0", "-3", "nan", "inf"])
def test_a_bad_timeout_in_task_config_names_the_key_and_the_fix(raw: str) -> None:
    defaults = ResultTimeouts(idle_s=300.0, start_s=900.0, ttl_s=10800.0)
    with pytest.raises(ConfigError, match=rf"{protocol.RESULT_IDLE_TIMEOUT_KEY}='{raw}'.*fix: .*same version"):
        ResultTimeouts.from_config({protocol.RESULT_IDLE_TIMEOUT_KEY: raw}, defaults)
