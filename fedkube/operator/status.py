"""Pure lifecycle decisions of the operator: what the FLJob status should say, which Events to post, what to delete.

No I/O and no clock: the handlers observe (pods, the server's status document,
the current time; see :mod:`fedkube.operator.views`) and this module
decides. A look at a running job goes detect, then act, then write once:
:func:`decide` reads the observation into a :class:`ServerWord` and the
previous per-site states, judges each site (:func:`judge_site`) and the job's
phase (:func:`judge_phase`) with small pure functions, and returns one status
patch. That keeps every rule of DESIGN.md §5 testable with an injected clock:

* a client pod not Ready within ``deploySeconds`` fails the client
  (DeployTimeout); a pod Pending past ``pendingSeconds`` fails it
  (PendingTimeout) with the scheduler's reason (lessons 15 and 20). Both count
  against ``minClients``; when too few clients are left the job fails, naming
  them (lesson 16).
* the job's outcome comes from the server's termination summary (exit code +
  JSON); a client pod exiting non-zero after the server finished successfully
  is teardown noise and fails nothing (lesson 19).
* crashes of running clients are shown per client, but whether they cost the
  job is the server's decision (it knows whether the result was delivered).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedkube.operator import model_status
from fedkube.operator.evaluation_status import evaluation_status
from fedkube.operator.rounds import STATUS_KEY as ROUND_METRICS
from fedkube.operator.rounds import round_metrics
from fedkube.operator.views import (
    OPERATOR_REASONS,
    POD_PENDING,
    REASON_INVALID_SPEC,
    REASON_SERVER_POD_GONE,
    REASON_TTL_EXPIRED,
    Outcome,
    PodView,
    ServerWord,
    is_teardown_noise,
    outcome_from_server,
    parse_time,
    pod_view,
    server_outcome,
    timeout_failure,
)
from fedkube.spec.model import FLJob, Timeouts
from fedkube.spec.status import ConditionStatus, SiteStatus
from fedkube.status import ClientState, JobStatus, Phase, Reason, utc_timestamp

__all__ = [
    "Decision", "Event", "Observation", "Outcome", "PodView", "SiteVerdict", "Verdict", "cleaned_up",
    "create_succeeded", "decide", "failed_create", "format_time", "get_condition", "invalid", "is_invalid",
    "is_teardown_noise", "judge_phase", "judge_site", "name_conflict", "operator_failed_sites",
    "outcome_from_server", "parse_time", "pod_view", "resumed", "revalidated", "set_condition", "suspended",
    "timeout_failure", "transition", "ttl_expired",
]

logger = logging.getLogger(__name__)

TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class Cond:
    """Condition types of an FLJob."""

    INVALID = "Invalid"
    DEPLOYED = "Deployed"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    CLEANED_UP = "CleanedUp"
    NAME_CONFLICT = "NameConflict"
    FAILED_CREATE = "FailedCreate"
    SPEC_CHANGE_REJECTED = "SpecChangeRejected"


# A child's name is taken by an object that is not this FLJob's (reason of the NameConflict and Failed conditions).
REASON_NAME_CONFLICT = "NameConflict"


def format_time(seconds: float) -> str:
    """RFC 3339 UTC, second precision."""
    return utc_timestamp(seconds)


# --- conditions --------------------------------------------------------------------


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type: str,
    status: ConditionStatus | str,
    reason: str,
    message: str,
    now: str,
) -> list[dict[str, Any]]:
    """``conditions`` with the one of ``type`` set; other conditions unchanged, order kept.

    ``lastTransitionTime`` moves only when ``status`` changes (as in
    Kubeflow's training operator): a new reason or message for the same
    status keeps the time at which the condition became what it is.
    """
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition {type}: status must be True, False or Unknown, got {status!r}")
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions or []:
        if cond.get("type") != type:
            out.append(dict(cond))
            continue
        found = True
        same = cond.get("status") == status and bool(cond.get("lastTransitionTime"))
        out.append(
            {
                "type": type,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": cond["lastTransitionTime"] if same else now,
            }
        )
    if not found:
        out.append({"type": type, "status": status, "reason": reason, "message": message, "lastTransitionTime": now})
    return out


def get_condition(conditions: Sequence[Mapping[str, Any]] | None, type: str) -> Mapping[str, Any] | None:
    """The condition of ``type``, or None."""
    for cond in conditions or []:
        if cond.get("type") == type:
            return cond
    return None


# --- per-site state ------------------------------------------------------------------


def _site(state: ClientState, reason: str = "", message: str = "", pod: str = "") -> SiteStatus:
    # Empty means absent: the written entry leaves it out, and "" and None compare alike.
    return SiteStatus(state=state, reason=reason or None, message=message or None, pod=pod or None)


def previous_sites(previous: Mapping[str, Any]) -> dict[str, SiteStatus]:
    """The per-site states of a stored status; an entry that is not one is left out."""
    raw = previous.get("clients")
    out: dict[str, SiteStatus] = {}
    for site, doc in (raw.items() if isinstance(raw, Mapping) else ()):
        state = SiteStatus.read(doc)
        if state is not None:
            out[str(site)] = state
    return out


def _operator_failed(state: SiteStatus | None) -> bool:
    return state is not None and state.state is ClientState.FAILED and (state.reason or "") in OPERATOR_REASONS


def operator_failed_sites(previous: Mapping[str, Any]) -> set[str]:
    """Sites the operator itself failed (pending/deploy timeouts): their pods are gone for good."""
    return {site for site, state in previous_sites(previous).items() if _operator_failed(state)}


# --- the whole picture ------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What the handlers saw in one look at a job."""

    now: float
    server_pod: PodView | None
    client_pods: Mapping[str, PodView]
    """Site name -> its pod; a site without a pod is missing."""
    server_status: JobStatus | None = None
    """The server's /status document, when it answered."""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the FLJob."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    """What to write and do after one look."""

    status: dict[str, Any]
    """Status fields to merge into ``.status`` (complete values, not deltas)."""
    events: list[Event] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    """Pods to delete: failed clients' (so they cannot join late), or all once the job failed without the server."""
    delete_children: bool = False
    """ttlSecondsAfterFinished expired: delete every child of the job."""


def _display(done: int, total: int) -> str:
    return f"{done}/{total}"


def transition(
    previous: Mapping[str, Any], phase: Phase, reason: str, message: str, now: float
) -> tuple[dict[str, Any], list[Event]]:
    """Status fields and the Event for moving to ``phase`` (no Event when the phase does not change)."""
    old = previous.get("phase")
    stamp = format_time(now)
    conds = list(previous.get("conditions") or [])
    out: dict[str, Any] = {"phase": phase.value}
    if phase is Phase.DEPLOYING:
        conds = set_condition(conds, Cond.DEPLOYED, "False", reason, message, stamp)
    if phase is Phase.RUNNING:
        conds = set_condition(conds, Cond.DEPLOYED, "True", "PodsReady", "the server and enough clients are up", stamp)
        conds = set_condition(conds, Cond.RUNNING, "True", reason, message, stamp)
    # A job that succeeded ran, even when it finished between two looks and Running was never seen.
    if phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED) and (
            get_condition(conds, Cond.RUNNING) is not None or phase is Phase.SUCCEEDED):
        conds = set_condition(conds, Cond.RUNNING, "False", reason, message, stamp)
    if phase is Phase.SUCCEEDED:
        # A job can finish between two looks at it; having succeeded, it was certainly deployed.
        conds = set_condition(conds, Cond.DEPLOYED, "True", "PodsReady", "the server and enough clients were up",
                              stamp)
    if phase in TERMINAL:
        conds = set_condition(conds, Cond.SUCCEEDED if phase is Phase.SUCCEEDED else Cond.FAILED, "True", reason,
                              message, stamp)
        if not previous.get("completionTime"):
            out["completionTime"] = stamp
    if phase is Phase.SUSPENDED:
        conds = set_condition(conds, Cond.SUSPENDED, "True", reason, message, stamp)
    elif get_condition(conds, Cond.SUSPENDED) is not None:
        conds = set_condition(conds, Cond.SUSPENDED, "False", "Resumed", "the job was resumed", stamp)
    out["conditions"] = conds
    events = []
    if old != phase:
        kind = "Warning" if phase is Phase.FAILED else "Normal"
        events.append(Event(kind, phase.value, f"{old or 'New'} -> {phase.value}: {message}"))
    return out, events


def invalid(previous: Mapping[str, Any], problems: Sequence[Any], now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events for a spec the operator cannot run: phase Failed with an Invalid condition.

    ``problems`` are :class:`fedkube.spec.Problem` (path, message, fix); each
    one is named, so the condition says which field to change and how.
    """
    text = "; ".join(str(p) for p in problems) or "the spec is invalid"
    out, events = transition(previous, Phase.FAILED, REASON_INVALID_SPEC, text, now)
    out["conditions"] = set_condition(out["conditions"], Cond.INVALID, "True", REASON_INVALID_SPEC, text,
                                      format_time(now))
    if not any(e.reason == Phase.FAILED.value for e in events):
        events = []
    events.insert(0, Event("Warning", REASON_INVALID_SPEC, text))
    return out, events


def name_conflict(previous: Mapping[str, Any], message: str, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events when a child's name is taken by someone else's object: phase Failed, NameConflict True.

    ``message`` (a :class:`fedkube.operator.kube.NameConflict`'s) names the
    object's kind and name and the fix; the Warning Event carries it, since its
    ``involvedObject`` is the FLJob.
    """
    out, events = transition(previous, Phase.FAILED, REASON_NAME_CONFLICT, message, now)
    out["conditions"] = set_condition(out["conditions"], Cond.NAME_CONFLICT, "True", REASON_NAME_CONFLICT, message,
                                      format_time(now))
    if is_invalid(previous):  # the spec was fixed (spec_changed got this far); it is the name that is wrong now
        out["conditions"] = set_condition(out["conditions"], Cond.INVALID, "False", "SpecFixed",
                                          "the spec is valid now", format_time(now))
    events = [e for e in events if e.reason == Phase.FAILED.value]
    return out, [Event("Warning", REASON_NAME_CONFLICT, message), *events]


def failed_create(previous: Mapping[str, Any], message: str, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Event when the API server refused a child: FailedCreate True with its message; the phase stays.

    The Warning Event is posted when the refusal is new or says something else, not at every retry.
    """
    before = get_condition(previous.get("conditions"), Cond.FAILED_CREATE)
    conds = set_condition(previous.get("conditions"), Cond.FAILED_CREATE, "True", Cond.FAILED_CREATE, message,
                          format_time(now))
    repeated = before is not None and before.get("status") == "True" and before.get("message") == message
    return {"conditions": conds}, [] if repeated else [Event("Warning", Cond.FAILED_CREATE, message)]


def create_succeeded(previous: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Status fields after every child was created: FailedCreate False if it was True; otherwise nothing."""
    before = get_condition(previous.get("conditions"), Cond.FAILED_CREATE)
    if before is None or before.get("status") != "True":
        return {}
    return {"conditions": set_condition(previous.get("conditions"), Cond.FAILED_CREATE, "False", "Created",
                                        "the API server accepted every child of the job", format_time(now))}


def revalidated(previous: Mapping[str, Any], job: FLJob, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events when a spec that was Invalid was fixed: the Failed verdict is lifted and the job starts."""
    stamp = format_time(now)
    conds = set_condition(previous.get("conditions"), Cond.INVALID, "False", "SpecFixed", "the spec is valid now",
                          stamp)
    conds = set_condition(conds, Cond.FAILED, "False", "SpecFixed", "the spec is valid now", stamp)
    base = {**previous, "phase": None, "conditions": conds, "completionTime": None}
    out, events = resumed(base, job, now)
    out.setdefault("conditions", conds)
    out["completionTime"] = None
    return out, [Event("Normal", "SpecFixed", "the spec is valid now; creating the job's objects"), *events]


def is_invalid(previous: Mapping[str, Any]) -> bool:
    """True while the job's status says its spec is Invalid."""
    cond = get_condition(previous.get("conditions"), Cond.INVALID)
    return cond is not None and cond.get("status") == "True"


def suspended(previous: Mapping[str, Any], now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events for ``spec.suspend: true``: pods removed, Secrets/ConfigMap/checkpoint kept."""
    out, events = transition(previous, Phase.SUSPENDED, "Suspended",
                             "spec.suspend is true: pods deleted, checkpoint kept; set it to false to resume", now)
    out.update(create_succeeded({**previous, **out}, now))
    out["clients"] = {site: state.to_dict() for site, state in previous_sites(previous).items()
                      if (state.reason or "") in OPERATOR_REASONS}
    out["clientsReady"] = 0
    out["clientsDisplay"] = _display(0, int(previous.get("clientsTotal") or 0))
    return out, events


def resumed(previous: Mapping[str, Any], job: FLJob, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events when pods are (re)created: phase Pending, every client Pending again."""
    out, events = transition(previous, Phase.PENDING, "PodsCreated", "the server and client pods were created", now)
    out.update(create_succeeded({**previous, **out}, now))
    total = len(job.spec.clients)
    out["clients"] = {
        site.name: _site(ClientState.PENDING, pod=f"{job.name}-client-{site.name}").to_dict()
        for site in job.spec.clients
    }
    out.update(
        rounds=job.spec.rounds,
        round=int(previous.get("round") or 0),
        roundDisplay=_display(int(previous.get("round") or 0), job.spec.rounds),
        clientsReady=0,
        clientsTotal=total,
        clientsDisplay=_display(0, total),
    )
    if not previous.get("startTime"):
        out["startTime"] = format_time(now)
    return out, events


# --- one look at a running job: judge each site, then the job ---------------------------------------------------


@dataclass(frozen=True)
class SiteVerdict:
    """One site after a look: its state, the pod to delete (timed out), the Event to post (newly failed)."""

    status: SiteStatus
    delete_pod: str | None = None
    event: Event | None = None


def _carried_state(pod: PodView | None, before: SiteStatus | None, reported: Any) -> SiteStatus:
    """The site's state before this look's pod is judged: the server's word, else the last one written."""
    if reported is not None:
        seen = {"peer": reported.peer or None, "cert_not_after": reported.cert_not_after or None}
        return _site(reported.state, reported.reason, reported.message, pod.name if pod else "").model_copy(
            update=seen)
    if before is not None and pod is not None and before.state is not ClientState.PENDING:
        # No fresh word from the server (it may be busy or on its way out): its last word stands.
        return _site(before.state, before.reason or "", before.message or "", pod.name)
    if pod is None:
        return _site(ClientState.PENDING, message="no pod yet")
    return _site(ClientState.PENDING, pod=pod.name)


def _pod_failure(
    job: str, site: str, pod: PodView, state: SiteStatus, ever_ready: bool, word: ServerWord, now: float,
    timeouts: Timeouts,
) -> SiteStatus | None:
    """A failure this pod shows while the server runs: a timeout, or a crash the server has not seen delivered."""
    if not ever_ready:
        failure = timeout_failure(pod, now, timeouts.deploy_seconds, timeouts.pending_seconds)
        if failure is not None:
            return failure
    if not pod.crashed:
        return None
    if state.state is ClientState.DONE:
        # Lesson 19: its result was delivered; an exit code now is teardown, not a failure.
        logger.info("job %s: client %s: trainer exited with code %s after delivering its result", job, site,
                    pod.exit_code)
        return None
    if not state.state.unhealthy and word.fresh(site) and not word.finishing:
        # Only with the server's fresh word that the client is not Done: it is polled after the pods were listed,
        # so an exit it has not seen a delivery for came before the delivery. Without that word (the server busy
        # or finishing) the exit may be teardown: wait for the next look.
        text = f"trainer exited with code {pod.exit_code}"
        if pod.message:
            text += f": {pod.message.strip()[-300:]}"
        return _site(ClientState.FAILED, Reason.TRAINER_EXITED.value, text, pod.name)
    return None


def _with_teardown_note(state: SiteStatus, pod: PodView | None, word: ServerWord) -> SiteStatus:
    if pod is None or state.state.unhealthy or not is_teardown_noise(word.succeeded, pod.exit_code):
        return state
    note = f"trainer exited with code {pod.exit_code} after the job succeeded (teardown, ignored)"
    return state.model_copy(update={"message": f"{state.message}; {note}" if state.message else note})


def _failure_event(site: str, before: SiteStatus | None, state: SiteStatus) -> Event | None:
    if not state.state.unhealthy:
        return None
    if before is not None and before.state is state.state and (before.reason or "") == (state.reason or ""):
        return None  # already reported
    return Event("Warning", state.reason or "ClientFailed", f"client {site}: {state.message or ''}")


def judge_site(
    job: FLJob, site: str, pod: PodView | None, before: SiteStatus | None, word: ServerWord, now: float
) -> SiteVerdict:
    """One site's state after a look, from its pod, its previous state and the server's word."""
    if before is not None and _operator_failed(before):
        # Sticks: the pod is gone for good. One still listed (a resumed operator's reconcile, working from the
        # status kopf handed it, re-created it while a look failed the site) goes too, or it could join late.
        return SiteVerdict(before, pod.name if pod is not None and not pod.deleting else None)
    reported = word.reported(site)
    state = _carried_state(pod, before, reported)
    delete = None
    if pod is not None and word.outcome is None:
        ever_ready = pod.ready or (before is not None and before.state is not ClientState.PENDING) or (
            reported is not None and reported.state != ClientState.PENDING)
        failure = _pod_failure(job.name, site, pod, state, ever_ready, word, now, job.spec.timeouts)
        if failure is not None:
            delete = pod.name if (failure.reason or "") in OPERATOR_REASONS else None
            state = failure
    if pod is not None and state.reason == Reason.REVOKED.value:  # the server refuses it: its pod has no use
        delete = pod.name
    state = _with_teardown_note(state, pod, word)
    if pod is None and state.state is ClientState.PENDING and any(c.remote for c in job.spec.clients if c.name == site):
        # No pod will ever come: say what the site is waiting for instead.
        state = state.model_copy(update={"message": f"remote site: waiting for it to join (fedkube join with the "
                                                    f"bundle in Secret {job.name}-join-{site}) and register"})
    return SiteVerdict(state, delete, _failure_event(site, before, state))


def count_ready(sites: Mapping[str, SiteStatus], pods: Mapping[str, PodView], remote: Collection[str] = ()) -> int:
    """Healthy sites that delivered (Done) or whose pod is Ready; a ``remote`` site (no pod here) once the server
    reports it registered."""
    return sum(
        1 for name, st in sites.items()
        if not st.state.unhealthy and (st.state is ClientState.DONE or (
            (pod := pods.get(name)) is not None and pod.ready) or (
            name in remote and st.state is not ClientState.PENDING))
    )


def current_round(previous: Mapping[str, Any], word: ServerWord) -> int:
    """The round to show: the summary's once the server ended, else its live one, else the last shown."""
    outcome = word.outcome
    if outcome is not None and outcome.summary is not None:
        return outcome.summary.completed_rounds if outcome.phase is Phase.SUCCEEDED else outcome.summary.round
    if word.live is not None:
        return word.live.round
    return int(previous.get("round") or 0)


@dataclass(frozen=True)
class Verdict:
    """The job's phase after a look, and whether every pod must go (the job failed without the server's word)."""

    phase: Phase
    reason: str
    message: str
    stop_all: bool = False


def _quorum_lost(job: FLJob, sites: Mapping[str, SiteStatus], word: ServerWord) -> Verdict | None:
    # Clients the job can no longer count on: those the operator failed, and those the server itself declared
    # Failed. A crashed pod alone is not enough: only the server knows whether its result was delivered.
    out = sorted(n for n, st in sites.items() if st.state is ClientState.FAILED and (
        (st.reason or "") in OPERATOR_REASONS or word.failed(n)))
    total, quorum = len(job.spec.clients), job.spec.quorum
    if total - len(out) >= quorum:
        return None
    named = ", ".join(f"{n} ({sites[n].reason or ''}: {sites[n].message or ''})" for n in out)
    return Verdict(Phase.FAILED, Reason.QUORUM_LOST.value,
                   f"only {total - len(out)} of {total} clients are left, fewer than minClients {quorum}; "
                   f"failed: {named}", stop_all=True)


def _server_verdict(job: FLJob, server: PodView, previous_phase: Any, word: ServerWord, now: float, ready: int,
                    round_now: int) -> Verdict:
    spec = job.spec
    was_up = server.ready or word.live is not None or previous_phase == Phase.RUNNING
    failure = None if was_up else timeout_failure(
        server, now, spec.timeouts.deploy_seconds, spec.timeouts.pending_seconds)
    if failure is not None:
        return Verdict(Phase.FAILED, failure.reason or "", "server: " + (failure.message or ""), stop_all=True)
    live = word.live
    if (live is not None and live.phase == Phase.RUNNING) or (
            previous_phase == Phase.RUNNING and (live is None or word.finishing)):
        # A missed poll (the server busy or on its way out) is no reason to leave Running, and neither is a server
        # that says it is done but has not exited yet: its exit decides the outcome at a later look.
        return Verdict(Phase.RUNNING, "RoundsInProgress", f"round {round_now} of {spec.rounds}")
    if server.phase == POD_PENDING and not server.scheduled:
        return Verdict(Phase.PENDING, server.schedule_reason or "Unschedulable",
                       f"the server pod is not scheduled: {server.schedule_message}")
    return Verdict(Phase.DEPLOYING, "WaitingForClients",
                   f"{ready} of {len(spec.clients)} clients ready; round 1 starts when minClients ({spec.quorum}) "
                   "registered")


def judge_phase(job: FLJob, previous: Mapping[str, Any], obs: Observation, word: ServerWord,
                sites: Mapping[str, SiteStatus], ready: int, round_now: int) -> Verdict:
    """The job's phase: the server's exit decides; then quorum; then what the server pod and status say."""
    if word.outcome is not None:  # lesson 19: nothing else does once it ended
        return Verdict(word.outcome.phase, word.outcome.reason, word.outcome.message)
    lost = _quorum_lost(job, sites, word)
    if lost is not None:
        return lost
    if obs.server_pod is None:
        return Verdict(Phase.PENDING, REASON_SERVER_POD_GONE, "the server pod does not exist (yet)")
    return _server_verdict(job, obs.server_pod, previous.get("phase"), word, obs.now, ready, round_now)


def decide(job: FLJob, previous: Mapping[str, Any], obs: Observation) -> Decision:
    """The status after one look at a running (not suspended, not finished) job, and what to do."""
    # Detect.
    word = ServerWord.of(server_outcome(obs.server_pod), obs.server_status)
    before = previous_sites(previous)
    # Decide, site by site, then the job.
    verdicts = {site.name: judge_site(job, site.name, obs.client_pods.get(site.name), before.get(site.name), word,
                                      obs.now) for site in job.spec.clients}
    sites = {name: v.status for name, v in verdicts.items()}
    ready = count_ready(sites, obs.client_pods, {c.name for c in job.spec.clients if c.remote})
    round_now = current_round(previous, word)
    verdict = judge_phase(job, previous, obs, word, sites, ready, round_now)
    # One patch.
    total, rounds = len(job.spec.clients), job.spec.rounds
    status: dict[str, Any] = {
        "round": round_now,
        "rounds": rounds,
        "roundDisplay": _display(round_now, rounds),
        "clients": {name: st.to_dict() for name, st in sites.items()},
        "clientsReady": ready,
        "clientsTotal": total,
        "clientsDisplay": _display(ready, total),
        ROUND_METRICS: round_metrics(previous, word),
    }
    fields, phase_events = transition(previous, verdict.phase, verdict.reason, verdict.message, obs.now)
    status.update(fields)
    evaluation = evaluation_status(word.live, word.outcome.summary if word.outcome is not None else None,
                                   previous.get("evaluation"))  # fedkube.operator.evaluation_status
    if evaluation is not None:
        status["evaluation"] = evaluation
    if verdict.phase is Phase.SUCCEEDED:  # where the trained model is (fedkube.operator.model_status)
        model = model_status.model_status(job, word.outcome.summary if word.outcome is not None else None)
        lost = model_status.not_persisted(job)
        if model is not None:
            status["model"] = model
        elif lost and get_condition(fields["conditions"], model_status.COND_MODEL_NOT_PERSISTED) is None:
            status["conditions"] = set_condition(fields["conditions"], model_status.COND_MODEL_NOT_PERSISTED, "True",
                                                 model_status.REASON_NO_OUTPUT, lost, format_time(obs.now))
            phase_events.append(Event("Warning", model_status.COND_MODEL_NOT_PERSISTED, lost))
    if verdict.stop_all:
        delete = {p.name for p in (obs.server_pod, *obs.client_pods.values()) if p is not None}
    else:
        delete = {v.delete_pod for v in verdicts.values() if v.delete_pod}
    site_events = [v.event for v in verdicts.values() if v.event is not None]
    return Decision(status=status, events=[*phase_events, *site_events], delete_pods=sorted(delete))


def ttl_expired(job: FLJob, previous: Mapping[str, Any], now: float) -> bool:
    """True once a finished job's ``ttlSecondsAfterFinished`` has passed and its children were not yet deleted."""
    ttl = job.spec.ttl_seconds_after_finished
    if ttl is None or previous.get("phase") not in TERMINAL:
        return False
    cleaned = get_condition(previous.get("conditions"), Cond.CLEANED_UP)
    if cleaned is not None and cleaned.get("status") == "True":
        return False
    done = parse_time(previous.get("completionTime"))
    return done is not None and now >= done + ttl


def cleaned_up(previous: Mapping[str, Any], ttl: int, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Event after the TTL deleted the job's children."""
    text = (f"ttlSecondsAfterFinished ({ttl}s) passed: the job's pods, Service, Secrets, ConfigMap and claim "
            "were deleted")
    conds = set_condition(previous.get("conditions"), Cond.CLEANED_UP, "True", REASON_TTL_EXPIRED, text,
                          format_time(now))
    return {"conditions": conds}, [Event("Normal", REASON_TTL_EXPIRED, text)]
