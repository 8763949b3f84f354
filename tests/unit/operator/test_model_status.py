"""A succeeded FLJob names its delivered model (claim, path, sha256) or warns, once, that the model has no home."""

from __future__ import annotations

from typing import Any

import pytest

from fedkube.operator import status as st
from fedkube.status import Phase
from fedkube.termination import TerminationSummary
from tests.unit.operator.test_status import T0, _job, _pod

SHA = "ab" * 32


def _succeeded_server(model_file: str = "") -> st.PodView:
    summary = TerminationSummary(exit_code=0, job="job", phase=Phase.SUCCEEDED, round=3, rounds=3, completed_rounds=3,
                                 model_file=model_file, model_sha256=SHA if model_file else "")
    text = summary.to_json()
    assert TerminationSummary.from_json(text) == summary  # the new fields survive the termination message
    return _pod("job-server", "Succeeded", ready=False, exit_code=0, message=text)


def _decide(server_pod: st.PodView, previous: dict[str, Any] | None = None, **spec: Any) -> st.Decision:
    pods = {s: _pod(f"job-client-{s}", "Succeeded", ready=False, exit_code=0) for s in ("a", "b", "c")}
    return st.decide(_job(**spec), previous or {"phase": "Running"}, st.Observation(T0 + 5, server_pod, pods))


@pytest.mark.parametrize(("output", "claim"), [({"size": "1Gi"}, "job-output"), ({"claimName": "models"}, "models")])
def test_a_delivered_model_is_named_in_status(output: dict[str, Any], claim: str) -> None:
    d = _decide(_succeeded_server("job.safetensors"), output=output)
    assert d.status["phase"] == "Succeeded"
    assert d.status["model"] == {"claimName": claim, "path": "/var/lib/fedkube/output/job.safetensors",
                                 "sha256": SHA, "round": 3}
    assert not any(c["type"] == "ModelNotPersisted" for c in d.status["conditions"])


def test_a_job_without_a_durable_location_warns_once_that_the_model_is_lost() -> None:
    d = _decide(_succeeded_server())
    cond = next(c for c in d.status["conditions"] if c["type"] == "ModelNotPersisted")
    assert cond["status"] == "True" and "lost with the pod" in cond["message"] and "spec.output" in cond["message"]
    assert [e.reason for e in d.events if e.type == "Warning"] == ["ModelNotPersisted"]
    assert "model" not in d.status
    again = _decide(_succeeded_server(), previous={"phase": "Running", "conditions": d.status["conditions"]})
    assert not [e for e in again.events if e.reason == "ModelNotPersisted"]


def test_a_checkpoint_claim_is_a_durable_location() -> None:
    d = _decide(_succeeded_server(), server={"checkpoint": {"enabled": True}})
    assert not any(c["type"] == "ModelNotPersisted" for c in d.status["conditions"])
