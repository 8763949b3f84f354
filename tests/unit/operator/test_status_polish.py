"""Status polish (issue 14): no phase flip while the server finishes; the last rounds' metrics in the status."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedkube.operator import status as st
from fedkube.operator.rounds import round_metrics
from fedkube.operator.views import ServerWord
from fedkube.spec.status import ROUND_METRICS_KEPT
from fedkube.status import JobStatus, Phase
from fedkube.termination import TerminationSummary
from tests.unit.operator.test_status import T0, _job, _live, _pod, _status_schema


@pytest.mark.parametrize("outcome", [Phase.SUCCEEDED, Phase.FAILED])
def test_a_running_job_stays_running_while_the_server_finishes(outcome: Phase) -> None:
    # The ordering behind "Running -> Deploying just before success": the server's /status already says the job
    # is over, but its process has not exited, so the pod still runs and no termination summary exists yet.
    job = _job()
    pods = {s: _pod(f"job-client-{s}") for s in ("a", "b", "c")}
    running = st.decide(job, {"phase": "Deploying"}, st.Observation(T0 + 1, _pod("job-server"), pods,
                                                                    _live(Phase.RUNNING, 3, a="Done")))
    assert running.status["phase"] == "Running"
    finishing = st.decide(job, running.status, st.Observation(T0 + 2, _pod("job-server"), pods,
                                                              _live(outcome, 3, a="Done", b="Done", c="Done")))
    assert finishing.status["phase"] == "Running"
    assert not [e for e in finishing.events if e.reason in {p.value for p in Phase}]


def _with_metrics(done: int, metrics: dict[str, float], seconds: float | None = 2.5) -> JobStatus:
    live = _live(Phase.RUNNING, min(done + 1, 9))
    live.completed_rounds, live.metrics, live.last_round_seconds = done, metrics, seconds
    return live


def test_status_keeps_the_last_rounds_metrics_bounded_and_once_per_round() -> None:
    import jsonschema  # type: ignore[import-untyped]

    job = _job(rounds=9)
    pods = {s: _pod(f"job-client-{s}") for s in ("a", "b", "c")}
    status: dict[str, Any] = {"phase": "Running"}
    # Rounds 1-7 as the operator sees them: round 4 twice (two looks in one round), round 6 never (it was short).
    for look, done in enumerate((1, 2, 3, 4, 4, 5, 7)):
        live = _with_metrics(done, {"loss": 1.0 / done, "accuracy": done / 10, "diverged": math.inf})
        status = {**status, **st.decide(job, status, st.Observation(T0 + look, _pod("job-server"), pods, live)).status}
    history = status["roundMetrics"]
    assert len(history) == ROUND_METRICS_KEPT and [e["round"] for e in history] == [2, 3, 4, 5, 7]
    assert history[-1] == {"round": 7, "metrics": {"loss": 1 / 7, "accuracy": 0.7}, "seconds": 2.5}
    # The server's final word adds the last round from its termination summary.
    summary = TerminationSummary(exit_code=0, job="job", phase=Phase.SUCCEEDED, round=9, rounds=9,
                                 completed_rounds=9, metrics={"loss": 0.01})
    done = _pod("job-server", "Succeeded", ready=False, exit_code=0, message=summary.to_json())
    status = {**status, **st.decide(job, status, st.Observation(T0 + 9, done, pods)).status}
    assert [e["round"] for e in status["roundMetrics"]] == [3, 4, 5, 7, 9]
    assert status["roundMetrics"][-1] == {"round": 9, "metrics": {"loss": 0.01}}
    jsonschema.validate(status["roundMetrics"], _status_schema()["properties"]["roundMetrics"])
    # A hand-edited entry is dropped, not trusted.
    assert round_metrics({"roundMetrics": ["x", {"round": "1"}, {"round": 2, "metrics": {}}]},
                         ServerWord.of(None, None)) == [{"round": 2, "metrics": {}}]
