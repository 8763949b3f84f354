"""A site that leaves by its own decision (control.proto ``Leave``), and the job's terms sent before any task."""

from __future__ import annotations

import threading

import grpc
import numpy as np

from fedkube.server.registry import LEAVE_MESSAGE_CHARS
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply, add_value
from tests.support.waiting import until


def _model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((3000,), np.float32)}


def _leave(reason: str, message: str) -> control_pb2.ClientMessage:
    return control_pb2.ClientMessage(leave=control_pb2.Leave(reason=reason, message=message))


def test_a_leave_withdraws_its_own_site_at_once_and_the_round_goes_on_exactly(harness: Harness) -> None:
    clients = ("site-a", "site-b", "site-c", "site-d")
    srv = harness.server(make_config(clients, rounds=2, min_clients=2, heartbeat_timeout_s=30.0,
                                     strategy="fedavg"), _model())  # fmt: skip
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    # c announces its result and stalls mid-upload; d refuses the terms before its first task.
    c = harness.sidecar(srv, "site-c", add_value(100.0))
    c.push_mode = lambda req: "stall"
    # A stream that is not site-d's own (a wrong token) cannot make d leave: refused before any Leave is read. A
    # Leave names no site at all: it withdraws the site its authenticated stream belongs to, so c cannot withdraw d.
    intruder = harness.sidecar(srv, "site-d", add_value(0.0), token="guess", start=False)
    intruder.send(_leave("PolicyRefused", "not me"))
    intruder.start()
    d = harness.sidecar(srv, "site-d", lambda task, params: Reply(None))  # its trainer never gets the task
    d.wait_for(lambda: any(m.WhichOneof("msg") == "registered" for m in d.messages), what="d registered")
    terms = next(m.registered.terms for m in d.messages if m.WhichOneof("msg") == "registered")
    assert (terms.strategy, terms.total_rounds) == ("fedavg", 2)
    intruder.wait_for(lambda: intruder.error is not None, what="the intruder's refusal")
    d.send(_leave("PolicyRefused", "the job asks 2 rounds " + "x" * 5000))
    c.wait_for(lambda: bool(c.upload_requests), what="c's upload requested")
    # The heartbeat timeout is 30 s: a Withdrawn state within the wait below came from the Leave, not silence.
    c.send(_leave("Withdrawn", "FLSite hospital/far-c deleted by the site admin"))

    outcome = srv.wait(15)
    assert outcome is not None and outcome.success, outcome
    status = {s.name: s for s in srv.workflow.status().clients}
    assert (status["site-c"].state, status["site-c"].reason) == ("Withdrawn", "Withdrawn"), status["site-c"]
    assert "deleted by the site admin" in status["site-c"].message
    assert (status["site-d"].state, status["site-d"].reason) == ("Withdrawn", "PolicyRefused"), status["site-d"]
    assert len(status["site-d"].message) <= LEAVE_MESSAGE_CHARS
    assert status["site-d"].message.startswith("the job asks 2 rounds"), "the intruder's Leave counted"
    # Exactly the average of a and b: nothing of c's half-uploaded result, nor of d.
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((3000,), 2.0, np.float32))
    assert {status[s].state for s in ("site-a", "site-b")} == {"Done"}
    left = srv.metrics_registry.get_sample_value("fedkube_server_client_failures_total",
                                                 {"fljob": srv.config.job, "reason": "Withdrawn"})
    assert left == 1.0


def test_a_site_that_refused_the_terms_rejoins_with_its_own_credentials_and_counts_from_the_next_round(
        harness: Harness) -> None:
    """Its admin changed the site's policy: the same site registers again (a new sidecar, the same token and
    certificate) while round 1 runs, gets no task of it, and from round 2 on is a participant like any other."""
    srv = harness.server(make_config(("site-a", "site-b", "site-d"), rounds=3, min_clients=2,
                                     heartbeat_timeout_s=30.0), _model())  # fmt: skip

    def state(site: str) -> tuple[str, str]:
        rec = next(c for c in srv.workflow.status().clients if c.name == site)
        return rec.state, rec.reason

    refusing = harness.sidecar(srv, "site-d", lambda task, params: Reply(None))
    refusing.wait_for(lambda: any(m.WhichOneof("msg") == "registered" for m in refusing.messages), what="registered")
    refusing.send(_leave("PolicyRefused", "the job asks 3 rounds, the site's maxRounds is 2"))
    until(lambda: state("site-d") == ("Withdrawn", "PolicyRefused"), "site-d withdrawn", context=lambda: str(
        state("site-d")))
    round_one = threading.Event()  # a's round 1 waits until d is back: d rejoins mid-round, not before it

    def a_trains(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        assert task.round != 1 or round_one.wait(10), "site-d never registered again"
        return add_value(1.0)(task, params)

    a = harness.sidecar(srv, "site-a", a_trains)
    # b trains round 1 and leaves in round 2: round 2 (min 2) then completes only with d, and so does round 3.
    b = harness.sidecar(srv, "site-b", lambda task, params: Reply(None) if task.round > 1 else add_value(3.0)(
        task, params), start=False)
    b.task_hook = lambda task: b.send(_leave("Withdrawn", "FLSite deleted")) if task.round == 2 else None
    b.start()
    a.wait_for(lambda: bool(a.tasks), what="a's round-1 task")
    # The rejoin goes through the same checks as any connection: d's site name with a wrong token is refused.
    intruder = harness.sidecar(srv, "site-d", add_value(50.0), token="guess")
    intruder.wait_for(lambda: intruder.error is not None, what="the intruder's refusal")
    assert intruder.error.code() == grpc.StatusCode.UNAUTHENTICATED and state("site-d")[0] == "Withdrawn"
    d = harness.sidecar(srv, "site-d", add_value(5.0))
    until(lambda: state("site-d") == ("Registered", ""), "site-d registered again", context=lambda: str(
        state("site-d")))
    round_one.set()

    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    assert not refusing.tasks and [t.round for t in d.tasks] == [2, 3], "d rejoined mid-round 1: rounds 2 and 3"
    # Round 1 averages a and b; round 2 exactly a and d (b left mid-round, nothing of it counts).
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((3000,), 2.0, np.float32))
    np.testing.assert_array_equal(a.globals[3]["w"], np.full((3000,), 5.0, np.float32))
    clients = {c.name: c for c in srv.workflow.status().clients}
    assert (clients["site-d"].state, clients["site-d"].rounds_completed) == ("Done", 2), clients["site-d"]
    assert (clients["site-b"].state, clients["site-b"].reason) == ("Withdrawn", "Withdrawn")
