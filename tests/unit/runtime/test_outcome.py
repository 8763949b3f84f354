"""The final summary of ``fedkube run`` (issue 11 §2.8 and §2.9), and reading the server's summary file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedkube.runtime.cli import format_outcome, outcome_json
from fedkube.runtime.local import RunOutcome, read_summary_file
from fedkube.runtime.pod import ContainerResult, PodResult
from fedkube.status import ClientState, ClientStatus, Phase, SummaryError
from fedkube.termination import TERMINATION_LIMIT, TerminationSummary


def _pod(name: str, phase: str = "Succeeded") -> PodResult:
    return PodResult(name=name, phase=phase, containers=(ContainerResult("trainer", 0, False),))


def _big_job(tmp_path: Path) -> tuple[str, RunOutcome]:
    """A 100-client job as the runtime sees it: the summary the server wrote, read back from its file."""
    sites = [f"site-{i:03d}" for i in range(100)]
    summary = TerminationSummary(
        exit_code=0, job="big", phase=Phase.SUCCEEDED, round=3, rounds=3, completed_rounds=3,
        reason="Completed", message="all 3 rounds done", metrics={"loss": 0.25},
        clients=[ClientStatus(s, ClientState.DONE, rounds_completed=3) for s in sites[1:]]
        + [ClientStatus(sites[0], ClientState.LOST, reason="Lost", message="no heartbeat")],
    )  # fmt: skip
    written = summary.to_json()
    path = tmp_path / "server.termination-log"
    path.write_text(written)
    outcome = RunOutcome(
        exit_code=0, summary=read_summary_file(path), pods={f"big-client-{s}": _pod(f"big-client-{s}") for s in sites},
        notes=(), run_dir=tmp_path, interrupted=False, client_sites={f"big-client-{s}": s for s in sites},
    )  # fmt: skip
    return written, outcome


def test_clients_the_server_summary_leaves_out_are_counted_with_where_to_see_them(tmp_path: Path) -> None:
    written, outcome = _big_job(tmp_path)
    omitted = json.loads(written)["clientsOmitted"]
    assert omitted > 0  # what a 100-client job's 4096-byte termination message does
    text = format_outcome("big", outcome)
    listed = [line for line in text.splitlines() if line.startswith("  client ")]
    assert len(listed) == 100 - omitted
    assert listed[0] == "  client site-000: Lost (Lost)"  # failed and lost clients are the ones kept
    assert "  rounds: 3/3" in text and "  reason: Completed" in text and "  message: all 3 rounds done" in text
    assert f"\u2026 and {omitted} more client(s)" in text
    assert f"their pods: {omitted} Succeeded" in text
    assert "--json" in text and str(tmp_path / "logs") in text


def test_the_delivered_model_is_named_with_its_sha256(tmp_path: Path) -> None:
    _, outcome = _big_job(tmp_path)
    assert "  model: " not in format_outcome("big", outcome)  # none delivered
    assert outcome.summary is not None
    outcome.summary.model_file, outcome.summary.model_sha256 = "big.safetensors", "0f" * 32
    assert f"  model: {tmp_path / 'model' / 'big.safetensors'} (sha256 {'0f' * 32})" in format_outcome("big", outcome)


def test_json_summary_is_the_document_the_server_wrote(tmp_path: Path) -> None:
    written, outcome = _big_job(tmp_path)
    doc = outcome_json("big", outcome)
    assert doc["summary"] == json.loads(written)  # clientsOmitted included: a summary read back keeps its count
    assert doc["outcome"] == "Succeeded" and doc["exitCode"] == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


_VALID = {"exitCode": 0, "job": "job", "phase": "Succeeded", "round": 2, "rounds": 2}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[" * 4000, "not valid JSON"),  # deeper than the stdlib parser's recursion limit
        (json.dumps(_VALID | {"round": "2"}), "termination summary.round: expected int, got '2'"),
        (json.dumps(_VALID | {"clients": {"site-a": "Done"}}), "termination summary.clients: expected a list"),
        (json.dumps(_VALID | {"clients": [{"name": "a", "state": "Zombie"}]}), "unknown state 'Zombie'"),
        (json.dumps({"phase": "Succeeded", "round": 3}), "missing key 'exitCode'"),
        (json.dumps(["not", "an", "object"]), "expected a JSON object"),
        ("not json at all", "not valid JSON"),
    ],
    ids=["nesting", "string-for-int", "clients-as-object", "unknown-state", "partial", "list", "text"],
)
def test_a_hostile_summary_file_is_a_summary_error_naming_the_problem(
    tmp_path: Path, content: str, problem: str
) -> None:
    with pytest.raises(SummaryError, match=problem.replace("(", r"\(").replace("[", r"\[")):
        read_summary_file(_write(tmp_path / "server.termination-log", content))


def test_an_oversized_summary_file_is_refused_after_reading_only_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "server.termination-log"
    with open(path, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB, sparse: reading it whole would exhaust the machine's memory
    with pytest.raises(SummaryError, match=f"{8 << 30} bytes, more than the {TERMINATION_LIMIT}"):
        read_summary_file(path)
    # Just over the limit is over the limit too, even when it would be valid JSON.
    padded = json.dumps(_VALID | {"message": "x" * TERMINATION_LIMIT})
    with pytest.raises(SummaryError, match=f"more than the {TERMINATION_LIMIT}"):
        read_summary_file(_write(path, padded))


def test_a_fifo_in_place_of_the_summary_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "server.termination-log"
    os.mkfifo(path)
    with pytest.raises(SummaryError, match="not a regular file"):
        read_summary_file(path)


def test_an_empty_summary_file_is_no_summary_and_a_valid_one_reads(tmp_path: Path) -> None:
    path = tmp_path / "server.termination-log"
    assert read_summary_file(_write(path, "  \n")) is None
    summary = read_summary_file(_write(path, json.dumps(_VALID)))
    assert summary is not None and summary.phase is Phase.SUCCEEDED and summary.completed_rounds == 0
