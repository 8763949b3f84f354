"""Client registry: lifecycle transitions, stale events, heartbeat debounce, reasons."""

from __future__ import annotations

import itertools

import pytest

from fedkube.server.registry import (
    STALL_FLOOR_S,
    ClientState,
    InvalidTransition,
    LoopWatch,
    RegistrationRejected,
    Registry,
    SessionKey,
)
from fedkube.status import Reason
from tests.unit.server.conftest import FakeClock

S = ClientState
_conn = itertools.count(1)


def connect(reg: Registry, site: str, session_id: str = "s1", resume: str = "") -> SessionKey:
    key = SessionKey(site, session_id, next(_conn))
    assert reg.register(key, resume) is not None
    return key


def make(clock: FakeClock, *names: str) -> Registry:
    return Registry(names or ("a", "b", "c"), heartbeat_timeout_s=30, clock=clock, job="j")


def test_happy_lifecycle_over_two_rounds(clock: FakeClock) -> None:
    reg = make(clock)
    a = connect(reg, "a")
    assert reg.get("a").state is S.REGISTERED
    reg.task_sent("a", "t1", 1)
    assert reg.result_announced(a, "t1")
    assert reg.get("a").state is S.UPLOADING
    assert reg.result_done("a", "t1")
    assert reg.get("a").state is S.DONE and reg.get("a").rounds_completed == 1
    reg.task_sent("a", "t2", 2)
    assert reg.get("a").state is S.TRAINING and reg.get("a").round == 2


def test_impossible_transitions_raise(clock: FakeClock) -> None:
    reg = make(clock)
    with pytest.raises(InvalidTransition, match="Pending; it cannot be given task"):
        reg.task_sent("a", "t1", 1)
    a = connect(reg, "a")
    reg.task_sent("a", "t1", 1)
    with pytest.raises(InvalidTransition, match="Training; it cannot be given task"):
        reg.task_sent("a", "t2", 1)
    reg.fail("a", Reason.EXCEPTION, "boom", session=a)
    with pytest.raises(InvalidTransition, match="failed for the job"):
        reg.task_sent("a", "t3", 2)


def test_stale_events_from_an_old_connection_are_ignored(clock: FakeClock) -> None:
    reg = make(clock)
    old = connect(reg, "a", "s1")
    reg.task_sent("a", "t1", 1)
    new = connect(reg, "a", "s1", resume="t1")  # reconnect of the same sidecar, resuming its task
    assert reg.get("a").state is S.TRAINING
    assert not reg.heartbeat(old)
    assert not reg.result_announced(old, "t1")
    assert not reg.fail("a", Reason.EXCEPTION, "late news from the old stream", session=old)
    assert not reg.disconnected(old)
    assert reg.get("a").state is S.TRAINING and reg.get("a").connected
    assert reg.result_announced(new, "t1")
    # An older connection registering late does not replace the newer one.
    assert reg.register(old) is None


def test_events_for_another_task_are_ignored(clock: FakeClock) -> None:
    reg = make(clock)
    a = connect(reg, "a")
    reg.task_sent("a", "t1", 1)
    assert not reg.result_announced(a, "t0")  # round 0's result arriving late
    assert not reg.fail("a", Reason.TRANSFER_FAILED, task_id="t0")
    assert reg.get("a").state is S.TRAINING
    assert reg.result_announced(a, "t1")
    assert not reg.result_done("a", "t0")
    assert reg.result_done("a", "t1")


def test_reconnect_without_resume_loses_the_task(clock: FakeClock) -> None:
    reg = make(clock)
    connect(reg, "a", "s1")
    reg.task_sent("a", "t1", 1)
    key = SessionKey("a", "s2", next(_conn))  # the sidecar restarted: new session, nothing to resume
    registration = reg.register(key)
    assert registration is not None and registration.task_lost and not registration.resumed
    assert reg.get("a").state is S.REGISTERED


def test_never_seen_client_is_never_lost(clock: FakeClock) -> None:
    reg = make(clock)
    connect(reg, "a")
    clock.advance(10_000)
    lost = reg.check_heartbeats()
    assert [r.name for r in lost] == ["a"]
    assert reg.get("b").state is S.PENDING and reg.get("b").reason is None


def test_heartbeats_keep_a_client_alive_and_silence_makes_it_lost(clock: FakeClock) -> None:
    reg = make(clock)
    a = connect(reg, "a")
    for _ in range(5):
        clock.advance(20)
        assert reg.heartbeat(a)
        assert reg.check_heartbeats() == []
    reg.disconnected(a)
    clock.advance(29)
    assert reg.check_heartbeats() == []  # a disconnect alone is not Lost: the sidecar reconnects with backoff
    clock.advance(2)
    (lost,) = reg.check_heartbeats()
    assert lost.state is S.LOST and lost.reason is Reason.LOST and "no heartbeat for 31.0 s" in lost.message
    assert not reg.heartbeat(a)  # the lost connection's events are stale
    connect(reg, "a", "s9")
    assert reg.get("a").state is S.REGISTERED and reg.get("a").reason is None


def test_loop_watch_reports_only_gaps_longer_than_a_third_of_the_heartbeat_timeout(clock: FakeClock) -> None:
    watch = LoopWatch(30, clock)
    assert watch.limit_s == 10
    assert watch.tick() == 0  # the first pass has nothing to compare with
    clock.advance(9.9)
    assert watch.tick() == 0
    clock.advance(10.5)
    assert watch.tick() == 10.5
    clock.advance(0.2)
    assert watch.tick() == 0
    # A short timeout keeps a floor above the loop's own pace: otherwise every pass would look like a stall.
    fast = LoopWatch(0.6, clock)
    assert fast.limit_s == STALL_FLOOR_S
    fast.tick()
    clock.advance(0.9)
    assert fast.tick() == 0


def _loop(reg: Registry, watch: LoopWatch, clock: FakeClock, seconds: int,
          beating: dict[str, SessionKey]) -> list[tuple[float, str, str]]:
    """The server's loop, a pass a second; ``beating`` heartbeat every 10 s. Returns (time, site, message) of losses."""
    lost = []
    for _ in range(seconds):
        clock.advance(1)
        if round(clock.now) % 10 == 0:
            for key in beating.values():
                reg.heartbeat(key)
        stalled = watch.tick()
        if stalled:
            reg.server_stalled(stalled)
        lost += [(clock.now, r.name, r.message) for r in reg.check_heartbeats()]
    return lost


def test_a_stall_of_the_server_itself_gives_every_client_a_fresh_timeout_from_the_resume(clock: FakeClock) -> None:
    """Issue 11 §2.2: the server stopped for 45 s (timeout 30 s) blames nobody; clients are judged after it."""
    reg, watch = make(clock, "a", "b"), LoopWatch(30, clock)
    keys = {s: connect(reg, s) for s in ("a", "b")}
    assert _loop(reg, watch, clock, 25, keys) == []
    clock.advance(45)  # the process is stopped: no pass of the loop, no heartbeat read
    resumed = clock.now + 1  # the loop's first pass after the stall
    b_died = {"a": keys["a"]}  # b died during the stall; a's heartbeats go on
    lost = _loop(reg, watch, clock, 60, b_died)
    # Nobody was blamed for the stall; b is Lost one timeout after the resume, not at once.
    assert [(site, when - resumed) for when, site, _ in lost] == [("b", 31)]
    assert "no heartbeat for 31.0 s since the server resumed from a stall of its own" in lost[0][2]
    assert reg.get("a").state is S.REGISTERED
    # Without the stall report (the bug), the same stall loses both clients on the first pass after it.
    reg2 = make(clock, "a", "b")
    for site in ("a", "b"):
        connect(reg2, site)
    clock.advance(45)
    assert sorted(r.name for r in reg2.check_heartbeats()) == ["a", "b"]


def test_client_done_with_the_final_round_is_not_lost_when_its_pod_winds_down(clock: FakeClock) -> None:
    reg = make(clock)
    a, b = connect(reg, "a"), connect(reg, "b")
    for site, key in (("a", a), ("b", b)):
        reg.task_sent(site, f"{site}-t2", 2)
        assert reg.result_announced(key, f"{site}-t2")
    assert reg.result_done("a", "a-t2")  # a delivered round 2 of 2; b is still uploading
    reg.disconnected(a)  # its trainer exited, then its sidecar: teardown (LESSONS.md 19)
    clock.advance(10_000)
    assert [r.name for r in reg.check_heartbeats(final_round=2)] == ["b"]
    assert reg.get("a").state is S.DONE and reg.get("a").reason is None
    # Not the last round: the same silence is a loss.
    reg2 = make(clock)
    c = connect(reg2, "a")
    reg2.task_sent("a", "t1", 1)
    assert reg2.result_announced(c, "t1") and reg2.result_done("a", "t1")
    clock.advance(10_000)
    assert [r.name for r in reg2.check_heartbeats(final_round=2)] == ["a"]


def test_failure_rules(clock: FakeClock) -> None:
    reg = make(clock)
    a = connect(reg, "a")
    reg.task_sent("a", "t1", 1)
    assert reg.fail("a", Reason.ROUND_TIMEOUT, task_id="t1")
    rec = reg.get("a")
    assert rec.state is S.FAILED and rec.failed_round == 1 and not rec.failed_for_job
    assert rec.message == Reason.ROUND_TIMEOUT.sentence
    assert not reg.fail("a", Reason.TRANSFER_FAILED)  # the first round-scoped failure wins
    reg.task_sent("a", "t2", 2)  # a straggler takes part in the next round
    assert reg.fail("a", Reason.EXCEPTION, "ValueError: x", session=a)
    assert reg.get("a").failed_for_job
    assert not reg.fail("a", Reason.ABORTED)
    with pytest.raises(RegistrationRejected, match=r"failed for job 'j'.*cannot rejoin"):
        reg.register(SessionKey("a", "s2", next(_conn)))
    with pytest.raises(RegistrationRejected, match="not a client of job"):
        reg.register(SessionKey("zz", "s", next(_conn)))
    with pytest.raises(ValueError, match="check_heartbeats"):
        reg.fail("b", Reason.LOST)


def test_statuses_and_note(clock: FakeClock) -> None:
    reg = make(clock)
    connect(reg, "a")
    assert reg.note("b", Reason.NOT_REGISTERED, "not connected when round 1 started")
    assert not reg.note("a", Reason.NOT_REGISTERED, "x")
    statuses = {s.name: s for s in reg.statuses()}
    assert statuses["a"].state == "Registered" and statuses["a"].reason == ""
    assert statuses["b"].state == "Pending" and statuses["b"].reason == "NotRegistered"
    connect(reg, "b")
    assert reg.get("b").reason is None


def test_bad_construction() -> None:
    with pytest.raises(Exception, match="unique"):
        Registry(["a", "a"], heartbeat_timeout_s=1)
    with pytest.raises(Exception, match="at least one client"):
        Registry([], heartbeat_timeout_s=1)


def test_round_scoped_failure_of_a_never_connected_client_is_a_no_op(clock: FakeClock) -> None:
    reg = make(clock)
    assert not reg.fail("a", Reason.NOT_REGISTERED)
    assert reg.get("a").state is S.PENDING
    with pytest.raises(InvalidTransition, match="cannot be given task"):
        reg.task_sent("a", "t1", 1)
    assert reg.fail("b", Reason.DEPLOY_TIMEOUT, "pod not ready in 300 s")  # the operator's verdict
    with pytest.raises(RegistrationRejected, match="DeployTimeout"):
        reg.register(SessionKey("b", "s", next(_conn)))


def test_a_leave_withdraws_at_once_only_from_the_current_stream_and_the_site_may_come_back(clock: FakeClock) -> None:
    from fedkube.server.registry import LEAVE_MESSAGE_CHARS, leave_reason

    reg = make(clock)
    old = connect(reg, "a")
    new = connect(reg, "a")  # replaces the old stream
    reg.task_sent("a", "t1", 1)
    assert reg.withdraw(old, Reason.WITHDRAWN, "stale") is None and reg.get("a").state is S.TRAINING
    assert reg.withdraw(SessionKey("b", "s1", 999), Reason.WITHDRAWN, "never connected") is None
    rec = reg.withdraw(new, leave_reason("Anything"), "y" * 2000)
    assert rec is not None and (rec.state, rec.reason) == (S.WITHDRAWN, Reason.WITHDRAWN)
    assert len(rec.message) == LEAVE_MESSAGE_CHARS and not rec.connected
    # The first word stands: no later failure, loss or second Leave replaces it.
    assert not reg.fail("a", Reason.TRAINER_EXITED, "its trainer ended as the pod went")
    assert reg.withdraw(new, Reason.POLICY_REFUSED, "again") is None
    clock.advance(100)
    assert reg.check_heartbeats() == [] and reg.get("a").state is S.WITHDRAWN
    # The site comes back (its admin changed the policy): Registered again, not refused.
    connect(reg, "a")
    assert reg.get("a").state is S.REGISTERED and reg.get("a").reason is None
    assert leave_reason("PolicyRefused") is Reason.POLICY_REFUSED
