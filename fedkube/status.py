"""The one status model: phases, client states, failure reasons and the live status JSON.

The server serves ``JobStatus`` on its HTTP status endpoint and, before it
exits, writes a ``TerminationSummary`` (``fedkube.termination``, built from the
same types) to the pod's termination-message path; the operator and
``fedkube run`` read both with
``from_json``, and the FLJob status (``fedkube.spec.status``, the CRD's
source) is built from the same ``Phase`` and ``ClientState``. Every status
enum is defined here and nowhere else.

It lives outside ``fedkube.server`` and imports nothing else of fedkube but
its errors and ``clip``, because the operator (which must not import ``fedkube.server``,
see tests/unit/test_project.py) parses the same documents.

Both documents come from another process (an HTTP answer, a pod's
termination message), so ``from_json`` treats them as untrusted: a size limit
before parsing, strict types (no ``"1"`` for 1, no ``true`` for 1), bounded
counts and lengths, and one ``SummaryError`` naming the field. Long messages
are shortened rather than refused, on reading and writing alike, so a long
traceback never costs the reader the whole document.

JSON keys are camelCase like the rest of the Kubernetes status the operator
writes; times are RFC 3339 UTC strings ("2026-01-02T03:04:05Z").
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, with_config

from fedkube.clipping import clip
from fedkube.errors import FedkubeError

ROUND_HISTORY = 20
"""How many recent round durations the status document keeps (``roundSeconds``)."""

STATUS_LIMIT = 1 << 20
"""The largest status document a reader accepts, in bytes (the operator reads at most this much of an answer)."""

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
"""The server's exit code for a configuration error (the process contract the operator reads)."""

# Bounds on what a reader accepts. Generous for any job the spec allows, small enough that a hostile or broken
# document cannot make the operator write an FLJob status etcd refuses, or loop over millions of entries.
NAME_CHARS = 253
REASON_CHARS = 128
TIME_CHARS = 64
MESSAGE_CHARS = 16384
CLIENT_MESSAGE_CHARS = 4096
MAX_CLIENTS = 100_000
MAX_METRICS = 1024
METRIC_NAME_CHARS = 256
MAX_COUNT = 10**12
"""Rounds, round numbers and per-client counts: far above any job, far below a number that costs to handle."""


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
    WITHDRAWN = "Withdrawn"
    POLICY_REFUSED = "PolicyRefused"
    REVOKED = "Revoked"

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
    Reason.WITHDRAWN: "the site ended its participation itself (its FLSite was deleted or `fedkube join` stopped)",
    Reason.POLICY_REFUSED: "the site's own policy refuses the job's terms (strategy or rounds)",
    Reason.REVOKED: "the job's spec.revokedSites names the site: every connection of it is refused",
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
    Reason.WITHDRAWN: Scope.CLIENT,
    Reason.POLICY_REFUSED: Scope.CLIENT,
    Reason.REVOKED: Scope.CLIENT,
    Reason.CONFIG_ERROR: Scope.JOB,
    Reason.QUORUM_LOST: Scope.JOB,
    Reason.INTERNAL: Scope.JOB,
}


class Phase(str, enum.Enum):
    """An FLJob's phase. The server's status document uses four of them (``SERVER_PHASES``); the operator adds
    Deploying and Suspended around them in the FLJob status."""

    PENDING = "Pending"
    """Waiting for clients to register before round 1 (server), or for the pods (operator)."""
    DEPLOYING = "Deploying"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


SERVER_PHASES = (Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED)


class ClientState(str, enum.Enum):
    """Where a client is in the job (the server's registry moves it; the operator shows it per site)."""

    PENDING = "Pending"
    REGISTERED = "Registered"
    TRAINING = "Training"
    UPLOADING = "Uploading"
    DONE = "Done"
    FAILED = "Failed"
    LOST = "Lost"
    WITHDRAWN = "Withdrawn"
    """The site left by its own decision (a Leave: reason Withdrawn or PolicyRefused), not by a failure."""

    @property
    def unhealthy(self) -> bool:
        return self in (ClientState.FAILED, ClientState.LOST, ClientState.WITHDRAWN)


def utc_timestamp(seconds: float) -> str:
    """RFC 3339 UTC with second precision, as Kubernetes writes times."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clipped(limit: int) -> Callable[[Any], Any]:
    def shorten(value: Any) -> Any:
        return clip(value, limit) if isinstance(value, str) else value

    return shorten


def _bounded_metrics(value: Any) -> Any:
    # A trainer names its metrics freely: keep the first MAX_METRICS reasonable names instead of refusing them all.
    if not isinstance(value, Mapping):
        return value
    kept = [(k, v) for k, v in value.items() if not isinstance(k, str) or len(k) <= METRIC_NAME_CHARS]
    return dict(kept[:MAX_METRICS])


def _newest(value: Any) -> Any:
    # The document shows the newest ROUND_HISTORY durations; a longer list is cut the same way on reading.
    return value[-ROUND_HISTORY:] if isinstance(value, list) else value


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    # JSON has no NaN/Infinity; a metric that diverged is left out rather than breaking the parser.
    return {k: float(v) for k, v in _bounded_metrics(metrics).items() if math.isfinite(v)}


def null_is(default: Callable[[], Any]) -> BeforeValidator:
    # An optional field given as null reads as absent, as it always did.
    return BeforeValidator(lambda value: default() if value is None else value)


Name = Annotated[str, Field(min_length=1, max_length=NAME_CHARS)]
ReasonText = Annotated[str, Field(max_length=REASON_CHARS), null_is(str)]
"""A :class:`Reason` value, or a job-level reason the server or operator adds (e.g. ``Completed``)."""
Message = Annotated[str, BeforeValidator(_clipped(MESSAGE_CHARS)), null_is(str)]
ClientMessage = Annotated[str, BeforeValidator(_clipped(CLIENT_MESSAGE_CHARS)), null_is(str)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
OptionalCount = Annotated[Count, null_is(int)]
Time = Annotated[str, Field(max_length=TIME_CHARS)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Magnitude = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Metrics = Annotated[dict[str, float], BeforeValidator(_bounded_metrics), null_is(dict)]


def camel(name: str) -> Any:
    """The field's JSON name, as a validation alias: rounds_completed reads roundsCompleted."""
    head, *rest = name.split("_")
    return Field(validation_alias=head + "".join(w.title() for w in rest))


# Plain dataclasses: the server builds them on its hot path (every state change of every client), so building one
# validates nothing; reading JSON (_parse) validates everything, strictly, against these annotations.
DOC_CONFIG = ConfigDict(extra="ignore")


@with_config(DOC_CONFIG)
@dataclass
class ClientStatus:
    """One client's line in the server's status: its state, and why when it is not healthy."""

    name: Name
    state: ClientState
    reason: ReasonText = ""
    message: ClientMessage = ""
    rounds_completed: Annotated[OptionalCount, camel("rounds_completed")] = 0
    """Rounds whose aggregate includes this client's full result."""
    weight: Magnitude | None = None
    """The weight its result had in the last completed round it delivered to (after weighting and the cap)."""
    update_norm: Annotated[Magnitude | None, camel("update_norm")] = None
    """L2 norm of that result's update before clipping (only with spec.strategy.clipNorm)."""
    bounded: ClientMessage = ""
    """How that result's influence was bounded ("" when it was not): capped num_examples, clipped update."""
    peer: ClientMessage = ""
    """Where its connection comes from, as the server sees it (remote sites: docs/remote-sites.md)."""
    cert_not_after: Annotated[ClientMessage, camel("cert_not_after")] = ""
    """When the certificate of its connection expires (RFC 3339)."""

    def to_dict(self, message_chars: int = CLIENT_MESSAGE_CHARS) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "state": ClientState(self.state).value}
        if self.reason:
            d["reason"] = self.reason
        if self.message:
            d["message"] = clip(self.message, message_chars)
        d["roundsCompleted"] = self.rounds_completed
        for key, value in (("weight", self.weight), ("updateNorm", self.update_norm)):
            if value is not None and math.isfinite(value):
                d[key] = value
        if self.bounded:
            d["bounded"] = clip(self.bounded, message_chars)
        if self.peer:
            d["peer"] = clip(self.peer, message_chars)
        if self.cert_not_after:
            d["certNotAfter"] = clip(self.cert_not_after, message_chars)
        return d


@with_config(DOC_CONFIG)
@dataclass
class EvaluationPoint:
    """One federated evaluation (spec.evaluation): the global model after training round ``round``, measured on
    the evaluating sites' data; ``metrics`` weighted by their ``num_examples``."""

    round: Count
    metrics: Metrics = field(default_factory=dict)
    sites: OptionalCount = 0
    """How many sites' results the metrics average (a site that failed its evaluation is left out)."""
    examples: Annotated[int, Field(ge=0), null_is(int)] = 0
    """The examples they were measured on, summed as weighted (after maxExamplesPerSite)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "metrics": finite_metrics(self.metrics),
            "sites": self.sites,
            "examples": self.examples,
        }


def _server_phase(phase: Phase) -> Phase:
    if phase not in SERVER_PHASES:
        known = ", ".join(p.value for p in SERVER_PHASES)
        raise ValueError(f"unknown phase {phase.value!r} for the server; it reports {known}")
    return phase


ServerPhase = Annotated[Phase, AfterValidator(_server_phase)]


@with_config(DOC_CONFIG)
@dataclass
class JobStatus:
    """The document the server's HTTP status endpoint serves."""

    job: Name
    phase: ServerPhase
    round: Count
    """The round in progress, or the last one when the job finished (0 before round 1)."""
    rounds: Count
    clients: Annotated[list[ClientStatus], Field(max_length=MAX_CLIENTS), null_is(list)] = field(default_factory=list)
    metrics: Metrics = field(default_factory=dict)
    """Weighted metrics of the last completed round."""
    completed_rounds: Annotated[OptionalCount, camel("completed_rounds")] = 0
    reason: ReasonText = ""
    message: Message = ""
    start_time: Annotated[Time | None, camel("start_time")] = None
    finish_time: Annotated[Time | None, camel("finish_time")] = None
    last_round_seconds: Annotated[Seconds | None, camel("last_round_seconds")] = None
    """Duration of the last completed round: tasks sent to aggregate done and handed to the checkpoint writer."""
    round_seconds: Annotated[list[Seconds], camel("round_seconds"), BeforeValidator(_newest), null_is(list)] = field(
        default_factory=list
    )
    """Durations of the most recent completed rounds, oldest first (at most ROUND_HISTORY)."""
    privacy_epsilon: Annotated[Magnitude | None, camel("privacy_epsilon")] = None
    """Central DP: epsilon spent by the completed rounds (spec.strategy.privacy); None without it."""
    evaluation: Annotated[list[EvaluationPoint], BeforeValidator(_newest), null_is(list)] = field(default_factory=list)
    """The most recent federated evaluations, oldest first (at most ROUND_HISTORY)."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "job": self.job,
            "phase": Phase(self.phase).value,
            "round": self.round,
            "rounds": self.rounds,
            "completedRounds": self.completed_rounds,
            "clients": [c.to_dict() for c in self.clients],
            "metrics": finite_metrics(self.metrics),
        }
        if self.reason:
            d["reason"] = self.reason
        if self.message:
            d["message"] = clip(self.message, MESSAGE_CHARS)
        if self.start_time:
            d["startTime"] = self.start_time
        if self.finish_time:
            d["finishTime"] = self.finish_time
        if self.last_round_seconds is not None and math.isfinite(self.last_round_seconds):
            d["lastRoundSeconds"] = self.last_round_seconds
        if self.round_seconds:
            d["roundSeconds"] = [x for x in self.round_seconds[-ROUND_HISTORY:] if math.isfinite(x)]
        if self.privacy_epsilon is not None and math.isfinite(self.privacy_epsilon):
            d["privacyEpsilon"] = self.privacy_epsilon
        if self.evaluation:
            d["evaluation"] = [p.to_dict() for p in self.evaluation[-ROUND_HISTORY:]]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobStatus:
        """Parse a status document; SummaryError naming the field that is wrong."""
        return parse_document(cls, text, "status", STATUS_LIMIT)


# --- reading ---------------------------------------------------------------------------------------------------

_Doc = TypeVar("_Doc")


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(cls: type[Any]) -> TypeAdapter[Any]:
    # Built on first read: the trainer SDK imports this module for Reason and never parses a document.
    # Two threads racing here build it twice, harmlessly.
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


def parse_document(cls: type[_Doc], text: str | bytes, what: str, limit: int) -> _Doc:
    if isinstance(text, str):
        # A lone surrogate (possible in a str decoded leniently elsewhere) is not text the parser could read.
        text = text.encode("utf-8", "replace")
    size = len(text)
    if size > limit:
        raise SummaryError(f"the {what} is {size} bytes, more than the {limit} a reader accepts")
    try:
        doc: _Doc = _adapter(cls).validate_json(text, strict=True)
    except ValidationError as exc:
        raise SummaryError(_problems(exc, what)) from None
    return doc


def _problems(exc: ValidationError, what: str) -> str:
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return f"the {what} is not valid JSON: {errors[0]['msg']}"
    lines = [_problem(err, what) for err in errors[:5]]
    more = f" (and {len(errors) - 5} more problems)" if len(errors) > 5 else ""
    return "; ".join(lines) + more


def _path(what: str, loc: Sequence[Any]) -> str:
    return what + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _problem(err: Any, what: str) -> str:
    """One pydantic error as ``status.clients[0]: missing key 'state'``: the path in the document's own names."""
    loc = list(err["loc"])  # in the document's own names (the validation aliases)
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    kind = err["type"]
    if kind == "missing" and loc:
        return f"{_path(what, loc[:-1])}: missing key {loc[-1]!r}"
    if kind == "enum" and loc:
        return f"{_path(what, loc)}: unknown {loc[-1]} {err.get('input')!r}; known: {err['ctx']['expected']}"
    if kind == "value_error":
        return f"{_path(what, loc)}: {err['ctx']['error']}"
    if kind in ("dataclass_type", "dict_type", "model_type"):
        return f"{_path(what, loc)}: expected a JSON object, got {got}"
    expected = {
        "int_type": "int",
        "int_parsing": "int",
        "string_type": "str",
        "float_type": "a number",
        "list_type": "a list",
    }.get(kind)
    if expected is not None:
        return f"{_path(what, loc)}: expected {expected}, got {got}"
    return f"{_path(what, loc)}: {err['msg']}, got {got}"
