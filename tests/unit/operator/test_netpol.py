"""NetworkPolicies per FLJob: who reaches the server's ports, where client pods may go, and how they are configured."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import builders, naming
from fedkube.operator.certificates import TlsPlaceholder
from fedkube.operator.netpol import (
    ENV_NETWORK_POLICY,
    NetworkPolicyConfig,
    Selector,
    build_network_policies,
    network_config_from_env,
)
from fedkube.spec import FLJob, SpecError, parse_job
from tests.unit.operator.kvalidate import assert_valid

CONFIG = NetworkPolicyConfig(
    "fedkube-system", monitoring=Selector({"kubernetes.io/metadata.name": "monitoring"}, {"app": "prometheus"}))
OWNER = {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "j", "uid": "u-1"}}


def _job(**trainer: Any) -> FLJob:
    return parse_job({"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob",
                      "metadata": {"name": "j", "namespace": "team"},
                      "spec": {"rounds": 1, "clients": [{"name": "a"}, {"name": "b"}],
                               "trainer": {"image": "t", "command": ["python"], **trainer}}})


def _policies(job: FLJob, config: NetworkPolicyConfig | None = CONFIG) -> dict[str, dict[str, Any]]:
    objs = builders.build_all(job, tokens={"a": "x", "b": "y"}, tls=TlsPlaceholder(), owner=OWNER, network=config)
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}


def _ports(rule: dict[str, Any]) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule.get("ports") or []}


def _pod_labels(objs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return next(o for o in objs if o["kind"] == "Pod" and o["metadata"]["name"] == name)["metadata"]["labels"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return (selector.get("matchLabels") or {}).items() <= labels.items()


def test_the_server_takes_grpc_and_bulk_only_from_its_own_jobs_client_pods() -> None:
    job = _job()
    objs = builders.build_all(job, tokens={"a": "x", "b": "y"}, tls=TlsPlaceholder(), owner=OWNER, network=CONFIG)
    server = _policies(job)["j-server"]
    assert _selects(server["spec"]["podSelector"], _pod_labels(objs, "j-server"))
    assert not _selects(server["spec"]["podSelector"], _pod_labels(objs, "j-client-a"))
    assert server["spec"]["policyTypes"] == ["Ingress", "Egress"]
    by_port = {port: rule for rule in server["spec"]["ingress"] for port, _ in _ports(rule)}
    grpc = by_port[envvars.DEFAULT_GRPC_PORT]
    assert _ports(grpc) == {(envvars.DEFAULT_GRPC_PORT, "TCP"), (envvars.DEFAULT_BULK_PORT, "TCP")}
    [peer] = grpc["from"]
    assert set(peer) == {"podSelector"}, "no namespaceSelector: only pods of the job's own namespace"
    for site in ("a", "b"):
        assert _selects(peer["podSelector"], _pod_labels(objs, f"j-client-{site}"))
    # Another job's client pods in the same namespace carry another fedkube.dev/job label.
    other = {**_pod_labels(objs, "j-client-a"), naming.LABEL_JOB: "other"}
    assert not _selects(peer["podSelector"], other)
    status = by_port[envvars.DEFAULT_STATUS_PORT]
    assert status["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fedkube-system"}}}]
    metrics = by_port[envvars.DEFAULT_METRICS_PORT]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                                "podSelector": {"matchLabels": {"app": "prometheus"}}}]
    assert len(server["spec"]["ingress"]) == 3
    [dns] = server["spec"]["egress"]
    assert _ports(dns) == {(53, "UDP"), (53, "TCP")}


def test_client_pods_reach_only_their_server_and_dns_unless_the_job_lists_more() -> None:
    job = _job()
    objs = builders.build_all(job, tokens={"a": "x", "b": "y"}, tls=TlsPlaceholder(), owner=OWNER, network=CONFIG)
    clients = _policies(job)["j-clients"]
    assert _selects(clients["spec"]["podSelector"], _pod_labels(objs, "j-client-b"))
    assert not _selects(clients["spec"]["podSelector"], _pod_labels(objs, "j-server"))
    to_server, dns = clients["spec"]["egress"]
    assert _selects(to_server["to"][0]["podSelector"], _pod_labels(objs, "j-server"))
    assert _ports(to_server) == {(envvars.DEFAULT_GRPC_PORT, "TCP"), (envvars.DEFAULT_BULK_PORT, "TCP")}
    assert dns == {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                           "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                   "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    [metrics] = clients["spec"]["ingress"]
    assert _ports(metrics) == {(builders.SIDECAR_METRICS_PORT, "TCP")}


def test_trainer_egress_opens_exactly_what_the_job_lists() -> None:
    egress = [{"to": [{"cidr": "10.20.0.0/16", "except": ["10.20.5.0/24"]}], "ports": [{"port": 443}]},
              {"to": [{"namespaceSelector": {"team": "data"}, "podSelector": {"app": "minio"}}]}]
    rules = _policies(_job(egress=egress))["j-clients"]["spec"]["egress"]
    assert rules[2:] == [
        {"to": [{"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.5.0/24"]}}],
         "ports": [{"port": 443, "protocol": "TCP"}]},
        {"to": [{"namespaceSelector": {"matchLabels": {"team": "data"}},
                 "podSelector": {"matchLabels": {"app": "minio"}}}]},
    ]


@pytest.mark.parametrize(("egress", "match"), [
    ([{"to": []}], "to"),
    ([{"to": [{}]}], "either cidr or namespaceSelector"),
    ([{"to": [{"cidr": "10.0.0.0/8", "podSelector": {"a": "b"}}]}], "not both"),
    ([{"to": [{"cidr": "10.0.0.1/8"}]}], "not a CIDR"),
    ([{"to": [{"podSelector": {"a": "b"}, "except": ["10.0.0.0/8"]}]}], "except needs a cidr"),
    ([{"to": [{"podSelector": {"has space": "b"}}]}], "not a label key"),
    ([{"to": [{"cidr": "0.0.0.0/0"}], "ports": [{"port": 0}]}], "port"),
])
def test_a_bad_egress_rule_is_named(egress: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(SpecError, match=match) as err:
        _job(egress=egress)
    assert any(p.path.startswith("spec.trainer.egress") for p in err.value.problems)


def test_the_policies_come_before_the_pods_and_are_owned_by_the_job() -> None:
    objs = builders.build_all(_job(), tokens={"a": "x", "b": "y"}, tls=TlsPlaceholder(), owner=OWNER, network=CONFIG)
    kinds = [o["kind"] for o in objs]
    assert kinds.index("NetworkPolicy") < kinds.index("Pod")
    for policy in (o for o in objs if o["kind"] == "NetworkPolicy"):
        assert policy["metadata"]["ownerReferences"][0]["uid"] == "u-1"
        assert policy["metadata"]["namespace"] == "team"


def test_no_config_no_policies_and_closed_metrics_without_a_monitoring_selector() -> None:
    assert _policies(_job(), None) == {}
    closed = _policies(_job(), NetworkPolicyConfig("ops"))
    assert [len(p["spec"]["ingress"]) for p in closed.values()] == [2, 0]


@pytest.mark.parametrize("version", ["1.29.0", "1.35.0"])
def test_the_policies_are_valid_kubernetes(version: str) -> None:
    egress = [{"to": [{"cidr": "2001:db8::/32"}], "ports": [{"port": 53, "protocol": "UDP"}]}]
    for policy in build_network_policies(_job(egress=egress), CONFIG):
        assert_valid(policy, version)


def test_config_from_the_charts_environment() -> None:
    chart = {"enabled": True, "monitoring": {"namespaceLabels": {"kubernetes.io/metadata.name": "mon"}},
             "dns": {"namespaceLabels": {"kubernetes.io/metadata.name": "kube-system"},
                     "podLabels": {"k8s-app": "coredns"}}}
    env = {ENV_NETWORK_POLICY: json.dumps(chart), envvars.NAMESPACE: "fedkube-system"}
    config = network_config_from_env(env)
    assert config == NetworkPolicyConfig("fedkube-system", Selector({"kubernetes.io/metadata.name": "mon"}),
                                         Selector({"kubernetes.io/metadata.name": "kube-system"},
                                                  {"k8s-app": "coredns"}))
    assert network_config_from_env({}) is None
    assert network_config_from_env({ENV_NETWORK_POLICY: '{"enabled": false}'}) is None
    with pytest.raises(ConfigError, match="FEDKUBE_NAMESPACE"):
        network_config_from_env({ENV_NETWORK_POLICY: '{"enabled": true}'})
    with pytest.raises(ConfigError, match="true or false"):
        network_config_from_env({ENV_NETWORK_POLICY: '{"enabled": "yes"}', envvars.NAMESPACE: "x"})
    with pytest.raises(ConfigError, match="namespaceLabels and/or podLabels"):
        network_config_from_env({ENV_NETWORK_POLICY: '{"monitoring": {"labels": {}}}', envvars.NAMESPACE: "x"})
