"""Two ``fedkube operator`` processes with kopf peering against the emulated API: one acts, the other takes over.

The peering lifetime is 3 s here (60 s in the chart), so the standby's takeover after the active one is killed
(SIGKILL: no goodbye, its record has to lapse) takes seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from fedkube.runtime.resolver import free_port
from tests.e2e.conftest import CRD
from tests.e2e.test_operator_process import _get, _phases
from tests.support import fixtures

kube = fixtures.kube
kubeconfig = fixtures.kubeconfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

PEERING_CRDS = fixtures.ROOT / "crds" / "kopf.dev_peerings.yaml"
LIFETIME = 3


def _until(check: Callable[[], Any], what: str, timeout: float, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
    pytest.fail(f"not {what} within {timeout}s\n{tails}")


@contextmanager
def _operator(kubeconfig: Path, log: Path, priority: int) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    health, metrics = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "FEDKUBE_WATCH_NAMESPACES": "default",
           "FEDKUBE_HEALTH_PORT": str(health), "FEDKUBE_METRICS_PORT": str(metrics), "FEDKUBE_LOG_FORMAT": "text",
           "FEDKUBE_PEERING": "fedkube", "FEDKUBE_PEERING_LIFETIME": str(LIFETIME),
           "FEDKUBE_PEERING_PRIORITY": str(priority)}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedkube.operator.main", "--interval", "0.5"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _until(lambda: _get(f"http://127.0.0.1:{health}/healthz") == 200 or proc.poll() is not None,
                   f"operator {log.stem} up", 60, [log])
            assert proc.poll() is None, log.read_text()
            yield proc, metrics
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


def _job(name: str) -> dict[str, Any]:
    return {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": name, "namespace": "default"},
            "spec": {"rounds": 1, "suspend": True, "clients": [{"name": "a"}],
                     "trainer": {"image": "t", "command": ["python", "train.py"]}}}


def test_two_replicas_one_acts_and_the_other_takes_over_when_it_dies(kube: fixtures.KubeHandle, kubeconfig: Path,
                                                                    tmp_path: Path) -> None:
    ext = kubernetes.client.ApiextensionsV1Api(kube.api_client)
    ext.create_custom_resource_definition(yaml.safe_load(CRD.read_text()))
    for crd in yaml.safe_load_all(PEERING_CRDS.read_text()):
        if crd:
            ext.create_custom_resource_definition(crd)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    custom.create_namespaced_custom_object("kopf.dev", "v1", "default", "kopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "fedkube", "namespace": "default"}})

    def phase(name: str) -> str | None:
        obj: Any = custom.get_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", name)
        return (obj.get("status") or {}).get("phase")

    logs = [tmp_path / "active.log", tmp_path / "standby.log"]
    with _operator(kubeconfig, logs[0], priority=200) as (active, active_metrics), \
            _operator(kubeconfig, logs[1], priority=100) as (standby, standby_metrics):
        # Both keep a record in the peering object; kopf starts a replica paused until it has seen the peers, so
        # the standby never resumes (and never logs a pause) while the active one's record is fresh.
        _until(lambda: sorted(p["priority"] for p in (custom.get_namespaced_custom_object(
            "kopf.dev", "v1", "default", "kopfpeerings", "fedkube").get("status") or {}).values()) == [100, 200],
            "both replicas peered", 30, logs)
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _job("first"))
        _until(lambda: phase("first") == "Suspended", "job first reconciled", 30, logs)
        assert _phases(active_metrics)["Suspended"] == 1
        assert _phases(standby_metrics)["Suspended"] == 0  # the standby stayed quiet

        os.killpg(active.pid, signal.SIGKILL)  # a crash: its peering record stays until it lapses
        active.wait(5)
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _job("second"))
        _until(lambda: phase("second") == "Suspended", "job second reconciled by the standby", 30, logs)
        assert "Resuming operations after the pause" in logs[1].read_text()
        # It took over the first job too: un-suspending it makes the standby create its pods.
        custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "first",
                                              {"spec": {"suspend": False}})
        _until(lambda: phase("first") in ("Pending", "Deploying"), "job first resumed by the standby", 30, logs)
        pods = kubernetes.client.CoreV1Api(kube.api_client).list_namespaced_pod(
            "default", label_selector="fedkube.dev/job=first").items
        assert sorted(p.metadata.name for p in pods) == ["first-client-a", "first-server"]
        assert standby.poll() is None
