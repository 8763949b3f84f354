"""The Helm chart lints, renders for several Kubernetes versions, and renders what the operator needs, no more."""

from __future__ import annotations

import functools
import subprocess
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.support import fixtures

k8s_tools = fixtures.k8s_tools

CHART = fixtures.ROOT / "charts" / "fedkube"
NAMESPACE = "fedkube-system"
KUBE_VERSIONS = ["1.29.0", "1.31.0", "1.35.0"]
CONFIGS: dict[str, list[str]] = {
    "default": [],
    "servicemonitor": ["--set", "metrics.serviceMonitor.enabled=true",
                       "--set", "metrics.serviceMonitor.labels.release=prom",
                       "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true"],
    # Two replicas: kopf peering (its object, RBAC and environment) in either scope.
    "cluster-scope": ["--set", "scope=cluster", "--set", "replicas=2"],
    "two-namespaces": ["--set", "watchNamespaces={ml,research}", "--set", "replicas=2"],
    "site": ["--set", "mode=site"],  # a remote site's cluster: the FLSite operator (test_chart_site.py)
}
# Kinds kubernetes-validate has no schema for; checked by the dedicated tests below instead.
NOT_BUILTIN = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}


def _helm(tools: fixtures.KubeTools, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools.helm), *args], capture_output=True, text=True, timeout=60)


@functools.cache
def _render_cached(helm: str, kube_version: str, extra: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([helm, "template", "fedkube", str(CHART), "--namespace", NAMESPACE, "--include-crds",
                           "--kube-version", kube_version, *extra], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def _render(tools: fixtures.KubeTools, config: str = "default", kube_version: str = "1.35.0") -> list[dict[str, Any]]:
    return list(_render_cached(str(tools.helm), kube_version, tuple(CONFIGS[config])))


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_helm_lint_strict(k8s_tools: fixtures.KubeTools, config: str) -> None:
    proc = _helm(k8s_tools, "lint", "--strict", str(CHART), *CONFIGS[config])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_manifests_validate_strictly(k8s_tools: fixtures.KubeTools, kube_version: str, config: str) -> None:
    docs = _render(k8s_tools, config, kube_version)
    kinds = sorted(d["kind"] for d in docs)
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds
    for doc in docs:
        if doc["kind"] in NOT_BUILTIN:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {kube_version}: {e}")


def test_kubernetes_older_than_1_29_is_refused(k8s_tools: fixtures.KubeTools) -> None:
    proc = _helm(k8s_tools, "template", "fedkube", str(CHART), "--kube-version", "1.28.0")
    assert proc.returncode != 0 and ">=1.29.0" in proc.stderr


@pytest.mark.parametrize(("args", "complaint"), [
    (["--set", "replicas=two"], "/replicas"),
    (["--set-string", "replicas=1"], "/replicas"),
    (["--set", "replicas=3"], "/replicas"),  # 2 is the tested peering pair
    (["--set", "peering.lifetimeSeconds=1"], "/peering/lifetimeSeconds"),
    (["--set", "metrics.prometheusRule.roundDeadline=1hour"], "/metrics/prometheusRule/roundDeadline"),
    (["--set", "scope=everywhere"], "/scope"),
    (["--set", "scope=cluster", "--set", "watchNamespaces={ml}"], "/watchNamespaces"),
    (["--set", "watchNamespaces={ML}"], "/watchNamespaces/0"),
    (["--set", "watchNamespaces={ml,ml}"], "/watchNamespaces"),
    (["--set", "logFormat=xml"], "/logFormat"),
    (["--set", "metrics.port=70000"], "/metrics/port"),
    (["--set", "metrics.serviceMonitor.interval=soon"], "/metrics/serviceMonitor/interval"),
    (["--set", "replica=1"], "'replica' not allowed"),
    (["--set", "image.tagg=v1"], "'tagg' not allowed"),
])
def test_values_schema_rejects_bad_values(k8s_tools: fixtures.KubeTools, args: list[str], complaint: str) -> None:
    for command in (["template", "fedkube"], ["lint", "--strict"]):
        proc = _helm(k8s_tools, *command, str(CHART), *args)
        assert proc.returncode != 0, f"helm {command[0]} accepted {args}"
        assert complaint in proc.stdout + proc.stderr


def _rules(docs: list[dict[str, Any]], kind: str) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for doc in docs if doc["kind"] == kind for rule in doc["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def test_operator_deployment(k8s_tools: fixtures.KubeTools) -> None:
    docs = _render(k8s_tools)
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["fedkube", "operator"]
    assert container["image"] == "ghcr.io/fedkube/fedkube:0.1.0.dev0"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 8080}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["FEDKUBE_METRICS_PORT"] == "9090" and env["FEDKUBE_HEALTH_PORT"] == "8080"
    assert env["FEDKUBE_LOG_FORMAT"] == "json" and env["FEDKUBE_WATCH_NAMESPACES"] == NAMESPACE
    assert env["FEDKUBE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9090"


def test_metrics_service_and_optional_service_monitor(k8s_tools: fixtures.KubeTools) -> None:
    default = _render(k8s_tools)
    assert not [d for d in default if d["kind"] == "ServiceMonitor"], "the ServiceMonitor must be off by default"
    docs = _render(k8s_tools, "servicemonitor")
    service = _one(docs, "Service")
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_chart_installs_the_generated_crd(k8s_tools: fixtures.KubeTools) -> None:
    crds = {d["metadata"]["name"]: d for d in _render(k8s_tools) if d["kind"] == "CustomResourceDefinition"}
    for plural in ("fljobs", "flsites"):  # FLSite: the chart in site mode (Helm's crds/ cannot depend on values)
        source = yaml.safe_load((fixtures.ROOT / "crds" / f"fedkube.dev_{plural}.yaml").read_text())
        assert crds.pop(f"{plural}.fedkube.dev") == source
    assert sorted(crds) == ["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]  # for peering (replicas: 2)


@pytest.mark.parametrize(("config", "kind", "namespaces"), [
    ("default", None, []), ("two-namespaces", "KopfPeering", ["ml", "research"]),
    ("cluster-scope", "ClusterKopfPeering", [None])])
def test_two_replicas_run_with_kopf_peering(k8s_tools: fixtures.KubeTools, config: str, kind: str | None,
                                            namespaces: list[str | None]) -> None:
    docs = _render(k8s_tools, config)
    peerings = [d for d in docs if d["apiVersion"] == "kopf.dev/v1"]
    assert [(d["kind"], d["metadata"].get("namespace")) for d in peerings] == [(kind, ns) for ns in namespaces]
    deployment = _one(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    if kind is None:
        assert deployment["spec"]["strategy"] == {"type": "Recreate"} and "FEDKUBE_PEERING" not in env
    else:
        assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
        assert env["FEDKUBE_PEERING"] == "fedkube" == peerings[0]["metadata"]["name"]
        assert env["FEDKUBE_PEERING_LIFETIME"] == "60"


@pytest.mark.parametrize(("args", "scope_line"), [
    (["--set", "scope=cluster"], "It reconciles FLJobs in every namespace."),
    ([], f"It reconciles FLJobs in namespace {NAMESPACE} only."),
    (["--set", "watchNamespaces={ml,research}"], "It reconciles FLJobs in namespaces ml, research only."),
])
def test_notes_tell_the_user_what_was_installed(k8s_tools: fixtures.KubeTools, args: list[str],
                                                scope_line: str) -> None:
    proc = _helm(k8s_tools, "install", "fedkube", str(CHART), "--dry-run=client", "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert scope_line in notes
    assert "kubectl get flj" in notes and "service fedkube-metrics, port 9090" in notes
