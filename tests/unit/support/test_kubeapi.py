"""The emulated API server behaves like a real one where kopf, the official client and kubectl need it."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from tests.support import fixtures
from tests.support.kopfrun import running_operator
from tests.support.kubeapi import EmulatedCluster
from tests.support.waiting import until

kube = fixtures.kube
kubeconfig = fixtures.kubeconfig
k8s_tools = fixtures.k8s_tools

GROUP, VERSION, PLURAL = "fedkube.dev", "v1alpha1", "fljobs"


def _pod(name: str, labels: dict[str, str] | None = None, owners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if owners:
        meta["ownerReferences"] = owners
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "main", "image": "python:3.11-slim"}]}}


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _status(err: ApiException) -> dict[str, Any]:
    assert err.body, f"no Status body in the {err.status} answer"
    return dict(json.loads(err.body))


def _core(kube: fixtures.KubeHandle) -> Any:
    return kubernetes.client.CoreV1Api(kube.api_client)


def _custom(kube: fixtures.KubeHandle) -> Any:
    return kubernetes.client.CustomObjectsApi(kube.api_client)


def _fljob(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FLJob", "metadata": {"name": name}, "spec": spec}


def _pod_names(kube: fixtures.KubeHandle, **kw: Any) -> list[str]:
    return sorted(p.metadata.name for p in _core(kube).list_namespaced_pod("default", **kw).items)


# --- create / read ----------------------------------------------------------------------------------

def test_create_answers_201_with_server_fields(kube: fixtures.KubeHandle) -> None:
    data, status, _ = _core(kube).create_namespaced_pod_with_http_info("default", _pod("p1"))
    assert status == 201
    meta = data.metadata
    assert meta.uid and meta.resource_version and meta.creation_timestamp and meta.namespace == "default"
    assert data.status.phase == "Pending"
    fetched = _core(kube).read_namespaced_pod("p1", "default")
    assert fetched.metadata.uid == meta.uid


def test_create_of_existing_name_is_409_already_exists(kube: fixtures.KubeHandle) -> None:
    _core(kube).create_namespaced_pod("default", _pod("p1"))
    with pytest.raises(ApiException) as err:
        _core(kube).create_namespaced_pod("default", _pod("p1"))
    assert err.value.status == 409
    assert _status(err.value)["reason"] == "AlreadyExists"


def test_generate_name_and_invalid_names(kube: fixtures.KubeHandle) -> None:
    body = _pod("x")
    body["metadata"] = {"generateName": "job-"}
    created = _core(kube).create_namespaced_pod("default", body)
    assert created.metadata.name.startswith("job-") and len(created.metadata.name) == len("job-") + 5
    with pytest.raises(ApiException) as err:
        _core(kube).create_namespaced_pod("default", _pod("Not_A_Name"))
    assert err.value.status == 422 and "metadata.name" in _status(err.value)["message"]


def test_missing_namespace_and_missing_object_are_404(kube: fixtures.KubeHandle) -> None:
    with pytest.raises(ApiException) as err:
        _core(kube).create_namespaced_pod("nowhere", _pod("p1"))
    assert err.value.status == 404 and "nowhere" in _status(err.value)["message"]
    with pytest.raises(ApiException) as err:
        _core(kube).read_namespaced_pod("absent", "default")
    body = _status(err.value)
    assert (err.value.status, body["reason"], body["details"]["name"]) == (404, "NotFound", "absent")


def test_lists_carry_kind_and_resource_version(kube: fixtures.KubeHandle) -> None:
    _core(kube).create_namespaced_pod("default", _pod("p1"))
    raw = kube.api_client.call_api("GET", f"{kube.url}/api/v1/namespaces/default/pods")
    raw.read()
    listing = json.loads(raw.data)
    assert listing["kind"] == "PodList" and listing["apiVersion"] == "v1"
    assert int(listing["metadata"]["resourceVersion"]) >= int(listing["items"][0]["metadata"]["resourceVersion"])


def test_namespaces_list_create_and_delete_cascades(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    assert "default" in [n.metadata.name for n in core.list_namespace().items]
    core.create_namespace({"metadata": {"name": "team-a"}})
    core.create_namespaced_config_map("team-a", {"metadata": {"name": "cm"}, "data": {"k": "v"}})
    assert core.read_namespace("team-a").status.phase == "Active"
    core.delete_namespace("team-a")
    assert "team-a" not in [n.metadata.name for n in core.list_namespace().items]
    assert core.list_config_map_for_all_namespaces().items == []


def test_secret_string_data_is_stored_as_base64_data(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    core.create_namespaced_secret("default", {"metadata": {"name": "tok"}, "stringData": {"token": "abc"}})
    secret = core.read_namespaced_secret("tok", "default")
    assert secret.data == {"token": "YWJj"} and not secret.string_data


# --- updates --------------------------------------------------------------------------------------

def test_put_replaces_and_stale_resource_version_is_409(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    created = core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    body = {"metadata": {"name": "cm", "resourceVersion": created.metadata.resource_version}, "data": {"a": "2"}}
    replaced = core.replace_namespaced_config_map("cm", "default", body)
    assert replaced.data == {"a": "2"}
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    assert replaced.metadata.uid == created.metadata.uid
    with pytest.raises(ApiException) as err:  # the same (now stale) resourceVersion again
        core.replace_namespaced_config_map("cm", "default", body)
    assert err.value.status == 409 and _status(err.value)["reason"] == "Conflict"
    with pytest.raises(ApiException) as err:  # a merge patch carrying a stale resourceVersion too
        core.patch_namespaced_config_map("cm", "default", body, _content_type="application/merge-patch+json")
    assert err.value.status == 409


def test_noop_update_keeps_resource_version(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    created = core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    same = core.patch_namespaced_config_map("cm", "default", {"data": {"a": "1"}},
                                            _content_type="application/merge-patch+json")
    assert same.metadata.resource_version == created.metadata.resource_version


def test_json_patch_applies_and_failed_test_is_422(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    created = core.create_namespaced_pod("default", _pod("p1"))
    rv = created.metadata.resource_version
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
           {"op": "add", "path": "/metadata/finalizers", "value": ["fedkube.dev/x"]}]
    patched = core.patch_namespaced_pod("p1", "default", ops)
    assert patched.metadata.finalizers == ["fedkube.dev/x"]
    with pytest.raises(ApiException) as err:  # rv moved on: the test op fails
        core.patch_namespaced_pod("p1", "default", ops)
    assert err.value.status == 422
    assert core.read_namespaced_pod("p1", "default").metadata.finalizers == ["fedkube.dev/x"]


def test_status_subresource_is_separate_from_the_main_resource(kube: fixtures.KubeHandle) -> None:
    kube.apply_crd()
    co = _custom(kube)
    created = co.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                                 {**_fljob("j", rounds=1), "status": {"phase": "Hacked"}})
    assert created.get("status") == {} and created["metadata"]["generation"] == 1
    co.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j", {"status": {"phase": "Ignored"}})
    assert co.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j").get("status") == {}
    after = co.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "j",
                                                     {"status": {"phase": "Running"}, "spec": {"rounds": 99}})
    assert after["status"] == {"phase": "Running"} and after["spec"] == {"rounds": 1}
    assert after["metadata"]["generation"] == 1  # status writes never bump generation
    spec_change = co.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j", {"spec": {"rounds": 2}})
    assert spec_change["metadata"]["generation"] == 2 and spec_change["status"] == {"phase": "Running"}


def test_strategic_merge_patch_merges_lists_by_key(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    pod = _pod("p1")
    pod["spec"]["containers"].append({"name": "side", "image": "busybox"})
    core.create_namespaced_pod("default", pod)
    patch = {"spec": {"containers": [{"name": "side", "image": "alpine"}]}}
    patched = core.patch_namespaced_pod("p1", "default", patch,
                                        _content_type="application/strategic-merge-patch+json")
    assert [(c.name, c.image) for c in patched.spec.containers] == [("main", "python:3.11-slim"), ("side", "alpine")]


# --- selectors and watches ---------------------------------------------------------------------------

@pytest.mark.parametrize(("selector", "expected"), [
    ("app=a", ["p1", "p2"]),
    ("app==a,tier=web", ["p1"]),
    ("app!=a", ["p3"]),
    ("tier in (web,db)", ["p1", "p2"]),
    ("tier notin (web)", ["p2", "p3"]),
    ("tier", ["p1", "p2"]),
    ("!tier", ["p3"]),
])
def test_label_selectors(kube: fixtures.KubeHandle, selector: str, expected: list[str]) -> None:
    core = _core(kube)
    core.create_namespaced_pod("default", _pod("p1", {"app": "a", "tier": "web"}))
    core.create_namespaced_pod("default", _pod("p2", {"app": "a", "tier": "db"}))
    core.create_namespaced_pod("default", _pod("p3", {"app": "b"}))
    assert _pod_names(kube, label_selector=selector) == expected


def test_field_selector_and_bad_selector(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    core.create_namespaced_pod("default", _pod("p1"))
    core.create_namespaced_pod("default", _pod("p2"))
    assert _pod_names(kube, field_selector="metadata.name=p2") == ["p2"]
    assert _pod_names(kube, field_selector="status.phase!=Pending") == []
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod("default", label_selector="a in b")
    assert err.value.status == 400 and "labelSelector" in _status(err.value)["message"]


def test_official_client_watch_sees_added_modified_deleted(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    core.create_namespaced_pod("default", _pod("before", {"w": "1"}))
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def watch() -> None:
        w = kubernetes.watch.Watch()
        for ev in w.stream(core.list_namespaced_pod, "default", label_selector="w=1", timeout_seconds=5):
            seen.append((ev["type"], ev["object"].metadata.name))
            if ev["type"] == "DELETED" and ev["object"].metadata.name == "before":
                w.stop()
        done.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    until(lambda: ("ADDED", "before") in seen, "the initial ADDED")
    core.create_namespaced_pod("default", _pod("other", {"w": "0"}))  # outside the selector
    core.patch_namespaced_pod("before", "default", {"metadata": {"annotations": {"x": "y"}}})
    core.delete_namespaced_pod("before", "default")
    assert done.wait(10), "the watch did not end"
    assert seen == [("ADDED", "before"), ("MODIFIED", "before"), ("DELETED", "before")]


def _watch_lines(kube: fixtures.KubeHandle, query: str, timeout: float = 10) -> list[dict[str, Any]]:
    resp = kube.api_client.call_api("GET", f"{kube.url}/api/v1/namespaces/default/pods?{query}",
                                    _request_timeout=timeout)
    resp.read()
    return [json.loads(line) for line in resp.data.decode().splitlines() if line.strip()]


def test_watch_resumes_from_resource_version_and_honours_timeout(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    first = core.create_namespaced_pod("default", _pod("p1"))
    core.create_namespaced_pod("default", _pod("p2"))
    start = time.monotonic()
    events = _watch_lines(kube, f"watch=true&resourceVersion={first.metadata.resource_version}&timeoutSeconds=1")
    assert time.monotonic() - start < 5, "timeoutSeconds was not honoured"
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "p2")]


def test_watch_from_a_compacted_resource_version_is_410(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    old = core.create_namespaced_pod("default", _pod("p1"))
    for i in range(3):
        core.create_namespaced_pod("default", _pod(f"n{i}"))
    kube.cluster.call(lambda api: api.compact(keep=2))
    events = _watch_lines(kube, f"watch=true&resourceVersion={old.metadata.resource_version}&timeoutSeconds=1")
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_watch_resumes_correctly_across_automatic_compaction() -> None:
    with EmulatedCluster(history=3) as cluster:
        client = cluster.api_client()
        handle = fixtures.KubeHandle(cluster=cluster, url=cluster.url, api_client=client)
        core = _core(handle)
        versions = [core.create_namespaced_pod("default", _pod(f"p{i}")).metadata.resource_version for i in range(9)]
        events = _watch_lines(handle, f"watch=true&resourceVersion={versions[6]}&timeoutSeconds=1")
        assert [e["object"]["metadata"]["name"] for e in events] == ["p7", "p8"]
        gone = _watch_lines(handle, f"watch=true&resourceVersion={versions[0]}&timeoutSeconds=1")
        assert [e["type"] for e in gone] == ["ERROR"]
        client.close()


def test_label_change_moves_object_out_of_a_watch_as_deleted(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    created = core.create_namespaced_pod("default", _pod("p1", {"sel": "yes"}))
    core.patch_namespaced_pod("p1", "default", {"metadata": {"labels": {"sel": "no"}}})
    events = _watch_lines(kube, f"watch=true&labelSelector=sel%3Dyes&resourceVersion="
                                f"{created.metadata.resource_version}&timeoutSeconds=1")
    assert [e["type"] for e in events] == ["DELETED"]


# --- deletion, finalizers, garbage collection ----------------------------------------------------------

def test_owner_deletion_garbage_collects_dependents(kube: fixtures.KubeHandle) -> None:
    kube.apply_crd()
    co, core = _custom(kube), _core(kube)
    job = co.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, _fljob("j"))
    other = co.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, _fljob("k"))
    core.create_namespaced_pod("default", _pod("j-server", owners=[_owner(job)]))
    svc = core.create_namespaced_service("default", {"metadata": {"name": "j-server", "ownerReferences": [_owner(job)]},
                                                     "spec": {"ports": [{"port": 7070}]}})
    assert svc.spec.cluster_ip
    grandchild = _pod("j-grandchild", owners=[{"apiVersion": "v1", "kind": "Service", "name": "j-server",
                                               "uid": svc.metadata.uid}])
    core.create_namespaced_pod("default", grandchild)
    core.create_namespaced_pod("default", _pod("shared", owners=[_owner(job), _owner(other)]))
    co.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j")
    assert _pod_names(kube) == ["shared"]  # two-level cascade; the shared pod keeps its other owner
    assert [r.name for r in core.read_namespaced_pod("shared", "default").metadata.owner_references] == ["k"]
    assert core.list_namespaced_service("default").items == []


def test_orphan_propagation_keeps_dependents(kube: fixtures.KubeHandle) -> None:
    core = _core(kube)
    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
    core.create_namespaced_pod("default", _pod("child", owners=[_owner(owner.to_dict() | {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "uid": owner.metadata.uid}})]))
    core.delete_namespaced_config_map("owner", "default", propagation_policy="Orphan")
    assert not core.read_namespaced_pod("child", "default").metadata.owner_references


def test_finalizers_hold_deletion_until_removed(kube: fixtures.KubeHandle) -> None:
    kube.apply_crd()
    co, core = _custom(kube), _core(kube)
    job = co.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                             {**_fljob("j"), "metadata": {"name": "j", "finalizers": ["x/y"]}})
    core.create_namespaced_pod("default", _pod("child", owners=[_owner(job)]))
    co.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j")
    held = co.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j")
    assert held["metadata"]["deletionTimestamp"] and _pod_names(kube) == ["child"]
    co.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as err:
        co.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j")
    assert err.value.status == 404 and _pod_names(kube) == []


def test_child_created_for_a_vanished_owner_is_collected(kube: fixtures.KubeHandle) -> None:
    ghost = {"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "00000000-0000-0000-0000-000000000000"}
    _core(kube).create_namespaced_pod("default", _pod("orphan", owners=[ghost]))
    assert _pod_names(kube) == []


# --- discovery and CRDs --------------------------------------------------------------------------------

def test_posted_crd_is_registered_in_discovery_and_established(kube: fixtures.KubeHandle) -> None:
    crd = kube.apply_crd()
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    groups = kubernetes.client.ApisApi(kube.api_client).get_api_versions()
    assert GROUP in [g.name for g in groups.groups]
    resources = kubernetes.client.CustomObjectsApi(kube.api_client).get_api_resources(GROUP, VERSION)
    by_name = {r.name: r for r in resources.resources}
    assert by_name[PLURAL].kind == "FLJob" and by_name[PLURAL].short_names == ["flj"]
    assert by_name[PLURAL].namespaced and f"{PLURAL}/status" in by_name
    ext = kubernetes.client.ApiextensionsV1Api(kube.api_client)
    ext.delete_custom_resource_definition(f"{PLURAL}.{GROUP}")
    with pytest.raises(ApiException) as err:
        _custom(kube).list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert err.value.status == 404


def test_kmock_reactions_still_take_precedence(kube: fixtures.KubeHandle) -> None:
    """Fault injection with kmock's DSL keeps working over the emulated API."""
    kube.cluster.handler["post /api/v1/namespaces/default/pods"] << 503
    with pytest.raises(ApiException) as err:
        _core(kube).create_namespaced_pod("default", _pod("p1"))
    assert err.value.status == 503
    assert _pod_names(kube) == []


# --- real clients --------------------------------------------------------------------------------------

def test_kopf_operator_reconciles_adopts_and_finalizes(kube: fixtures.KubeHandle) -> None:
    kube.apply_crd()
    registry = kopf.OperatorRegistry()
    core, co = _core(kube), _custom(kube)
    deleted: list[str] = []

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def create(body: Any, patch: Any, name: str, namespace: str | None, **_: Any) -> None:
        pod = _pod(f"{name}-server", {"fedkube.dev/job": name})
        kopf.adopt(pod, owner=body)
        core.create_namespaced_pod(namespace, pod)
        patch.status["phase"] = "Deploying"
        kopf.event(body, type="Normal", reason="Deploying", message="server pod created")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def delete(name: str, **_: Any) -> None:
        deleted.append(name)

    with running_operator(kube.url, registry):
        co.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, _fljob("demo", rounds=1))

        def status() -> dict[str, Any]:
            return co.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo").get("status", {})
        until(lambda: status().get("phase") == "Deploying", "status.phase from the kopf handler")
        obj = co.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
        assert obj["metadata"]["finalizers"], "kopf did not add its finalizer"
        assert _pod_names(kube, label_selector="fedkube.dev/job=demo") == ["demo-server"]
        # kopf posts Events with generateName, the server names them
        until(lambda: bool(core.list_namespaced_event(
            "default", field_selector="involvedObject.name=demo,reason=Deploying").items), "kopf's event")
        co.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
        until(lambda: not co.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]
              and not _pod_names(kube), "the FLJob and its pod to be gone")
    assert deleted == ["demo"]


def _kubectl(tools: fixtures.KubeTools, kubeconfig: Path, *args: str) -> str:
    proc = subprocess.run([str(tools.kubectl), "--kubeconfig", str(kubeconfig), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def test_kubectl_apply_get_and_delete(kube: fixtures.KubeHandle, kubeconfig: Path, k8s_tools: fixtures.KubeTools,
                                      tmp_path: Path) -> None:
    fljob = tmp_path / "fljob.yaml"
    fljob.write_text(json.dumps(_fljob("demo", rounds=3)))
    pod = tmp_path / "pod.yaml"
    pod.write_text(json.dumps(_pod("demo-client-a", {"fedkube.dev/job": "demo"})))
    out = _kubectl(k8s_tools, kubeconfig, "apply", "--validate=false", "-f", str(fixtures.FLJOB_CRD))
    assert "fljobs.fedkube.dev created" in out
    assert "created" in _kubectl(k8s_tools, kubeconfig, "apply", "--validate=false", "-f", str(fljob))
    fljob.write_text(json.dumps(_fljob("demo", rounds=5)))
    assert "configured" in _kubectl(k8s_tools, kubeconfig, "apply", "--validate=false", "-f", str(fljob))
    assert _custom(kube).get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")["spec"]["rounds"] == 5
    assert "demo" in _kubectl(k8s_tools, kubeconfig, "get", "flj")
    _kubectl(k8s_tools, kubeconfig, "apply", "--validate=false", "-f", str(pod))
    assert "unchanged" in _kubectl(k8s_tools, kubeconfig, "apply", "--validate=false", "-f", str(pod))
    listed = _kubectl(k8s_tools, kubeconfig, "get", "pods", "-l", "fedkube.dev/job=demo", "-o", "name")
    assert listed.split() == ["pod/demo-client-a"]
    assert _kubectl(k8s_tools, kubeconfig, "get", "pods", "-l", "fedkube.dev/job=other", "-o", "name") == ""
    # Typed client-go commands send protobuf, which the emulator refuses cleanly (not as an internal error).
    create = subprocess.run([str(k8s_tools.kubectl), "--kubeconfig", str(kubeconfig), "create", "namespace", "x"],
                            capture_output=True, text=True, timeout=60)
    assert create.returncode != 0 and "only accepts JSON" in create.stderr
    _kubectl(k8s_tools, kubeconfig, "delete", "flj", "demo")
    _kubectl(k8s_tools, kubeconfig, "delete", "pod", "demo-client-a")
    assert json.loads(_kubectl(k8s_tools, kubeconfig, "get", "flj,pods", "-o", "json"))["items"] == []
