"""The quickstart FLJob in real pods: the operator's pods run by podman from fedkube's images, mutual TLS on."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedkube.operator import builders
from fedkube.server.checkpoint import load_latest
from tests.containers.conftest import RealPods
from tests.e2e.conftest import NAMESPACE, quickstart_job
from tests.e2e.test_lifecycle import _site_data
from tests.support.podkubelet import PodmanBackend, podman

# One xdist worker runs them all (scripts/test.sh --dist loadgroup): one image build per session, and real
# pods of two tests never compete for the two cores at once.
pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(600),  # a first run builds images
              pytest.mark.xdist_group("containers")]

SITES = ("site-a", "site-b")
STALL_TRAINER = Path(__file__).with_name("stall_trainer.py")
CHUNK = 16 << 10


class SidecarScrapes:
    """The last /metrics text of each client pod's sidecar, scraped at its pod IP while the job runs.

    The pods end with the job, so the counters are read on the way rather than after.
    """

    def __init__(self, backend: PodmanBackend, job: str) -> None:
        self.backend, self.job = backend, job
        self.last: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sidecar-scrapes", daemon=True)

    def __enter__(self) -> SidecarScrapes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            for site in SITES:
                ip = self.backend.ip_of(NAMESPACE, f"{self.job}-client-{site}")
                if ip is None:
                    continue
                try:
                    url = f"http://{ip}:{builders.SIDECAR_METRICS_PORT}/metrics"
                    with urllib.request.urlopen(url, timeout=1) as resp:
                        self.last[site] = resp.read().decode()
                except OSError:
                    pass  # not listening yet, or already gone

    def value(self, site: str, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` with ``labels`` in ``site``'s last scrape (0 when none)."""
        total = 0.0
        for line in self.last.get(site, "").splitlines():
            match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
            if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
                total += float(match.group(2))
        return total


def test_quickstart_job_succeeds_in_real_pods_with_mutual_tls(pods: RealPods) -> None:
    fl, backend = pods.fl, pods.backend
    job = quickstart_job("real", sites=SITES, rounds=2, server={"checkpoint": {"enabled": True}})
    assert job["spec"].get("security", {}).get("tls", "enabled") != "disabled"  # mutual TLS: the default
    with SidecarScrapes(backend, "real") as scrapes:
        fl.apply(job)
        status = fl.wait_phase("real", "Succeeded", timeout=180)
    assert status["round"] == 2
    assert {site: c["state"] for site, c in status["clients"].items()} == dict.fromkeys(SITES, "Done")

    # Every container ended 0 as Kubernetes reports it, and the server pod had a pod IP of its own.
    server = fl.core.read_namespaced_pod("real-server", NAMESPACE)
    assert server.status.pod_ip == backend.ip_of(NAMESPACE, "real-server") != "127.0.0.1"
    for name in ("real-server", *(f"real-client-{s}" for s in SITES)):
        pod = fl.core.read_namespaced_pod(name, NAMESPACE)
        assert pod.status.phase == "Succeeded", (name, pod.status)
        for c in (pod.status.init_container_statuses or []) + pod.status.container_statuses:
            assert c.state.terminated.exit_code == 0, (name, c.name, c.state.terminated)

    # The trained model, from the checkpoint the server wrote (as uid 65532) on the job's claim.
    ckpt = load_latest(fl.run_dir / "volumes" / f"{NAMESPACE}-real-checkpoint", "real")
    assert ckpt is not None and ckpt.round == 2
    for site in SITES:
        x, y = _site_data(site)
        trained = float(np.mean((x @ ckpt.model["w"] + ckpt.model["b"] - y) ** 2))
        assert trained < 0.5 * float(np.mean(y**2)), (site, trained)

    # The sidecar and the trainer are two containers of one pod: the trainer reached the sidecar over the
    # pod's shared loopback, the model went down and the result up through it (under TLS the sidecar relays:
    # the site's key never reaches the trainer), and the same-user check let the trainer in.
    for site in SITES:
        assert scrapes.value(site, "fedkube_sidecar_relayed_bytes_total", direction="to_trainer") > 0, site
        assert scrapes.value(site, "fedkube_sidecar_relayed_bytes_total", direction="to_server") > 0, site
        assert scrapes.value(site, "fedkube_sidecar_rejected_local_connections_total") == 0, site



def test_trainer_killed_by_podman_mid_upload_fails_its_site_and_the_job_succeeds(pods: RealPods) -> None:
    # DESIGN.md section 5 (and fault f01 with processes): a trainer that dies before its result was downloaded
    # fails its client (ExitedBeforeDownload); the job goes on while minClients remain. Here the kill is
    # podman's, from outside the container, while the server pulls the third of sixteen chunks.
    fl = pods.fl
    sites = ("site-0", "site-a", "site-b")  # site-0 first by name: the server pulls its result first
    fl.core.create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "stall-trainer"},
                                                     "data": {"stall_trainer.py": STALL_TRAINER.read_text()}})
    job = quickstart_job("kill", sites=sites, rounds=1, min_clients=2, transfer={"chunkBytes": CHUNK})
    trainer = job["spec"]["trainer"]
    trainer["command"] = ["python", "/opt/stall/stall_trainer.py"]
    trainer["env"] = [{"name": "STALL_SIZE", "value": str(16 * CHUNK // 4)}]
    trainer["volumes"] = [{"name": "stall", "configMap": {"name": "stall-trainer"}}]
    trainer["volumeMounts"] = [{"name": "stall", "mountPath": "/opt/stall", "readOnly": True}]
    job["spec"]["clients"][0]["env"] = [{"name": "STALL_AT_ROUND", "value": "1"}]
    fl.apply(job)

    deadline = time.monotonic() + 120
    while not list(pods.kubelet_dir.glob("default/kill-client-site-0-*/volumes/fedkube-work/upload-stalled")):
        if time.monotonic() > deadline:
            pytest.fail(f"site-0 never stalled mid-upload; status {fl.status('kill')}\n{fl.sink.tail()}")
        time.sleep(0.2)
    pod_name = pods.backend.podman_pod_of(NAMESPACE, "kill-client-site-0")
    podman("kill", f"{pod_name}-trainer")

    status = fl.wait_phase("kill", "Succeeded", timeout=120)
    clients = status["clients"]
    assert (clients["site-0"]["state"], clients["site-0"]["reason"]) == ("Failed", "ExitedBeforeDownload"), clients
    assert {clients[s]["state"] for s in ("site-a", "site-b")} == {"Done"}
    pod = fl.core.read_namespaced_pod("kill-client-site-0", NAMESPACE)
    trainer_status = next(c for c in pod.status.container_statuses if c.name == "trainer")
    assert trainer_status.state.terminated.exit_code == 128 + 9, trainer_status  # SIGKILL, as Kubernetes says
