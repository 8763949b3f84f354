"""Random event sequences against the registry: stale events never move state, lifecycle rules always hold."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.server.registry import _ALLOWED, ClientState, InvalidTransition, RegistrationRejected, Registry, SessionKey
from fedkube.status import Reason
from tests.unit.server.conftest import FakeClock

S = ClientState
SITES = ("a", "b")
FAIL_REASONS = [r for r in Reason if r is not Reason.LOST]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_event_sequences_respect_the_lifecycle(data: st.DataObject) -> None:
    clock = FakeClock()
    reg = Registry(SITES, heartbeat_timeout_s=10, clock=clock, job="j")
    conns: dict[str, list[SessionKey]] = {s: [] for s in SITES}
    next_conn = 1
    task_no = 0
    ever_registered: set[str] = set()
    for _ in range(data.draw(st.integers(1, 60))):
        site = data.draw(st.sampled_from(SITES))
        op = data.draw(
            st.sampled_from(["register", "heartbeat", "task", "announce", "done", "fail", "disconnect", "tick"])
        )
        before = reg.get(site)
        stale = bool(conns[site]) and data.draw(st.booleans())
        session = conns[site][0] if stale and len(conns[site]) > 1 else (conns[site][-1] if conns[site] else None)
        was_current = session is not None and reg.is_current(session)
        changed = None
        if op == "register":
            key = SessionKey(site, data.draw(st.sampled_from(["s1", "s2"])), next_conn)
            next_conn += 1
            try:
                result = reg.register(key, data.draw(st.sampled_from(["", before.task_id])))
            except RegistrationRejected:
                assert before.failed_for_job
                continue
            assert result is not None
            conns[site].append(key)
            ever_registered.add(site)
        elif op == "heartbeat" and session is not None:
            changed = reg.heartbeat(session)
        elif op == "task":
            task_no += 1
            idle = before.state in (S.REGISTERED, S.DONE)
            eligible = idle or (before.state is S.FAILED and not before.failed_for_job)
            if eligible and before.seen:
                reg.task_sent(site, f"t{task_no}", task_no)
            else:
                try:
                    reg.task_sent(site, f"t{task_no}", task_no)
                except InvalidTransition:
                    pass
                else:
                    raise AssertionError(f"task_sent from {before.state} did not raise")
        elif op == "announce" and session is not None:
            task = data.draw(st.sampled_from([before.task_id, "t-old"]))
            changed = reg.result_announced(session, task)
        elif op == "done":
            reg.result_done(site, data.draw(st.sampled_from([before.task_id, "t-old"])))
        elif op == "fail":
            reason = data.draw(st.sampled_from(FAIL_REASONS))
            changed = reg.fail(site, reason, "x", session=session if data.draw(st.booleans()) else None)
        elif op == "disconnect" and session is not None:
            changed = reg.disconnected(session)
        elif op == "tick":
            clock.advance(data.draw(st.sampled_from([1.0, 6.0, 11.0])))
            reg.check_heartbeats()
        after = reg.get(site)
        if session is not None and op in ("heartbeat", "announce", "disconnect") and not was_current:
            assert changed is False and after == before, f"a stale {op} changed {site}"
        if after.state is not before.state:
            assert after.state in _ALLOWED[before.state], f"{before.state} -> {after.state}"
        if before.failed_for_job:
            assert after.state is S.FAILED and after.reason == before.reason
        for s in SITES:
            if s not in ever_registered:
                assert reg.get(s).state in (S.PENDING, S.FAILED), "a never-seen client must never be Lost"
