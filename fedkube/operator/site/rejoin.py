"""A refused FLSite joins again by itself once its admin changes the policy the refusal came from.

The sidecar checks the job's terms (strategy, rounds) against ``FEDKUBE_SITE_POLICY``, fixed when its pod was made,
and a pod whose sidecar refused them has left the job for good: the same pod cannot change its mind. So the
client pod carries the digest of that policy (:data:`~fedkube.operator.site.builders.ANNOTATION_SITE_POLICY`),
and while the sidecar's view says Refused the site operator compares it with the digest of the FLSite's
``spec.policy`` now: another one replaces the pod (deleted here, made again with the new policy on the next look,
where a missing pod is made anyway), the same one keeps it. A refused pod is replaced at most once per policy
change, so an unchanged policy never loops, and nothing but this refusal replaces a pod: other spec edits (the
trainer, the sidecar) still do not touch a running or finished pod.

Pure: :func:`decide` reads a pod and a digest; the handler acts on its :class:`Step`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from fedkube import envvars
from fedkube.operator import naming
from fedkube.operator.site.builders import ANNOTATION_SITE_POLICY, policy_digest

#: The reason of the Event and of the ``Refused`` condition (status False) when a refused pod is replaced.
POLICY_CHANGED = "PolicyChanged"


class Step(str, enum.Enum):
    KEEP = "Keep"
    """The pod ran with the policy the FLSite has now: its refusal stands."""
    REPLACE = "Replace"
    """The policy changed since the pod was made: delete the refused pod (the next look makes the new one)."""
    WAIT = "Wait"
    """The refused pod is already being deleted: wait for it to go (no second delete, no second Event)."""


def pod_policy(pod: Mapping[str, Any]) -> str | None:
    """The digest of the policy ``pod``'s sidecar runs with: its annotation, else (a pod made before the
    annotation existed) the digest of the sidecar's ``FEDKUBE_SITE_POLICY``; None when neither is there."""
    meta = pod.get("metadata") or {}
    recorded = (meta.get("annotations") or {}).get(ANNOTATION_SITE_POLICY)
    if recorded:
        return str(recorded)
    for container in (pod.get("spec") or {}).get("initContainers") or []:
        if container.get("name") != naming.SIDECAR_CONTAINER:
            continue
        for entry in container.get("env") or []:
            if entry.get("name") == envvars.SITE_POLICY and "value" in entry:
                return policy_digest(str(entry["value"]))
    return None


def decide(pod: Mapping[str, Any], wanted: str) -> Step:
    """What to do with ``pod``, whose sidecar refused the job's terms, when the FLSite's policy digests to ``wanted``.

    A pod whose policy cannot be read is kept: replacing it on a guess could repeat forever."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return Step.WAIT
    had = pod_policy(pod)
    return Step.REPLACE if had is not None and had != wanted else Step.KEEP


def message(pod_name: str, job: str) -> str:
    """The Event's and condition's text when the refused pod is replaced."""
    return (f"spec.policy changed since pod {pod_name} refused job {job}'s terms; the pod is replaced so the site "
            "registers again with the new policy (the server takes it back from its next round)")
