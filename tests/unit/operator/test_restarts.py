"""Client pod re-creation within spec.clientRestartLimit: the pure plan, its place in decide, and the handlers.

The handlers test runs the operator against the emulated API without a kubelet: a pod is "evicted" by writing
the status a kubelet would write, and "deleted" by deleting it.
"""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest

from fedkube.operator import disruption, restarts
from fedkube.operator import status as st
from fedkube.operator.views import REASON_RESTART_LIMIT, ServerWord, server_outcome
from fedkube.spec import FLJob, parse_job
from fedkube.status import ClientStatus, JobStatus, Phase
from tests.support import fixtures
from tests.support.waiting import until
from tests.unit.operator.test_handlers import _crd, _doc, _Labelled, _operator, _status

kube = fixtures.kube

T0 = 1_800_000_000.0


def _job(limit: int = 2, sites: tuple[str, ...] = ("a", "b", "c"), min_clients: int = 2) -> FLJob:
    return parse_job({
        "apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "job", "namespace": "ns"},
        "spec": {"rounds": 3, "minClients": min_clients, "clients": [{"name": s} for s in sites],
                 "trainer": {"image": "t", "command": ["python", "train.py"]}, "clientRestartLimit": limit},
    })


def _raw(site: str, phase: str = "Running", *, reason: str = "", message: str = "", exit_code: int | None = None,
         deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"job-client-{site}", "uid": f"uid-{site}", "creationTimestamp":
                            "2027-01-15T08:00:00Z"}
    if deleting:
        meta["deletionTimestamp"] = "2027-01-15T08:05:00Z"
    status: dict[str, Any] = {"phase": phase}
    if reason:
        status.update(reason=reason, message=message)
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error"}}}]
    return {"metadata": meta, "status": status}


def _word(phase: Phase = Phase.RUNNING, **clients: str | tuple[str, str]) -> ServerWord:
    entries = [ClientStatus(n, *(s if isinstance(s, tuple) else (s,))) for n, s in clients.items()]
    return ServerWord.of(None, JobStatus(job="job", phase=phase, round=2, rounds=3, clients=entries))


SILENT = ServerWord.of(None, None)
RUNNING = {s: _raw(s) for s in ("a", "b", "c")}


def _previous(**counts: int) -> dict[str, Any]:
    return {"phase": "Running", "clients": {s: {"state": "Training", **({"restarts": counts[s]} if s in counts else {})}
                                            for s in ("a", "b", "c")}}


@pytest.mark.parametrize(("pod", "word", "why"), [
    (None, SILENT, "its pod was deleted"),
    (_raw("a", "Failed", reason="Evicted", message="The node was low on resource: memory."), SILENT,
     "Evicted: The node was low on resource: memory."),
    (_raw("a", "Failed", exit_code=137), _word(a="Training"), "trainer Error with exit code 137"),
])
def test_an_ended_pod_within_budget_is_created_again(pod: dict[str, Any] | None, word: ServerWord,
                                                     why: str) -> None:
    pods = {**RUNNING, "a": pod} if pod is not None else {s: p for s, p in RUNNING.items() if s != "a"}
    plan = restarts.plan(_job(), _previous(a=1), pods, word)
    assert [(e.site, e.why) for e in plan.recreate] == [("a", why)]
    assert plan.exhausted == [] and plan.events == [] and plan.replaced == {"a"}
    assert plan.counts == {"a": 1, "b": 0, "c": 0}


@pytest.mark.parametrize(("pods", "word", "previous"), [
    # Running, or still terminating (its successor would only meet the name).
    (RUNNING, SILENT, _previous()),
    ({**RUNNING, "a": _raw("a", "Failed", reason="Evicted", deleting=True)}, SILENT, _previous()),
    # A crash without the server's fresh word may be a trainer that raised: wait for the server.
    ({**RUNNING, "a": _raw("a", "Failed", exit_code=1)}, SILENT, _previous()),
    # The server failed the site for the job: its sidecar would be refused.
    ({**RUNNING, "a": _raw("a", "Failed", exit_code=1)}, _word(a=("Failed", "Exception")), _previous()),
    # The job is over or ending: client exits are teardown.
    ({**RUNNING, "a": _raw("a", "Failed", reason="Evicted")}, _word(Phase.SUCCEEDED, a="Done"), _previous()),
    # The operator failed the site already (a timeout): its pod is gone for good.
    ({s: p for s, p in RUNNING.items() if s != "a"}, SILENT,
     {"phase": "Running", "clients": {"a": {"state": "Failed", "reason": "DeployTimeout"}}}),
])
def test_pods_that_are_not_created_again(pods: dict[str, Any], word: ServerWord, previous: dict[str, Any]) -> None:
    plan = restarts.plan(_job(), previous, pods, word)
    assert plan.recreate == [] and plan.exhausted == [] and plan.events == []


def test_the_ended_server_pod_stops_all_recreation() -> None:
    server = st.PodView(name="job-server", phase="Succeeded", exit_code=0)
    word = ServerWord.of(server_outcome(server), None)
    plan = restarts.plan(_job(), _previous(), {"b": RUNNING["b"], "c": RUNNING["c"]}, word)
    assert plan.recreate == []


def test_over_budget_the_site_fails_for_the_job_naming_the_pods_last_reason_and_the_job_goes_on() -> None:
    job = _job(limit=2)
    pods = {**RUNNING, "a": _raw("a", "Failed", reason="Evicted", message="low on memory")}
    plan = restarts.plan(job, _previous(a=2), pods, SILENT)
    assert plan.recreate == [] and [e.site for e in plan.exhausted] == ["a"]
    entry = plan.previous["clients"]["a"]
    assert (entry["state"], entry["reason"], entry["restarts"]) == ("Failed", REASON_RESTART_LIMIT, 2)
    assert "Evicted: low on memory" in entry["message"] and "clientRestartLimit (2)" in entry["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", REASON_RESTART_LIMIT)]
    assert "client a" in plan.events[0].message

    views = {s: st.pod_view(p, "trainer") for s, p in pods.items() if s not in plan.replaced}
    ready = {s: v.__class__(**{**v.__dict__, "ready": True}) for s, v in views.items()}
    decision = st.decide(job, plan.previous, st.Observation(T0, st.PodView("job-server", "Running", ready=True),
                                                            ready, None))
    restarts.stamp(decision.status, plan.counts)
    assert decision.status["phase"] == "Running"  # 2 of 3 left, minClients 2
    assert decision.status["clients"]["a"]["reason"] == REASON_RESTART_LIMIT
    assert decision.status["clients"]["a"]["restarts"] == 2
    # Below minClients the job fails, naming the site and why.
    lost = restarts.plan(_job(limit=0, min_clients=3), _previous(), pods, SILENT)
    decision = st.decide(_job(limit=0, min_clients=3), lost.previous,
                         st.Observation(T0, st.PodView("job-server", "Running", ready=True), ready, None))
    assert decision.status["phase"] == "Failed"
    failed = st.get_condition(decision.status["conditions"], "Failed") or {}
    assert failed.get("reason") == "QuorumLost" and f"a ({REASON_RESTART_LIMIT}" in str(failed.get("message"))


def test_a_pod_listed_for_a_site_the_operator_failed_is_deleted_in_the_next_look() -> None:
    # An operator restarting while a site used up its budget: its resume handler, working from the status kopf
    # handed it, re-created the pod after the look that failed the site deleted it. The next look deletes it again.
    job = _job(limit=1)
    plan = restarts.plan(job, _previous(a=1), {**RUNNING, "a": _raw("a", "Failed", reason="Evicted")}, SILENT)
    failed = st.decide(job, plan.previous, st.Observation(T0, st.PodView("job-server", "Running", ready=True),
                                                          {}, None)).status
    again = {s: st.PodView(f"job-client-{s}", "Running", ready=True) for s in ("a", "b", "c")}
    later = st.decide(job, failed, st.Observation(T0 + 5, st.PodView("job-server", "Running", ready=True), again, None))
    assert later.delete_pods == ["job-client-a"] and later.status["clients"]["a"]["reason"] == REASON_RESTART_LIMIT
    going = {**again, "a": st.PodView("job-client-a", "Running", ready=True, deleting=True)}
    assert st.decide(job, failed, st.Observation(T0 + 10, st.PodView("job-server", "Running", ready=True), going,
                                                 None)).delete_pods == []


def test_restarts_read_from_the_status_ignore_what_is_no_count() -> None:
    for value in (True, -1, "2", None):
        assert restarts.restarts_of({"clients": {"a": {"state": "Training", "restarts": value}}}, "a") == 0
    assert restarts.restarts_of({"clients": {"a": {"restarts": 3}}}, "a") == 3
    assert restarts.restarts_of({}, "a") == 0


def test_a_resume_after_suspend_gives_every_site_a_fresh_pod_and_a_fresh_budget() -> None:
    # Kept on purpose (docs/kubernetes.md, "Client restarts and disruptions"): a resume re-admits every site, the
    # one that used up its budget too, so a count carried over would leave that site a pod and no re-creation.
    job = _job(limit=2)
    previous = _previous(b=1)
    previous["clients"]["a"] = {"state": "Failed", "reason": REASON_RESTART_LIMIT, "message": "x", "restarts": 2}
    paused, _ = st.suspended(previous, T0)
    again, _ = st.resumed({**previous, **paused}, job, T0 + 60)
    assert {s: e["state"] for s, e in again["clients"].items()} == dict.fromkeys(("a", "b", "c"), "Pending")
    assert [restarts.restarts_of(again, s) for s in ("a", "b", "c")] == [0, 0, 0]
    plan = restarts.plan(job, {**previous, **again}, {**RUNNING, "a": None}, SILENT)
    assert [e.site for e in plan.recreate] == ["a"] and not plan.exhausted  # a's budget is whole again


def test_the_server_pdb_refuses_voluntary_evictions_of_the_healthy_server_and_is_owned_by_the_job() -> None:
    refs = [{"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "name": "job", "uid": "u", "controller": True}]
    pdb = disruption.build_server_pdb(_job(), refs)
    assert (pdb["apiVersion"], pdb["kind"], pdb["metadata"]["name"]) == ("policy/v1", "PodDisruptionBudget",
                                                                         "job-server")
    assert pdb["spec"]["maxUnavailable"] == 0 and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"]["matchLabels"] == {"fedkube.dev/job": "job", "fedkube.dev/role": "server"}
    assert pdb["metadata"]["ownerReferences"] == refs


def _pod(api: _Labelled, name: str) -> dict[str, Any] | None:
    return next((p for p in api.job_pods("default", "evict") if p["metadata"]["name"] == name), None)


def _evict(core: Any, name: str) -> None:
    core.patch_namespaced_pod_status(name, "default", {"status": {
        "phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}})


def test_client_pods_are_created_again_within_the_budget_kept_across_operator_restarts(
        kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    core = kubernetes.client.CoreV1Api(kube.api_client)
    policy = kubernetes.client.PolicyV1Api(kube.api_client)
    api = _Labelled(kube)
    doc = _doc("evict", minClients=1, clientRestartLimit=1)

    def site_a() -> dict[str, Any]:
        return dict((_status(custom, "evict").get("clients") or {}).get("a") or {})

    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", doc)
        first = until(lambda: _pod(api, "evict-client-a"), "pod evict-client-a")
        until(lambda: _status(custom, "evict").get("phase"), "a phase")
        core.delete_namespaced_pod("evict-client-a", "default")
        second = until(lambda: (p := _pod(api, "evict-client-a")) and p["metadata"]["uid"] != first["metadata"]["uid"]
                       and p, "a new pod evict-client-a")
        assert second["metadata"]["ownerReferences"][0]["name"] == "evict"
        until(lambda: site_a().get("restarts") == 1, "restarts 1 in the status of site a")
        # kopf posts Events from a queue of its own: the Event may land just after the status patch.
        until(lambda: any(e.reason == "ClientPodRecreated" and "client a: its pod was deleted" in e.message for e in
                          core.list_namespaced_event("default", field_selector="involvedObject.name=evict").items),
              "the ClientPodRecreated Event")
        pdb = policy.read_namespaced_pod_disruption_budget("evict-server", "default")
        assert pdb.spec.max_unavailable == 0 and pdb.metadata.owner_references[0].name == "evict"
    # A new operator reads the count from the status: the budget (1) is used up, the next eviction fails site a.
    with _operator(kube):
        _evict(core, "evict-client-a")
        until(lambda: site_a().get("reason") == REASON_RESTART_LIMIT, "site a RestartLimitExceeded")
        assert "Evicted: The node was low on resource: memory." in site_a()["message"] and site_a()["restarts"] == 1
        until(lambda: _pod(api, "evict-client-a") is None, "the evicted pod deleted", 30.0)  # slow under load
        assert _status(custom, "evict")["phase"] not in ("Failed", "Succeeded")  # b is left, minClients 1
        assert _pod(api, "evict-client-b") is not None
