"""`fedkube run` shows the evaluation curve (spec.evaluation): a console line per evaluation as the status shows
it, every evaluation in the final summary, and a termination summary that leaves the curve out before a client."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from fedkube.runtime.cli import format_outcome
from fedkube.runtime.local import RunOutcome
from fedkube.runtime.progress import ProgressDisplay, parse_status
from fedkube.status import ClientState, ClientStatus, EvaluationPoint, JobStatus, Phase
from fedkube.termination import SUMMARY_EVALUATIONS, TERMINATION_LIMIT, TerminationSummary

CURVE = [EvaluationPoint(round=r, metrics={"loss": 1.0 / r, "accuracy": 0.5 + r / 10}, sites=2, examples=200)
         for r in (1, 2, 3)]  # fmt: skip


def test_the_console_prints_each_evaluation_once_as_it_appears() -> None:
    out = io.StringIO()
    display = ProgressDisplay(Console(file=out, width=200), interval_s=60)
    for upto in (1, 1, 3):
        status = JobStatus(job="j", phase=Phase.RUNNING, round=upto, rounds=3, evaluation=CURVE[:upto])
        display.update(parse_status(status.to_dict()))
    lines = [line for line in out.getvalue().splitlines() if line.startswith("evaluation")]
    assert lines == ["evaluation after round 1: loss 1, accuracy 0.6 (2 site(s))",
                     "evaluation after round 2: loss 0.5, accuracy 0.7 (2 site(s))",
                     "evaluation after round 3: loss 0.3333, accuracy 0.8 (2 site(s))"]


def test_the_run_summary_lists_the_curve(tmp_path: Path) -> None:
    status = JobStatus(job="j", phase=Phase.SUCCEEDED, round=3, rounds=3, completed_rounds=3, evaluation=CURVE)
    summary = TerminationSummary.from_json(TerminationSummary.from_status(status).to_json())
    outcome = RunOutcome(exit_code=0, summary=summary, pods={}, notes=(), run_dir=tmp_path, interrupted=False,
                         client_sites={})  # fmt: skip
    text = format_outcome("j", outcome)
    assert "  evaluation after round 1: loss 1, accuracy 0.6 (2 site(s), 200 examples)" in text
    assert text.index("after round 1") < text.index("after round 2") < text.index("after round 3")


def test_a_full_termination_summary_leaves_the_curve_out_before_any_client() -> None:
    many = [EvaluationPoint(round=r, metrics={f"metric_{i:02d}": 0.5 for i in range(60)}, sites=9, examples=10**9)
            for r in range(1, 30)]  # fmt: skip
    status = JobStatus(job="j", phase=Phase.SUCCEEDED, round=29, rounds=29, evaluation=many,
                       clients=[ClientStatus(f"site-{i}", ClientState.DONE) for i in range(5)])  # fmt: skip
    summary = TerminationSummary.from_status(status)
    assert [p.round for p in summary.evaluation] == list(range(30 - SUMMARY_EVALUATIONS, 30))
    doc = json.loads(summary.to_json())
    assert len(summary.to_json().encode()) <= TERMINATION_LIMIT
    assert "evaluation" not in doc and len(doc["clients"]) == 5 and "clientsOmitted" not in doc
    small = TerminationSummary.from_status(JobStatus(job="j", phase=Phase.SUCCEEDED, round=3, rounds=3,
                                                     evaluation=CURVE))  # fmt: skip
    assert [p["round"] for p in json.loads(small.to_json())["evaluation"]] == [1, 2, 3]
