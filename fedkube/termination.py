"""The server's final word: ``TerminationSummary``, the compact JSON a finished server writes for Kubernetes.

The server writes it to the pod's termination-message path before it exits;
the operator and ``fedkube run`` read it back with ``from_json`` under the same
rules as the live status document (``fedkube.status``): untrusted input, a size
limit before parsing, strict types. It must fit in ``TERMINATION_LIMIT`` bytes
because Kubernetes truncates a termination message there, so ``to_json`` leaves
things out in a fixed order rather than fail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, with_config

from fedkube.status import (
    DOC_CONFIG,
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    MAX_CLIENTS,
    NAME_CHARS,
    ClientState,
    ClientStatus,
    Count,
    EvaluationPoint,
    JobStatus,
    Message,
    Metrics,
    Name,
    OptionalCount,
    Phase,
    ReasonText,
    ServerPhase,
    SummaryError,
    Time,
    camel,
    clip,
    finite_metrics,
    null_is,
    parse_document,
)

TERMINATION_LIMIT = 4096
"""Kubernetes keeps at most this many bytes of a container's termination message."""
SUMMARY_EVALUATIONS = 5
"""How many of the newest evaluations the termination summary carries (it must fit in TERMINATION_LIMIT)."""

_CLIENT_MESSAGE_CHARS = 160
_MESSAGE_CHARS = 1024


@with_config(DOC_CONFIG)
@dataclass
class TerminationSummary:
    """The server's final word: exit code + compact JSON for the pod's termination message."""

    exit_code: Annotated[int, Field(ge=0, le=255), camel("exit_code")]
    job: Name
    phase: ServerPhase
    round: Count
    rounds: Count
    completed_rounds: Annotated[OptionalCount, camel("completed_rounds")] = 0
    reason: ReasonText = ""
    message: Message = ""
    metrics: Metrics = field(default_factory=dict)
    clients: Annotated[list[ClientStatus], Field(max_length=MAX_CLIENTS), null_is(list)] = field(default_factory=list)
    clients_omitted: Annotated[OptionalCount, camel("clients_omitted")] = 0
    """Clients left out to stay under the 4096-byte limit (healthy ones go first)."""
    model_file: Annotated[str, Field(max_length=NAME_CHARS), camel("model_file"), null_is(str)] = ""
    """The delivered model's file name in the output directory (fedkube.server.output), "" when none was written."""
    model_sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$"), camel("model_sha256"), null_is(str)] = ""
    start_time: Annotated[Time | None, camel("start_time")] = None
    finish_time: Annotated[Time | None, camel("finish_time")] = None
    evaluation: Annotated[list[EvaluationPoint], Field(max_length=SUMMARY_EVALUATIONS), null_is(list)] = field(
        default_factory=list
    )
    """The newest federated evaluations (at most SUMMARY_EVALUATIONS; left out first when the summary is full)."""

    @classmethod
    def from_status(cls, status: JobStatus) -> TerminationSummary:
        """The summary of a finished job; exit 0 only when it succeeded."""
        return cls(
            exit_code=EXIT_SUCCEEDED if status.phase == Phase.SUCCEEDED else EXIT_FAILED,
            job=status.job,
            phase=status.phase,
            round=status.round,
            rounds=status.rounds,
            completed_rounds=status.completed_rounds,
            reason=status.reason,
            message=status.message,
            metrics=dict(status.metrics),
            clients=list(status.clients),
            start_time=status.start_time,
            finish_time=status.finish_time,
            evaluation=list(status.evaluation[-SUMMARY_EVALUATIONS:]),
        )

    def _doc(self, clients: Sequence[dict[str, Any]], omitted: int, message: str, metrics: bool,
             evaluation: bool = False) -> dict[str, Any]:  # fmt: skip
        d: dict[str, Any] = {
            "exitCode": self.exit_code,
            "job": self.job,
            "phase": Phase(self.phase).value,
            "round": self.round,
            "rounds": self.rounds,
            "completedRounds": self.completed_rounds,
        }
        if self.reason:
            d["reason"] = self.reason
        if message:
            d["message"] = message
        if metrics and self.metrics:
            d["metrics"] = finite_metrics(self.metrics)
        d["clients"] = list(clients)
        if omitted:
            d["clientsOmitted"] = omitted
        if self.model_file:
            d.update(modelFile=self.model_file, modelSha256=self.model_sha256)
        if self.start_time:
            d["startTime"] = self.start_time
        if self.finish_time:
            d["finishTime"] = self.finish_time
        if evaluation and self.evaluation:
            d["evaluation"] = [p.to_dict() for p in self.evaluation[-SUMMARY_EVALUATIONS:]]
        return d

    def to_json(self, limit: int = TERMINATION_LIMIT) -> str:
        """Compact JSON of at most ``limit`` UTF-8 bytes.

        When everything does not fit, the evaluation curve is left out first,
        then clients are dropped (healthy ones
        first; failed and lost clients are what a person needs to read) and
        counted in ``clientsOmitted``; then the metrics; then the message is
        shortened.
        """
        ordered = [
            c.to_dict(_CLIENT_MESSAGE_CHARS)
            for c in sorted(self.clients, key=lambda c: (not ClientState(c.state).unhealthy and not c.reason, c.name))
        ]
        message = clip(self.message, _MESSAGE_CHARS)

        def encode(k: int, msg: str, metrics: bool) -> str:
            # A summary read back keeps counting the clients its writer already left out.
            doc = self._doc(ordered[:k], self.clients_omitted + len(ordered) - k, msg, metrics)
            return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

        def fits(text: str) -> bool:
            return len(text.encode("utf-8")) <= limit

        if self.evaluation:
            full = self._doc(ordered, self.clients_omitted, message, True, True)
            text = json.dumps(full, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            if fits(text):
                return text
        text = encode(len(ordered), message, True)
        if fits(text):
            return text
        # Largest prefix of the client list that fits (size grows with k, so bisect).
        lo, hi = 0, len(ordered)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(encode(mid, message, True)):
                lo = mid
            else:
                hi = mid - 1
        text = encode(lo, message, True)
        if fits(text):
            return text
        text = encode(0, message, False)
        while not fits(text) and message:
            message = clip(message, len(message) // 2) if len(message) > 8 else ""
            text = encode(0, message, False)
        if not fits(text):
            raise SummaryError(
                f"the termination summary of job {self.job!r} does not fit in {limit} bytes even without "
                "clients, metrics and message; the job name is too long"
            )
        return text

    @classmethod
    def from_json(cls, text: str | bytes) -> TerminationSummary:
        """Parse a termination summary; SummaryError naming the field that is wrong."""
        return parse_document(cls, text, "termination summary", TERMINATION_LIMIT)


def write_termination_summary(path: str | os.PathLike[str], summary: TerminationSummary) -> str:
    """Write the summary to ``path`` (the pod's terminationMessagePath) and return the JSON written.

    Written in place, not by rename: Kubernetes mounts that path as a single
    file, which cannot be replaced.
    """
    text = summary.to_json()
    target = Path(path)
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return text
