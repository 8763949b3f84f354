"""Each client's weight, update norm and bound in the status document: written, read back, checked."""

from __future__ import annotations

import json

import pytest

from fedkube.status import ClientState, ClientStatus, JobStatus, Phase, SummaryError
from fedkube.termination import TerminationSummary


def _status(*clients: ClientStatus) -> JobStatus:
    return JobStatus(job="j", phase=Phase.RUNNING, round=2, rounds=3, clients=list(clients))


def test_influence_fields_round_trip_and_are_left_out_when_unknown() -> None:
    bounded = ClientStatus("site-c", ClientState.DONE, rounds_completed=1, weight=10.0, update_norm=1.5e8,
                           bounded="num_examples 1e+06 capped to 10; update norm 1.5e+08 clipped to 500")  # fmt: skip
    plain = ClientStatus("site-a", ClientState.DONE, rounds_completed=1)
    doc = json.loads(_status(bounded, plain).to_json())
    assert doc["clients"][0]["weight"] == 10.0 and doc["clients"][0]["updateNorm"] == 1.5e8
    assert "capped" in doc["clients"][0]["bounded"]
    assert not {"weight", "updateNorm", "bounded"} & set(doc["clients"][1])
    back = JobStatus.from_json(json.dumps(doc))
    assert back.clients[0] == bounded and back.clients[1] == plain
    summary = TerminationSummary.from_status(_status(bounded, plain))
    read = {c.name: c for c in TerminationSummary.from_json(summary.to_json()).clients}
    assert read["site-c"].update_norm == 1.5e8 and read["site-a"].update_norm is None


@pytest.mark.parametrize("bad", [{"weight": -1.0}, {"updateNorm": "big"}, {"weight": True}])
def test_a_bad_influence_field_is_refused_by_name(bad: dict[str, object]) -> None:
    doc = json.loads(_status(ClientStatus("site-a", ClientState.DONE)).to_json())
    doc["clients"][0].update(bad)
    with pytest.raises(SummaryError, match=next(iter(bad))):
        JobStatus.from_json(json.dumps(doc))
