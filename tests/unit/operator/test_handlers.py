"""Handlers and the API module against the emulated API (no pods run): idempotence, tokens, isolation, config."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import kopf
import kubernetes
import pytest
import yaml

from fedkube.errors import ConfigError
from fedkube.operator import handlers, main
from fedkube.operator import kube as kubeops
from fedkube.operator.builders import build_all
from fedkube.runtime.local import new_tls
from fedkube.spec import parse_job
from tests.support import fixtures
from tests.support.kopfrun import running_operator
from tests.support.waiting import until

kube = fixtures.kube

pytestmark = pytest.mark.timeout(60)


def _doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fedkube.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"rounds": 2, "clients": [{"name": "a"}, {"name": "b"}],
                 "trainer": {"image": "t", "command": ["python", "train.py"]}, **spec},
    }


def _crd(k: fixtures.KubeHandle) -> None:
    from tests.e2e.conftest import CRD

    kubernetes.client.ApiextensionsV1Api(k.api_client).create_custom_resource_definition(
        yaml.safe_load(CRD.read_text()))


def _status(custom: Any, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", name)
    return dict(obj.get("status") or {})


def _owner(k: fixtures.KubeHandle, name: str) -> dict[str, Any]:
    """An FLJob created in the API (no operator runs): the owner its children need, or garbage collection takes them."""
    _crd(k)
    custom = kubernetes.client.CustomObjectsApi(k.api_client)
    return dict(custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _doc(name)))


class _Labelled:
    """What the API holds for a job by its label alone (the tests' view; the operator also checks ownership)."""

    def __init__(self, k: fixtures.KubeHandle) -> None:
        self.core = kubernetes.client.CoreV1Api(k.api_client)

    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(namespace, label_selector=f"fedkube.dev/job={job}",
                                             _preload_content=False)
        return list(json.loads(resp.data)["items"])

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def _operator(k: fixtures.KubeHandle, resumed: set[str] | None = None, *, clock: Any = None) -> Any:
    """The operator in a thread; with ``resumed``, the name of each job it has resumed is added to that set;
    with ``clock``, the operator's time comes from it (``handlers.Memo.CLOCK``).

    The probe is a resume handler registered after the operator's own: kopf's default lifecycle runs one
    handler per pass in registration order, so a job's name arrives once the operator's resume handling
    of it has run. A test that checks what a restarted operator does *not* do waits for that, not a while.
    """
    registry = handlers.register(kopf.OperatorRegistry(), interval=0.2)
    if resumed is not None:
        @kopf.on.resume(*handlers.RESOURCE, registry=registry, id="test-resumed")
        def _resumed(name: str | None, **_: Any) -> None:
            resumed.add(str(name))

    memo = kopf.Memo()
    memo[handlers.Memo.API_CLIENT] = k.api_client
    if clock is not None:
        memo[handlers.Memo.CLOCK] = clock
    return running_operator(k.url, registry, memo=memo)


def test_create_or_patch_is_idempotent_and_leaves_pods_alone(kube: fixtures.KubeHandle) -> None:
    api = kubeops.Kube(kube.api_client)
    owner = _owner(kube, "idem")
    ref = kubeops.JobRef.of(owner)
    job = parse_job(_doc("idem"))
    objs = build_all(job, tokens={"a": "ta", "b": "tb"}, tls=new_tls(job), owner=owner)
    assert [api.create_or_patch(o, ref) for o in objs] == ["created"] * len(objs)
    again = [api.create_or_patch(o, ref) for o in objs]
    assert again == ["exists" if o["kind"] == "Pod" else "patched" for o in objs]
    assert sorted(p["metadata"]["name"] for p in api.job_pods(ref)) == [
        "idem-client-a", "idem-client-b", "idem-server"]
    assert api.job_secret_data(ref, "idem-server-tokens") == {"a": "ta", "b": "tb"}
    assert api.job_secret_data(ref, "nope") is None
    children = [(o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] != "Pod"]
    assert api.delete_children(ref, children) == len(objs)
    assert api.job_pods(ref) == []


def test_job_tokens_are_generated_once_and_kept() -> None:
    fresh = kubeops.job_tokens(None, ["a", "b"])
    assert len(set(fresh.values())) == 2 and all(len(t) >= 32 for t in fresh.values())
    assert kubeops.job_tokens(fresh, ["a", "b"]) == fresh
    grown = kubeops.job_tokens({"a": fresh["a"]}, ["a", "c"])
    assert grown["a"] == fresh["a"] and grown["c"] not in fresh.values()


def test_default_status_url_uses_the_pods_ip_and_status_port() -> None:
    pod = {"status": {"podIP": "10.1.2.3"},
           "spec": {"containers": [{"ports": [{"name": "grpc", "containerPort": 7070},
                                              {"name": "status", "containerPort": 8081}]}]}}
    assert kubeops.default_status_url(pod) == "http://10.1.2.3:8081/status"
    assert kubeops.default_status_url({"status": {"podIP": "fd00::1"}, "spec": {}}) == "http://[fd00::1]:8080/status"
    assert kubeops.default_status_url({"status": {}}) is None


def test_fetch_server_status_is_bounded_and_none_when_nobody_answers() -> None:
    start = time.monotonic()
    assert kubeops.fetch_server_status("http://127.0.0.1:9/status", timeout=0.5) is None
    assert time.monotonic() - start < 5


def test_suspended_job_gets_no_pods_and_keeps_its_tokens_across_operator_restarts(
    kube: fixtures.KubeHandle,
) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("held", suspend=True))
        until(lambda: _status(custom, "held").get("phase") == "Suspended", "job held Suspended")
        tokens = api.secret_data("default", "held-server-tokens")
        assert tokens is not None and set(tokens) == {"a", "b"}
        assert api.job_pods("default", "held") == []
    resumed: set[str] = set()
    with _operator(kube, resumed):  # a restarted operator resumes the job: same tokens, still no pods
        until(lambda: "held" in resumed, "the restarted operator to resume job held")
        assert api.secret_data("default", "held-server-tokens") == tokens
        assert api.job_pods("default", "held") == []


def test_an_invalid_job_does_not_stop_a_valid_one(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)

    def status(name: str) -> dict[str, Any]:
        return _status(custom, name)

    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("bad", trainer={"image": "t", "command": []}))
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _doc("good"))
        until(lambda: status("bad").get("phase") == "Failed", "job bad Failed")
        until(lambda: len(api.job_pods("default", "good")) == 3, "the 3 pods of job good")
        invalid = {c["type"]: c for c in status("bad")["conditions"]}["Invalid"]
        assert "spec.trainer.command" in invalid["message"] and "fix:" in invalid["message"]
        assert api.job_pods("default", "bad") == []
        # Its pods exist before its first status patch lands: wait for the phase too.
        until(lambda: status("good").get("phase") in ("Pending", "Deploying"), "job good Pending or Deploying")


def test_write_removes_client_sites_and_fields_that_are_gone() -> None:
    patch = kopf.Patch()
    previous = {"clients": {"a": {"state": "Uploading", "message": "3 of 9 bytes"}, "b": {"state": "Done"}}}
    handlers._write(patch, previous, {"clients": {"a": {"state": "Done"}}, "phase": "Pending"})
    assert patch["status"] == {"clients": {"a": {"state": "Done", "message": None}, "b": None}, "phase": "Pending"}


def test_write_patches_only_what_changed() -> None:
    previous = {"phase": "Running", "round": 2, "clients": {"a": {"state": "Training"}},
                "conditions": [{"type": "Running", "status": "True", "lastTransitionTime": "t0"}]}
    patch = kopf.Patch()
    handlers._write(patch, previous, {**previous, "completionTime": None}, only_changed=True)
    assert not patch  # an unchanged look sends no request
    handlers._write(patch, previous, {**previous, "round": 3}, only_changed=True)
    assert patch["status"] == {"round": 3}


# --- fedkube operator: configuration ---------------------------------------------------------------


def test_config_from_the_charts_environment() -> None:
    cfg = main.parse_config([], {"FEDKUBE_WATCH_NAMESPACES": "ml, research", "FEDKUBE_HEALTH_PORT": "8181",
                                 "FEDKUBE_METRICS_PORT": "9191", "FEDKUBE_LOG_FORMAT": "json"})
    assert cfg.namespaces == ("ml", "research") and cfg.health_port == 8181 and cfg.metrics_port == 9191
    assert cfg.liveness_endpoint == "http://0.0.0.0:8181/healthz" and cfg.log_format == "json"
    everywhere = main.parse_config([], {"FEDKUBE_WATCH_NAMESPACES": ""})
    assert everywhere.namespaces == () and everywhere.health_port == 8080 and everywhere.metrics_port == 0


def test_flags_win_over_the_environment() -> None:
    cfg = main.parse_config(["-n", "a", "-n", "b", "--health-port", "0"], {"FEDKUBE_WATCH_NAMESPACES": "x"})
    assert cfg.namespaces == ("a", "b") and cfg.health_port == 0
    assert main.parse_config(["-A"], {"FEDKUBE_WATCH_NAMESPACES": "x"}).namespaces == ()


@pytest.mark.parametrize(("argv", "env", "match"), [
    (["-A", "-n", "x"], {}, "exclude each other"),
    ([], {"FEDKUBE_HEALTH_PORT": "http"}, "health port='http' is not a port number"),
    (["--metrics-port", "70000"], {}, "metrics port=70000 is out of range"),
    (["--interval", "0"], {}, "--interval must be positive"),
    ([], {"FEDKUBE_LOG_FORMAT": "xml"}, "text or json"),
])
def test_bad_configuration_is_a_clear_error(argv: list[str], env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        main.parse_config(argv, env)


def test_main_returns_2_on_bad_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["--interval", "-1"]) == 2
    assert "--interval must be positive" in capsys.readouterr().out


def test_a_deleted_server_pod_of_a_live_job_is_created_again(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    core = kubernetes.client.CoreV1Api(kube.api_client)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _doc("again"))
        first = until(lambda: [p for p in api.job_pods("default", "again") if p["metadata"]["name"] == "again-server"],
                      "the server pod of job again")
        core.delete_namespaced_pod("again-server", "default")
        second = until(lambda: [p for p in api.job_pods("default", "again")
                                 if p["metadata"]["name"] == "again-server"
                                 and p["metadata"]["uid"] != first[0]["metadata"]["uid"]],
                       "a new server pod of job again")
        assert second[0]["metadata"]["ownerReferences"][0]["name"] == "again"
        until(lambda: any(e.reason == "ServerPodRecreated" for e in core.list_namespaced_event(
            "default", field_selector="involvedObject.name=again").items), "a ServerPodRecreated event")


def test_an_operator_restart_does_not_bring_back_a_client_it_failed(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    core = kubernetes.client.CoreV1Api(kube.api_client)
    doc = _doc("restart", clients=[{"name": "a"}, {"name": "b"}, {"name": "c"}], minClients=2,
               timeouts={"deploySeconds": 1, "pendingSeconds": 1})
    ready = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", doc)
        until(lambda: len(api.job_pods("default", "restart")) == 4, "the 4 pods of job restart")
        for pod in ("restart-server", "restart-client-a", "restart-client-b"):  # a kubelet's word: these are Ready
            core.patch_namespaced_pod_status(pod, "default", ready)
        until(lambda: ((_status(custom, "restart").get("clients") or {}).get("c") or {}).get("reason")
               == "DeployTimeout", "client c DeployTimeout")
        until(lambda: "restart-client-c" not in {p["metadata"]["name"] for p in api.job_pods("default", "restart")},
              "pod restart-client-c deleted")
    resumed: set[str] = set()
    with _operator(kube, resumed):
        until(lambda: "restart" in resumed, "the restarted operator to resume job restart")
        names = {p["metadata"]["name"] for p in api.job_pods("default", "restart")}
        phase = _status(custom, "restart")["phase"]
        assert "restart-client-c" not in names, names
        # With 1 s deploy/pending timeouts a loaded machine may let the job end before this look (its stand-in
        # server never answers /status); while it runs, it must run with exactly the pods it had.
        if phase in ("Deploying", "Running"):
            assert names == {"restart-server", "restart-client-a", "restart-client-b"}
        else:
            assert phase == "Failed" and not names, (phase, names)


def test_fixing_an_invalid_spec_starts_the_job(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("fixme", minClients=3))
        until(lambda: _status(custom, "fixme").get("phase") == "Failed", "job fixme Failed")
        custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "fixme",
                                              {"spec": {"minClients": 2}})
        until(lambda: _status(custom, "fixme").get("phase") in ("Pending", "Deploying"),
              "job fixme Pending or Deploying")
        until(lambda: len(api.job_pods("default", "fixme")) == 3, "the 3 pods of job fixme")
        status = _status(custom, "fixme")
        conds = {c["type"]: c["status"] for c in status["conditions"]}
        assert conds["Invalid"] == "False" and conds["Failed"] == "False"
        assert "completionTime" not in status


def test_a_job_suspended_while_the_operator_was_away_loses_its_pods_on_restart(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _doc("away"))
        until(lambda: len(api.job_pods("default", "away")) == 3, "the 3 pods of job away")
    custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "away",
                                          {"spec": {"suspend": True}})
    with _operator(kube):
        until(lambda: _status(custom, "away").get("phase") == "Suspended", "job away Suspended")
        until(lambda: api.job_pods("default", "away") == [], "the pods of job away deleted")
