"""One pair of NetworkPolicies per FLJob: who may talk to the job's server and client pods, and where they may go.

Pure builders like :mod:`fedkube.operator.builders` (which calls
:func:`build_network_policies` from ``build_all``): no I/O, no kopf.

* ``{job}-server`` selects the server pod. Ingress: gRPC and bulk only from
  this job's client pods (by the ``fedkube.dev/job`` and ``fedkube.dev/role``
  labels), the status port only from the operator's namespace, the metrics
  port only from the configured monitoring selector. Egress: DNS only (the
  server never opens connections; clients come to it).
* ``{job}-client`` selects the job's client pods. Ingress: the sidecar's
  metrics port from the monitoring selector, nothing else (the trainer talks
  to its sidecar over the pod's own loopback, which policies do not touch).
  Egress: the server pods' gRPC and bulk ports, the cluster DNS, and whatever
  ``spec.trainer.egress`` lists.

The trainer and the sidecar share the pod's network namespace, and a
NetworkPolicy selects pods, not containers: a rule that lets the trainer reach
an object store lets the sidecar reach it too, and the server's ports are open
to the trainer as well as to the sidecar (the server still demands the site's
token, which only the sidecar mounts). So the pod's egress is nothing beyond
the server and DNS unless the job's author lists more, and docs/kubernetes.md
says so.

A policy only restricts traffic when the cluster's CNI enforces NetworkPolicies
(Calico, Cilium, ...); the chart's ``networkPolicy.enabled: false`` stops the
operator from creating them for CNIs that do not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import joins, naming
from fedkube.spec import FLJob

#: Set by the chart's Deployment (JSON of the ``networkPolicy:`` values); unset or ``enabled: false`` = none.
ENV_NETWORK_POLICY = "FEDKUBE_NETWORK_POLICY"
#: Namespaces carry their name in this label (Kubernetes >= 1.22), so a policy can select one by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
SIDECAR_METRICS_PORT = 9091  # builders.SIDECAR_METRICS_PORT; builders imports this module, so not from there
MAX_CONFIG_BYTES = 16 * 1024

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Selector:
    """Pods by labels in namespaces by labels (``{}`` selects all; None leaves that part out)."""

    namespace_labels: Mapping[str, str] | None = None
    pod_labels: Mapping[str, str] | None = None

    def peer(self) -> dict[str, Any]:
        """The NetworkPolicyPeer."""
        out: dict[str, Any] = {}
        if self.namespace_labels is not None:
            out["namespaceSelector"] = {"matchLabels": dict(self.namespace_labels)} if self.namespace_labels else {}
        if self.pod_labels is not None:
            out["podSelector"] = {"matchLabels": dict(self.pod_labels)} if self.pod_labels else {}
        return out


@dataclass(frozen=True)
class NetworkPolicyConfig:
    """Where the operator, the cluster DNS and the metrics scraper run; from the chart's ``networkPolicy:``."""

    operator_namespace: str
    """The operator's own namespace: the only one that may reach the server's status port."""
    monitoring: Selector | None = None
    """Who may scrape the metrics ports; None closes them."""
    dns: Selector = field(default_factory=lambda: Selector({NAMESPACE_NAME_LABEL: "kube-system"},
                                                           {"k8s-app": "kube-dns"}))
    """The cluster DNS pods (CoreDNS keeps the kube-dns label)."""


def server_policy_name(job: str) -> str:
    """``{job}-server``: NetworkPolicies have their own namespace of names, so it may equal the Service's."""
    return naming.server_name(job)


def client_policy_name(job: str) -> str:
    """``{job}-clients``: one policy for every client pod of the job."""
    return f"{job}-clients"


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"port": p, "protocol": "TCP"} for p in ports]


def _dns_egress(config: NetworkPolicyConfig) -> dict[str, Any]:
    return {"to": [config.dns.peer()], "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def _policy(job: FLJob, name: str, role: str, owner_refs: Sequence[Mapping[str, Any]],
            ingress: list[dict[str, Any]], egress: list[dict[str, Any]]) -> Manifest:
    meta: dict[str, Any] = {"name": name, "namespace": job.namespace, "labels": naming.labels(job.name, role)}
    if owner_refs:
        meta["ownerReferences"] = [dict(r) for r in owner_refs]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            # By job and role only: a client pod's site label varies, and one policy covers every site.
            "podSelector": {"matchLabels": {naming.LABEL_JOB: job.name, naming.LABEL_ROLE: role}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }


def build_network_policies(job: FLJob, config: NetworkPolicyConfig | None,
                           owner_refs: Sequence[Mapping[str, Any]] = ()) -> list[Manifest]:
    """The job's server and client NetworkPolicies; none when ``config`` is None (policies turned off)."""
    if config is None:
        return []
    server_pods = {naming.LABEL_JOB: job.name, naming.LABEL_ROLE: naming.ROLE_SERVER}
    client_pods = {naming.LABEL_JOB: job.name, naming.LABEL_ROLE: naming.ROLE_CLIENT}
    server_in: list[dict[str, Any]] = [
        {"from": [{"podSelector": {"matchLabels": client_pods}}],
         "ports": _tcp(envvars.DEFAULT_GRPC_PORT, envvars.DEFAULT_BULK_PORT)},
        {"from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: config.operator_namespace}}}],
         "ports": _tcp(envvars.DEFAULT_STATUS_PORT)},
        *joins.remote_ingress(job),  # remote sites: authenticated by mutual TLS, not by where they come from
    ]
    client_in: list[dict[str, Any]] = []
    if config.monitoring is not None:
        server_in.append({"from": [config.monitoring.peer()], "ports": _tcp(envvars.DEFAULT_METRICS_PORT)})
        client_in.append({"from": [config.monitoring.peer()], "ports": _tcp(SIDECAR_METRICS_PORT)})
    client_out = [
        {"to": [{"podSelector": {"matchLabels": server_pods}}],
         "ports": _tcp(envvars.DEFAULT_GRPC_PORT, envvars.DEFAULT_BULK_PORT)},
        _dns_egress(config),
        *(rule.manifest() for rule in job.spec.trainer.egress),
    ]
    return [
        _policy(job, server_policy_name(job.name), naming.ROLE_SERVER, owner_refs, server_in, [_dns_egress(config)]),
        _policy(job, client_policy_name(job.name), naming.ROLE_CLIENT, owner_refs, client_in, client_out),
    ]


# --- configuration -----------------------------------------------------------------------------


def _labels(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{where} must be a map of label names to values, got {value!r}; fix: e.g. "
                          "{app.kubernetes.io/name: prometheus}")
    return dict(value)


def _selector(value: Any, where: str) -> Selector | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"namespaceLabels", "podLabels"}:
        raise ConfigError(f"{where} must be an object with namespaceLabels and/or podLabels, got {value!r}")
    selector = Selector(_labels(value.get("namespaceLabels"), f"{where}.namespaceLabels"),
                        _labels(value.get("podLabels"), f"{where}.podLabels"))
    if selector.namespace_labels is None and selector.pod_labels is None:
        return None  # nothing named: the port stays closed rather than open to every pod of the job's namespace
    return selector


def network_config_from_env(environ: Mapping[str, str]) -> NetworkPolicyConfig | None:
    """The NetworkPolicy settings in ``FEDKUBE_NETWORK_POLICY``; None when unset or ``enabled`` is false.

    The operator's namespace comes from ``FEDKUBE_NAMESPACE`` (the chart sets it from the pod's own).
    """
    data = envvars.json_document(environ, ENV_NETWORK_POLICY, MAX_CONFIG_BYTES, source="the values' networkPolicy:")
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"enabled", "monitoring", "dns"}:
        raise ConfigError(
            f"{ENV_NETWORK_POLICY} must be an object with enabled, monitoring and dns, got {json.dumps(data)}"
        )
    if not isinstance(data.get("enabled", True), bool):
        raise ConfigError(f"networkPolicy.enabled must be true or false, got {data['enabled']!r}")
    if not data.get("enabled", True):
        return None
    namespace = environ.get(envvars.NAMESPACE, "").strip()
    if not namespace:
        raise ConfigError(f"NetworkPolicies need the operator's namespace in {envvars.NAMESPACE}; fix: set it (the "
                          "chart does) or turn networkPolicy.enabled off")
    dns = _selector(data.get("dns"), "networkPolicy.dns") or NetworkPolicyConfig(namespace).dns
    return NetworkPolicyConfig(namespace, _selector(data.get("monitoring"), "networkPolicy.monitoring"), dns)
