"""Every message the server sends on a control stream is built here, and only here.

The workflow, the reverse-path downloads and the control servicer decide
*what* to say; these functions say it in protobuf. One place keeps the wire
shape of each message (and its task-config keys) reviewable and testable on
its own (tests/unit/server/test_outbox.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from fedkube.protocol import task_kind
from fedkube.terms import JobTerms
from fedkube.transfer.refs import TensorRef
from fedkube.wire.v1 import control_pb2


class TaskSettings(Protocol):
    """What every task's config carries: ResultTimeouts, or those plus the strategy's entries (FedProx's mu,
    ``fedkube.server.strategy_report.task_settings``)."""

    def to_config(self) -> dict[str, str]: ...


def task(
    task_id: str, round_: int, kind: str, refs: Iterable[TensorRef], total_rounds: int, timeouts: TaskSettings
) -> control_pb2.ServerMessage:
    """A client's task for one round: the global model's refs (none for the init task), its kind, and how
    long the trainer's ``send()`` waits for this server's download of its result."""
    return control_pb2.ServerMessage(
        task=control_pb2.Task(
            task_id=task_id,
            round=round_,
            refs=[r.to_proto() for r in refs],
            kind=task_kind(kind),
            config=timeouts.to_config(),
            total_rounds=total_rounds,
        )
    )


def result_received(task_id: str, ok: bool, reason: str = "", message: str = "") -> control_pb2.ServerMessage:
    """The answer to a result announcement; the client's ``send()`` returns on it."""
    return control_pb2.ServerMessage(
        result_received=control_pb2.ResultReceived(task_id=task_id, ok=ok, reason=reason, message=message)
    )


def stop(success: bool, reason: str, message: str) -> control_pb2.ServerMessage:
    """The job is over for this client (or the client is out of it)."""
    return control_pb2.ServerMessage(stop=control_pb2.Stop(success=success, reason=reason, message=message))


def upload_request(request_id: str, ref: TensorRef, offset: int, max_chunk_bytes: int) -> control_pb2.ServerMessage:
    """Ask a sidecar for the bytes of one of its tensors from ``offset`` on (the reverse path)."""
    return control_pb2.ServerMessage(
        upload=control_pb2.UploadRequest(
            request_id=request_id, ref=ref.to_proto(), offset=offset, max_chunk_bytes=max_chunk_bytes
        )
    )


def cancel_upload(request_id: str) -> control_pb2.ServerMessage:
    """The server no longer wants the bytes of ``request_id``."""
    return control_pb2.ServerMessage(cancel_upload=control_pb2.CancelUpload(request_id=request_id))


def registered(job: str, heartbeat_interval_ms: int, terms: JobTerms | None = None) -> control_pb2.ServerMessage:
    """The first message on an accepted control stream, with the job's terms a site's policy checks."""
    terms = terms or JobTerms()
    return control_pb2.ServerMessage(registered=control_pb2.Registered(
        job=job, heartbeat_interval_ms=heartbeat_interval_ms,
        terms=control_pb2.JobTerms(strategy=terms.strategy or "", total_rounds=terms.total_rounds or 0),
    ))  # fmt: skip


def rejected(reason: str, message: str) -> control_pb2.ServerMessage:
    """The only message on a refused control stream, before it is aborted."""
    return control_pb2.ServerMessage(rejected=control_pb2.Rejected(reason=reason, message=message))
