"""Round decisions: who gets the task, when a round closes, who is a straggler, when the job fails.

Pure functions of the registry's records, the policy and a time; the server's
round loop asks them what to do and acts (send tasks, discard stragglers from
the aggregator, write the status). DESIGN.md §5 rows decided here:

* a client never registered when a round starts is excluded from it by name
  (NotRegistered); the job proceeds if at least ``min_clients`` can take part.
  Round 1 first waits up to ``registration_timeout_s`` for every client.
* a round closes when every participant delivered (Done) or failed, or when
  the deadline passed with at least ``min_clients`` results; clients still
  training then are stragglers, excluded by name with RoundTimeout
  (LESSONS.md 16). A client whose result was announced before the deadline is
  not a straggler: its download is progress-aware and bounded by the transfer
  layer's idle timeout (LESSONS.md 3), so the round waits for it.
* the job fails with QuorumLost as soon as fewer than ``min_clients``
  participants can still deliver, with a message naming each missing client
  and why; it fails with ConfigError when any trainer reports one (it would
  hit every client).
* trainer reports: only explicit failure kinds fail a client; an exit after
  the client's final result was downloaded is teardown noise (LESSONS.md 19).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedkube.errors import ConfigError, FedkubeError
from fedkube.server.registry import ClientRecord, ClientState, Registry
from fedkube.status import Reason, Scope

S = ClientState


class RoundError(FedkubeError):
    """The round logic was driven out of order: a bug in the caller."""


@dataclass(frozen=True)
class RoundPolicy:
    """The spec's round settings (names as in fedkube.server.config.JobSettings)."""

    rounds: int
    min_clients: int
    round_timeout_s: float
    registration_timeout_s: float

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"spec.rounds is {self.rounds}; fix: set it to 1 or more")
        if self.min_clients < 1:
            raise ConfigError(f"spec.minClients is {self.min_clients}; fix: set it to 1 or more")
        for name, value in (
            ("spec.timeouts.roundSeconds", self.round_timeout_s),
            ("spec.timeouts.registrationSeconds", self.registration_timeout_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} is {value}; fix: set a positive number of seconds")


@dataclass(frozen=True)
class Exclusion:
    """Why a client is not in a round (or was dropped from it)."""

    client: str
    reason: Reason
    message: str

    def __str__(self) -> str:
        return f"{self.client}: {self.reason.value} ({self.message})"


def _why(rec: ClientRecord) -> Exclusion:
    """The exclusion of a client that cannot take part, from its record."""
    if rec.state is S.PENDING:
        return Exclusion(rec.name, Reason.NOT_REGISTERED, rec.message or "its sidecar never connected to the server")
    reason = rec.reason or Reason.INTERNAL
    return Exclusion(rec.name, reason, rec.message or reason.sentence)


def _names(excl: Sequence[Exclusion]) -> str:
    return "; ".join(str(e) for e in excl)


def _quorum_message(round: int, have: int, policy: RoundPolicy, missing: Sequence[Exclusion], what: str) -> str:
    return (
        f"round {round}: {have} {what}, minClients is {policy.min_clients}; "
        f"missing: {_names(missing) or 'none'}"
    )


def _job_failure(records: Sequence[ClientRecord]) -> Exclusion | None:
    for rec in records:
        if rec.state is S.FAILED and rec.reason is not None and rec.reason.scope is Scope.JOB:
            return Exclusion(rec.name, rec.reason, rec.message or rec.reason.sentence)
    return None


class Action(str, enum.Enum):
    WAIT = "Wait"
    """Nothing to do until ``wake_at`` or the next event."""
    START = "Start"
    """Start the round with ``participants`` (start decisions)."""
    CLOSE = "Close"
    """Aggregate the Done clients' results (round decisions)."""
    FAIL = "Fail"
    """The job fails with ``reason``/``message``."""


# -- round start ----------------------------------------------------------------


@dataclass(frozen=True)
class StartDecision:
    action: Action
    round: int
    participants: tuple[str, ...] = ()
    excluded: tuple[Exclusion, ...] = ()
    wake_at: float | None = None
    reason: Reason | None = None
    message: str = ""


def _can_take_task(rec: ClientRecord) -> bool:
    if rec.state in (S.REGISTERED, S.DONE):
        return True
    return rec.state is S.FAILED and not rec.failed_for_job


def decide_start(
    registry: Registry, policy: RoundPolicy, round: int, *, waiting_since: float, now: float
) -> StartDecision:
    """Whether round ``round`` can start, and with whom.

    ``waiting_since`` is when the server began waiting for this round (its
    start time for round 1). Round 1 waits until every client registered or
    ``registration_timeout_s`` passed; later rounds start at once with the
    clients that can take a task (a disconnected client that is not Lost yet
    counts: its task is sent when it reconnects, see RoundDecision.needs_task).
    Pure: ``apply_start`` records the exclusions on the registry.
    """
    records = registry.records()
    failure = _job_failure(records)
    if failure is not None:
        return StartDecision(Action.FAIL, round, reason=failure.reason, message=f"client {failure}")
    able = [r for r in records if _can_take_task(r)]
    unable = [r for r in records if not _can_take_task(r)]
    busy = [r for r in unable if r.state in (S.TRAINING, S.UPLOADING)]
    if busy:
        raise RoundError(
            f"round {round} cannot start: {[r.name for r in busy]} still hold a task of round "
            f"{busy[0].round}; close the previous round first (LESSONS.md 14)"
        )
    deadline = waiting_since + policy.registration_timeout_s
    if round == 1 and any(r.state is S.PENDING for r in records) and now < deadline:
        return StartDecision(Action.WAIT, round, wake_at=deadline)
    excluded = tuple(
        Exclusion(r.name, Reason.NOT_REGISTERED, f"not connected when round {round} started")
        if r.state is S.PENDING
        else _why(r)
        for r in unable
    )
    if len(able) < policy.min_clients:
        what = f"client(s) can take part ({', '.join(r.name for r in able) or 'none'})"
        msg = _quorum_message(round, len(able), policy, excluded, what)
        return StartDecision(Action.FAIL, round, excluded=excluded, reason=Reason.QUORUM_LOST, message=msg)
    return StartDecision(Action.START, round, tuple(r.name for r in able), excluded)


# -- round progress -------------------------------------------------------------


@dataclass(frozen=True)
class RoundDecision:
    action: Action
    round: int
    done: tuple[str, ...] = ()
    """Clients whose whole result is in (aggregate exactly these)."""
    stragglers: tuple[Exclusion, ...] = ()
    """Participants excluded at the deadline (RoundTimeout); mark them failed for the round."""
    failed: tuple[Exclusion, ...] = ()
    """Participants that failed or were lost during the round."""
    needs_task: tuple[str, ...] = ()
    """Participants that hold no task of this round (reconnected without resuming it): send it."""
    wake_at: float | None = None
    reason: Reason | None = None
    message: str = ""


@dataclass
class RoundState:
    """One round in progress: its number, participants, task id per participant and deadline."""

    round: int
    participants: tuple[str, ...]
    started_at: float
    policy: RoundPolicy
    task_ids: dict[str, str] = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        return self.started_at + self.policy.round_timeout_s

    def assign(self, registry: Registry, site: str, task_id: str) -> ClientRecord:
        """The task for this round was sent to ``site`` (it becomes Training)."""
        if site not in self.participants:
            raise RoundError(f"{site!r} is not a participant of round {self.round}: {list(self.participants)}")
        rec = registry.task_sent(site, task_id, self.round)
        self.task_ids[site] = task_id
        return rec

    def decide(self, registry: Registry, now: float) -> RoundDecision:
        """What the round loop should do now."""
        recs = {r.name: r for r in registry.records()}
        done: list[str] = []
        uploading: list[str] = []
        training: list[str] = []
        needs_task: list[str] = []
        failed: list[Exclusion] = []
        for name in self.participants:
            rec = recs[name]
            mine = rec.round == self.round and rec.task_id == self.task_ids.get(name, rec.task_id)
            delivered = bool(rec.delivered_task_id) and rec.delivered_task_id == self.task_ids.get(name)
            if (rec.state is S.DONE and mine) or delivered:
                # A result in hand counts even if its client failed or went silent afterwards.
                done.append(name)
            elif rec.state is S.UPLOADING and mine:
                uploading.append(name)
            elif rec.state is S.TRAINING and mine:
                training.append(name)
            elif rec.state in (S.REGISTERED, S.DONE) or (rec.state is S.FAILED and not mine and not rec.failed_for_job):
                needs_task.append(name)
            else:
                failed.append(_why(rec))
        # QuorumLost names every missing client, including those not in this round at all.
        outsiders = [_why(r) for n, r in recs.items() if n not in self.participants]
        job_failure = _job_failure(list(recs.values()))
        if job_failure is not None:
            return RoundDecision(
                Action.FAIL, self.round, tuple(done), failed=tuple(failed),
                reason=job_failure.reason, message=f"client {job_failure}",
            )
        can_deliver = len(done) + len(uploading) + len(training) + len(needs_task)
        if can_deliver < self.policy.min_clients:
            what = f"participant(s) can still deliver ({', '.join(done + uploading + training + needs_task) or 'none'})"
            return RoundDecision(
                Action.FAIL, self.round, tuple(done), failed=tuple(failed), reason=Reason.QUORUM_LOST,
                message=_quorum_message(self.round, can_deliver, self.policy, failed + outsiders, what),
            )
        if not (uploading or training or needs_task):
            return RoundDecision(Action.CLOSE, self.round, tuple(done), failed=tuple(failed))
        if now < self.deadline:
            return RoundDecision(
                Action.WAIT, self.round, tuple(done), failed=tuple(failed),
                needs_task=tuple(needs_task), wake_at=self.deadline,
            )
        late = training + needs_task
        stragglers = tuple(
            Exclusion(
                n, Reason.ROUND_TIMEOUT,
                f"no result within roundSeconds={self.policy.round_timeout_s:g} of round {self.round}",
            )
            for n in late
        )
        if len(done) + len(uploading) < self.policy.min_clients:
            return RoundDecision(
                Action.FAIL, self.round, tuple(done), stragglers, tuple(failed), reason=Reason.QUORUM_LOST,
                message=_quorum_message(
                    self.round, len(done) + len(uploading), self.policy, failed + list(stragglers) + outsiders,
                    "result(s) by the deadline",
                ),
            )
        if uploading:
            # Announced in time; wait for the downloads (the transfer layer fails stalled ones).
            return RoundDecision(Action.WAIT, self.round, tuple(done), stragglers, tuple(failed))
        return RoundDecision(Action.CLOSE, self.round, tuple(done), stragglers, tuple(failed))


def apply_start(registry: Registry, start: StartDecision) -> None:
    """Record a start decision's NotRegistered exclusions on the Pending clients (for the status)."""
    for e in start.excluded:
        if e.reason is Reason.NOT_REGISTERED:
            registry.note(e.client, e.reason, e.message)


def begin_round(start: StartDecision, policy: RoundPolicy, now: float) -> RoundState:
    """The RoundState of a Start decision; the round's deadline counts from ``now``."""
    if start.action is not Action.START:
        raise RoundError(f"begin_round needs a Start decision, got {start.action.value}")
    return RoundState(start.round, start.participants, now, policy)


def apply_stragglers(registry: Registry, state: RoundState, decision: RoundDecision) -> list[str]:
    """Mark the decision's stragglers Failed(RoundTimeout) for this round; returns those marked.

    A late result from them is then stale (their task is over) and ignored.
    """
    marked = []
    for e in decision.stragglers:
        if registry.fail(e.client, e.reason, e.message, task_id=state.task_ids.get(e.client)):
            marked.append(e.client)
    return marked


def job_finished(policy: RoundPolicy, completed_rounds: int) -> bool:
    """True when the last round has been aggregated."""
    return completed_rounds >= policy.rounds


# -- trainer reports ------------------------------------------------------------


class TrainerReportLike(Protocol):
    """What a sidecar says about its trainer (fedkube.server.control.TrainerReport satisfies it).

    ``phase``: Unknown | Starting | Running | Finished | Failed | Exited;
    ``kind``: "" or a Reason name (Exception, ConfigError, Aborted, ExitedBeforeDownload).
    """

    @property
    def phase(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def message(self) -> str: ...

    @property
    def exit_code(self) -> int: ...


class Verdict(str, enum.Enum):
    HEALTHY = "Healthy"
    TEARDOWN = "Teardown"
    """The trainer ended after its work was delivered: log it, change nothing."""
    FAIL_CLIENT = "FailClient"
    FAIL_JOB = "FailJob"


@dataclass(frozen=True)
class TrainerVerdict:
    verdict: Verdict
    reason: Reason | None = None
    message: str = ""


_EXPLICIT = {
    "Exception": Reason.EXCEPTION,
    "ConfigError": Reason.CONFIG_ERROR,
    "Aborted": Reason.ABORTED,
    "ExitedBeforeDownload": Reason.EXITED_BEFORE_DOWNLOAD,
}


def classify_trainer_report(
    report: TrainerReportLike, record: ClientRecord, policy: RoundPolicy, *, job_done: bool = False
) -> TrainerVerdict:
    """Turn a sidecar's report about its trainer into a decision (LESSONS.md 19).

    * running/starting: healthy.
    * after the job finished, or after the client's final result was
      downloaded, an ending of any kind is teardown noise.
    * an explicit kind fails the client (ConfigError: the job).
    * ending without a kind while a result awaits download: ExitedBeforeDownload;
      otherwise (no result sent, or no more tasks possible): TrainerExited.
    """
    phase = report.phase
    if phase not in ("Finished", "Failed", "Exited"):
        return TrainerVerdict(Verdict.HEALTHY)
    final_delivered = (
        record.round >= policy.rounds and bool(record.delivered_task_id) and record.delivered_task_id == record.task_id
    )
    detail = report.message.strip()
    code = f" (exit code {report.exit_code})" if report.exit_code else ""
    if job_done or final_delivered:
        what = report.kind or phase.lower()
        return TrainerVerdict(
            Verdict.TEARDOWN, None,
            f"trainer {what}{code} after its final result was delivered; not a failure",
        )
    reason = _EXPLICIT.get(report.kind)
    if reason is None and phase == "Failed":
        reason = Reason.EXCEPTION
    if reason is not None:
        message = detail or reason.sentence
        if reason is Reason.CONFIG_ERROR:
            return TrainerVerdict(Verdict.FAIL_JOB, reason, f"trainer of {record.name!r}: {message}")
        return TrainerVerdict(Verdict.FAIL_CLIENT, reason, message + code)
    if record.state is S.UPLOADING:
        return TrainerVerdict(
            Verdict.FAIL_CLIENT, Reason.EXITED_BEFORE_DOWNLOAD,
            f"trainer {phase.lower()}{code} while the server was downloading its result of round {record.round}",
        )
    when = f"during round {record.round}" if record.state is S.TRAINING else "before the job's last round"
    return TrainerVerdict(
        Verdict.FAIL_CLIENT, Reason.TRAINER_EXITED,
        f"trainer {phase.lower()}{code} {when} without sending a result"
        + (f": {detail}" if detail else "; check the trainer's logs"),
    )
