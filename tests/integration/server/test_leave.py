"""A site that leaves by its own decision (control.proto ``Leave``), and the job's terms sent before any task."""

from __future__ import annotations

import numpy as np

from fedkube.server.registry import LEAVE_MESSAGE_CHARS
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply, add_value


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
