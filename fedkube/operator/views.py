"""Detect: what the operator reads from Kubernetes and the server, as typed observations (no I/O, no clock).

The handlers list pods and poll the server; these functions turn what came
back into :class:`PodView`, :class:`Outcome` and :class:`ServerWord`, which
the pure rules in :mod:`fedkube.operator.status` decide on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fedkube.spec.status import SiteStatus
from fedkube.status import EXIT_CONFIG_ERROR, ClientState, ClientStatus, JobStatus, Phase, Reason, SummaryError
from fedkube.termination import TerminationSummary

logger = logging.getLogger(__name__)

# Kubernetes pod phases (the API's vocabulary, not ours: a pod's phase is not an FLJob's phase).
POD_PENDING = "Pending"
POD_RUNNING = "Running"
POD_SUCCEEDED = "Succeeded"
POD_FAILED = "Failed"
POD_ENDED = frozenset({POD_SUCCEEDED, POD_FAILED})

# Reasons the operator itself gives (the server's failure reasons are fedkube.status.Reason).
REASON_INVALID_SPEC = "InvalidSpec"
REASON_SERVER_EXITED = "ServerExited"
REASON_SERVER_POD_GONE = "ServerPodGone"
REASON_TTL_EXPIRED = "TTLExpired"
REASON_COMPLETED = "Completed"
# A site's pod ended more often than spec.clientRestartLimit allows (fedkube.operator.restarts).
REASON_RESTART_LIMIT = "RestartLimitExceeded"
# Failures the operator decides; they stick (the pod is deleted, so nothing later could contradict them).
OPERATOR_REASONS = frozenset({Reason.PENDING_TIMEOUT.value, Reason.DEPLOY_TIMEOUT.value, REASON_RESTART_LIMIT})
# A scheduling gate holds the pod (Kueue's, until its whole pod group is admitted): queued, not failing to start.
SCHEDULING_GATED = "SchedulingGated"
# Kueue's webhook labels every pod it manages (fedkube.operator.podspec sets the queue and group keys).
KUEUE_MANAGED_LABEL = "kueue.x-k8s.io/managed"


def parse_time(text: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time as Kubernetes writes it; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- pods ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    """What the operator reads from one pod."""

    name: str
    phase: str
    """The pod's Kubernetes phase (POD_PENDING, POD_RUNNING, ...)."""
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
    queued: bool = False
    """Kueue manages the pod: it may wait gated in a queue for any time before it is scheduled."""
    scheduled_at: float | None = None
    """When the pod was scheduled (PodScheduled turned True), if it was."""

    @property
    def gated(self) -> bool:
        """A scheduling gate holds the pod (Pending, not failed: Kueue has not admitted its group yet)."""
        return not self.scheduled and self.schedule_reason == SCHEDULING_GATED

    @property
    def crashed(self) -> bool:
        """The main container exited with a non-zero code."""
        return self.exit_code not in (None, 0)


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
        phase=str(st.get("phase") or POD_PENDING),
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
        queued=(meta.get("labels") or {}).get(KUEUE_MANAGED_LABEL) == "true",
        scheduled_at=parse_time((scheduled or {}).get("lastTransitionTime"))
        if scheduled and scheduled.get("status") == "True" else None,
    )


def timeout_failure(pod: PodView, now: float, deploy_seconds: float, pending_seconds: float) -> SiteStatus | None:
    """A Failed state when ``pod`` ran past its pending or deploy timeout, else None.

    Both count from the pod's creation (a Kueue-managed pod's deploy time from
    its scheduling). Pending applies while the pod cannot start (unschedulable,
    image pull errors), deploy until it is Ready for the first time; neither
    while a scheduling gate holds the pod in a queue. The caller stops asking
    once the pod was Ready.
    """
    if pod.created is None or pod.gated:
        return None
    # A queued pod's wait for admission is not deploying: its deploy time starts when it is scheduled.
    start = pod.scheduled_at if pod.queued and pod.scheduled_at is not None else pod.created
    age = now - start
    # Pending counts only while the pod cannot start at all: not scheduled, or a container stuck waiting
    # (ErrImagePull, ImagePullBackOff, CreateContainerConfigError). A scheduled pod whose containers are being
    # created or whose init containers run is deploying, which deploySeconds bounds.
    stuck = not pod.scheduled or bool(pod.waiting_reason)
    if pod.phase == POD_PENDING and stuck and age >= pending_seconds:
        if not pod.scheduled:
            why = pod.schedule_reason or "Unschedulable"
            detail = f": {pod.schedule_message}" if pod.schedule_message else ""
            fix = "free or add nodes that fit the pod's resources, nodeSelector and tolerations, or lower them"
        else:
            why, detail = pod.waiting_reason, f": {pod.waiting_message}" if pod.waiting_message else ""
            fix = "check the image name, the registry's pull secrets and the pod's env/volume references"
        return SiteStatus(
            state=ClientState.FAILED,
            reason=Reason.PENDING_TIMEOUT.value,
            message=f"pod {pod.name} stayed Pending for {age:.0f}s (pendingSeconds {pending_seconds:g}): "
            f"{why}{detail}; fix: {fix}",
            pod=pod.name,
        )
    if not pod.ready and pod.phase in (POD_PENDING, POD_RUNNING) and age >= deploy_seconds:
        return SiteStatus(
            state=ClientState.FAILED,
            reason=Reason.DEPLOY_TIMEOUT.value,
            message=f"pod {pod.name} was not Ready within deploySeconds ({deploy_seconds:g}s); fix: check its "
            "containers' logs and events, or raise spec.timeouts.deploySeconds",
            pod=pod.name,
        )
    return None


# --- the server ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How the job ended, as the server pod's exit says."""

    phase: Phase
    """Succeeded or Failed."""
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
            logger.warning("job %s: server exited with %s but its summary says %s; trusting the exit code",
                           summary.job, exit_code, summary.exit_code)
        if exit_code == 0 and summary.phase == Phase.SUCCEEDED:
            text = summary.message or f"completed {summary.completed_rounds}/{summary.rounds} rounds"
            return Outcome(Phase.SUCCEEDED, REASON_COMPLETED, text, summary)
        reason = summary.reason or _exit_reason(exit_code)
        return Outcome(Phase.FAILED, reason, summary.message or f"the server exited with code {exit_code}", summary)
    tail = message.strip()[-400:]
    seen = f"; its termination message was: {tail}" if tail else ""
    if exit_code == 0:
        # Exit 0 is the server's contract for success; the missing summary only costs the details.
        return Outcome(Phase.SUCCEEDED, REASON_COMPLETED, f"the server exited with code 0 but {error}{seen}")
    return Outcome(
        Phase.FAILED,
        _exit_reason(exit_code),
        f"the server exited with code {exit_code} and {error}{seen}; fix: read the server pod's log "
        "(kubectl logs <job>-server)",
    )


def _exit_reason(exit_code: int) -> str:
    return Reason.CONFIG_ERROR.value if exit_code == EXIT_CONFIG_ERROR else REASON_SERVER_EXITED


def server_outcome(server: PodView | None) -> Outcome | None:
    """The outcome once the server pod ended, None while it runs (or does not exist)."""
    if server is None or server.phase not in POD_ENDED:
        return None
    code = server.exit_code if server.exit_code is not None else (0 if server.phase == POD_SUCCEEDED else 1)
    return outcome_from_server(code, server.message)


def is_teardown_noise(server_finished_ok: bool, client_exit_code: int | None) -> bool:
    """Lesson 19: a client exiting non-zero after the server finished successfully fails nothing."""
    return server_finished_ok and client_exit_code not in (None, 0)


@dataclass(frozen=True)
class ServerWord:
    """Everything the server said in one look: its exit (once it ended) and its live status (when it answered)."""

    outcome: Outcome | None
    live: JobStatus | None
    _summary: Mapping[str, ClientStatus] = field(default_factory=dict)
    _live: Mapping[str, ClientStatus] = field(default_factory=dict)

    @classmethod
    def of(cls, outcome: Outcome | None, live: JobStatus | None) -> ServerWord:
        summary = outcome.summary.clients if outcome is not None and outcome.summary is not None else []
        return cls(outcome, live, {c.name: c for c in summary}, {c.name: c for c in (live.clients if live else [])})

    @property
    def succeeded(self) -> bool:
        """The server exited and said the job succeeded."""
        return self.outcome is not None and self.outcome.phase is Phase.SUCCEEDED

    @property
    def finishing(self) -> bool:
        """The server says the job is over but has not exited yet: client exits from here on are teardown."""
        return self.live is not None and Phase(self.live.phase).finished

    def reported(self, site: str) -> ClientStatus | None:
        """The server's last word on ``site``: its summary's, else its live status'."""
        return self._summary.get(site) or self._live.get(site)

    def fresh(self, site: str) -> bool:
        """The live status of this look names ``site``."""
        return site in self._live

    def failed(self, site: str) -> bool:
        """The server itself declared ``site`` Failed."""
        rep = self.reported(site)
        return rep is not None and rep.state == ClientState.FAILED
