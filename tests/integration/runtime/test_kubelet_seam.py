"""run_pod as the test kubelet's pod runner: pods created in the emulated API run as local processes."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest

from fedkube import envvars
from fedkube.runtime.pod import ApiObjects, PodOptions, PodRun, run_pod
from fedkube.runtime.process import NullSink
from fedkube.runtime.resolver import LocalResolver
from tests.support.fixtures import KubeHandle
from tests.support.kubelet import TestKubelet
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

TRAINER = """
import os, pathlib, socket, time
token = pathlib.Path(os.environ["FEDKUBE_TOKEN_FILE"]).read_text()
host, port = os.environ["FEDKUBE_SERVER_ADDRESS"].split(":")
for _ in range(200):  # the server pod may not be listening yet, as in a cluster
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
open(os.environ["FEDKUBE_TERMINATION_LOG"], "w").write("token " + token)
"""

SERVER = """
import os, socket
s = socket.socket(); s.bind(("127.0.0.1", int(os.environ["FEDKUBE_GRPC_PORT"]))); s.listen()
s.accept()
"""


def _pod(name: str, code: str, env: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "example/x:1",
                    "command": ["python", "-c", code],
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                    "terminationMessagePath": "/dev/termination-log",
                    **spec.pop("container", {}),
                }
            ],
            **spec,
        },
    }


def test_pods_from_the_api_run_through_run_pod_with_secrets_and_services(kube: KubeHandle, tmp_path: Path) -> None:
    import kubernetes

    core = kubernetes.client.CoreV1Api(kube.api_client)
    core.create_namespaced_secret(
        "default",
        {"metadata": {"name": "tok"}, "data": {"token": base64.b64encode(b"s3cret").decode()}},
    )
    service = {"metadata": {"name": "srv"}, "spec": {"selector": {"app": "srv"}, "ports": [{"port": 7070}]}}
    core.create_namespaced_service("default", service)
    server = _pod("srv", SERVER, {envvars.GRPC_PORT: "7070"})
    resolver = LocalResolver()
    # What a kubelet-plus-DNS would do: the Service routes to the pod its selector picks.
    resolver.add_service(
        {**service, "metadata": {"name": "srv", "namespace": "default"}},
        {**server, "metadata": {"name": "srv", "namespace": "default", "labels": {"app": "srv"}}},
    )
    runs: list[PodRun] = []

    def pod_runner(pod: dict[str, Any], directory: Path) -> PodRun:
        options = PodOptions(run_dir=directory, resolver=resolver, objects=ApiObjects(kube.api_client), sink=NullSink())
        run = run_pod(pod, options)
        runs.append(run)
        return run

    with TestKubelet(kube.api_client, tmp_path, pod_runner=pod_runner):
        core.create_namespaced_pod("default", server)
        client = _pod(
            "client",
            TRAINER,
            {
                envvars.SERVER_ADDRESS: "srv.default.svc:7070",
                envvars.TOKEN_FILE: "/var/run/token/token",
                envvars.TERMINATION_LOG: "/dev/termination-log",
            },
            volumes=[{"name": "tok", "secret": {"secretName": "tok"}}],
            container={"volumeMounts": [{"name": "tok", "mountPath": "/var/run/token"}]},
        )
        core.create_namespaced_pod("default", client)
        deadline = time.monotonic() + 40
        phases: dict[str, str] = {}
        while time.monotonic() < deadline:
            phases = {n: core.read_namespaced_pod(n, "default").status.phase for n in ("srv", "client")}
            if all(p in ("Succeeded", "Failed") for p in phases.values()):
                break
            time.sleep(0.1)
        assert phases == {"srv": "Succeeded", "client": "Succeeded"}
        status = core.read_namespaced_pod("client", "default").status.container_statuses[0]
        assert status.state.terminated.exit_code == 0
        assert status.state.terminated.message == "token s3cret"


# Reads the ConfigMap's key through both mounts until the directory mount shows the patched value; every read
# must be a whole file (a torn read would mix values or cut one short).
READER = """
import os, pathlib, time
live, pinned = pathlib.Path(os.environ["LIVE"]), pathlib.Path(os.environ["PINNED"])
seen, deadline = [], time.monotonic() + 10
while time.monotonic() < deadline:
    text = live.read_text()
    word = text[:2] if text == text[:2] * (len(text) // 2) and len(text) == int(os.environ["SIZE"]) else "torn"
    if word not in seen:
        seen.append(word)
    if word != "v1":
        break
    time.sleep(0.005)
pathlib.Path(os.environ["FEDKUBE_TERMINATION_LOG"]).write_text(f"live {seen} pinned {pinned.read_text()[:2]}")
"""


def test_a_patched_config_map_reaches_a_running_pod_whole_but_not_its_sub_path_mount(
        kube: KubeHandle, tmp_path: Path) -> None:
    import kubernetes

    core = kubernetes.client.CoreV1Api(kube.api_client)
    size = 200_000
    core.create_namespaced_config_map("default", {"metadata": {"name": "conf"}, "data": {"value": "v1" * (size // 2)}})

    def pod_runner(pod: dict[str, Any], directory: Path) -> PodRun:
        options = PodOptions(run_dir=directory, resolver=LocalResolver(), objects=ApiObjects(kube.api_client),
                             sink=NullSink())
        return run_pod(pod, options)

    reader = _pod(
        "reader", READER,
        {"LIVE": "/etc/live/value", "PINNED": "/etc/pinned", "SIZE": str(size),
         envvars.TERMINATION_LOG: "/dev/termination-log"},
        volumes=[{"name": "live", "configMap": {"name": "conf"}}, {"name": "pinned", "configMap": {"name": "conf"}}],
        container={"volumeMounts": [{"name": "live", "mountPath": "/etc/live"},
                                    {"name": "pinned", "mountPath": "/etc/pinned", "subPath": "value"}]},
    )
    with TestKubelet(kube.api_client, tmp_path, pod_runner=pod_runner, volume_sync_s=0.2):
        core.create_namespaced_pod("default", reader)
        until(lambda: core.read_namespaced_pod("reader", "default").status.phase == "Running", "reader running")
        core.patch_namespaced_config_map("conf", "default", {"data": {"value": "v2" * (size // 2)}})
        status = until(lambda: core.read_namespaced_pod("reader", "default").status.container_statuses[0].state
                       .terminated, "reader finished", timeout=15)
    assert status.exit_code == 0
    assert status.message == "live ['v1', 'v2'] pinned v1"
