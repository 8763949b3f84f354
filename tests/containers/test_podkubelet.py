"""The podman kubelet's pod logic that needs no podman: stop order and the podman options of a securityContext."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from fedkube.operator import builders
from tests.support.kubelet import ContainerLaunch, LocalPod
from tests.support.podkubelet import PodmanPod, _security_options


@dataclasses.dataclass
class FakeContainer:
    """A container that ends when told to (SIGTERM and SIGKILL alike), recording the order of the requests."""

    name: str
    log: list[str]
    code: int | None = None

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.log.append(self.name)
        self.code = 143

    def kill(self) -> None:
        self.code = 137


def _pod() -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "default"},
            "spec": {"initContainers": [{"name": "sidecar", "image": "i", "restartPolicy": "Always"}],
                     "containers": [{"name": "trainer", "image": "i"}]}}


def test_a_deleted_pod_stops_its_trainer_before_its_sidecar(tmp_path: Path) -> None:
    order: list[str] = []
    started: dict[str, FakeContainer] = {}

    def runner(launch: ContainerLaunch) -> FakeContainer:
        started[launch.container["name"]] = FakeContainer(str(launch.container["name"]), order)
        return started[launch.container["name"]]

    pod = PodmanPod(pod_name="default-p", ip="10.0.0.10", local=LocalPod(_pod(), runner, tmp_path, lambda c: {}))
    pod.step()
    assert set(started) == {"sidecar", "trainer"}

    pod.stop(grace=5)
    assert order == ["trainer"]  # the sidecar keeps serving while the trainer winds down
    pod.step()  # the trainer has exited: now the sidecar goes
    assert order == ["trainer", "sidecar"]
    pod.step()
    assert pod.finished()


def test_the_operators_pod_security_becomes_podmans_options() -> None:
    job_pod = {"securityContext": {"runAsUser": builders.RUN_AS, "runAsGroup": builders.RUN_AS,
                                   "fsGroup": builders.RUN_AS, "runAsNonRoot": True}}
    container = {"securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]}}}
    options = _security_options(job_pod, container)
    pairs = set(itertools.pairwise(options))
    assert ("--user", f"{builders.RUN_AS}:{builders.RUN_AS}") in pairs
    assert ("--group-add", str(builders.RUN_AS)) in pairs  # fsGroup: the group Secret files are readable by
    assert ("--cap-drop", "ALL") in pairs and ("--security-opt", "no-new-privileges") in pairs
    # No tmpfs on /tmp and friends: a kubelet adds none, so a write outside the pod's volumes must fail.
    assert "--read-only" in options and "--read-only-tmpfs=false" in options
