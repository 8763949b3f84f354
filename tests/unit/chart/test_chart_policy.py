"""The chart's policy: and networkPolicy: values reach the operator as it parses them, and bad ones stop helm."""

from __future__ import annotations

from typing import Any

import pytest

from fedkube import envvars
from fedkube.operator.netpol import NetworkPolicyConfig, Selector, network_config_from_env
from fedkube.operator.policy import AdminPolicy, TolerationRule, policy_from_env
from tests.support import fixtures
from tests.unit.chart.test_chart import CHART, NAMESPACE, _helm, _one, _render_cached

k8s_tools = fixtures.k8s_tools


def _docs(tools: fixtures.KubeTools, *args: str) -> list[dict[str, Any]]:
    return list(_render_cached(str(tools.helm), "1.35.0", args))


def _operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    [container] = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    env[envvars.NAMESPACE] = NAMESPACE  # the pod's own namespace, which the chart takes from the downward API
    return env


def _netpol_rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in _one(docs, kind)["rules"] if "networking.k8s.io" in r["apiGroups"]]


def test_by_default_the_safe_policy_and_network_policies_with_prometheus_and_kube_dns(
        k8s_tools: fixtures.KubeTools) -> None:
    env = _operator_env(_docs(k8s_tools))
    assert policy_from_env(env) == AdminPolicy()
    assert network_config_from_env(env) == NetworkPolicyConfig(
        NAMESPACE,
        monitoring=Selector({"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"}),
        dns=Selector({"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"}))


def test_policy_values_reach_the_operator(k8s_tools: fixtures.KubeTools) -> None:
    docs = _docs(k8s_tools, "--set-json", 'policy.allowedImagePrefixes=["registry.example.com/ml"]',
                 "--set-json", 'policy.allowedVolumeKinds=["emptyDir","secret"]',
                 "--set-json", 'policy.allowedTolerations=[{"key":"nvidia.com/gpu","effect":"NoSchedule"}]')
    assert policy_from_env(_operator_env(docs)) == AdminPolicy(
        ("registry.example.com/ml",), ("emptyDir", "secret"), (TolerationRule("nvidia.com/gpu", effect="NoSchedule"),))


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_network_policies_off_means_no_config_and_no_rights(k8s_tools: fixtures.KubeTools, scope: str) -> None:
    kind = "ClusterRole" if scope == "cluster" else "Role"
    on = _docs(k8s_tools, "--set", f"scope={scope}")
    assert _netpol_rules(on, kind) == [{"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                                        "verbs": ["get", "create", "patch"]}]
    off = _docs(k8s_tools, "--set", f"scope={scope}", "--set", "networkPolicy.enabled=false")
    assert _netpol_rules(off, kind) == []
    assert network_config_from_env(_operator_env(off)) is None


@pytest.mark.parametrize(("args", "complaint"), [
    (["--set-json", 'policy.allowedVolumeKinds=["hostPath"]'], "allowedVolumeKinds"),
    (["--set-json", 'policy.allowedImages=["x"]'], "allowedImages"),
    (["--set-json", 'policy.allowedTolerations=[{"key":"a","operator":"Maybe"}]'], "operator"),
    (["--set", "networkPolicy.enabled=maybe"], "enabled"),
    (["--set-json", 'networkPolicy.monitoring={"namespace":"mon"}'], "monitoring"),
])
def test_bad_policy_values_stop_helm(k8s_tools: fixtures.KubeTools, args: list[str], complaint: str) -> None:
    proc = _helm(k8s_tools, "template", "fedkube", str(CHART), *args)
    assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr

