"""Fault 12: a result whose tensor shapes, dtypes or names differ from the global model.

The server checks an announced result against the global model before it
downloads a byte of it: a mismatch excludes that client from the round with
reason InvalidResult (round-scoped: it gets the next round's task), the
trainer's ``send()`` raises ``ResultRejectedError`` saying what differs, and
``fedkube_server_client_failures_total{reason="InvalidResult"}`` counts it.
site-c sends a wrong shape in round 1, a wrong dtype in round 2 and a wrong
name in round 3; the aggregate of site-a and site-b must come out exact.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.faults.support import LocalJob, assert_knob_aggregate, clients_of, job_doc, knob_steps

pytestmark = pytest.mark.timeout(90)

ROUNDS = 3


def test_mismatched_results_are_excluded_each_round_and_the_aggregate_is_exact(tmp_path: Path) -> None:
    doc = job_doc(
        "f12", ("site-a", "site-b", "site-c"), rounds=ROUNDS, min_clients=2, checkpoint=True,
        site_env={**knob_steps(),
                  "site-c": {"FAULT_STEP": "100", "FAULT_EXAMPLES": "1000", "FAULT_HOLD_ROUND": "-1",
                             "FAULT_BAD_RESULT": "1:shape,2:dtype,3:name"}},
    )
    with LocalJob(doc, tmp_path) as job:
        # site-a and site-b hold round 3's result; site-c's third bad result is refused by then.
        live = job.until_failed("site-c", "InvalidResult", count=ROUNDS)  # one per round
        assert "'b'" in live["message"] and "bias" in live["message"], live  # round 3: the renamed tensor
        job.open_gate()
        _, summary = job.succeeded(rounds=ROUNDS)

    # Each round's refusal reached the trainer's send(), naming what differs.
    rejected = re.findall(r"\[site-c trainer\] site-c round (\d) rejected: InvalidResult: (.*)", job.output.text())
    assert [r for r, _ in rejected] == ["1", "2", "3"], rejected
    why = dict(rejected)
    assert "shape" in why["1"] and "float64" in why["2"] and "bias" in why["3"], why
    server_log = job.log("server", "server")
    assert len(re.findall(r"round \d: invalid result from site-c: ", server_log)) == ROUNDS

    clients = clients_of(summary)
    assert {s: clients[s]["roundsCompleted"] for s in clients} == {"site-a": 3, "site-b": 3, "site-c": 0}
    # Every round's aggregate is site-a's and site-b's alone, to the bit.
    assert_knob_aggregate(job.checkpoint(), rounds=ROUNDS)
