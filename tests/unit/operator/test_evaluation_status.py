"""status.evaluation: the FLJob shows the server's newest evaluations, and keeps them once the server is gone."""

from __future__ import annotations

import dataclasses

from fedkube.operator import status as st
from fedkube.operator.evaluation_status import EVALUATION_HISTORY
from fedkube.spec.status import FLJobStatus
from fedkube.status import EvaluationPoint, Phase
from fedkube.termination import TerminationSummary
from tests.unit.operator.test_status import T0, _job, _live, _pod


def test_the_flj_status_shows_the_newest_evaluations_and_a_missed_poll_keeps_them() -> None:
    points = [EvaluationPoint(round=r, metrics={"acc": r / 100}, sites=3, examples=90) for r in range(1, 15)]
    live = dataclasses.replace(_live(Phase.RUNNING, 14, a="Done", b="Done", c="Done"), evaluation=points)
    pods = {s: _pod(f"job-client-{s}") for s in ("a", "b", "c")}
    d = st.decide(_job(), {"phase": "Running"}, st.Observation(T0 + 1, _pod("job-server"), pods, live))
    shown = d.status["evaluation"]
    assert [p["round"] for p in shown] == list(range(15 - EVALUATION_HISTORY, 15))
    assert shown[-1] == {"round": 14, "metrics": {"acc": 0.14}, "sites": 3, "examples": 90}
    assert FLJobStatus.model_validate(d.status).evaluation[-1].metrics == {"acc": 0.14}  # the CRD's model reads it
    again = st.decide(_job(), d.status, st.Observation(T0 + 2, _pod("job-server"), pods, None))
    assert "evaluation" not in again.status  # the merge patch leaves the last curve in place
    without = st.decide(_job(), {"phase": "Running"}, st.Observation(T0 + 1, _pod("job-server"), pods,
                                                                      _live(Phase.RUNNING, 1, a="Training")))
    assert "evaluation" not in without.status


def test_a_finished_servers_summary_adds_the_final_evaluation_the_last_poll_missed() -> None:
    points = [EvaluationPoint(round=r, metrics={"acc": r / 100}, sites=3, examples=90) for r in range(1, 7)]
    pods = {s: _pod(f"job-client-{s}", "Succeeded", exit_code=0) for s in ("a", "b", "c")}
    shown = [p.to_dict() for p in points[:5]]  # the last poll saw rounds 1-5; the server evaluated round 6 after it
    summary = TerminationSummary(exit_code=0, job="job", phase=Phase.SUCCEEDED, round=6, rounds=6, completed_rounds=6,
                                 evaluation=points[-5:])  # the summary carries only its newest 5
    server = _pod("job-server", "Succeeded", exit_code=0, message=summary.to_json())
    d = st.decide(_job(), {"phase": "Running", "evaluation": shown}, st.Observation(T0 + 1, server, pods, None))
    assert d.status["phase"] == "Succeeded"
    assert [p["round"] for p in d.status["evaluation"]] == [1, 2, 3, 4, 5, 6]
    assert d.status["evaluation"][-1] == {"round": 6, "metrics": {"acc": 0.06}, "sites": 3, "examples": 90}
