"""Round decisions, one test per DESIGN.md §5 row the server owns."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from fedkube.errors import ConfigError
from fedkube.server.registry import ClientState, Registry, SessionKey
from fedkube.server.rounds import (
    Action,
    RoundError,
    RoundPolicy,
    RoundState,
    Verdict,
    apply_start,
    apply_stragglers,
    begin_round,
    classify_trainer_report,
    decide_start,
    job_finished,
)
from fedkube.status import Reason
from tests.unit.server.conftest import FakeClock

S = ClientState
POLICY = RoundPolicy(rounds=3, min_clients=2, round_timeout_s=100, registration_timeout_s=60)
_conn = itertools.count(1)


@dataclass(frozen=True)
class Report:
    phase: str
    kind: str = ""
    message: str = ""
    exit_code: int = 0


class Job:
    """A registry plus the helpers a round loop would use."""

    def __init__(self, clock: FakeClock, names: tuple[str, ...] = ("a", "b", "c"), policy: RoundPolicy = POLICY):
        self.clock = clock
        self.policy = policy
        self.reg = Registry(names, heartbeat_timeout_s=30, clock=clock, job="j")
        self.sessions: dict[str, SessionKey] = {}
        self.t0 = clock.now

    def connect(self, *names: str) -> None:
        for n in names:
            self.sessions[n] = SessionKey(n, "s", next(_conn))
            self.reg.register(self.sessions[n])

    def start(self, round: int = 1) -> RoundState:
        d = decide_start(self.reg, self.policy, round, waiting_since=self.t0, now=self.clock.now)
        assert d.action is Action.START, d
        apply_start(self.reg, d)
        state = begin_round(d, self.policy, self.clock.now)
        for n in d.participants:
            state.assign(self.reg, n, f"r{round}-{n}")
        return state

    def deliver(self, state: RoundState, *names: str) -> None:
        for n in names:
            assert self.reg.result_announced(self.sessions[n], state.task_ids[n])
            assert self.reg.result_done(n, state.task_ids[n])


def test_round1_waits_for_registration_then_starts_when_all_registered(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b")
    d = decide_start(job.reg, POLICY, 1, waiting_since=job.t0, now=clock.advance(10))
    assert d.action is Action.WAIT and d.wake_at == job.t0 + 60
    job.connect("c")
    d = decide_start(job.reg, POLICY, 1, waiting_since=job.t0, now=clock.now)
    assert d.action is Action.START and d.participants == ("a", "b", "c") and d.excluded == ()


def test_never_registered_client_is_excluded_by_name_and_job_proceeds(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b")
    clock.advance(61)
    d = decide_start(job.reg, POLICY, 1, waiting_since=job.t0, now=clock.now)
    assert d.action is Action.START and d.participants == ("a", "b")
    assert [(e.client, e.reason) for e in d.excluded] == [("c", Reason.NOT_REGISTERED)]
    apply_start(job.reg, d)
    status = {s.name: s for s in job.reg.statuses()}["c"]
    assert (status.state, status.reason) == ("Pending", "NotRegistered")
    assert status.message == "not connected when round 1 started"


def test_too_few_registered_fails_with_quorum_lost_naming_each_client(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a")
    clock.advance(61)
    d = decide_start(job.reg, POLICY, 1, waiting_since=job.t0, now=clock.now)
    assert d.action is Action.FAIL and d.reason is Reason.QUORUM_LOST
    assert "round 1: 1 client(s) can take part (a), minClients is 2" in d.message
    assert "b: NotRegistered (not connected when round 1 started)" in d.message
    assert "c: NotRegistered" in d.message


def test_round_closes_when_all_results_are_in(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b", "c")
    state = job.start()
    job.deliver(state, "a", "b")
    d = state.decide(job.reg, clock.advance(5))
    assert d.action is Action.WAIT and d.wake_at == state.deadline and d.done == ("a", "b")
    job.deliver(state, "c")
    d = state.decide(job.reg, clock.now)
    assert d.action is Action.CLOSE and d.done == ("a", "b", "c") and d.stragglers == ()


def test_straggler_is_excluded_by_name_at_the_deadline_and_its_late_result_ignored(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b", "c")
    state = job.start()
    job.deliver(state, "a", "b")
    d = state.decide(job.reg, clock.advance(101))
    assert d.action is Action.CLOSE and d.done == ("a", "b")
    assert [(e.client, e.reason) for e in d.stragglers] == [("c", Reason.ROUND_TIMEOUT)]
    assert "no result within roundSeconds=100 of round 1" in d.stragglers[0].message
    assert apply_stragglers(job.reg, state, d) == ["c"]
    assert not job.reg.result_announced(job.sessions["c"], state.task_ids["c"])
    # The straggler gets round 2's task like everyone else.
    state2 = job.start(2)
    assert state2.participants == ("a", "b", "c")
    assert job.reg.get("c").state is S.TRAINING


def test_result_announced_before_the_deadline_is_waited_for(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b", "c")
    state = job.start()
    job.deliver(state, "a")
    assert job.reg.result_announced(job.sessions["b"], state.task_ids["b"])
    d = state.decide(job.reg, clock.advance(150))
    assert d.action is Action.WAIT and [e.client for e in d.stragglers] == ["c"]
    apply_stragglers(job.reg, state, d)
    assert job.reg.result_done("b", state.task_ids["b"])
    d = state.decide(job.reg, clock.now)
    assert d.action is Action.CLOSE and d.done == ("a", "b")
    assert [(e.client, e.reason) for e in d.failed] == [("c", Reason.ROUND_TIMEOUT)]


def test_deadline_with_too_few_results_is_quorum_lost(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b", "c")
    state = job.start()
    job.deliver(state, "a")
    d = state.decide(job.reg, clock.advance(101))
    assert d.action is Action.FAIL and d.reason is Reason.QUORUM_LOST
    assert "round 1: 1 result(s) by the deadline, minClients is 2" in d.message
    assert "b: RoundTimeout" in d.message and "c: RoundTimeout" in d.message


def test_job_proceeds_while_min_clients_remain_and_fails_early_when_not(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b", "c")
    state = job.start()
    job.reg.fail("c", Reason.EXCEPTION, "ZeroDivisionError in train.py", session=job.sessions["c"])
    job.deliver(state, "a", "b")
    d = state.decide(job.reg, clock.advance(1))
    assert d.action is Action.CLOSE and d.done == ("a", "b")
    assert [(e.client, e.reason) for e in d.failed] == [("c", Reason.EXCEPTION)]
    state2 = job.start(2)
    assert state2.participants == ("a", "b")
    # b goes silent: Lost; one participant left, so the round cannot reach minClients.
    clock.advance(20)
    job.reg.heartbeat(job.sessions["a"])
    clock.advance(15)
    assert [r.name for r in job.reg.check_heartbeats()] == ["b"]
    d = state2.decide(job.reg, clock.now)
    assert d.action is Action.FAIL and d.reason is Reason.QUORUM_LOST
    assert "round 2: 1 participant(s) can still deliver (a), minClients is 2" in d.message
    assert "b: Lost (no heartbeat for 36.0 s (heartbeatSeconds=30)" in d.message
    assert "c: Exception (ZeroDivisionError in train.py)" in d.message


def test_later_round_start_excludes_lost_and_failed_clients_by_name(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b", "c")
    state = job.start()
    job.reg.fail("c", Reason.EXCEPTION, "ZeroDivisionError", session=job.sessions["c"])
    job.deliver(state, "a", "b")
    assert state.decide(job.reg, clock.now).action is Action.CLOSE
    clock.advance(31)
    job.reg.heartbeat(job.sessions["a"])
    assert [r.name for r in job.reg.check_heartbeats()] == ["b"]
    d = decide_start(job.reg, POLICY, 2, waiting_since=clock.now, now=clock.now)
    assert d.action is Action.FAIL and d.reason is Reason.QUORUM_LOST
    assert {e.client: e.reason for e in d.excluded} == {"b": Reason.LOST, "c": Reason.EXCEPTION}
    assert "b: Lost (no heartbeat for 31.0 s" in d.message and "c: Exception (ZeroDivisionError)" in d.message


def test_config_error_from_any_trainer_fails_the_job(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b", "c")
    state = job.start()
    v = classify_trainer_report(Report("Failed", "ConfigError", "missing DATA_DIR"), job.reg.get("b"), POLICY)
    assert v.verdict is Verdict.FAIL_JOB and v.reason is Reason.CONFIG_ERROR
    job.reg.fail("b", v.reason, v.message, session=job.sessions["b"])
    d = state.decide(job.reg, clock.now)
    assert d.action is Action.FAIL and d.reason is Reason.CONFIG_ERROR and "missing DATA_DIR" in d.message


def test_reconnected_participant_without_its_task_needs_it_again(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b")
    clock.advance(61)
    state = job.start()
    job.sessions["b"] = SessionKey("b", "s-restarted", next(_conn))
    registration = job.reg.register(job.sessions["b"])
    assert registration is not None and registration.task_lost
    d = state.decide(job.reg, clock.now)
    assert d.action is Action.WAIT and d.needs_task == ("b",)
    state.assign(job.reg, "b", "r1-b-again")
    job.deliver(state, "a", "b")
    assert state.decide(job.reg, clock.now).action is Action.CLOSE


def test_trainer_report_classification(clock: FakeClock) -> None:
    job = Job(clock, policy=RoundPolicy(rounds=1, min_clients=1, round_timeout_s=100, registration_timeout_s=60))
    job.connect("a", "b", "c")
    state = job.start()
    policy = job.policy
    assert classify_trainer_report(Report("Running"), job.reg.get("a"), policy).verdict is Verdict.HEALTHY
    # Exit while the server is downloading its result.
    job.reg.result_announced(job.sessions["a"], state.task_ids["a"])
    v = classify_trainer_report(Report("Exited", exit_code=137), job.reg.get("a"), policy)
    assert (v.verdict, v.reason) == (Verdict.FAIL_CLIENT, Reason.EXITED_BEFORE_DOWNLOAD)
    assert "exit code 137" in v.message
    # Non-zero exit after the final result was downloaded: teardown noise (LESSONS.md 19).
    job.reg.result_done("a", state.task_ids["a"])
    v = classify_trainer_report(Report("Exited", exit_code=1), job.reg.get("a"), policy)
    assert v.verdict is Verdict.TEARDOWN and v.reason is None
    # An explicit exception while training fails the client.
    v = classify_trainer_report(Report("Failed", "Exception", "ValueError: bad"), job.reg.get("b"), policy)
    assert (v.verdict, v.reason, v.message) == (Verdict.FAIL_CLIENT, Reason.EXCEPTION, "ValueError: bad")
    # A clean finish without sending the round's result.
    v = classify_trainer_report(Report("Finished"), job.reg.get("c"), policy)
    assert (v.verdict, v.reason) == (Verdict.FAIL_CLIENT, Reason.TRAINER_EXITED)
    assert "during round 1 without sending a result" in v.message
    # Anything after the job finished is teardown.
    v = classify_trainer_report(Report("Failed", "Exception", "x"), job.reg.get("c"), policy, job_done=True)
    assert v.verdict is Verdict.TEARDOWN


def test_order_and_policy_errors(clock: FakeClock) -> None:
    job = Job(clock)
    job.connect("a", "b", "c")
    job.start()
    with pytest.raises(RoundError, match="still hold a task of round 1"):
        decide_start(job.reg, POLICY, 2, waiting_since=clock.now, now=clock.now)
    with pytest.raises(ConfigError, match=r"spec\.minClients is 0"):
        RoundPolicy(rounds=1, min_clients=0, round_timeout_s=1, registration_timeout_s=1)
    with pytest.raises(ConfigError, match="roundSeconds is nan"):
        RoundPolicy(rounds=1, min_clients=1, round_timeout_s=float("nan"), registration_timeout_s=1)
    assert not job_finished(POLICY, 2) and job_finished(POLICY, 3)


def test_a_delivered_result_counts_even_if_its_client_is_lost_afterwards(clock: FakeClock) -> None:
    job = Job(clock, ("a", "b"))
    job.connect("a", "b")
    state = job.start()
    job.deliver(state, "a")
    clock.advance(31)
    job.reg.heartbeat(job.sessions["b"])
    assert [r.name for r in job.reg.check_heartbeats()] == ["a"]
    assert state.decide(job.reg, clock.now).action is Action.WAIT  # not QuorumLost: a's result is in
    job.deliver(state, "b")
    d = state.decide(job.reg, clock.now)
    assert d.action is Action.CLOSE and d.done == ("a", "b")


def test_exit_after_final_delivery_is_teardown_even_when_the_client_was_lost_meanwhile(clock: FakeClock) -> None:
    policy = RoundPolicy(rounds=1, min_clients=1, round_timeout_s=100, registration_timeout_s=60)
    job = Job(clock, ("a",), policy)
    job.connect("a")
    state = job.start()
    job.deliver(state, "a")
    clock.advance(31)
    job.reg.check_heartbeats()
    assert job.reg.get("a").state is S.LOST
    v = classify_trainer_report(Report("Exited", exit_code=2), job.reg.get("a"), policy)
    assert v.verdict is Verdict.TEARDOWN
