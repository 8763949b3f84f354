"""spec.revokedSites on a running job: the operator propagates it into the server's spec ConfigMap, for good.

A real operator against the emulated API (which runs no CEL, like any API server: the list is a mutable field).
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes
import pytest

from fedkube.operator import edits, revoking
from fedkube.spec.load import parse_job
from tests.support import fixtures
from tests.support.waiting import until
from tests.unit.operator.test_handlers import _crd, _doc, _operator, _status

kube = fixtures.kube

pytestmark = pytest.mark.timeout(60)


def test_a_revocation_reaches_the_servers_configmap_and_dropping_the_name_readmits_nobody(
    kube: fixtures.KubeHandle,
) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    core = kubernetes.client.CoreV1Api(kube.api_client)

    def status() -> dict[str, Any]:
        return _status(custom, "rev")

    def patch(spec: dict[str, Any]) -> None:
        custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "rev", {"spec": spec})

    def served() -> list[str]:
        doc = json.loads(core.read_namespaced_config_map("rev-spec", "default").data["job.json"])
        return list(doc["spec"].get("revokedSites") or [])

    sites = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("rev", clients=sites, minClients=1, revokedSites=["c"]))
        until(lambda: status().get("revokedSites") == ["c"], "c in status.revokedSites")
        assert served() == ["c"]
        pods = {p.metadata.name for p in core.list_namespaced_pod("default").items}
        assert pods == {"rev-server", "rev-client-a", "rev-client-b"}  # a revoked site gets no pod

        patch({"revokedSites": ["b"]})  # a merge patch replaces the list: c drops out of the spec here
        until(lambda: served() == ["b", "c"], "b added to the server's spec ConfigMap, c kept")
        until(lambda: status().get("revokedSites") == ["b", "c"], "b and c in status.revokedSites")
        now = status()
        assert now["observedGeneration"] == 2
        assert not any(c["type"] == "SpecChangeRejected" and c["status"] == "True" for c in now["conditions"])
        events = core.list_namespaced_event("default", field_selector="involvedObject.name=rev").items
        assert [e.type for e in events if e.reason == revoking.REASON_REVOKED] == ["Warning", "Warning"]

        patch({"revokedSites": None})  # a silent re-admit is what this must not be
        until(lambda: status().get("observedGeneration") == 3, "the operator looked at generation 3")
        assert served() == ["b", "c"] and status()["revokedSites"] == ["b", "c"]


def test_the_effective_spec_keeps_every_propagated_revocation_and_update_reports_only_new_ones() -> None:
    accepted = {"rounds": 2, "clients": [{"name": "a"}, {"name": "b"}]}
    status = {edits.ACCEPTED_SPEC: accepted, "revokedSites": ["b"]}
    assert edits.effective_spec({**accepted, "revokedSites": ["a"]}, status)["revokedSites"] == ["a", "b"]
    assert edits.effective_spec(accepted, status)["revokedSites"] == ["b"]
    assert edits.rejected_fields({**accepted, "revokedSites": ["a"]}, status) == []
    job = parse_job(_doc("rev", revokedSites=["b"]))
    assert revoking.update(job, status) == ({}, [])
    fields, events = revoking.update(parse_job(_doc("rev", revokedSites=["a", "b", "zz"])), status)
    assert fields == {"revokedSites": ["a", "b"]} and "site(s) a revoked" in events[0].message


def test_once_the_server_reports_a_site_revoked_its_pod_goes_and_the_status_says_revoked() -> None:
    from fedkube.operator import status as st
    from fedkube.status import ClientStatus, JobStatus, Phase
    from tests.unit.operator.test_status import T0, _job, _pod

    job = _job(("a", "b", "c"), 2, revokedSites=["c"])
    pods = {s: _pod(f"job-client-{s}") for s in "abc"}
    live = JobStatus(job="job", phase=Phase.RUNNING, round=1, rounds=3, clients=[
        ClientStatus("a", "Training"), ClientStatus("b", "Training"), ClientStatus("c", "Failed", "Revoked")])
    d = st.decide(job, {"phase": "Running"}, st.Observation(T0 + 5, _pod("job-server"), pods, live))
    assert (d.status["clients"]["c"]["state"], d.status["clients"]["c"]["reason"]) == ("Failed", "Revoked")
    assert d.delete_pods == ["job-client-c"] and d.status["phase"] == "Running"
    assert [e.reason for e in d.events if e.type == "Warning"] == ["Revoked"]


def _kueue_counts(job: Any) -> dict[str, str]:
    """Pod name -> the Kueue group count it announces, for the pods the operator creates (revoked sites get none)."""
    from fedkube.operator import builders
    from fedkube.operator.certificates import TlsPlaceholder

    revoked = set(job.spec.revoked_sites or ())
    pods = [o for o in builders.build_all(job, tokens={c.name: "t" for c in job.spec.clients}, tls=TlsPlaceholder())
            if o["kind"] == "Pod" and o["metadata"]["labels"].get("fedkube.dev/site") not in revoked]
    return {p["metadata"]["name"]: p["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] for p in pods}


def test_the_kueue_group_counts_the_pods_made_at_creation_and_keeps_that_count_after_a_later_revocation() -> None:
    from fedkube.operator import handlers

    sites = [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "r", "remote": True}]
    created = _doc("rev", clients=sites, minClients=1, queueName="gpu", revokedSites=["c"])
    # At creation: the server, a and b; c is revoked already and the remote site r runs no pod here.
    assert _kueue_counts(handlers._parse(created)) == dict.fromkeys(["rev-server", "rev-client-a", "rev-client-b"], "3")
    # b revoked while the job runs: pods made from now on (a restart, a resume) announce the admitted count.
    running = {**created, "spec": {**created["spec"], "revokedSites": ["b"]},
               "status": {edits.ACCEPTED_SPEC: created["spec"], "revokedSites": ["c"], "phase": "Running"}}
    job = handlers._parse(running)
    assert job.spec.revoked_sites == ["b", "c"]
    assert _kueue_counts(job) == {"rev-server": "3", "rev-client-a": "3"}
