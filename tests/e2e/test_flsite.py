"""A remote site run by its own cluster: two emulated Kubernetes APIs, the server's operator and the site's.

The server cluster (the ``fl`` harness) runs an FLJob with one in-cluster site and one remote site. The site
cluster is a second emulated API with the FLSite CRD, the site operator (FLSite handlers) and a kubelet of its own.
The site admin puts the job owner's join bundle into a Secret and creates an FLSite with the site's own trainer;
the site operator enrolls and runs the client pod, which dials the server's exposed Service. Both kubelets share
one resolver, which stands for the network between the clusters: the bundle's address (the exposed Service's
DNS name, as ``externalAddresses`` say) reaches the server pod. The operator itself runs in the test process,
outside that network, so its enrollment dial is mapped to the server pod's local port (the memo seam).
One job, four checks: an FLSite accepting the CA joins, its status follows the rounds (its sidecar's view) and the
job Succeeds; one refusing the CA never enrolls; one whose maxRounds is below the job's rounds enrolls, refuses the
job's terms before any task (Refused, the term named; PolicyRefused at the server), and once its admin raises
maxRounds the site operator replaces its pod and the site joins after all and delivers; a fourth site's FLSite
deleted mid-job leaves the job as Withdrawn (not Lost, not TrainerExited) while it goes on above minClients.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
import yaml

from fedkube import envvars
from fedkube.operator.site import handlers as site_handlers
from fedkube.runtime.pod import SIDECAR_EXIT_ON_STOP, PodOptions, PodRun, run_pod
from fedkube.security import enroll
from fedkube.spec.remote import DEFAULT_ENROLL_PORT
from fedkube.spec.site import API_GROUP, API_VERSION_NAME, PLURAL
from tests.e2e.conftest import FL, INTERVAL, NAMESPACE, QUICKSTART, ApiObjects, LogSink, quickstart_job
from tests.support.kopfrun import running_operator
from tests.support.kubeapi import EmulatedCluster
from tests.support.kubelet import TestKubelet
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]
SITE_CRD = ROOT / "crds" / "fedkube.dev_flsites.yaml"
JOB = "far"
EXPOSED = f"{JOB}-remote.{NAMESPACE}.svc.cluster.local"  # the address the bundle names; the shared resolver's
SITE_NS = "hospital"


class SiteCluster:
    def __init__(self, client: Any, restart_operator: Callable[[], None]) -> None:
        self.client = client
        self.restart_operator = restart_operator  # a new operator process: fresh registry and memory
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def flsite(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION_NAME, SITE_NS, PLURAL, name))


@pytest.fixture
def site_cluster(fl: FL, tmp_path: Path) -> Iterator[SiteCluster]:
    """The second cluster: its own API, kubelet and site operator; the network (resolver) shared with ``fl``."""
    with EmulatedCluster() as cluster:
        client = cluster.api_client()
        kubernetes.client.ApiextensionsV1Api(client).create_custom_resource_definition(
            yaml.safe_load(SITE_CRD.read_text()))
        kubernetes.client.CoreV1Api(client).create_namespace({"metadata": {"name": SITE_NS}})
        objects = ApiObjects(kubernetes.client.CoreV1Api(client))
        sink = LogSink(tmp_path / "site-pods.log")

        runs: dict[str, PodRun] = {}

        def pod_runner(pod: dict[str, Any], directory: Path) -> PodRun:
            name = pod["metadata"]["name"]
            if name in runs:
                # A pod made again under the same name (a refused one replaced) shares its predecessor's
                # directory here, unlike a kubelet's per-uid one, as in the server cluster's runner (conftest):
                # let that one's teardown (which removes its Secret files) end, and drop its termination message.
                runs[name].wait(timeout=15)
                shutil.rmtree(tmp_path / "site-run" / "pods" / name, ignore_errors=True)
            options = PodOptions(run_dir=tmp_path / "site-run", resolver=fl.resolver, objects=objects, sink=sink,
                                 base_dir=QUICKSTART, extra_env={SIDECAR_EXIT_ON_STOP: "1"}, sidecar_grace_s=3.0,
                                 stop_grace_s=3.0)  # fmt: skip
            runs[name] = run = run_pod(pod, options)
            return run

        def enroll_address(bundle: enroll.JoinBundle) -> tuple[str, int]:
            return "127.0.0.1", fl.resolver.local_port(f"{NAMESPACE}/{JOB}-server", bundle.enroll_port)

        def sidecar_url(pod: dict[str, Any]) -> str | None:
            key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
            try:
                return f"http://127.0.0.1:{fl.resolver.local_port(key, envvars.DEFAULT_SITE_STATUS_PORT)}"
            except Exception:  # not reported yet
                return None

        operator = contextlib.ExitStack()

        def start_operator() -> None:
            memo = kopf.Memo()
            memo[site_handlers.Memo.API_CLIENT] = client
            memo[site_handlers.ENROLL_ADDRESS] = enroll_address
            memo[site_handlers.SIDECAR_URL] = sidecar_url
            registry = site_handlers.register(kopf.OperatorRegistry(), interval=INTERVAL)
            operator.enter_context(running_operator(cluster.url, registry, memo=memo))

        def restart_operator() -> None:
            operator.close()
            start_operator()

        try:
            with TestKubelet(client, tmp_path / "site-kubelet", pod_runner=pod_runner,  # type: ignore[arg-type]
                             stop_grace=3.0), operator:
                start_operator()
                yield SiteCluster(client, restart_operator)
        finally:
            client.close()


def _enroll_listening(fl: FL) -> bool:
    if f"{JOB}-server" not in fl.pods_started:
        return False
    try:
        port = fl.resolver.local_port(f"{NAMESPACE}/{JOB}-server", DEFAULT_ENROLL_PORT)
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except Exception:  # not listening yet, or its port not reported yet
        return False
    return True


def _wait(what: str, probe: Any, fl: FL, timeout: float = 40.0, more: Any = None) -> Any:
    return until(probe, what, timeout, interval=0.1, context=lambda: (
        f"{more() if more else ''}\nFLJob status: {fl.status(JOB)}\npods:\n{fl.sink.tail()}"))


def _flsite(name: str, ca: str, bundle_secret: str, max_rounds: int = 5) -> dict[str, Any]:
    trainer = yaml.safe_load((QUICKSTART / "fljob.yaml").read_text())["spec"]["trainer"]
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION_NAME}", "kind": "FLSite",
        "metadata": {"name": name, "namespace": SITE_NS},
        "spec": {"joinBundleSecretRef": {"name": bundle_secret},
                 "trainer": {k: trainer[k] for k in ("image", "command", "workingDir")},
                 "policy": {"acceptedCaFingerprints": [ca], "maxRounds": max_rounds}},
    }  # fmt: skip


def test_a_site_cluster_joins_with_an_flsite_refuses_a_foreign_ca_and_withdraws(
        fl: FL, site_cluster: SiteCluster) -> None:
    # registrationSeconds 60: round 1 waits for site-w, whose FLSite comes once site-p rejoined (bounded margin).
    job = quickstart_job(JOB, sites=("site-a", "site-r", "site-w", "site-p"), min_clients=2, rounds=3,
                         timeouts={"registrationSeconds": 60}, server={
        # LoadBalancer, not NodePort: a node port is not something the test network can dial (test_remote_site
        # covers NodePort with fedkube join's port flags), and the bundle carries the Service ports as they are.
        "expose": {"type": "LoadBalancer", "externalAddresses": [EXPOSED]}})
    job["spec"]["clients"] = [{"name": "site-a"}, {"name": "site-r", "remote": True},
                              {"name": "site-w", "remote": True}, {"name": "site-p", "remote": True}]
    fl.apply(job)
    secret = _wait("join bundle", lambda: _secret(fl, f"{JOB}-join-site-r"), fl)
    bundle = enroll.JoinBundle.from_text(base64.b64decode(secret["bundle.json"]).decode())
    # The site admin stores the bundle as it came, in the site's own namespace.
    site_cluster.core.create_namespaced_secret(SITE_NS, {"metadata": {"name": "far-join"}, "data": secret})
    for site in ("w", "p"):
        site_cluster.core.create_namespaced_secret(SITE_NS, {"metadata": {"name": f"far-join-{site}"},
                                                             "data": _secret(fl, f"{JOB}-join-site-{site}")})
    _wait("the server's enrollment port", lambda: _enroll_listening(fl), fl)
    # A second FLSite that accepts another CA only: refused, it never enrolls nor runs a pod.
    other = "sha256:" + "0" * 64
    site_cluster.custom.create_namespaced_custom_object(API_GROUP, API_VERSION_NAME, SITE_NS, PLURAL,
                                                        _flsite("wary", other, "far-join"))
    site_cluster.custom.create_namespaced_custom_object(API_GROUP, API_VERSION_NAME, SITE_NS, PLURAL,
                                                        _flsite("far-r", bundle.ca_sha256, "far-join"))
    # A site whose admin accepts 2 rounds at most: it enrolls, then refuses the job's 3 before any task.
    site_cluster.custom.create_namespaced_custom_object(API_GROUP, API_VERSION_NAME, SITE_NS, PLURAL,
                                                        _flsite("far-p", bundle.ca_sha256, "far-join-p", 2))
    tight = _wait("FLSite far-p Refused", lambda: (site_cluster.flsite("far-p").get("status") or {}).get("phase")
                  == "Refused" and site_cluster.flsite("far-p")["status"], fl,
                  more=lambda: f"FLSite far-p: {site_cluster.flsite('far-p')}")
    assert "maxRounds (FLSite hospital/far-p spec.policy) is 2" in tight["lastError"], tight
    assert any(c["type"] == "Refused" and c["reason"] == "RoundsNotAccepted" for c in tight["conditions"]), tight
    assert tight["serverView"] == {"state": "Refused", "reason": "PolicyRefused"}, tight
    refused = _wait("site-p PolicyRefused at the server", lambda: (fl.status(JOB).get("clients") or {}).get(
        "site-p", {}).get("reason") == "PolicyRefused" and fl.status(JOB)["clients"]["site-p"], fl)
    assert refused["state"] == "Withdrawn" and "the job asks 3 rounds" in refused["message"], refused
    refused_uid = site_cluster.core.read_namespaced_pod("far-p-client", SITE_NS).metadata.uid
    # Its admin accepts the job's rounds after all: the site operator replaces the refused pod, the site joins.
    site_cluster.custom.patch_namespaced_custom_object(API_GROUP, API_VERSION_NAME, SITE_NS, PLURAL, "far-p",
                                                       {"spec": {"policy": {"maxRounds": 5}}})
    _wait("site-p registered again", lambda: (fl.status(JOB).get("clients") or {}).get("site-p", {}).get(
        "state") in ("Registered", "Training", "Uploading", "Done"), fl,
        more=lambda: f"FLSite far-p: {site_cluster.flsite('far-p')}")
    site_cluster.custom.create_namespaced_custom_object(API_GROUP, API_VERSION_NAME, SITE_NS, PLURAL,
                                                        _flsite("far-w", bundle.ca_sha256, "far-join-w"))
    # The third site's admin withdraws mid-job: the job goes on above minClients.
    _wait("site-w training", lambda: (fl.status(JOB).get("clients") or {}).get("site-w", {}).get("state")
          in ("Training", "Uploading", "Done"), fl)
    # The running site's FLSite shows where it stands at the server, fed by its sidecar.
    _wait("far-r's round in its FLSite status", lambda: (site_cluster.flsite("far-r").get("status") or {}).get(
        "round"), fl, more=lambda: f"FLSite far-r: {site_cluster.flsite('far-r')}")
    # The site operator restarts mid-round (a new process, nothing in memory): the running pods are left alone
    # and nothing enrolls again (the join tokens are spent: a second enrollment would be refused as replayed).
    running = {"far-r": site_cluster.core.read_namespaced_pod("far-r-client", SITE_NS).metadata.uid}
    site_cluster.restart_operator()
    site_cluster.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION_NAME, SITE_NS, PLURAL, "far-w")

    status = fl.wait_phase(JOB, "Succeeded", timeout=90)
    # The withdrawn site left by its own decision: the site operator asked its sidecar to leave before the pod went.
    withdrawn = status["clients"]["site-w"]
    assert (withdrawn["state"], withdrawn["reason"]) == ("Withdrawn", "Withdrawn"), withdrawn
    assert "far-w was deleted by the site's admin" in withdrawn["message"]
    rejoined = status["clients"]["site-p"]
    assert rejoined["state"] == "Done", rejoined  # a result of its own confirmed: it took part
    assert {s: status["clients"][s]["state"] for s in ("site-a", "site-r")} == {"site-a": "Done", "site-r": "Done"}
    site = _wait("FLSite Succeeded", lambda: (site_cluster.flsite("far-r").get("status") or {}).get("phase")
                 == "Succeeded" and site_cluster.flsite("far-r")["status"], fl,
                 more=lambda: f"FLSite far-r: {site_cluster.flsite('far-r')}\npods: "
                 f"{[(p.metadata.name, p.status.phase) for p in site_cluster.core.list_namespaced_pod(SITE_NS).items]}")
    assert site["job"] == f"{NAMESPACE}/{JOB}" and site["site"] == "site-r" and site["pod"] == "far-r-client"
    assert site["round"] == 3 and site["serverView"] == {"state": "Stopped", "reason": "Succeeded"}, site
    assert site["certNotAfter"] == status["clients"]["site-r"]["certNotAfter"]
    tls = site_cluster.core.read_namespaced_secret("far-r-tls", SITE_NS)
    assert tls.type == "kubernetes.io/tls" and tls.metadata.owner_references[0].name == "far-r"
    pod = site_cluster.core.read_namespaced_pod("far-r-client", SITE_NS)
    assert pod.spec.containers[0].image == job["spec"]["trainer"]["image"]
    assert pod.metadata.uid == running["far-r"], "the restarted site operator replaced a running pod"

    accepted = _wait("FLSite far-p Succeeded", lambda: (site_cluster.flsite("far-p").get("status") or {}).get(
        "phase") == "Succeeded" and site_cluster.flsite("far-p")["status"], fl,
        more=lambda: f"FLSite far-p: {site_cluster.flsite('far-p')}")
    assert any(c["type"] == "Refused" and c["status"] == "False" and c["reason"] == "PolicyChanged"
               for c in accepted["conditions"]), accepted
    assert accepted["round"] == 3 and accepted["serverView"] == {"state": "Stopped", "reason": "Succeeded"}, accepted
    assert site_cluster.core.read_namespaced_pod("far-p-client", SITE_NS).metadata.uid != refused_uid
    events = site_cluster.core.list_namespaced_event(SITE_NS, field_selector="involvedObject.name=far-p").items
    assert [e.reason for e in events].count("PolicyChanged") == 1, [(e.reason, e.message) for e in events]

    wary = site_cluster.flsite("wary")["status"]
    assert wary["phase"] == "Refused" and wary["caSha256"] == bundle.ca_sha256
    assert any(c["type"] == "Refused" and c["reason"] == "CANotAccepted" for c in wary["conditions"])
    names = [p.metadata.name for p in site_cluster.core.list_namespaced_pod(SITE_NS).items]
    assert "wary-client" not in names
    secrets = [s.metadata.name for s in site_cluster.core.list_namespaced_secret(SITE_NS).items]
    assert "wary-tls" not in secrets


def _secret(fl: FL, name: str) -> dict[str, str] | None:
    try:
        return dict(fl.core.read_namespaced_secret(name, NAMESPACE).data)
    except kubernetes.client.exceptions.ApiException:
        return None

