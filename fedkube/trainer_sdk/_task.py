"""A task as the trainer holds it between ``receive()`` and ``send()``."""

from __future__ import annotations

from fedkube import protocol
from fedkube.transfer.refs import TensorRef
from fedkube.wire.v1 import control_pb2


class Task:
    def __init__(self, task: control_pb2.Task) -> None:
        self.id = task.task_id
        self.round = int(task.round)
        self.total_rounds = int(task.total_rounds)
        self.kind = task.kind
        self.config = dict(task.config)
        self.refs = [TensorRef.from_proto(r) for r in task.refs]

    @property
    def is_evaluate(self) -> bool:
        """An evaluate task: its result carries metrics only."""
        return self.kind == protocol.TASK_EVALUATE

    def script_config(self) -> dict[str, str]:
        """The config a script sees: the task's settings plus its kind by name (``fedkube.task``)."""
        return {**self.config, protocol.TASK_KIND_KEY: protocol.task_kind_name(self.kind)}
