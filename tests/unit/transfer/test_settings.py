"""Fetch settings validation (LESSONS.md 22): inconsistent timeouts are reported with a fix."""

from __future__ import annotations

import pytest

from fedkube.transfer import FetchSettings, InvalidRequestError, SettingsProblem, validate_settings
from fedkube.transfer.fetch import Fetcher


def _fields(problems: list[SettingsProblem]) -> list[str]:
    return [p.field for p in problems]


def test_defaults_are_consistent_with_a_long_round() -> None:
    assert validate_settings(FetchSettings(), ttl_s=3600, round_timeout_s=3600) == []


def test_idle_timeout_not_above_chunk_timeout() -> None:
    problems = validate_settings(FetchSettings(chunk_timeout_s=60, idle_timeout_s=30))
    assert _fields(problems) == ["idle_timeout_s"]
    assert "120" in problems[0].fix and "chunk_timeout_s" in problems[0].fix


def test_ttl_shorter_than_round_timeout_and_idle() -> None:
    problems = validate_settings(FetchSettings(), ttl_s=100, round_timeout_s=600)
    assert _fields(problems) == ["ttl_s", "ttl_s"]
    assert any("round timeout" in p.message for p in problems)
    assert all(p.fix for p in problems)


def test_round_timeout_not_above_idle() -> None:
    assert "round_timeout_s" in _fields(validate_settings(FetchSettings(), round_timeout_s=60))


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (FetchSettings(max_attempts=0), "max_attempts"),
        (FetchSettings(max_chunk_bytes=0), "max_chunk_bytes"),
        (FetchSettings(max_chunk_bytes=1 << 30), "max_chunk_bytes"),
        (FetchSettings(backoff_base_s=5, backoff_max_s=1), "backoff_max_s"),
        (FetchSettings(backoff_max_s=500), "backoff_max_s"),
        (FetchSettings(chunk_timeout_s=float("nan")), "chunk_timeout_s"),
        (FetchSettings(max_checksum_retries=-1), "max_checksum_retries"),
    ],
)
def test_each_bad_value_is_named(settings: FetchSettings, field: str) -> None:
    problems = validate_settings(settings)
    assert field in _fields(problems)
    assert all(str(p).startswith(p.field) and "fix:" in str(p) for p in problems)


def test_fetcher_refuses_inconsistent_settings() -> None:
    with pytest.raises(InvalidRequestError, match="idle_timeout_s"):
        Fetcher(object(), FetchSettings(chunk_timeout_s=10, idle_timeout_s=5))  # type: ignore[arg-type]


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    s = FetchSettings(backoff_base_s=0.1, backoff_max_s=1.0)
    for n, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (50, 1.0)]:
        delays = [s.backoff(n) for _ in range(50)]
        assert all(cap * 0.5 <= d <= cap for d in delays)
        assert len(set(delays)) > 1  # jittered
