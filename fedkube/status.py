"""Status vocabulary and documents: failure reasons, the status JSON, the termination summary.

The server serves ``JobStatus`` on its HTTP status endpoint and writes a
``TerminationSummary`` (compact JSON, at most 4096 bytes, because Kubernetes
truncates a termination message there) to the pod's termination-message path
before it exits; the operator reads both with ``from_json`` and copies the
reasons into the FLJob status, Events and metric labels.

It lives outside ``fedkube.server`` and imports nothing else of fedkube,
because the operator (which must not import ``fedkube.server``, see
tests/unit/test_project.py) parses the same documents.

JSON keys are camelCase like the rest of the Kubernetes status the operator
writes; times are RFC 3339 UTC strings ("2026-01-02T03:04:05Z").
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedkube.errors import FedkubeError

TERMINATION_LIMIT = 4096
"""Kubernetes keeps at most this many bytes of a container's termination message."""
ROUND_HISTORY = 20
"""How many recent round durations the status document keeps (``roundSeconds``)."""

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1


class SummaryError(FedkubeError):
    """A status or summary document could not be parsed."""


class Scope(enum.Enum):
    """How far a failure reaches."""

    ROUND = "round"
    """The client sits out this round and may take part in the next one."""
    CLIENT = "client"
    """The client is out for the rest of the job (it may come back only by reconnecting, for Lost)."""
    JOB = "job"
    """The whole job fails."""


class Reason(str, enum.Enum):
    """Machine-readable failure reasons, used verbatim in status, Events, logs and metric labels.

    The value is the stable name; ``sentence`` is what a person reads;
    ``scope`` says what the failure takes down.
    """

    NOT_REGISTERED = "NotRegistered"
    DEPLOY_TIMEOUT = "DeployTimeout"
    PENDING_TIMEOUT = "PendingTimeout"
    EXCEPTION = "Exception"
    CONFIG_ERROR = "ConfigError"
    ABORTED = "Aborted"
    EXITED_BEFORE_DOWNLOAD = "ExitedBeforeDownload"
    TRAINER_EXITED = "TrainerExited"
    LOST = "Lost"
    ROUND_TIMEOUT = "RoundTimeout"
    TRANSFER_FAILED = "TransferFailed"
    INVALID_RESULT = "InvalidResult"
    REJECTED = "Rejected"
    QUORUM_LOST = "QuorumLost"
    INTERNAL = "InternalError"

    @property
    def sentence(self) -> str:
        return _SENTENCES[self]

    @property
    def scope(self) -> Scope:
        return _SCOPES[self]

    @classmethod
    def parse(cls, value: str) -> Reason:
        """The reason with this stable name; SummaryError listing the known ones otherwise."""
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(r.value for r in cls)
            raise SummaryError(f"unknown failure reason {value!r}; known: {known}") from None


_SENTENCES: dict[Reason, str] = {
    Reason.NOT_REGISTERED: "the client's sidecar has not connected to the server (yet)",
    Reason.DEPLOY_TIMEOUT: "the client's pod was not ready within deploySeconds",
    Reason.PENDING_TIMEOUT: "the client's pod stayed Pending past pendingSeconds (unschedulable, or its image "
    "cannot be pulled)",
    Reason.EXCEPTION: "the training script raised an exception",
    Reason.CONFIG_ERROR: "the training script reported a configuration error, which would hit every client",
    Reason.ABORTED: "the training script aborted",
    Reason.EXITED_BEFORE_DOWNLOAD: "the trainer exited before the server had downloaded its result",
    Reason.TRAINER_EXITED: "the trainer process ended without sending its result or reporting a failure",
    Reason.LOST: "the client was connected, then sent no heartbeat for longer than heartbeatSeconds",
    Reason.ROUND_TIMEOUT: "the client did not deliver its result before the round deadline (straggler)",
    Reason.TRANSFER_FAILED: "downloading the client's result failed after retries",
    Reason.INVALID_RESULT: "the client's result does not match the global model",
    Reason.REJECTED: "the server refused the connection (unknown site, wrong token, or another job)",
    Reason.QUORUM_LOST: "fewer than minClients clients could deliver a result",
    Reason.INTERNAL: "the server hit an internal error",
}
_SCOPES: dict[Reason, Scope] = {
    Reason.NOT_REGISTERED: Scope.ROUND,
    Reason.ROUND_TIMEOUT: Scope.ROUND,
    Reason.TRANSFER_FAILED: Scope.ROUND,
    Reason.INVALID_RESULT: Scope.ROUND,
    Reason.DEPLOY_TIMEOUT: Scope.CLIENT,
    Reason.PENDING_TIMEOUT: Scope.CLIENT,
    Reason.EXCEPTION: Scope.CLIENT,
    Reason.ABORTED: Scope.CLIENT,
    Reason.EXITED_BEFORE_DOWNLOAD: Scope.CLIENT,
    Reason.TRAINER_EXITED: Scope.CLIENT,
    Reason.LOST: Scope.CLIENT,
    Reason.REJECTED: Scope.CLIENT,
    Reason.CONFIG_ERROR: Scope.JOB,
    Reason.QUORUM_LOST: Scope.JOB,
    Reason.INTERNAL: Scope.JOB,
}


class Phase(str, enum.Enum):
    """The server's view of the job's phase (the operator adds Deploying/Suspended around it)."""

    PENDING = "Pending"
    """Waiting for clients to register before round 1."""
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


def utc_timestamp(seconds: float) -> str:
    """RFC 3339 UTC with second precision, as Kubernetes writes times."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _object_phase(doc: Any, where: str) -> Phase:
    """The phase of a status document, after checking it is a JSON object."""
    if not isinstance(doc, Mapping):
        raise SummaryError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    phase = _req(doc, "phase", str, where)
    try:
        return Phase(phase)
    except ValueError:
        raise SummaryError(f"{where}.phase: unknown phase {phase!r}") from None


def _req(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise SummaryError(f"{where}: missing key {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SummaryError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _opt(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    if doc.get(key) is None:
        return default
    return _req(doc, key, kind, where)


def _metrics(doc: Mapping[str, Any], where: str) -> dict[str, float]:
    raw = _opt(doc, "metrics", dict, {}, where)
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise SummaryError(f"{where}.metrics.{k}: expected a number, got {v!r}")
        out[str(k)] = float(v)
    return out


def _finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    # JSON has no NaN/Infinity; a metric that diverged is left out rather than breaking the parser.
    return {k: float(v) for k, v in metrics.items() if v == v and v not in (float("inf"), float("-inf"))}


def _seconds(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise SummaryError(f"{where}: expected a non-negative number of seconds, got {value!r}")
    return float(value)


def _seconds_list(doc: Mapping[str, Any], key: str, where: str) -> list[float]:
    raw = _opt(doc, key, list, [], where)
    out: list[float] = []
    for i, v in enumerate(raw):
        seconds = _seconds(v, f"{where}.{key}[{i}]")
        if seconds is None:
            raise SummaryError(f"{where}.{key}[{i}]: expected a number of seconds, got null")
        out.append(seconds)
    return out


@dataclass
class ClientStatus:
    """One client's line in the status: its state, and why when it is not healthy."""

    name: str
    state: str
    reason: str = ""
    message: str = ""
    rounds_completed: int = 0
    """Rounds whose aggregate includes this client's full result."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "state": self.state}
        if self.reason:
            d["reason"] = self.reason
        if self.message:
            d["message"] = self.message
        d["roundsCompleted"] = self.rounds_completed
        return d

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "clients[]") -> ClientStatus:
        if not isinstance(doc, Mapping):
            raise SummaryError(f"{where}: expected an object, got {doc!r}")
        return cls(
            name=_req(doc, "name", str, where),
            state=_req(doc, "state", str, where),
            reason=_opt(doc, "reason", str, "", where),
            message=_opt(doc, "message", str, "", where),
            rounds_completed=_opt(doc, "roundsCompleted", int, 0, where),
        )


@dataclass
class JobStatus:
    """The document the server's HTTP status endpoint serves."""

    job: str
    phase: Phase
    round: int
    """The round in progress, or the last one when the job finished (0 before round 1)."""
    rounds: int
    clients: list[ClientStatus] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """Weighted metrics of the last completed round."""
    completed_rounds: int = 0
    reason: str = ""
    message: str = ""
    start_time: str | None = None
    finish_time: str | None = None
    last_round_seconds: float | None = None
    """Duration of the last completed round: tasks sent to aggregate done and handed to the checkpoint writer."""
    round_seconds: list[float] = field(default_factory=list)
    """Durations of the most recent completed rounds, oldest first (at most ROUND_HISTORY)."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "job": self.job,
            "phase": self.phase.value,
            "round": self.round,
            "rounds": self.rounds,
            "completedRounds": self.completed_rounds,
            "clients": [c.to_dict() for c in self.clients],
            "metrics": _finite_metrics(self.metrics),
        }
        for key, value in (("reason", self.reason), ("message", self.message)):
            if value:
                d[key] = value
        if self.start_time:
            d["startTime"] = self.start_time
        if self.finish_time:
            d["finishTime"] = self.finish_time
        if self.last_round_seconds is not None and math.isfinite(self.last_round_seconds):
            d["lastRoundSeconds"] = self.last_round_seconds
        if self.round_seconds:
            d["roundSeconds"] = [x for x in self.round_seconds[-ROUND_HISTORY:] if math.isfinite(x)]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> JobStatus:
        where = "status"
        parsed_phase = _object_phase(doc, where)
        clients = _opt(doc, "clients", list, [], where)
        return cls(
            job=_req(doc, "job", str, where),
            phase=parsed_phase,
            round=_req(doc, "round", int, where),
            rounds=_req(doc, "rounds", int, where),
            completed_rounds=_opt(doc, "completedRounds", int, 0, where),
            clients=[ClientStatus.from_dict(c, f"{where}.clients[{i}]") for i, c in enumerate(clients)],
            metrics=_metrics(doc, where),
            reason=_opt(doc, "reason", str, "", where),
            message=_opt(doc, "message", str, "", where),
            start_time=_opt(doc, "startTime", str, None, where),
            finish_time=_opt(doc, "finishTime", str, None, where),
            last_round_seconds=_seconds(doc.get("lastRoundSeconds"), f"{where}.lastRoundSeconds"),
            round_seconds=_seconds_list(doc, "roundSeconds", where),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> JobStatus:
        return cls.from_dict(_loads(text, "status"))


def _loads(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SummaryError(f"the {what} is not valid JSON: {exc}") from exc


_CLIENT_MESSAGE_CHARS = 160
_MESSAGE_CHARS = 1024
_UNHEALTHY_FIRST = ("Failed", "Lost")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "\u2026"


@dataclass
class TerminationSummary:
    """The server's final word: exit code + compact JSON for the pod's termination message."""

    exit_code: int
    job: str
    phase: Phase
    round: int
    rounds: int
    completed_rounds: int = 0
    reason: str = ""
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    clients: list[ClientStatus] = field(default_factory=list)
    clients_omitted: int = 0
    """Clients left out to stay under the 4096-byte limit (healthy ones go first)."""
    start_time: str | None = None
    finish_time: str | None = None

    @classmethod
    def from_status(cls, status: JobStatus) -> TerminationSummary:
        """The summary of a finished job; exit 0 only when it succeeded."""
        return cls(
            exit_code=EXIT_SUCCEEDED if status.phase is Phase.SUCCEEDED else EXIT_FAILED,
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
        )

    def _doc(self, clients: Sequence[ClientStatus], omitted: int, message: str, metrics: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "exitCode": self.exit_code,
            "job": self.job,
            "phase": self.phase.value,
            "round": self.round,
            "rounds": self.rounds,
            "completedRounds": self.completed_rounds,
        }
        if self.reason:
            d["reason"] = self.reason
        if message:
            d["message"] = message
        if metrics and self.metrics:
            d["metrics"] = _finite_metrics(self.metrics)
        d["clients"] = [c.to_dict() for c in clients]
        if omitted:
            d["clientsOmitted"] = omitted
        if self.start_time:
            d["startTime"] = self.start_time
        if self.finish_time:
            d["finishTime"] = self.finish_time
        return d

    def to_json(self, limit: int = TERMINATION_LIMIT) -> str:
        """Compact JSON of at most ``limit`` UTF-8 bytes.

        When everything does not fit, clients are dropped (healthy ones
        first; failed and lost clients are what a person needs to read) and
        counted in ``clientsOmitted``; then the metrics; then the message is
        shortened.
        """
        ordered = sorted(
            (
                ClientStatus(c.name, c.state, c.reason, _clip(c.message, _CLIENT_MESSAGE_CHARS), c.rounds_completed)
                for c in self.clients
            ),
            key=lambda c: (c.state not in _UNHEALTHY_FIRST and not c.reason, c.name),
        )
        message = _clip(self.message, _MESSAGE_CHARS)

        def encode(k: int, msg: str, metrics: bool) -> str:
            doc = self._doc(ordered[:k], len(ordered) - k, msg, metrics)
            return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

        def fits(text: str) -> bool:
            return len(text.encode("utf-8")) <= limit

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
            message = _clip(message, len(message) // 2) if len(message) > 8 else ""
            text = encode(0, message, False)
        if not fits(text):
            raise SummaryError(
                f"the termination summary of job {self.job!r} does not fit in {limit} bytes even without "
                "clients, metrics and message; the job name is too long"
            )
        return text

    @classmethod
    def from_json(cls, text: str | bytes) -> TerminationSummary:
        where = "termination summary"
        doc = _loads(text, where)
        parsed_phase = _object_phase(doc, where)
        clients = _opt(doc, "clients", list, [], where)
        return cls(
            exit_code=_req(doc, "exitCode", int, where),
            job=_req(doc, "job", str, where),
            phase=parsed_phase,
            round=_req(doc, "round", int, where),
            rounds=_req(doc, "rounds", int, where),
            completed_rounds=_opt(doc, "completedRounds", int, 0, where),
            reason=_opt(doc, "reason", str, "", where),
            message=_opt(doc, "message", str, "", where),
            metrics=_metrics(doc, where),
            clients=[ClientStatus.from_dict(c, f"{where}.clients[{i}]") for i, c in enumerate(clients)],
            clients_omitted=_opt(doc, "clientsOmitted", int, 0, where),
            start_time=_opt(doc, "startTime", str, None, where),
            finish_time=_opt(doc, "finishTime", str, None, where),
        )


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
