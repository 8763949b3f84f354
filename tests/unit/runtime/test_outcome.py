"""The console summary of ``fedkube run`` (issue 11 §2.8 and §2.9)."""

from __future__ import annotations

import json
from pathlib import Path

from fedkube.runtime.cli import format_outcome
from fedkube.runtime.local import RunOutcome
from fedkube.runtime.pod import ContainerResult, PodResult
from fedkube.status import ClientState, ClientStatus, Phase, TerminationSummary


def _pod(name: str, phase: str = "Succeeded") -> PodResult:
    return PodResult(name=name, phase=phase, containers=(ContainerResult("trainer", 0, False),))


def test_clients_the_server_summary_leaves_out_are_counted_with_where_to_see_them(tmp_path: Path) -> None:
    sites = [f"site-{i:03d}" for i in range(100)]
    summary = TerminationSummary(
        exit_code=0, job="big", phase=Phase.SUCCEEDED, round=3, rounds=3, completed_rounds=3,
        clients=[ClientStatus(s, ClientState.DONE, rounds_completed=3) for s in sites],
    )  # fmt: skip
    doc = json.loads(summary.to_json())
    omitted = doc["clientsOmitted"]
    assert omitted > 0  # what a 100-client job's 4096-byte termination message does
    outcome = RunOutcome(
        exit_code=0, summary=doc, pods={f"big-client-{s}": _pod(f"big-client-{s}") for s in sites}, notes=(),
        run_dir=tmp_path, interrupted=False, client_sites={f"big-client-{s}": s for s in sites},
    )  # fmt: skip
    text = format_outcome("big", outcome)
    listed = [line for line in text.splitlines() if line.startswith("  client ")]
    assert len(listed) == 100 - omitted
    assert f"\u2026 and {omitted} more client(s)" in text
    assert f"their pods: {omitted} Succeeded" in text
    assert "--json" in text and str(tmp_path / "logs") in text
