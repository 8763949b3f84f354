"""Pure lifecycle decisions of the operator: what the FLJob status should say, which Events to post, what to delete.

No I/O and no clock: the handlers observe (pods, the server's status document,
the current time) and this module decides. That keeps every rule of
DESIGN.md §5 testable with an injected clock:

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fedkube.spec.model import FLJob
from fedkube.status import JobStatus, Reason, SummaryError, TerminationSummary, utc_timestamp

logger = logging.getLogger(__name__)

PENDING = "Pending"
DEPLOYING = "Deploying"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
TERMINAL = frozenset({SUCCEEDED, FAILED})

# Condition types.
COND_INVALID = "Invalid"
COND_DEPLOYED = "Deployed"
COND_RUNNING = "Running"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
COND_SUSPENDED = "Suspended"
COND_CLEANED_UP = "CleanedUp"

# Reasons the operator itself gives (the server's failure reasons come from fedkube.status.Reason).
REASON_INVALID_SPEC = "InvalidSpec"
REASON_SERVER_EXITED = "ServerExited"
REASON_SERVER_POD_GONE = "ServerPodGone"
REASON_TTL_EXPIRED = "TTLExpired"
REASON_TEARDOWN = "TeardownAfterSuccess"

# Client states the operator sets (the server adds Registered, Training, Uploading, Done, Lost).
CLIENT_PENDING = "Pending"
CLIENT_FAILED = "Failed"
CLIENT_DONE = "Done"
_UNHEALTHY = frozenset({CLIENT_FAILED, "Lost"})
# Failures the operator decides; they stick (the pod is deleted, so nothing later could contradict them).
OPERATOR_REASONS = frozenset({Reason.PENDING_TIMEOUT.value, Reason.DEPLOY_TIMEOUT.value})

EXIT_CONFIG_ERROR = 2  # the server's exit code for a configuration error (process contract)


# --- time ------------------------------------------------------------------------


def parse_time(text: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time as Kubernetes writes it; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(seconds: float) -> str:
    """RFC 3339 UTC, second precision."""
    return utc_timestamp(seconds)


# --- conditions --------------------------------------------------------------------


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type: str,
    status: str,
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


# --- pods --------------------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    """What the operator reads from one pod."""

    name: str
    phase: str
    created: float | None = None
    ready: bool = False
    scheduled: bool = True
    schedule_reason: str = ""
    schedule_message: str = ""
    waiting_reason: str = ""
    waiting_message: str = ""
    exit_code: int | None = None
    """Exit code of the main container once it terminated."""
    message: str = ""
    """The main container's termination message."""
    deleting: bool = False


def pod_view(pod: Mapping[str, Any], container: str) -> PodView:
    """Read a Pod object (as the API returns it); ``container`` names its main container."""
    meta = pod.get("metadata") or {}
    st = pod.get("status") or {}
    conditions = {str(c.get("type")): c for c in st.get("conditions") or [] if isinstance(c, Mapping)}
    scheduled = conditions.get("PodScheduled")
    ready = conditions.get("Ready")
    waiting_reason = waiting_message = ""
    exit_code: int | None = None
    message = ""
    statuses = [*(st.get("initContainerStatuses") or []), *(st.get("containerStatuses") or [])]
    for cs in statuses:
        state = cs.get("state") or {}
        if "waiting" in state and not waiting_reason:
            reason = str(state["waiting"].get("reason") or "")
            if reason not in ("", "PodInitializing", "ContainerCreating"):
                waiting_reason, waiting_message = reason, str(state["waiting"].get("message") or "")
        if cs.get("name") == container and "terminated" in state:
            term = state["terminated"]
            code = term.get("exitCode")
            exit_code = int(code) if isinstance(code, int) else None
            message = str(term.get("message") or "")
    return PodView(
        name=str(meta.get("name") or ""),
        phase=str(st.get("phase") or PENDING),
        created=parse_time(meta.get("creationTimestamp")),
        ready=bool(ready and ready.get("status") == "True"),
        scheduled=not (scheduled and scheduled.get("status") == "False"),
        schedule_reason=str((scheduled or {}).get("reason") or ""),
        schedule_message=str((scheduled or {}).get("message") or ""),
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        exit_code=exit_code,
        message=message,
        deleting=bool(meta.get("deletionTimestamp")),
    )


# --- the server's outcome ------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How the job ended, as the server pod's exit says."""

    phase: str  # Succeeded or Failed
    reason: str
    message: str
    summary: TerminationSummary | None = None


def outcome_from_server(exit_code: int, message: str) -> Outcome:
    """The job's outcome from the server container's exit code and termination message.

    The message is the server's JSON termination summary. When it cannot be
    read (the server died before writing it, or something else wrote there),
    the exit code alone decides, and the failure says that the summary is
    missing and shows what was there instead (the log tail, with
    FallbackToLogsOnError), so a person can act on it.
    """
    try:
        summary = TerminationSummary.from_json(message) if message.strip() else None
        error = "" if summary is not None else "the server wrote no termination summary"
    except SummaryError as exc:
        summary, error = None, str(exc)
    if summary is not None:
        if summary.exit_code != exit_code:
            logger.warning(
                "job %s: server exited with %s but its summary says %s; trusting the exit code",
                summary.job,
                exit_code,
                summary.exit_code,
            )
        ok = exit_code == 0 and summary.phase.value == SUCCEEDED
        if ok:
            text = summary.message or f"completed {summary.completed_rounds}/{summary.rounds} rounds"
            return Outcome(SUCCEEDED, "Completed", text, summary)
        reason = summary.reason or (Reason.CONFIG_ERROR.value if exit_code == EXIT_CONFIG_ERROR else
                                    REASON_SERVER_EXITED)
        text = summary.message or f"the server exited with code {exit_code}"
        return Outcome(FAILED, reason, text, summary)
    tail = message.strip()[-400:]
    seen = f"; its termination message was: {tail}" if tail else ""
    if exit_code == 0:
        # Exit 0 is the server's contract for success; the missing summary only costs the details.
        return Outcome(SUCCEEDED, "Completed", f"the server exited with code 0 but {error}{seen}")
    reason = Reason.CONFIG_ERROR.value if exit_code == EXIT_CONFIG_ERROR else REASON_SERVER_EXITED
    return Outcome(
        FAILED,
        reason,
        f"the server exited with code {exit_code} and {error}{seen}; fix: read the server pod's log "
        "(kubectl logs <job>-server)",
    )


def is_teardown_noise(server_finished_ok: bool, client_exit_code: int | None) -> bool:
    """Lesson 19: a client exiting non-zero after the server finished successfully fails nothing."""
    return server_finished_ok and client_exit_code not in (None, 0)


# --- per-client state ----------------------------------------------------------------


@dataclass
class ClientState:
    """One site's line in ``status.clients``."""

    state: str
    reason: str = ""
    message: str = ""
    pod: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.reason:
            out["reason"] = self.reason
        if self.message:
            out["message"] = self.message
        if self.pod:
            out["pod"] = self.pod
        return out

    @classmethod
    def from_dict(cls, doc: Any) -> ClientState | None:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("state"), str):
            return None
        return cls(str(doc["state"]), str(doc.get("reason") or ""), str(doc.get("message") or ""),
                   str(doc.get("pod") or ""))


def operator_failed_sites(previous: Mapping[str, Any]) -> set[str]:
    """Sites the operator itself failed (pending/deploy timeouts): their pods are gone for good."""
    out = set()
    for site, doc in (previous.get("clients") or {}).items():
        state = ClientState.from_dict(doc)
        if state is not None and state.state == CLIENT_FAILED and state.reason in OPERATOR_REASONS:
            out.add(str(site))
    return out


def timeout_failure(pod: PodView, now: float, deploy_seconds: float, pending_seconds: float) -> ClientState | None:
    """A Failed state when ``pod`` ran past its pending or deploy timeout, else None.

    Both count from the pod's creation. Pending applies while the pod cannot
    start (unschedulable, image pull errors), deploy until it is Ready for the
    first time. The caller stops asking once the pod was Ready.
    """
    if pod.created is None:
        return None
    age = now - pod.created
    # Pending counts only while the pod cannot start at all: not scheduled, or a container stuck waiting
    # (ErrImagePull, ImagePullBackOff, CreateContainerConfigError). A scheduled pod whose containers are being
    # created or whose init containers run is deploying, which deploySeconds bounds.
    stuck = not pod.scheduled or bool(pod.waiting_reason)
    if pod.phase == PENDING and stuck and age >= pending_seconds:
        if not pod.scheduled:
            why = pod.schedule_reason or "Unschedulable"
            detail = f": {pod.schedule_message}" if pod.schedule_message else ""
            fix = "free or add nodes that fit the pod's resources, nodeSelector and tolerations, or lower them"
        else:
            why, detail = pod.waiting_reason, f": {pod.waiting_message}" if pod.waiting_message else ""
            fix = "check the image name, the registry's pull secrets and the pod's env/volume references"
        return ClientState(
            CLIENT_FAILED,
            Reason.PENDING_TIMEOUT.value,
            f"pod {pod.name} stayed Pending for {age:.0f}s (pendingSeconds {pending_seconds:g}): {why}{detail}; "
            f"fix: {fix}",
            pod.name,
        )
    if not pod.ready and pod.phase in (PENDING, RUNNING) and age >= deploy_seconds:
        return ClientState(
            CLIENT_FAILED,
            Reason.DEPLOY_TIMEOUT.value,
            f"pod {pod.name} was not Ready within deploySeconds ({deploy_seconds:g}s); fix: check its containers' "
            "logs and events, or raise spec.timeouts.deploySeconds",
            pod.name,
        )
    return None


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
    previous: Mapping[str, Any], phase: str, reason: str, message: str, now: float
) -> tuple[dict[str, Any], list[Event]]:
    """Status fields and the Event for moving to ``phase`` (no Event when the phase does not change)."""
    old = previous.get("phase")
    stamp = format_time(now)
    conds = list(previous.get("conditions") or [])
    out: dict[str, Any] = {"phase": phase}
    if phase == DEPLOYING:
        conds = set_condition(conds, COND_DEPLOYED, "False", reason, message, stamp)
    if phase == RUNNING:
        conds = set_condition(conds, COND_DEPLOYED, "True", "PodsReady", "the server and enough clients are up", stamp)
        conds = set_condition(conds, COND_RUNNING, "True", reason, message, stamp)
    # A job that succeeded ran, even when it finished between two looks and Running was never seen.
    if phase in (SUCCEEDED, FAILED, SUSPENDED) and (get_condition(conds, COND_RUNNING) is not None
                                                    or phase == SUCCEEDED):
        conds = set_condition(conds, COND_RUNNING, "False", reason, message, stamp)
    if phase == SUCCEEDED:
        # A job can finish between two looks at it; having succeeded, it was certainly deployed.
        conds = set_condition(conds, COND_DEPLOYED, "True", "PodsReady", "the server and enough clients were up",
                              stamp)
    if phase in TERMINAL:
        conds = set_condition(conds, COND_SUCCEEDED if phase == SUCCEEDED else COND_FAILED, "True", reason, message,
                              stamp)
        if not previous.get("completionTime"):
            out["completionTime"] = stamp
    if phase == SUSPENDED:
        conds = set_condition(conds, COND_SUSPENDED, "True", reason, message, stamp)
    elif get_condition(conds, COND_SUSPENDED) is not None and phase != SUSPENDED:
        conds = set_condition(conds, COND_SUSPENDED, "False", "Resumed", "the job was resumed", stamp)
    out["conditions"] = conds
    events = []
    if old != phase:
        kind = "Warning" if phase == FAILED else "Normal"
        events.append(Event(kind, phase, f"{old or 'New'} -> {phase}: {message}"))
    return out, events


def invalid(previous: Mapping[str, Any], problems: Sequence[Any], now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events for a spec the operator cannot run: phase Failed with an Invalid condition.

    ``problems`` are :class:`fedkube.spec.Problem` (path, message, fix); each
    one is named, so the condition says which field to change and how.
    """
    text = "; ".join(str(p) for p in problems) or "the spec is invalid"
    out, events = transition(previous, FAILED, REASON_INVALID_SPEC, text, now)
    out["conditions"] = set_condition(out["conditions"], COND_INVALID, "True", REASON_INVALID_SPEC, text,
                                      format_time(now))
    if not any(e.reason == FAILED for e in events):
        events = []
    events.insert(0, Event("Warning", REASON_INVALID_SPEC, text))
    return out, events


def revalidated(previous: Mapping[str, Any], job: FLJob, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events when a spec that was Invalid was fixed: the Failed verdict is lifted and the job starts."""
    stamp = format_time(now)
    conds = set_condition(previous.get("conditions"), COND_INVALID, "False", "SpecFixed", "the spec is valid now",
                          stamp)
    conds = set_condition(conds, COND_FAILED, "False", "SpecFixed", "the spec is valid now", stamp)
    base = {**previous, "phase": None, "conditions": conds, "completionTime": None}
    out, events = resumed(base, job, now)
    out.setdefault("conditions", conds)
    out["completionTime"] = None
    return out, [Event("Normal", "SpecFixed", "the spec is valid now; creating the job's objects"), *events]


def is_invalid(previous: Mapping[str, Any]) -> bool:
    """True while the job's status says its spec is Invalid."""
    cond = get_condition(previous.get("conditions"), COND_INVALID)
    return cond is not None and cond.get("status") == "True"


def suspended(previous: Mapping[str, Any], now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events for ``spec.suspend: true``: pods removed, Secrets/ConfigMap/checkpoint kept."""
    out, events = transition(previous, SUSPENDED, "Suspended",
                             "spec.suspend is true: pods deleted, checkpoint kept; set it to false to resume", now)
    clients = {}
    for site, doc in (previous.get("clients") or {}).items():
        state = ClientState.from_dict(doc)
        if state is not None and state.reason in OPERATOR_REASONS:
            clients[site] = state.to_dict()
    out["clients"] = clients
    out["clientsReady"] = 0
    out["clientsDisplay"] = _display(0, int(previous.get("clientsTotal") or 0))
    return out, events


def resumed(previous: Mapping[str, Any], job: FLJob, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Events when pods are (re)created: phase Pending, every client Pending again."""
    out, events = transition(previous, PENDING, "PodsCreated", "the server and client pods were created", now)
    total = len(job.spec.clients)
    out["clients"] = {
        site.name: ClientState(CLIENT_PENDING, pod=f"{job.name}-client-{site.name}").to_dict()
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


def decide(job: FLJob, previous: Mapping[str, Any], obs: Observation) -> Decision:
    """The status after one look at a running (not suspended, not finished) job, and what to do."""
    spec = job.spec
    now = obs.now
    timeouts = spec.timeouts
    prev_clients = previous.get("clients") or {}
    server_status = obs.server_status
    events: list[Event] = []
    delete: list[str] = []

    # The server's exit decides the job (lesson 19: nothing else does once it succeeded).
    outcome: Outcome | None = None
    server = obs.server_pod
    if server is not None and server.phase in TERMINAL:
        code = server.exit_code if server.exit_code is not None else (0 if server.phase == SUCCEEDED else 1)
        outcome = outcome_from_server(code, server.message)
    server_ok = outcome is not None and outcome.phase == SUCCEEDED
    summary_clients = {c.name: c for c in (outcome.summary.clients if outcome and outcome.summary else [])}
    live_clients = {c.name: c for c in (server_status.clients if server_status is not None else [])}
    # The server says the job is over but has not exited yet: client exits from here on are teardown.
    live_finished = server_status is not None and server_status.phase.finished

    clients: dict[str, ClientState] = {}
    for site in spec.clients:
        name = site.name
        pod = obs.client_pods.get(name)
        before = ClientState.from_dict(prev_clients.get(name))
        reported = summary_clients.get(name) or live_clients.get(name)
        if before is not None and before.state == CLIENT_FAILED and before.reason in OPERATOR_REASONS:
            clients[name] = before
            continue
        if reported is not None:
            state = ClientState(reported.state, reported.reason, reported.message, pod.name if pod else "")
        elif before is not None and pod is not None and before.state != CLIENT_PENDING:
            # No fresh word from the server (it may be busy or on its way out): its last word stands.
            state = ClientState(before.state, before.reason, before.message, pod.name)
        elif pod is None:
            state = ClientState(CLIENT_PENDING, "", "no pod yet")
        else:
            state = ClientState(CLIENT_PENDING, "", "", pod.name)
        if pod is not None and outcome is None:
            ever_ready = pod.ready or (before is not None and before.state not in (CLIENT_PENDING,)) or (
                reported is not None and reported.state != CLIENT_PENDING)
            failure = None if ever_ready else timeout_failure(
                pod, now, timeouts.deploy_seconds, timeouts.pending_seconds)
            if failure is not None:
                state = failure
                delete.append(pod.name)
            elif pod.exit_code not in (None, 0) and state.state == CLIENT_DONE:
                # Lesson 19: its result was delivered; an exit code now is teardown, not a failure.
                logger.info("job %s: client %s: trainer exited with code %s after delivering its result",
                            job.name, name, pod.exit_code)
            elif (pod.exit_code not in (None, 0) and state.state not in _UNHEALTHY and name in live_clients
                  and not live_finished):
                # Only with the server's fresh word that the client is not Done: it is polled after the pods
                # were listed, so an exit it has not seen a delivery for came before the delivery. Without
                # that word (the server busy or finishing) the exit may be teardown: wait for the next look.
                text = f"trainer exited with code {pod.exit_code}"
                if pod.message:
                    text += f": {pod.message.strip()[-300:]}"
                state = ClientState(CLIENT_FAILED, Reason.TRAINER_EXITED.value, text, pod.name)
        if pod is not None and state.state not in _UNHEALTHY and is_teardown_noise(server_ok, pod.exit_code):
            note = f"trainer exited with code {pod.exit_code} after the job succeeded (teardown, ignored)"
            state.message = f"{state.message}; {note}" if state.message else note
        newly_failed = state.state in _UNHEALTHY and (before is None or before.state != state.state
                                                       or before.reason != state.reason)
        if newly_failed:
            events.append(Event("Warning", state.reason or "ClientFailed", f"client {name}: {state.message}"))
        clients[name] = state

    total = len(spec.clients)
    ready = sum(
        1 for name, st in clients.items()
        if st.state not in _UNHEALTHY and (st.state == CLIENT_DONE or (
            (pod := obs.client_pods.get(name)) is not None and pod.ready))
    )
    rounds = spec.rounds
    round_now = int(previous.get("round") or 0)
    if outcome is not None and outcome.summary is not None:
        round_now = outcome.summary.completed_rounds if outcome.phase == SUCCEEDED else outcome.summary.round
    elif server_status is not None:
        round_now = server_status.round
    status: dict[str, Any] = {
        "round": round_now,
        "rounds": rounds,
        "roundDisplay": _display(round_now, rounds),
        "clients": {k: v.to_dict() for k, v in clients.items()},
        "clientsReady": ready,
        "clientsTotal": total,
        "clientsDisplay": _display(ready, total),
    }

    # Phase.
    phase: str
    reason: str
    message: str
    # Clients the job can no longer count on: those the operator failed, and those the server itself declared
    # Failed. A crashed pod alone is not enough: only the server knows whether its result was delivered.
    out_of_job = sorted(
        n for n, st in clients.items()
        if st.state == CLIENT_FAILED and (
            st.reason in OPERATOR_REASONS
            or ((rep := summary_clients.get(n) or live_clients.get(n)) is not None and rep.state == CLIENT_FAILED))
    )
    if outcome is not None:
        phase, reason, message = outcome.phase, outcome.reason, outcome.message
    elif total - len(out_of_job) < spec.quorum:
        phase, reason = FAILED, Reason.QUORUM_LOST.value
        named = ", ".join(f"{n} ({clients[n].reason}: {clients[n].message})" for n in out_of_job)
        message = (f"only {total - len(out_of_job)} of {total} clients are left, fewer than minClients "
                   f"{spec.quorum}; failed: {named}")
        delete = [p.name for p in (server, *obs.client_pods.values()) if p is not None]
    elif server is None:
        phase, reason, message = PENDING, REASON_SERVER_POD_GONE, "the server pod does not exist (yet)"
    else:
        was_up = server.ready or server_status is not None or previous.get("phase") == RUNNING
        server_failure = None if was_up else timeout_failure(
            server, now, timeouts.deploy_seconds, timeouts.pending_seconds)
        if server_failure is not None:
            phase, reason = FAILED, server_failure.reason
            message = "server: " + server_failure.message
            delete = [p.name for p in (server, *obs.client_pods.values()) if p is not None]
        elif (server_status is not None and server_status.phase.value == RUNNING) or (
                server_status is None and previous.get("phase") == RUNNING):
            # A missed poll (the server busy or on its way out) is no reason to leave Running.
            phase, reason = RUNNING, "RoundsInProgress"
            message = f"round {round_now} of {rounds}"
        elif server.phase == PENDING and not server.scheduled:
            phase, reason = PENDING, server.schedule_reason or "Unschedulable"
            message = f"the server pod is not scheduled: {server.schedule_message}"
        else:
            phase, reason = DEPLOYING, "WaitingForClients"
            message = f"{ready} of {total} clients ready; round 1 starts when minClients ({spec.quorum}) registered"
    status_fields, transition_events = transition(previous, phase, reason, message, now)
    status.update(status_fields)
    return Decision(status=status, events=[*transition_events, *events], delete_pods=sorted(set(delete)))


def ttl_expired(job: FLJob, previous: Mapping[str, Any], now: float) -> bool:
    """True once a finished job's ``ttlSecondsAfterFinished`` has passed and its children were not yet deleted."""
    ttl = job.spec.ttl_seconds_after_finished
    if ttl is None or previous.get("phase") not in TERMINAL:
        return False
    cleaned = get_condition(previous.get("conditions"), COND_CLEANED_UP)
    if cleaned is not None and cleaned.get("status") == "True":
        return False
    done = parse_time(previous.get("completionTime"))
    return done is not None and now >= done + ttl


def cleaned_up(previous: Mapping[str, Any], ttl: int, now: float) -> tuple[dict[str, Any], list[Event]]:
    """Status and Event after the TTL deleted the job's children."""
    text = (f"ttlSecondsAfterFinished ({ttl}s) passed: the job's pods, Service, Secrets, ConfigMap and claim "
            "were deleted")
    conds = set_condition(previous.get("conditions"), COND_CLEANED_UP, "True", REASON_TTL_EXPIRED, text,
                          format_time(now))
    return {"conditions": conds}, [Event("Normal", REASON_TTL_EXPIRED, text)]
