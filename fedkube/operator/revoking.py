"""``spec.revokedSites`` of a running job: what the operator propagates to the server, and what it keeps.

The server reads the spec ConfigMap it mounts (``<job>-spec``) again every few seconds
(:mod:`fedkube.server.revocation`), so propagating a revocation is patching that ConfigMap with the effective
spec; the operator's timer does it in its next look (every 5 s), then the kubelet's sync brings it into the pod.

Revocation is final for the FLJob: every name the operator propagated is kept in ``status.revokedSites`` and
:func:`fedkube.operator.edits.effective_spec` adds it back, so removing a name from the spec re-admits nobody,
not even after a suspend/resume (a remote site's certificate outlives a resume, so its thief would be back).
A site is taken back with a new FLJob. Pure: the handlers read and write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedkube.operator import edits
from fedkube.operator.status import Event
from fedkube.spec.model import FLJob
from fedkube.spec.revocation import FIELD, STATUS_KEY, stored_names

REASON_REVOKED = "SiteRevoked"


def kept(status: Mapping[str, Any]) -> list[str]:
    """The names already propagated (``status.revokedSites``)."""
    return stored_names(status.get(STATUS_KEY))


def at_creation(job: FLJob) -> frozenset[str]:
    """The sites revoked when the job's pods were first created: ``spec.revokedSites`` of the accepted spec
    (``status.acceptedSpec``, recorded then: :mod:`fedkube.operator.edits`), or of ``job`` before there is one.

    Needs the job parsed with its status (``handlers._parse`` keeps it); a job without one is being created.
    """
    accepted = edits.accepted_spec(job.status or {})
    if accepted is None:
        return frozenset(job.spec.revoked_sites or ())
    return frozenset(stored_names(accepted.get(FIELD)))


def update(job: FLJob, status: Mapping[str, Any]) -> tuple[dict[str, Any], list[Event]]:
    """Status fields and Events when ``job`` (the effective spec) revokes sites not yet propagated; ({}, [])
    when there is nothing new, and then nothing is to be patched either."""
    sites = {c.name for c in job.spec.clients}
    names = sorted(set(job.spec.revoked_sites or ()) & sites)
    new = sorted(set(names) - set(kept(status)))
    if not new:
        return {}, []
    message = (f"site(s) {', '.join(new)} revoked: the server refuses them from its next read of the spec "
               "ConfigMap (the kubelet's sync, about a minute at most) and fails them for the job (reason Revoked); "
               "final for this FLJob")
    return {STATUS_KEY: sorted(set(names) | set(kept(status)))}, [Event("Warning", REASON_REVOKED, message)]
