"""The chart's jobDefaults: values reach the operator as the PodDefaults the builders use for every job pod."""

from __future__ import annotations

from fedkube.operator.podspec import PodDefaults, defaults_from_env
from fedkube.spec.model import Resources
from tests.support import fixtures
from tests.unit.chart.test_chart import CHART, _helm, _render_cached
from tests.unit.chart.test_chart_policy import _operator_env

k8s_tools = fixtures.k8s_tools


def _defaults(tools: fixtures.KubeTools, *args: str) -> PodDefaults:
    return defaults_from_env(_operator_env(list(_render_cached(str(tools.helm), "1.35.0", args))))


def test_job_pods_default_to_the_operator_image_and_server_requests(k8s_tools: fixtures.KubeTools) -> None:
    assert _defaults(k8s_tools) == PodDefaults(
        image="ghcr.io/fedkube/fedkube:0.1.0.dev0",
        server_resources=Resources(requests={"cpu": "250m", "memory": "512Mi"}))
    # An air-gapped cluster mirrors the one image: the operator's repository serves the job pods too.
    assert _defaults(k8s_tools, "--set", "image.repository=mirror.example/fedkube", "--set", "image.tag=v7").image \
        == "mirror.example/fedkube:v7"


def test_job_defaults_values_reach_the_operator(k8s_tools: fixtures.KubeTools) -> None:
    got = _defaults(k8s_tools, "--set", "jobDefaults.image.repository=mirror.example/fl",
                    "--set", "jobDefaults.imagePullSecrets[0].name=regcred",
                    "--set", "jobDefaults.serverResources.limits.memory=8Gi",
                    "--set", "jobDefaults.copyLabels={team,cost-center}")
    assert got.image == "mirror.example/fl:0.1.0.dev0"
    assert got.image_pull_secrets == ("regcred",) and got.copy_labels == ("team", "cost-center")
    assert got.server_resources == Resources(requests={"cpu": "250m", "memory": "512Mi"}, limits={"memory": "8Gi"})


def test_bad_job_defaults_stop_helm(k8s_tools: fixtures.KubeTools) -> None:
    for args in (["--set", "jobDefaults.imagePullSecrets[0].nam=regcred"], ["--set", "jobDefaults.imag=x"],
                 ["--set", "policy.allowedServiceAccounts={Not_A_Name}"]):
        proc = _helm(k8s_tools, "template", "fedkube", str(CHART), *args)
        assert proc.returncode != 0, f"helm accepted {args}"
