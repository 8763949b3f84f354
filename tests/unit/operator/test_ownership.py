"""The operator never adopts, patches, reads as its own or deletes an object that is not its FLJob's.

Each test plays the attacker of issue 13: someone allowed to create FLJobs
(but not the victim's objects) names a job so that one of its children's names
is taken by a victim's Service, ConfigMap, Secret or Pod, or finds a way to
have the TTL cleanup delete a look-alike. Against the emulated API, with the
operator's real handlers running in kopf.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import kubernetes
import pytest

from fedkube.operator import builders
from fedkube.operator import kube as kubeops
from fedkube.spec import parse_job
from tests.support import fixtures
from tests.support.waiting import until
from tests.unit.operator.test_handlers import _crd, _doc, _operator, _status

kube = fixtures.kube

pytestmark = pytest.mark.timeout(60)

NS = "default"
VICTIM_LABELS = {"app": "payments"}


def _core(k: fixtures.KubeHandle) -> Any:
    return kubernetes.client.CoreV1Api(k.api_client)


def _read(k: fixtures.KubeHandle, kind: str, name: str) -> dict[str, Any] | None:
    core = _core(k)
    read = {"Service": core.read_namespaced_service, "ConfigMap": core.read_namespaced_config_map,
            "Secret": core.read_namespaced_secret, "Pod": core.read_namespaced_pod}[kind]
    try:
        return dict(json.loads(read(name, NS, _preload_content=False).data))
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _victim(kind: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta = {"name": name, "namespace": NS, "labels": labels}
    if kind == "Service":
        return {"apiVersion": "v1", "kind": kind, "metadata": meta,
                "spec": {"selector": {"app": "payments"}, "ports": [{"name": "https", "port": 443}]}}
    if kind == "ConfigMap":
        return {"apiVersion": "v1", "kind": kind, "metadata": meta, "data": {"db": "payments.internal"}}
    if kind == "Secret":
        return {"apiVersion": "v1", "kind": kind, "metadata": meta,
                "data": {"a": base64.b64encode(b"the-victims-password").decode()}}
    return {"apiVersion": "v1", "kind": kind, "metadata": meta,
            "spec": {"containers": [{"name": "app", "image": "payments:1"}]}}


def _create(k: fixtures.KubeHandle, manifest: dict[str, Any]) -> dict[str, Any]:
    core = _core(k)
    create = {"Service": core.create_namespaced_service, "ConfigMap": core.create_namespaced_config_map,
              "Secret": core.create_namespaced_secret, "Pod": core.create_namespaced_pod}[manifest["kind"]]
    create(NS, manifest)
    stored = _read(k, manifest["kind"], manifest["metadata"]["name"])
    assert stored is not None
    return stored


def _job_pods(k: fixtures.KubeHandle, job: str) -> set[str]:
    resp = _core(k).list_namespaced_pod(NS, label_selector=f"fedkube.dev/job={job}", _preload_content=False)
    return {p["metadata"]["name"] for p in json.loads(resp.data)["items"]}


def _events(k: fixtures.KubeHandle, job: str, reason: str) -> list[str]:
    events = _core(k).list_namespaced_event(NS, field_selector=f"involvedObject.name={job}").items
    return [e.message for e in events if e.reason == reason]


# Each child name a victim's object may hold; labelled like the job's own children or not at all.
TAKEN = [
    ("Service", "{job}-server", VICTIM_LABELS),
    ("ConfigMap", "{job}-spec", {"fedkube.dev/job": "{job}"}),
    ("Secret", "{job}-client-a-token", VICTIM_LABELS),
    ("Secret", "{job}-server-tokens", VICTIM_LABELS),
    ("Secret", "{job}-server-tokens", {"fedkube.dev/job": "{job}"}),
    ("Pod", "{job}-client-b", {"fedkube.dev/job": "{job}", "fedkube.dev/role": "client", "fedkube.dev/site": "b"}),
]


@pytest.mark.parametrize(("kind", "pattern", "labels"), TAKEN,
                         ids=[f"{kind}-{pattern[6:]}-{'look-alike' if 'fedkube.dev/job' in labels else 'plain'}"
                              for kind, pattern, labels in TAKEN])
def test_a_name_taken_by_someone_elses_object_fails_the_job_and_leaves_the_object_alone(
    kube: fixtures.KubeHandle, kind: str, pattern: str, labels: dict[str, str],
) -> None:
    job = "grab"
    _crd(kube)
    victim = _create(kube, _victim(kind, pattern.format(job=job),
                                   {k: v.format(job=job) for k, v in labels.items()}))
    name = victim["metadata"]["name"]
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", NS, "fljobs", _doc(job))
        until(lambda: _status(custom, job).get("phase") == "Failed", f"job {job} Failed")
        conflict = {c["type"]: c for c in _status(custom, job)["conditions"]}["NameConflict"]
        assert conflict["status"] == "True" and conflict["reason"] == "NameConflict"
        assert f"{kind} {NS}/{name}" in conflict["message"] and "Fix:" in conflict["message"]
        warnings = until(lambda: _events(kube, job, "NameConflict"), "a NameConflict event")
        assert f"{kind} {NS}/{name}" in warnings[0]
        # Nothing of the job runs: in particular no pod that would mount the victim's Secret as tokens.
        until(lambda: _job_pods(kube, job) <= ({name} if kind == "Pod" else set()), f"no pods of job {job}")
        after = _read(kube, kind, name)
        assert after is not None
        assert after["metadata"]["resourceVersion"] == victim["metadata"]["resourceVersion"], "the victim was written"
        custom.delete_namespaced_custom_object("fedkube.dev", "v1alpha1", NS, "fljobs", job)
    assert _read(kube, kind, name) == after, "deleting the FLJob took the victim's object with it"


def test_ttl_cleanup_deletes_only_what_the_job_owns(kube: fixtures.KubeHandle) -> None:
    job = "tidy"
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    core = _core(kube)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", NS, "fljobs",
                                               _doc(job, ttlSecondsAfterFinished=0))
        until(lambda: len(_job_pods(kube, job)) == 3, f"the 3 pods of job {job}")
        # The pods exist before the first status patch lands; ours must come after it, not be overwritten by it.
        until(lambda: _status(custom, job).get("phase") in ("Pending", "Deploying"), f"job {job} Pending")
        # Someone else's objects that look like the job's: the same label, one of them under a child's name
        # (the job's own ConfigMap was deleted and the name taken), one a pod the label selects.
        core.delete_namespaced_config_map(f"{job}-spec", NS)
        look_alike = {"fedkube.dev/job": job}
        spec_cm = _create(kube, _victim("ConfigMap", f"{job}-spec", look_alike))
        pod = _create(kube, _victim("Pod", f"{job}-sidecar-of-someone", look_alike))
        custom.patch_namespaced_custom_object_status(
            "fedkube.dev", "v1alpha1", NS, "fljobs", job,
            {"status": {"phase": "Failed", "completionTime": "2020-01-01T00:00:00Z"}})
        until(lambda: any(c["type"] == "CleanedUp" and c["status"] == "True"
                          for c in _status(custom, job).get("conditions") or []), f"job {job} CleanedUp",
              timeout=30)  # ~6 s alone (the TTL timer's look); two loaded xdist workers went past 10 s
        assert _job_pods(kube, job) == {pod["metadata"]["name"]}
        assert _read(kube, "Secret", f"{job}-server-tokens") is None and _read(kube, "Service", f"{job}-server") is None
        assert _read(kube, "ConfigMap", f"{job}-spec") == spec_cm
        assert _read(kube, "Pod", pod["metadata"]["name"]) == pod


def test_delete_children_skips_an_object_replaced_after_it_was_checked(kube: fixtures.KubeHandle) -> None:
    """The uid precondition: a child deleted and its name taken between the ownership check and the delete."""
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    owner = custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", NS, "fljobs", _doc("swap"))
    ref = kubeops.JobRef.of(owner)
    api = kubeops.Kube(kube.api_client)
    cm = builders.build_spec_configmap(parse_job(_doc("swap")), owner=owner)
    assert api.create_or_patch(cm, ref) == "created"
    ours = _read(kube, "ConfigMap", "swap-spec")
    assert ours is not None
    _core(kube).delete_namespaced_config_map("swap-spec", NS)
    theirs = _create(kube, _victim("ConfigMap", "swap-spec", {"fedkube.dev/job": "swap"}))
    assert api._delete_owned("ConfigMap", ref, ours) is False
    assert _read(kube, "ConfigMap", "swap-spec") == theirs


def _obj(labels: dict[str, str], uids: list[str]) -> dict[str, Any]:
    return {"metadata": {"labels": labels, "ownerReferences": [{"uid": u} for u in uids]}}


@pytest.mark.parametrize(("obj", "reason"), [
    (_obj({"fedkube.dev/job": "j"}, ["u1"]), None),
    (_obj({"fedkube.dev/job": "j"}, ["other", "u1"]), None),
    (_obj({"fedkube.dev/job": "j"}, ["other"]), "no ownerReference names the FLJob's uid u1"),
    (_obj({"fedkube.dev/job": "j"}, []), "no ownerReference names the FLJob's uid u1"),
    (_obj({"fedkube.dev/job": "k"}, ["u1"]), "it lacks the label fedkube.dev/job=j"),
    (_obj({}, ["u1"]), "it lacks the label fedkube.dev/job=j"),
    ({}, "it lacks the label fedkube.dev/job=j"),
])
def test_an_object_is_the_jobs_only_with_its_label_and_its_uid(obj: dict[str, Any], reason: str | None) -> None:
    assert kubeops.foreign(obj, kubeops.JobRef("ns", "j", "u1")) == reason


def test_the_fljobs_labels_do_not_reach_its_pods_and_service(kube: fixtures.KubeHandle) -> None:
    """kopf.adopt copies the owner's labels: an FLJob labelled app=payments would put its trainer pods (the author's
    image) behind the victim's Service that selects app=payments, and receive that Service's traffic."""
    job = "lure"
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    doc = _doc(job)
    doc["metadata"]["labels"] = VICTIM_LABELS
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", NS, "fljobs", doc)
        until(lambda: len(_job_pods(kube, job)) == 3, f"the 3 pods of job {job}")
        selected = _core(kube).list_namespaced_pod(NS, label_selector="app=payments").items
        assert [p.metadata.name for p in selected] == []
        service = _read(kube, "Service", f"{job}-server")
        assert service is not None and "app" not in service["metadata"]["labels"]
