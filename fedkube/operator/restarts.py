"""Client pods that ended before their job: created again within ``spec.clientRestartLimit``, else the site fails.

Client pods run with ``restartPolicy: Never`` (see :mod:`fedkube.operator.builders`), so an evicted, deleted or
failed client pod stays gone unless the operator makes a new one. It does, per site, as long as the site's
budget lasts: the new pod's sidecar connects with a new session and the server takes it like a restarted site
(Lost or Training -> Registered; a task it lost is sent again, DESIGN.md section 5). Once a site has used its
budget, its next ended pod fails the site for the job (``RestartLimitExceeded``, one of the reasons the
operator decides, so it sticks and counts against ``minClients``); the job goes on while enough sites remain.

Not re-created: a site the server failed for the job (its sidecar would be refused), a site the operator
already failed, and any pod once the server finished or is finishing (client exits are teardown then).

The count is kept in the FLJob status (``clients.<site>.restarts``), so an operator restart does not renew the
budget; a resume after suspend starts every site afresh, budget included (new pods, as on creation; the resume
re-admits every site, so a carried-over count would leave a re-admitted site no re-creation: docs/kubernetes.md).

:func:`plan` is pure (detect and decide); :func:`recreate` makes the API calls the plan asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedkube.operator import builders, kube, naming, podspec
from fedkube.operator.podspec import PodDefaults
from fedkube.operator.status import Event, operator_failed_sites
from fedkube.operator.views import POD_FAILED, REASON_RESTART_LIMIT, ServerWord, pod_view
from fedkube.spec.model import FLJob
from fedkube.status import ClientState, Reason, Scope

logger = logging.getLogger(__name__)

RESTARTS = "restarts"  # the per-site key in the FLJob status
REASON_RECREATED = "ClientPodRecreated"


@dataclass(frozen=True)
class Ended:
    """A site whose pod ended: the pod as listed (None when it is gone) and why, in words."""

    site: str
    pod: Mapping[str, Any] | None
    why: str

    @property
    def pod_name(self) -> str:
        return str(((self.pod or {}).get("metadata") or {}).get("name") or "")


@dataclass
class Plan:
    """What one look decided about ended client pods."""

    previous: dict[str, Any]
    """The stored status with the sites over budget Failed: :func:`fedkube.operator.status.decide` keeps them."""
    counts: dict[str, int]
    """Restarts per site so far (:func:`recreate` adds the ones it makes)."""
    recreate: list[Ended] = field(default_factory=list)
    exhausted: list[Ended] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def replaced(self) -> frozenset[str]:
        """Sites whose listed pod is not theirs any more (re-created or failed here): decide sees no pod."""
        return frozenset(e.site for e in (*self.recreate, *self.exhausted))


def restarts_of(previous: Mapping[str, Any], site: str) -> int:
    """The restarts stored for ``site``; 0 when none (or a hand-edited value that is no count)."""
    entry = (previous.get("clients") or {}).get(site)
    value = entry.get(RESTARTS) if isinstance(entry, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def why_ended(pod: Mapping[str, Any] | None) -> str:
    """The pod's last termination reason in words: the kubelet's (Evicted: ...), else the trainer's exit."""
    if pod is None:
        return "its pod was deleted"
    st = pod.get("status") or {}
    if st.get("reason"):
        return f"{st['reason']}: {str(st.get('message') or '').strip()[:300]}".rstrip(": ")
    for cs in st.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") if cs.get("name") == naming.TRAINER_CONTAINER else None
        if term:
            return f"trainer {term.get('reason') or 'terminated'} with exit code {term.get('exitCode')}"
    return "its pod failed"


def _failed_for_job(word: ServerWord, site: str) -> bool:
    rep = word.reported(site)
    if rep is None or rep.state != ClientState.FAILED:
        return False
    try:
        return Reason(rep.reason).scope is not Scope.ROUND
    except ValueError:
        return True  # a reason this operator does not know: the server's word stands


def _ended(site: str, pod: Mapping[str, Any] | None, word: ServerWord) -> Ended | None:
    if pod is None:
        return Ended(site, None, why_ended(None))
    view = pod_view(pod, naming.TRAINER_CONTAINER)
    # A pod being deleted is not gone yet (creating its successor would only meet the name): wait for the next look.
    if view.deleting or view.phase != POD_FAILED:
        return None
    # A pod the kubelet ended (status.reason: Evicted, Preempting, NodeShutdown...) ended through no fault of its
    # trainer. Any other failed pod only on the server's fresh word (polled after the pods were listed) that the
    # site did not fail for the job: a trainer that raised is reported by its sidecar before its pod fails.
    if not (pod.get("status") or {}).get("reason") and not word.fresh(site):
        return None
    return Ended(site, pod, why_ended(pod))


def plan(job: FLJob, previous: Mapping[str, Any], pods: Mapping[str, Mapping[str, Any]], word: ServerWord) -> Plan:
    """Which sites' pods to create again and which sites fail for having used their budget.

    ``pods`` maps each site to its listed pod (a site without one is missing); ``word`` is what the server said
    in this look.
    """
    counts = {site.name: restarts_of(previous, site.name) for site in job.spec.clients}
    out = Plan(previous=dict(previous), counts=counts)
    if word.outcome is not None or word.finishing:
        return out
    failed = operator_failed_sites(previous)
    limit = job.spec.client_restart_limit
    clients = dict(previous.get("clients") or {})
    for site in podspec.pod_sites(job):  # a remote site has no pod here to create again
        name = site.name
        if name in failed or _failed_for_job(word, name) or name in (job.spec.revoked_sites or ()):
            continue  # (a revoked site's pod is gone for good, even before the server has read the revocation)
        ended = _ended(name, pods.get(name), word)
        if ended is None:
            continue
        if counts[name] < limit:
            out.recreate.append(ended)
            continue
        pod = ended.pod_name or naming.client_pod_name(job.name, name)
        message = (f"pod {pod} ended ({ended.why}) after {counts[name]} re-creations; spec.clientRestartLimit "
                   f"({limit}) is used up, so the site failed for the job (the job goes on while minClients "
                   "remain); fix: look at the pod's events and the trainer's log, or raise clientRestartLimit")
        clients[name] = {"state": ClientState.FAILED.value, "reason": REASON_RESTART_LIMIT, "message": message,
                         "pod": pod, RESTARTS: counts[name]}
        out.exhausted.append(ended)
        out.events.append(Event("Warning", REASON_RESTART_LIMIT, f"client {name}: {message}"))
    out.previous["clients"] = clients
    return out


def stamp(status: dict[str, Any], counts: Mapping[str, int]) -> None:
    """Write each site's restart count into the status' client entries (decide does not carry it)."""
    for site, entry in (status.get("clients") or {}).items():
        if isinstance(entry, dict) and counts.get(site):
            entry[RESTARTS] = counts[site]


def recreate(api: kube.Kube, ref: kube.JobRef, job: FLJob, owner: Mapping[str, Any], todo: Plan,
             log_format: str, *, create: bool = True, defaults: PodDefaults | None = None) -> list[Event]:
    """Delete the ended pods of ``todo`` and, with ``create`` (the job goes on), create each site's pod again.

    Counts the pods really created.

    Raises :class:`fedkube.operator.kube.NameConflict` when a pod's name was taken by someone else's pod.
    """
    api.delete_pods(ref, [e.pod for e in (*todo.recreate, *todo.exhausted) if e.pod is not None])
    events: list[Event] = []
    for ended in todo.recreate if create else ():
        pod = builders.build_client_pod(job, ended.site, owner=owner, log_format=log_format, defaults=defaults)
        # "exists": the old pod is still terminating; it counts once it is gone and a new one is really made.
        if api.create_or_patch(pod, ref) != "created":
            continue
        todo.counts[ended.site] += 1
        count, limit = todo.counts[ended.site], job.spec.client_restart_limit
        logger.warning("job %s/%s: client %s: %s; pod created again (%s of %s)", job.namespace, job.name,
                       ended.site, ended.why, count, limit)
        events.append(Event("Warning", REASON_RECREATED,
                            f"client {ended.site}: {ended.why}; its pod was created again (restart {count} of "
                            f"clientRestartLimit {limit}); the server takes it back as a restarted site"))
    return events
