"""Status document and termination summary: JSON round trips, the 4096-byte limit, reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.status import (
    CLIENT_MESSAGE_CHARS,
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    MAX_METRICS,
    MESSAGE_CHARS,
    ROUND_HISTORY,
    STATUS_LIMIT,
    ClientStatus,
    JobStatus,
    Phase,
    Reason,
    Scope,
    SummaryError,
    utc_timestamp,
)
from fedkube.termination import TERMINATION_LIMIT, TerminationSummary, write_termination_summary


def _status(n_clients: int = 3, phase: Phase = Phase.RUNNING, message: str = "") -> JobStatus:
    clients = [ClientStatus(f"site-{i:03d}", "Done", rounds_completed=2) for i in range(n_clients)]
    return JobStatus(
        job="mnist",
        phase=phase,
        round=3,
        rounds=20,
        completed_rounds=2,
        clients=clients,
        metrics={"loss": 0.25, "accuracy": 0.91, "diverged": float("nan")},
        message=message,
        start_time=utc_timestamp(0),
    )


def test_status_json_round_trip_and_shape() -> None:
    status = _status()
    status.clients[1] = ClientStatus("site-001", "Failed", "Exception", "ValueError: bad input", 1)
    doc = json.loads(status.to_json())
    assert doc["phase"] == "Running" and doc["startTime"] == "1970-01-01T00:00:00Z"
    assert doc["clients"][1] == {
        "name": "site-001", "state": "Failed", "reason": "Exception", "message": "ValueError: bad input",
        "roundsCompleted": 1,
    }
    assert "diverged" not in doc["metrics"]  # NaN is not JSON; it is left out
    back = JobStatus.from_json(status.to_json())
    status.metrics.pop("diverged")
    assert back == status


def test_from_json_errors_name_the_field() -> None:
    with pytest.raises(SummaryError, match="not valid JSON"):
        JobStatus.from_json("{")
    with pytest.raises(SummaryError, match="missing key 'round'"):
        JobStatus.from_json('{"job": "j", "phase": "Running", "rounds": 1}')
    with pytest.raises(SummaryError, match="unknown phase 'Bogus'"):
        JobStatus.from_json('{"job": "j", "phase": "Bogus", "round": 1, "rounds": 1}')
    with pytest.raises(SummaryError, match=r"clients\[0\]: missing key 'state'"):
        JobStatus.from_json('{"job": "j", "phase": "Running", "round": 1, "rounds": 1, "clients": [{"name": "a"}]}')
    with pytest.raises(SummaryError, match="round: expected int"):
        JobStatus.from_json('{"job": "j", "phase": "Running", "round": true, "rounds": 1}')


def test_small_summary_keeps_everything() -> None:
    summary = TerminationSummary.from_status(_status(phase=Phase.SUCCEEDED))
    assert summary.exit_code == EXIT_SUCCEEDED
    text = summary.to_json()
    back = TerminationSummary.from_json(text)
    assert back.clients_omitted == 0 and len(back.clients) == 3 and back.metrics == {"loss": 0.25, "accuracy": 0.91}


def test_large_summary_drops_healthy_clients_first_and_counts_them() -> None:
    status = _status(500, Phase.FAILED, "round 3: QuorumLost")
    status.reason = Reason.QUORUM_LOST.value
    status.clients[250] = ClientStatus("site-250", "Lost", "Lost", "no heartbeat for 31.0 s " + "x" * 500)
    status.clients[499] = ClientStatus("site-499", "Failed", "Exception", "Traceback ... " * 100)
    summary = TerminationSummary.from_status(status)
    assert summary.exit_code == EXIT_FAILED
    text = summary.to_json()
    assert len(text.encode()) <= TERMINATION_LIMIT
    back = TerminationSummary.from_json(text)
    assert [c.name for c in back.clients[:2]] == ["site-250", "site-499"]
    assert len(back.clients[0].message) <= 160 and back.clients[0].message.endswith("\u2026")
    assert back.clients_omitted == 500 - len(back.clients) > 0
    assert back.reason == "QuorumLost" and back.metrics  # metrics kept while clients could be dropped


@settings(max_examples=60, deadline=None)
@given(
    clients=st.lists(
        st.builds(
            ClientStatus,
            name=st.text(min_size=1, max_size=63),
            state=st.sampled_from(["Pending", "Done", "Failed", "Lost"]),
            reason=st.sampled_from([""] + [r.value for r in Reason]),
            message=st.text(max_size=400),
            rounds_completed=st.integers(0, 10**6),
        ),
        max_size=200,
    ),
    message=st.text(max_size=6000),
    metrics=st.dictionaries(st.text(max_size=300), st.floats(allow_nan=False, allow_infinity=False), max_size=40),
)
def test_termination_summary_always_fits_and_parses(
    clients: list[ClientStatus], message: str, metrics: dict[str, float]
) -> None:
    summary = TerminationSummary(EXIT_FAILED, "job", Phase.FAILED, 1, 2, 0, "QuorumLost", message, metrics, clients)
    text = summary.to_json()
    assert len(text.encode("utf-8")) <= TERMINATION_LIMIT
    back = TerminationSummary.from_json(text)
    assert back.exit_code == EXIT_FAILED and back.job == "job"
    assert len(back.clients) + back.clients_omitted == len(clients)


def test_write_termination_summary(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    text = write_termination_summary(path, TerminationSummary.from_status(_status()))
    assert path.read_text() == text and TerminationSummary.from_json(path.read_bytes()).job == "mnist"


def test_reasons_have_stable_names_sentences_and_scopes() -> None:
    assert Reason.parse("RoundTimeout") is Reason.ROUND_TIMEOUT
    assert Reason.ROUND_TIMEOUT.scope is Scope.ROUND and Reason.CONFIG_ERROR.scope is Scope.JOB
    assert Reason.EXCEPTION.scope is Scope.CLIENT
    for r in Reason:
        assert r.sentence and r.value[0].isupper() and " " not in r.value
    with pytest.raises(SummaryError, match="unknown failure reason 'Oops'; known: NotRegistered"):
        Reason.parse("Oops")


def test_round_seconds_round_trip_and_bounded_history() -> None:
    status = _status()
    assert "lastRoundSeconds" not in status.to_dict() and "roundSeconds" not in status.to_dict()
    status.last_round_seconds = 2.5
    status.round_seconds = [float(i) for i in range(ROUND_HISTORY + 5)]
    doc = json.loads(status.to_json())
    assert doc["lastRoundSeconds"] == 2.5
    assert doc["roundSeconds"] == [float(i) for i in range(5, ROUND_HISTORY + 5)]  # the newest, oldest first
    back = JobStatus.from_json(status.to_json())
    assert back.last_round_seconds == 2.5 and back.round_seconds == doc["roundSeconds"]
    assert JobStatus.from_json(back.to_json()) == back


@pytest.mark.parametrize(
    ("patch", "field_name"),
    [({"lastRoundSeconds": "3"}, "lastRoundSeconds"), ({"lastRoundSeconds": -1}, "lastRoundSeconds"),
     ({"roundSeconds": [1.0, "x"]}, "roundSeconds[1]"), ({"roundSeconds": 4}, "roundSeconds")],
)
def test_round_seconds_errors_name_the_field(patch: dict[str, object], field_name: str) -> None:
    doc = json.loads(_status().to_json()) | patch
    with pytest.raises(SummaryError, match=field_name.replace("[", r"\[").replace("]", r"\]")):
        JobStatus.from_json(json.dumps(doc))


def test_the_status_keeps_the_newest_round_durations_when_built_with_a_longer_history() -> None:
    # The server hands over every round's duration; the document carries only the newest ROUND_HISTORY.
    status = JobStatus("j", Phase.RUNNING, 30, 30, round_seconds=[float(i) for i in range(30)])
    assert JobStatus.from_json(status.to_json()).round_seconds == [float(i) for i in range(10, 30)]


_VALID = {"job": "j", "phase": "Running", "round": 1, "rounds": 2}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # Deep nesting made the stdlib parser raise RecursionError, which no caller expects.
        ("[" * 5000, "not valid JSON"),
        ('{"job": ' + "[" * 5000, "not valid JSON"),
        (json.dumps(_VALID | {"message": "x" * STATUS_LIMIT}), f"more than the {STATUS_LIMIT}"),
        (json.dumps(_VALID | {"clients": [{"name": "a", "state": "Zombie"}]}), r"clients\[0\]\.state: unknown state"),
        (json.dumps(_VALID | {"clients": [{"name": "", "state": "Done"}]}), r"clients\[0\]\.name"),
        (json.dumps(_VALID | {"clients": [{"name": "a" * 300, "state": "Done"}]}), r"clients\[0\]\.name"),
        (json.dumps(_VALID | {"clients": [{"name": "a", "state": "Done", "roundsCompleted": -1}]}),
         r"clients\[0\]\.roundsCompleted"),
        (json.dumps(_VALID | {"round": -1}), "status.round:"),
        (json.dumps(_VALID | {"rounds": 10**30}), "status.rounds:"),
        (json.dumps(_VALID | {"round": "1"}), "status.round: expected int"),
        (json.dumps(_VALID | {"reason": "R" * 1000}), "status.reason"),
        (json.dumps(_VALID | {"startTime": "t" * 1000}), "status.startTime"),
        (json.dumps(_VALID | {"phase": "Suspended"}), "unknown phase 'Suspended' for the server"),
        (json.dumps(_VALID | {"metrics": {"loss": "low"}}), r"status.metrics.loss: expected a number"),
        (json.dumps(_VALID | {"clients": {"a": "Done"}}), "status.clients: expected a list"),
        ('{"job": "j", "phase": "Running", "round": 1, "rounds": 2, "lastRoundSeconds": 1e999}', "lastRoundSeconds"),
        (json.dumps(["not", "an", "object"]), "status: expected a JSON object"),
    ],
)
def test_a_hostile_status_document_is_refused_with_the_field_named(text: str, problem: str) -> None:
    with pytest.raises(SummaryError, match=problem):
        JobStatus.from_json(text)


def test_a_hostile_status_document_is_bounded_where_it_is_not_refused() -> None:
    doc = _VALID | {
        "message": "m" * (10 * MESSAGE_CHARS),
        "clients": [{"name": "a", "state": "Failed", "message": "t" * (10 * CLIENT_MESSAGE_CHARS)}],
        "metrics": {f"m{i}": 1.0 for i in range(MAX_METRICS + 500)} | {"x" * 10_000: 2.0},
        "roundSeconds": [1.0] * 500,
        "unknownField": {"deep": [1, 2, 3]},
    }
    status = JobStatus.from_json(json.dumps(doc))
    assert len(status.message) == MESSAGE_CHARS and status.message.endswith("\u2026")
    assert len(status.clients[0].message) == CLIENT_MESSAGE_CHARS
    assert len(status.metrics) == MAX_METRICS and all(len(k) <= 256 for k in status.metrics)
    assert len(status.round_seconds) == ROUND_HISTORY


def test_a_termination_summary_larger_than_kubernetes_keeps_is_refused() -> None:
    doc = {"exitCode": 1, "job": "job", "phase": "Failed", "round": 1, "rounds": 2}
    assert TerminationSummary.from_json(json.dumps(doc | {"message": "x" * 3000})).exit_code == 1
    with pytest.raises(SummaryError, match=f"more than the {TERMINATION_LIMIT}"):
        TerminationSummary.from_json(json.dumps(doc | {"message": "x" * TERMINATION_LIMIT}))
    with pytest.raises(SummaryError, match="not valid JSON"):
        TerminationSummary.from_json("[" * 4000)


def test_null_optional_fields_read_as_absent_as_the_hand_written_parser_had_it() -> None:
    doc = _VALID | {"reason": None, "message": None, "clients": None, "metrics": None, "completedRounds": None,
                    "startTime": None, "lastRoundSeconds": None, "roundSeconds": None}
    status = JobStatus.from_json(json.dumps(doc))
    assert (status.reason, status.message, status.clients, status.metrics, status.completed_rounds) == (
        "", "", [], {}, 0)
    with pytest.raises(SummaryError, match=r"status\.round: expected int, got None"):
        JobStatus.from_json(json.dumps(_VALID | {"round": None}))  # required: null is no round


def test_text_the_parser_cannot_read_is_a_summary_error() -> None:
    with pytest.raises(SummaryError, match="not valid JSON"):
        JobStatus.from_json(b"\xff\xfe")
    # A lone surrogate (a str decoded leniently elsewhere) raised UnicodeEncodeError.
    with pytest.raises(SummaryError):
        JobStatus.from_json('{"job": "\ud800", "phase": "Running", "round": 1, "rounds": 1')
