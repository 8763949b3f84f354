"""Real containers: the e2e harness of tests/e2e with every pod run by podman from fedkube's images.

``pods`` is the ``fl`` fixture of tests/e2e/conftest.py (emulated API, the
real operator in kopf, the FLJob CRD) with one difference: the test kubelet
runs each Pod as a podman pod (tests/support/podkubelet.py) from the images
``scripts/build-images.sh`` builds, so the image's entrypoint, user, files,
ports and the pod's securityContext, volumes and Secret modes are the real
ones. The operator polls the server pod's status at its real pod IP.

Tests here carry ``@pytest.mark.containers`` (``pytest -m "not containers"``
skips them). Where podman cannot run, they are skipped and the reason is
printed as a warning; CI (.ci/run) installs podman so they run there.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import kopf
import kubernetes
import pytest
import yaml

from fedkube.operator import handlers
from fedkube.runtime.resolver import LocalResolver
from tests.e2e.conftest import CRD, FL, LogSink
from tests.support import fixtures
from tests.support.kopfrun import running_operator
from tests.support.kubelet import TestKubelet
from tests.support.podkubelet import PodmanBackend, podman_problem

kube = fixtures.kube

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build-images.sh"
IMAGES = ("fedkube", "quickstart-numpy")
BUILD_TIMEOUT_S = 900  # a first build makes the Debian base too (~2 min), then the images


class ContainerLogs(LogSink):
    """The tail of every container's log under the kubelet's directory (printed when a wait fails)."""

    def __init__(self, kubelet_dir: Path, path: Path) -> None:
        super().__init__(path)
        self.kubelet_dir = kubelet_dir

    def tail(self, lines: int = 60) -> str:
        parts = []
        for log in sorted(self.kubelet_dir.glob("*/*/*/log")):
            text = log.read_text(errors="replace").splitlines()[-max(lines // 4, 10):]
            parts.append(f"--- {log.parent.parent.name}/{log.parent.name}\n" + "\n".join(text))
        return "\n".join(parts)


@dataclasses.dataclass
class RealPods:
    """The e2e harness (``fl``), the podman backend its kubelet uses, and that kubelet's directory."""

    fl: FL
    backend: PodmanBackend
    kubelet_dir: Path  # <namespace>/<pod>-<uid8>/volumes/<volume> are the pods' volumes on this machine


@pytest.fixture(scope="session")
def images() -> None:
    """fedkube's images, built (or brought up to date from podman's layer cache) once per session."""
    problem = podman_problem()
    if problem is not None:
        warnings.warn(f"container tests skipped: {problem}", stacklevel=1)
        pytest.skip(f"podman cannot run here: {problem}")
    started = time.monotonic()
    done = subprocess.run([str(BUILD), *IMAGES], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                          env={**os.environ})
    if done.returncode != 0:
        pytest.fail(f"scripts/build-images.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    print(f"images ready in {time.monotonic() - started:.0f} s: {done.stderr.strip()}")


@pytest.fixture
def pods(images: None, kube: fixtures.KubeHandle, tmp_path: Path) -> Iterator[RealPods]:
    """The e2e setup with pods in podman; every pod and the network are removed at the end."""
    ext = kubernetes.client.ApiextensionsV1Api(kube.api_client)
    ext.create_custom_resource_definition(yaml.safe_load(CRD.read_text()))
    core = kubernetes.client.CoreV1Api(kube.api_client)
    run_dir = tmp_path / "run"
    kubelet_dir = tmp_path / "kubelet"
    sink = ContainerLogs(kubelet_dir, tmp_path / "pods.log")
    holds: dict[str, str] = {}
    registry = handlers.register(kopf.OperatorRegistry(), interval=0.3)
    memo = kopf.Memo()
    memo[handlers.Memo.API_CLIENT] = kube.api_client
    memo[handlers.Memo.STATUS_TIMEOUT] = 1.0
    with PodmanBackend(core, run_dir / "volumes") as backend:
        kubelet = TestKubelet(kube.api_client, kubelet_dir, pod_runner=backend.run_pod,
                              hold=lambda pod: holds.get(pod["metadata"]["name"]), stop_grace=3.0)
        backend.env_of = kubelet.container_env
        with kubelet, running_operator(kube.url, registry, memo=memo):
            fl = FL(kube=kube, run_dir=run_dir, resolver=LocalResolver(), holds=holds, sink=sink, pods_started=[])
            yield RealPods(fl=fl, backend=backend, kubelet_dir=kubelet_dir)
