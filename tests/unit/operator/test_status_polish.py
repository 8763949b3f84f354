"""Status polish (issue 14): no phase flip while the server finishes."""

from __future__ import annotations

import pytest

from fedkube.operator import status as st
from fedkube.status import Phase
from tests.unit.operator.test_status import T0, _job, _live, _pod


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
