"""The server pod's PodDisruptionBudget: a node drain or an autoscaler waits instead of evicting the aggregator.

A client pod that is evicted is created again (:mod:`fedkube.operator.restarts`) and costs its site one restart;
an evicted server costs the whole job a restart from its last checkpoint and every client's round in flight. So
voluntary disruptions of the server are refused (``maxUnavailable: 0``) while it is healthy; a server pod that is
not Ready (stuck, crash-looping) may still be evicted (``unhealthyPodEvictionPolicy: AlwaysAllow``), so a broken
job never blocks a drain. Pure: no I/O, like the builders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedkube.operator import naming
from fedkube.spec.model import FLJob

KIND = "PodDisruptionBudget"


def server_pdb_name(job: str) -> str:
    """The server's PodDisruptionBudget, named like the server pod it protects."""
    return naming.server_name(job)


def build_server_pdb(job: FLJob, owner_refs: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """PodDisruptionBudget ``{job}-server``: no voluntary eviction of the healthy server pod; owned by the FLJob."""
    meta: dict[str, Any] = {"name": server_pdb_name(job.name), "namespace": job.namespace,
                            "labels": naming.labels(job.name, naming.ROLE_SERVER)}
    if owner_refs:
        meta["ownerReferences"] = [dict(ref) for ref in owner_refs]
    return {
        "apiVersion": "policy/v1",
        "kind": KIND,
        "metadata": meta,
        "spec": {
            "maxUnavailable": 0,
            "selector": {"matchLabels": {naming.LABEL_JOB: job.name, naming.LABEL_ROLE: naming.ROLE_SERVER}},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
