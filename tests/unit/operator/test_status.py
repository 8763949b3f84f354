"""The operator's pure lifecycle rules: conditions, phases, timeouts (injected clock), outcomes, lesson 19."""

from __future__ import annotations

from typing import Any

import pytest

from fedkube.operator import status as st
from fedkube.spec import FLJob, parse_job
from fedkube.status import ClientStatus, JobStatus, Phase
from fedkube.termination import TerminationSummary

T0 = 1_800_000_000.0  # pods are created at T0 in these tests


def _job(sites: tuple[str, ...] = ("a", "b", "c"), min_clients: int = 2, **spec: Any) -> FLJob:
    doc = {
        "apiVersion": "fedkube.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": "job", "namespace": "ns"},
        "spec": {
            "rounds": 3,
            "minClients": min_clients,
            "clients": [{"name": s} for s in sites],
            "trainer": {"image": "t", "command": ["python", "train.py"]},
            "timeouts": {"deploySeconds": 60, "pendingSeconds": 20},
            **spec,
        },
    }
    return parse_job(doc)


def _pod(name: str, phase: str = "Running", *, ready: bool = True, scheduled: bool = True, exit_code: int | None = None,
         message: str = "", waiting: str = "") -> st.PodView:
    return st.PodView(
        name=name, phase=phase, created=T0, ready=ready, scheduled=scheduled,
        schedule_reason="" if scheduled else "Unschedulable",
        schedule_message="" if scheduled else "0/3 nodes are available: 3 Insufficient cpu.",
        waiting_reason=waiting, exit_code=exit_code, message=message,
    )


def _summary(phase: Phase, exit_code: int, reason: str = "", message: str = "",
             clients: tuple[tuple[str, str, str], ...] = ()) -> str:
    return TerminationSummary(
        exit_code=exit_code, job="job", phase=phase, round=3, rounds=3, completed_rounds=3 if exit_code == 0 else 1,
        reason=reason, message=message, clients=[ClientStatus(n, s, r) for n, s, r in clients],
    ).to_json()


def _live(phase: Phase = Phase.RUNNING, round_: int = 1, **clients: str) -> JobStatus:
    return JobStatus(job="job", phase=phase, round=round_, rounds=3,
                     clients=[ClientStatus(n, s) for n, s in clients.items()])


# --- set_condition -----------------------------------------------------------------------------


def test_new_condition_gets_now() -> None:
    conds = st.set_condition([], "Running", "True", "Go", "started", "t1")
    assert conds == [{"type": "Running", "status": "True", "reason": "Go", "message": "started",
                      "lastTransitionTime": "t1"}]


def test_same_status_keeps_transition_time_but_takes_the_new_reason_and_message() -> None:
    conds = st.set_condition([], "Running", "True", "Go", "round 1", "t1")
    conds = st.set_condition(conds, "Running", "True", "StillGoing", "round 2", "t2")
    assert conds[0]["lastTransitionTime"] == "t1"
    assert (conds[0]["reason"], conds[0]["message"]) == ("StillGoing", "round 2")


def test_status_change_moves_transition_time_and_keeps_other_conditions_in_order() -> None:
    conds = st.set_condition([], "Deployed", "True", "Up", "", "t0")
    conds = st.set_condition(conds, "Running", "True", "Go", "", "t1")
    conds = st.set_condition(conds, "Running", "False", "Done", "", "t2")
    assert [c["type"] for c in conds] == ["Deployed", "Running"]
    assert conds[0]["lastTransitionTime"] == "t0"
    assert conds[1]["lastTransitionTime"] == "t2" and conds[1]["status"] == "False"


def test_set_condition_rejects_a_status_kubernetes_does_not_know() -> None:
    with pytest.raises(ValueError, match="True, False or Unknown"):
        st.set_condition([], "Running", "yes", "", "", "t")


# --- pod_view ------------------------------------------------------------------------------------


def test_pod_view_reads_scheduling_readiness_and_the_main_containers_exit() -> None:
    pod = {
        "metadata": {"name": "p", "creationTimestamp": "2027-01-15T08:00:00Z"},
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
            "initContainerStatuses": [{"name": "sidecar", "state": {"terminated": {"exitCode": 0}}}],
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 3, "message": "boom"}}}],
        },
    }
    view = st.pod_view(pod, "trainer")
    assert (view.phase, view.ready, view.scheduled, view.exit_code, view.message) == ("Failed", False, True, 3, "boom")
    assert view.created == st.parse_time("2027-01-15T08:00:00Z")


def test_pod_view_of_an_unschedulable_pod_keeps_the_schedulers_words() -> None:
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes fit"}]}}
    view = st.pod_view(pod, "trainer")
    assert not view.scheduled and view.schedule_reason == "Unschedulable" and view.schedule_message == "0/3 nodes fit"


# --- timeouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod", "elapsed", "reason"),
    [
        (_pod("p", "Pending", ready=False, scheduled=False), 19.9, None),
        (_pod("p", "Pending", ready=False, scheduled=False), 20.0, "PendingTimeout"),
        (_pod("p", "Pending", ready=False, waiting="ImagePullBackOff"), 25.0, "PendingTimeout"),
        # Scheduled and starting (init containers, image being pulled): deploying, not pending.
        (_pod("p", "Pending", ready=False), 25.0, None),
        (_pod("p", "Pending", ready=False), 60.0, "DeployTimeout"),
        (_pod("p", "Running", ready=False), 59.0, None),
        (_pod("p", "Running", ready=False), 60.0, "DeployTimeout"),
        (_pod("p", "Running", ready=True), 600.0, None),
    ],
)
def test_timeouts_with_an_injected_clock(pod: st.PodView, elapsed: float, reason: str | None) -> None:
    failure = st.timeout_failure(pod, T0 + elapsed, deploy_seconds=60, pending_seconds=20)
    assert (failure.reason if failure else None) == reason
    if failure is not None:
        assert failure.state == "Failed" and "fix:" in failure.message and failure.pod == "p"


def test_pending_timeout_carries_the_schedulers_reason_and_message() -> None:
    failure = st.timeout_failure(_pod("p", "Pending", ready=False, scheduled=False), T0 + 21, 60, 20)
    assert failure is not None
    assert "Unschedulable: 0/3 nodes are available: 3 Insufficient cpu." in failure.message


# --- outcome from the server's termination summary ----------------------------------------------------


def test_outcome_success() -> None:
    out = st.outcome_from_server(0, _summary(Phase.SUCCEEDED, 0, message="completed 3 round(s)",
                                             clients=(("a", "Done", ""),)))
    assert (out.phase, out.reason, out.message) == ("Succeeded", "Completed", "completed 3 round(s)")
    assert out.summary is not None and out.summary.clients[0].state == "Done"


def test_outcome_quorum_lost_names_the_servers_reason() -> None:
    out = st.outcome_from_server(1, _summary(Phase.FAILED, 1, "QuorumLost", "round 2: 1 of 3 results; b: Lost",
                                             (("b", "Lost", "Lost"),)))
    assert (out.phase, out.reason) == ("Failed", "QuorumLost") and "b: Lost" in out.message


def test_outcome_config_error() -> None:
    out = st.outcome_from_server(2, _summary(Phase.FAILED, 2, "ConfigError", "spec.model.path does not exist"))
    assert (out.phase, out.reason, out.message) == ("Failed", "ConfigError", "spec.model.path does not exist")


def test_outcome_from_a_garbage_message_is_a_clear_failure() -> None:
    out = st.outcome_from_server(1, "Traceback (most recent call last): ... MemoryError")
    assert out.phase == "Failed" and out.reason == "ServerExited" and out.summary is None
    assert "exited with code 1" in out.message and "not valid JSON" in out.message
    assert "MemoryError" in out.message and "kubectl logs" in out.message


def test_outcome_without_a_summary_uses_the_exit_code() -> None:
    assert st.outcome_from_server(2, "").reason == "ConfigError"
    ok = st.outcome_from_server(0, "")
    assert ok.phase == "Succeeded" and "no termination summary" in ok.message


def test_a_failed_job_is_not_success_even_if_the_process_exited_zero() -> None:
    assert st.outcome_from_server(0, _summary(Phase.FAILED, 1, "QuorumLost", "x")).phase == "Failed"


# --- lesson 19 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("server_ok", "code", "noise"), [(True, 1, True), (True, 0, False), (False, 1, False),
                                                           (True, None, False)])
def test_teardown_noise_rule(server_ok: bool, code: int | None, noise: bool) -> None:
    assert st.is_teardown_noise(server_ok, code) is noise


def test_client_exiting_nonzero_after_the_server_succeeded_does_not_fail_the_job() -> None:
    job = _job(("a", "b"), 2)
    server = _pod("job-server", "Succeeded", ready=False, exit_code=0,
                  message=_summary(Phase.SUCCEEDED, 0, clients=(("a", "Done", ""), ("b", "Done", ""))))
    pods = {"a": _pod("job-client-a", "Failed", ready=False, exit_code=137), "b": _pod("job-client-b")}
    d = st.decide(job, {"phase": "Running"}, st.Observation(T0 + 5, server, pods))
    assert d.status["phase"] == "Succeeded"
    assert d.status["clients"]["a"]["state"] == "Done"
    assert "teardown" in d.status["clients"]["a"]["message"]
    assert not [e for e in d.events if e.type == "Warning" and e.reason != "ModelNotPersisted"]


def test_client_exiting_after_delivering_its_result_while_the_server_finishes_is_not_a_failure() -> None:
    job = _job(("a", "b"), 2)
    pods = {"a": _pod("job-client-a", "Failed", ready=False, exit_code=3), "b": _pod("job-client-b")}
    # The server's status poll failed (it is writing its summary); the last word on "a" was Done.
    previous = {"phase": "Running", "clients": {"a": {"state": "Done"}, "b": {"state": "Done"}}}
    d = st.decide(job, previous, st.Observation(T0 + 5, _pod("job-server"), pods))
    assert d.status["clients"]["a"]["state"] == "Done" and d.status["phase"] == "Running"
    assert not d.events


# --- decide: phases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "live", "previous", "phase"),
    [
        (None, None, "Pending", "Pending"),
        (_pod("job-server", "Pending", ready=False, scheduled=False), None, "Pending", "Pending"),
        (_pod("job-server", "Running", ready=False), None, "Pending", "Deploying"),
        (_pod("job-server"), _live(Phase.PENDING, 0), "Deploying", "Deploying"),
        (_pod("job-server"), _live(Phase.RUNNING, 1, a="Training", b="Training", c="Training"), "Deploying", "Running"),
        (_pod("job-server"), None, "Running", "Running"),  # a missed poll does not leave Running
        (_pod("job-server", "Succeeded", ready=False, exit_code=0, message=_summary(Phase.SUCCEEDED, 0)), None,
         "Running", "Succeeded"),
        (_pod("job-server", "Failed", ready=False, exit_code=1, message=_summary(Phase.FAILED, 1, "QuorumLost", "x")),
         None, "Running", "Failed"),
    ],
)
def test_phase_table(server: st.PodView | None, live: JobStatus | None, previous: str, phase: str) -> None:
    pods = {s: _pod(f"job-client-{s}") for s in ("a", "b", "c")}
    d = st.decide(_job(), {"phase": previous}, st.Observation(T0 + 1, server, pods, live))
    assert d.status["phase"] == phase
    events = [e for e in d.events if e.reason == phase]
    assert bool(events) == (phase != previous), "an Event for every phase transition, none otherwise"


def test_phase_transition_event_and_terminal_conditions() -> None:
    server = _pod("job-server", "Failed", ready=False, exit_code=2,
                  message=_summary(Phase.FAILED, 2, "ConfigError", "bad model path"))
    d = st.decide(_job(), {"phase": "Running"}, st.Observation(T0 + 9, server, {}))
    conds = {c["type"]: c for c in d.status["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Failed"]["reason"] == "ConfigError"
    assert d.status["completionTime"] == st.format_time(T0 + 9)
    assert [e.type for e in d.events if e.reason == "Failed"] == ["Warning"]


def test_pending_timeout_fails_the_client_deletes_its_pod_and_the_job_continues_above_quorum() -> None:
    pods = {"a": _pod("job-client-a"), "b": _pod("job-client-b"),
            "c": _pod("job-client-c", "Pending", ready=False, scheduled=False)}
    d = st.decide(_job(), {"phase": "Deploying"}, st.Observation(T0 + 21, _pod("job-server"), pods))
    assert d.status["clients"]["c"]["reason"] == "PendingTimeout"
    assert d.status["phase"] == "Deploying" and d.delete_pods == ["job-client-c"]
    assert d.status["clientsReady"] == 2 and d.status["clientsDisplay"] == "2/3"
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "PendingTimeout")]
    # Once failed by the operator, the client stays failed though its pod is gone.
    again = st.decide(_job(), {**d.status}, st.Observation(T0 + 22, _pod("job-server"),
                                                            {"a": pods["a"], "b": pods["b"]}))
    assert again.status["clients"]["c"]["reason"] == "PendingTimeout" and not again.events


def test_too_few_clients_left_fails_the_job_naming_them_and_stops_its_pods() -> None:
    pods = {"a": _pod("job-client-a"), "b": _pod("job-client-b", "Running", ready=False),
            "c": _pod("job-client-c", "Pending", ready=False, scheduled=False)}
    d = st.decide(_job(), {"phase": "Deploying"}, st.Observation(T0 + 61, _pod("job-server"), pods))
    assert d.status["phase"] == "Failed"
    failed = {c["type"]: c for c in d.status["conditions"]}["Failed"]
    assert failed["reason"] == "QuorumLost"
    assert "b (DeployTimeout" in failed["message"] and "c (PendingTimeout" in failed["message"]
    assert d.delete_pods == ["job-client-a", "job-client-b", "job-client-c", "job-server"]


def test_a_crashed_client_is_shown_failed_but_the_server_decides_the_job() -> None:
    pods = {"a": _pod("job-client-a"), "b": _pod("job-client-b"),
            "c": _pod("job-client-c", "Failed", ready=False, exit_code=1, message="ValueError: bad batch")}
    live = _live(Phase.RUNNING, 2, a="Training", b="Training", c="Training")
    d = st.decide(_job(min_clients=3), {"phase": "Running"}, st.Observation(T0 + 5, _pod("job-server"), pods, live))
    assert d.status["clients"]["c"]["reason"] == "TrainerExited" and "ValueError" in d.status["clients"]["c"]["message"]
    assert d.status["phase"] == "Running"
    assert any(e.type == "Warning" and "client c" in e.message for e in d.events)


def test_server_pending_past_its_timeout_fails_the_job() -> None:
    server = _pod("job-server", "Pending", ready=False, scheduled=False)
    d = st.decide(_job(), {"phase": "Pending"}, st.Observation(T0 + 21, server, {}))
    assert d.status["phase"] == "Failed" and "server:" in d.status["conditions"][-1]["message"]


# --- invalid, suspend, resume, TTL --------------------------------------------------------------------


def test_invalid_names_every_field_and_fix() -> None:
    from fedkube.spec import Problem

    fields, events = st.invalid({}, [Problem("spec.clients[1].name", "duplicate", "rename it")], T0)
    conds = {c["type"]: c for c in fields["conditions"]}
    assert fields["phase"] == "Failed" and conds["Invalid"]["status"] == "True"
    assert conds["Invalid"]["message"] == "spec.clients[1].name: duplicate; fix: rename it"
    assert [e.reason for e in events] == ["InvalidSpec", "Failed"]


def test_suspend_and_resume() -> None:
    job = _job()
    running = st.set_condition([], "Running", "True", "RoundsInProgress", "round 2 of 3", "t0")
    fields, events = st.suspended({"phase": "Running", "clientsTotal": 3, "conditions": running,
                                   "clients": {"a": {"state": "Training"},
                                               "c": {"state": "Failed", "reason": "PendingTimeout"}}}, T0)
    assert fields["phase"] == "Suspended" and list(fields["clients"]) == ["c"]
    assert {c["type"]: c["status"] for c in fields["conditions"]} == {"Running": "False", "Suspended": "True"}
    assert [(e.type, e.reason) for e in events] == [("Normal", "Suspended")]
    resumed, events = st.resumed(fields, job, T0 + 1)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Pending")]
    assert resumed["phase"] == "Pending" and set(resumed["clients"]) == {"a", "b", "c"}
    assert {c["type"]: c["status"] for c in resumed["conditions"]}["Suspended"] == "False"
    assert resumed["startTime"] == st.format_time(T0 + 1)


@pytest.mark.parametrize(("ttl", "elapsed", "expired"), [(None, 1e6, False), (30, 29, False), (30, 30, True)])
def test_ttl_after_finished(ttl: int | None, elapsed: float, expired: bool) -> None:
    job = _job(ttlSecondsAfterFinished=ttl) if ttl is not None else _job()
    previous = {"phase": "Succeeded", "completionTime": st.format_time(T0)}
    assert st.ttl_expired(job, previous, T0 + elapsed) is expired
    if expired:
        fields, _ = st.cleaned_up(previous, ttl or 0, T0 + elapsed)
        assert not st.ttl_expired(job, {**previous, **fields}, T0 + elapsed + 100)


def test_ttl_never_applies_to_a_running_job() -> None:
    assert not st.ttl_expired(_job(ttlSecondsAfterFinished=0), {"phase": "Running"}, T0 + 1e6)


def test_operator_failed_sites_are_only_the_timeouts() -> None:
    previous = {"clients": {"a": {"state": "Failed", "reason": "PendingTimeout"},
                            "b": {"state": "Failed", "reason": "Exception"},
                            "c": {"state": "Failed", "reason": "DeployTimeout"}, "d": {"state": "Done"}}}
    assert st.operator_failed_sites(previous) == {"a", "c"}


def test_revalidated_lifts_the_invalid_verdict() -> None:
    from fedkube.spec import Problem

    failed, _ = st.invalid({}, [Problem("spec.minClients", "too many", "lower it")], T0)
    assert st.is_invalid(failed)
    fields, events = st.revalidated(failed, _job(), T0 + 5)
    conds = {c["type"]: c["status"] for c in fields["conditions"]}
    assert fields["phase"] == "Pending" and conds["Invalid"] == "False" and conds["Failed"] == "False"
    assert fields["completionTime"] is None  # a null in the merge patch removes it
    assert [e.reason for e in events] == ["SpecFixed", "Pending"]
    assert not st.is_invalid({**failed, **fields})


def test_a_name_conflict_fails_the_job_and_says_which_object() -> None:
    message = "Service ns/j-server already exists and does not belong to FLJob ns/j (...). Fix: ..."
    fields, events = st.name_conflict({"phase": "Pending"}, message, T0)
    conds = {c["type"]: c for c in fields["conditions"]}
    assert fields["phase"] == "Failed" and fields["completionTime"] == st.format_time(T0)
    assert (conds["NameConflict"]["status"], conds["NameConflict"]["reason"]) == ("True", "NameConflict")
    assert conds["Failed"]["reason"] == "NameConflict" and conds["NameConflict"]["message"] == message
    assert (events[0].type, events[0].reason, events[0].message) == ("Warning", "NameConflict", message)
    assert [e.reason for e in events] == ["NameConflict", "Failed"]
    # An Invalid job whose fixed spec then meets a taken name: the spec is no longer what is wrong.
    from fedkube.spec import Problem

    invalid, _ = st.invalid({}, [Problem("spec.minClients", "too many", "lower it")], T0)
    fields, events = st.name_conflict(invalid, message, T0 + 5)
    assert not st.is_invalid({**invalid, **fields}) and fields["phase"] == "Failed"
    assert [e.reason for e in events] == ["NameConflict"]  # it was Failed already


def _status_schema() -> dict[str, Any]:
    import yaml

    from tests.e2e.conftest import CRD

    crd = yaml.safe_load(CRD.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return schema


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def test_every_status_the_operator_writes_matches_the_crd_schema() -> None:
    import jsonschema  # type: ignore[import-untyped]

    from fedkube.spec import Problem

    job = _job()
    pods = {"a": _pod("job-client-a"), "b": _pod("job-client-b", "Running", ready=False),
            "c": _pod("job-client-c", "Pending", ready=False, scheduled=False)}
    written: list[dict[str, Any]] = []
    status: dict[str, Any] = {}
    for fields, _ in (st.resumed(status, job, T0),):
        status = {**status, **fields}
        written.append(status)
    for when, server, live in (
        (T0 + 1, _pod("job-server"), _live(Phase.PENDING, 0)),
        (T0 + 2, _pod("job-server"), _live(Phase.RUNNING, 1, a="Training", b="Uploading", c="Pending")),
        (T0 + 61, _pod("job-server"), None),
        (T0 + 70, _pod("job-server", "Succeeded", ready=False, exit_code=0,
                       message=_summary(Phase.SUCCEEDED, 0, clients=(("a", "Done", ""),))), None),
    ):
        status = {**status, **st.decide(job, status, st.Observation(when, server, pods, live)).status}
        written.append(status)
    written.append({**status, **st.suspended(status, T0 + 80)[0]})
    written.append({**status, **st.invalid(status, [Problem("spec.x", "bad", "fix it")], T0 + 90)[0]})
    written.append({**status, **st.cleaned_up(status, 5, T0 + 99)[0]})
    schema = _status_schema()
    for doc in written:
        jsonschema.validate(_drop_nulls(doc), schema)
    assert {d["phase"] for d in written} >= {"Pending", "Deploying", "Running", "Succeeded", "Suspended", "Failed"}


def test_a_client_that_crashed_before_the_end_gets_no_teardown_note() -> None:
    job = _job(("a", "b", "c"), 2)
    server = _pod("job-server", "Succeeded", ready=False, exit_code=0, message=_summary(
        Phase.SUCCEEDED, 0, clients=(("a", "Done", ""), ("b", "Done", ""), ("c", "Failed", "Exception"))))
    pods = {"a": _pod("job-client-a"), "b": _pod("job-client-b"),
            "c": _pod("job-client-c", "Failed", ready=False, exit_code=1)}
    d = st.decide(job, {"phase": "Running", "clients": {"c": {"state": "Failed", "reason": "Exception"}}},
                  st.Observation(T0 + 5, server, pods))
    assert d.status["phase"] == "Succeeded"
    assert d.status["clients"]["c"]["reason"] == "Exception" and "teardown" not in d.status["clients"]["c"].get(
        "message", "")


def test_a_client_exit_without_the_servers_fresh_word_is_not_judged_yet() -> None:
    job = _job(("a", "b"), 2)
    pods = {"a": _pod("job-client-a", "Failed", ready=False, exit_code=3), "b": _pod("job-client-b")}
    # The last poll said Uploading; this one failed (the server is finishing the job).
    previous = {"phase": "Running", "clients": {"a": {"state": "Uploading"}, "b": {"state": "Done"}}}
    d = st.decide(job, previous, st.Observation(T0 + 5, _pod("job-server"), pods))
    assert d.status["clients"]["a"]["state"] == "Uploading" and not d.events
    # With the server's word that "a" never delivered, the exit is a failure.
    live = _live(Phase.RUNNING, 3, a="Uploading", b="Done")
    d = st.decide(job, previous, st.Observation(T0 + 6, _pod("job-server"), pods, live))
    assert d.status["clients"]["a"]["reason"] == "TrainerExited"


def test_a_job_that_finished_between_two_looks_shows_it_ran() -> None:
    # Deploying, then Succeeded at the next look: Running was never seen, but the job certainly ran.
    status, _ = st.transition({}, Phase.DEPLOYING, "Creating", "creating pods", 0.0)
    status, _ = st.transition(status, Phase.SUCCEEDED, "Completed", "3 of 3 rounds", 5.0)
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds["Deployed"] == "True" and conds["Running"] == "False" and conds["Succeeded"] == "True"
    # A job that failed before it ran says nothing about running.
    failed, _ = st.transition({}, Phase.FAILED, "QuorumLost", "no clients", 5.0)
    assert "Running" not in {c["type"] for c in failed["conditions"]}


def test_a_remote_site_counts_as_ready_once_the_server_reports_it_registered() -> None:
    job = _job(clients=[{"name": "a"}, {"name": "b"}, {"name": "r", "remote": True}])
    pods = {"a": _pod("job-client-a"), "b": _pod("job-client-b")}
    waiting = st.decide(job, {"phase": "Deploying"}, st.Observation(T0 + 5, _pod("job-server"), pods,
                                                                    _live(Phase.PENDING, 0, a="Registered")))
    assert waiting.status["clientsDisplay"] == "2/3"  # the remote site has not joined yet: no pod to be Ready
    joined = st.decide(job, {"phase": "Deploying"}, st.Observation(T0 + 6, _pod("job-server"), pods, _live(
        Phase.PENDING, 0, a="Registered", b="Registered", r="Registered")))
    assert joined.status["clientsReady"] == 3 and joined.status["clientsDisplay"] == "3/3"
