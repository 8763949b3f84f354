"""The test kubelet runs pods from the emulated API as processes and reports their status."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from tests.support import fixtures
from tests.support.kubelet import TestKubelet, which_python
from tests.support.waiting import until

kube = fixtures.kube
PY = which_python()

# A native sidecar that runs until SIGTERM and says so on the way out; it records its pid once its handler is in
# place, which is when the main container may finish (as a trainer waits to reach its sidecar): a loaded machine
# can start the sidecar's Python slower than the main container runs, and a SIGTERM before the handler is a -15.
SIDECAR = """
import os, pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
pathlib.Path(os.environ["PID_FILE"]).write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""
# The main container: reports its env through the termination message, exits with EXIT_CODE.
MAIN = """
import os, pathlib, sys, time
deadline = time.monotonic() + 20
while os.environ.get("SIDECAR_PID_FILE") and not os.path.exists(os.environ["SIDECAR_PID_FILE"]):
    assert time.monotonic() < deadline, "the sidecar never started"
    time.sleep(0.02)
msg = " ".join(f"{k}={os.environ.get(k, '')}" for k in ("POD", "TOKEN", "PLAIN"))
pathlib.Path(os.environ["MSG_FILE"]).write_text(msg)
print("main says hello", flush=True)
sys.exit(int(os.environ["EXIT_CODE"]))
"""


def _pod(name: str, exit_code: int = 0, *, sidecar_pid_file: Path | None = None,
         init: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    init_containers = list(init or [])
    if sidecar_pid_file is not None:
        init_containers.append({"name": "sidecar", "image": "fedkube", "restartPolicy": "Always",
                                "command": [PY, "-c", SIDECAR],
                                "env": [{"name": "PID_FILE", "value": str(sidecar_pid_file)}]})
    sidecar_env = [{"name": "SIDECAR_PID_FILE", "value": str(sidecar_pid_file)}] if sidecar_pid_file else []
    main = {"name": "trainer", "image": "trainer", "command": [PY, "-c"], "args": [MAIN],
            "terminationMessagePath": "/dev/termination-log",
            "env": [{"name": "EXIT_CODE", "value": str(exit_code)},
                    {"name": "MSG_FILE", "value": "/dev/termination-log"},
                    {"name": "PLAIN", "value": "p"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
                    *sidecar_env]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "initContainers": init_containers, "containers": [main]}}


def _wait_for(kube: fixtures.KubeHandle, name: str, check: Callable[[Mapping[str, Any]], bool],
              timeout: float = 20.0) -> dict[str, Any]:
    core = kubernetes.client.CoreV1Api(kube.api_client)

    def matched() -> dict[str, Any] | None:
        status: dict[str, Any] = core.read_namespaced_pod(name, "default").to_dict()["status"] or {}
        return status if check(status) else None

    return until(matched, f"pod {name}'s status to match", timeout=timeout,
                 context=lambda: f"last: {core.read_namespaced_pod(name, 'default').to_dict()['status']}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def env(kube: fixtures.KubeHandle, tmp_path: Path) -> Iterator[tuple[fixtures.KubeHandle, Any]]:
    core: Any = kubernetes.client.CoreV1Api(kube.api_client)
    secret: dict[str, Any] = {"metadata": {"name": "tok"}, "stringData": {"token": "s3cret"}}
    core.create_namespaced_secret("default", secret)
    yield kube, core


def test_pod_with_sidecar_runs_to_succeeded(env: tuple[fixtures.KubeHandle, Any], tmp_path: Path) -> None:
    kube, core = env
    pid_file = tmp_path / "sidecar.pid"
    with TestKubelet(kube.api_client, tmp_path / "kubelet"):
        core.create_namespaced_pod("default", _pod("ok", sidecar_pid_file=pid_file))
        status = _wait_for(kube, "ok", lambda s: s.get("phase") == "Succeeded")
    assert status["pod_ip"] == "127.0.0.1"
    main = status["container_statuses"][0]["state"]["terminated"]
    assert (main["exit_code"], main["reason"]) == (0, "Completed")
    assert main["message"] == "POD=ok TOKEN=s3cret PLAIN=p"
    sidecar = status["init_container_statuses"][0]
    assert sidecar["name"] == "sidecar" and sidecar["state"]["terminated"]["exit_code"] == 0
    assert not _alive(int(pid_file.read_text())), "the sidecar outlived its pod"
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready == {"PodScheduled": "True", "Initialized": "True", "ContainersReady": "False", "Ready": "False"}


def test_running_pod_is_ready_and_failure_reports_exit_code(env: tuple[fixtures.KubeHandle, Any],
                                                            tmp_path: Path) -> None:
    kube, core = env
    slow_init = {"name": "setup", "image": "x", "command": [PY, "-c", "import time; time.sleep(0.3)"]}
    pod = _pod("bad", exit_code=3, init=[slow_init])
    # keep the main container running for a moment so the Running/Ready state is observable
    pod["spec"]["containers"][0]["args"] = ["import time; time.sleep(1.0)\n" + MAIN]
    with TestKubelet(kube.api_client, tmp_path / "kubelet"):
        core.create_namespaced_pod("default", pod)
        running = _wait_for(kube, "bad", lambda s: s.get("phase") == "Running" and any(
            c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions") or []))
        assert running["init_container_statuses"][0]["state"]["terminated"]["exit_code"] == 0
        status = _wait_for(kube, "bad", lambda s: s.get("phase") in ("Succeeded", "Failed"))
    assert status["phase"] == "Failed"
    terminated = status["container_statuses"][0]["state"]["terminated"]
    assert (terminated["exit_code"], terminated["reason"]) == (3, "Error")


def test_failed_init_container_fails_the_pod(env: tuple[fixtures.KubeHandle, Any], tmp_path: Path) -> None:
    kube, core = env
    bad_init = {"name": "setup", "image": "x", "command": [PY, "-c", "print('no data'); raise SystemExit(2)"],
                "terminationMessagePolicy": "FallbackToLogsOnError"}
    with TestKubelet(kube.api_client, tmp_path / "kubelet"):
        core.create_namespaced_pod("default", _pod("initfail", init=[bad_init]))
        status = _wait_for(kube, "initfail", lambda s: s.get("phase") in ("Succeeded", "Failed"))
    assert status["phase"] == "Failed"
    init = status["init_container_statuses"][0]["state"]["terminated"]
    assert init["exit_code"] == 2 and init["message"] == "no data"
    assert "waiting" in status["container_statuses"][0]["state"], "the main container must never start"


def test_held_pod_stays_pending_unschedulable_until_released(env: tuple[fixtures.KubeHandle, Any],
                                                             tmp_path: Path) -> None:
    kube, core = env
    why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."

    def hold(pod: Mapping[str, Any]) -> str | None:
        return why if pod["metadata"]["name"] == "stuck" else None

    with TestKubelet(kube.api_client, tmp_path / "kubelet", hold=hold) as kubelet:
        core.create_namespaced_pod("default", _pod("stuck"))
        core.create_namespaced_pod("default", _pod("fine"))
        _wait_for(kube, "fine", lambda s: s.get("phase") == "Succeeded")
        status = _wait_for(kube, "stuck", lambda s: bool(s.get("conditions")))
        assert status["phase"] == "Pending"
        [cond] = status["conditions"]
        assert (cond["type"], cond["status"], cond["reason"], cond["message"]) == (
            "PodScheduled", "False", "Unschedulable", why)
        kubelet.release("default", "stuck")
        _wait_for(kube, "stuck", lambda s: s.get("phase") == "Succeeded")


def test_pod_waits_for_a_missing_secret_like_a_kubelet(env: tuple[fixtures.KubeHandle, Any],
                                                       tmp_path: Path) -> None:
    kube, core = env
    pod = _pod("needs-secret")
    [token] = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "TOKEN"]
    token["valueFrom"]["secretKeyRef"]["name"] = "later"  # a Secret that does not exist yet
    with TestKubelet(kube.api_client, tmp_path / "kubelet"):
        core.create_namespaced_pod("default", pod)
        status = _wait_for(kube, "needs-secret", lambda s: bool(s.get("container_statuses")))
        assert status["phase"] == "Pending"
        waiting = status["container_statuses"][0]["state"]["waiting"]
        assert waiting["reason"] == "CreateContainerConfigError" and "'later' not found" in waiting["message"]
        core.create_namespaced_secret("default", {"metadata": {"name": "later"}, "stringData": {"token": "t"}})
        _wait_for(kube, "needs-secret", lambda s: s.get("phase") == "Succeeded")


def test_deleting_a_pod_stops_its_processes(env: tuple[fixtures.KubeHandle, Any], tmp_path: Path) -> None:
    kube, core = env
    pid_file = tmp_path / "sidecar.pid"
    pod = _pod("doomed", sidecar_pid_file=pid_file)
    pod["spec"]["containers"][0]["command"] = [PY, "-c", "import time; time.sleep(60)"]
    pod["spec"]["containers"][0]["args"] = []
    with TestKubelet(kube.api_client, tmp_path / "kubelet", stop_grace=2.0):
        core.create_namespaced_pod("default", pod)
        _wait_for(kube, "doomed", lambda s: s.get("phase") == "Running")
        until(pid_file.exists, "the sidecar's pid file")
        pid = int(pid_file.read_text())
        core.delete_namespaced_pod("doomed", "default")
        until(lambda: not _alive(pid), "the deleted pod's sidecar to stop")


def test_container_without_command_fails_with_a_clear_message(env: tuple[fixtures.KubeHandle, Any],
                                                              tmp_path: Path) -> None:
    kube, core = env
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nocmd"},
           "spec": {"containers": [{"name": "main", "image": "busybox"}]}}
    with TestKubelet(kube.api_client, tmp_path / "kubelet"):
        core.create_namespaced_pod("default", pod)
        status = _wait_for(kube, "nocmd", lambda s: s.get("phase") == "Failed")
    terminated = status["container_statuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "StartError" and "has no command" in terminated["message"]


def test_kopf_operator_and_kubelet_together(env: tuple[fixtures.KubeHandle, Any], tmp_path: Path) -> None:
    """The chain the e2e tests rely on: kopf creates a pod, the kubelet runs it, kopf sees it finish."""
    import kopf

    from tests.support.kopfrun import running_operator

    kube, core = env
    kube.apply_crd()
    registry = kopf.OperatorRegistry()

    @kopf.on.create("fedkube.dev", "v1alpha1", "fljobs", registry=registry)
    def create(body: Any, name: str, namespace: str | None, patch: Any, **_: Any) -> None:
        pod = _pod(f"{name}-server")
        pod["metadata"]["labels"] = {"fedkube.dev/job": name}
        kopf.adopt(pod, owner=body)
        core.create_namespaced_pod(namespace, pod)
        patch.status["phase"] = "Running"

    @kopf.on.field("", "v1", "pods", field="status.phase", labels={"fedkube.dev/job": kopf.PRESENT},
                   registry=registry)
    def pod_phase(new: Any, labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
        if new in ("Succeeded", "Failed") and namespace is not None:
            kubernetes.client.CustomObjectsApi(kube.api_client).patch_namespaced_custom_object_status(
                "fedkube.dev", "v1alpha1", namespace, "fljobs", labels["fedkube.dev/job"], {"status": {"phase": new}})

    custom: Any = kubernetes.client.CustomObjectsApi(kube.api_client)
    with TestKubelet(kube.api_client, tmp_path / "kubelet"), running_operator(kube.url, registry):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", {
            "apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "chain"}, "spec": {}})
        until(lambda: (custom.get_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "chain")
                       .get("status") or {}).get("phase") == "Succeeded", "job chain Succeeded", timeout=20)
        custom.delete_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "chain")
        assert core.list_namespaced_pod("default").items == [], "the job's pod was not garbage-collected"
