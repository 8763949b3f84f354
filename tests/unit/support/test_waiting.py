"""The suite's one polling helper and one free-port helper."""

from __future__ import annotations

import itertools
import socket

import pytest

from tests.support.waiting import free_port, until


def test_until_returns_the_first_truthy_value() -> None:
    calls = itertools.count()
    assert until(lambda: [n] if (n := next(calls)) >= 2 else [], "the third call", timeout=5, interval=0) == [2]


def test_until_names_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the queue to drain; last value: \{'held': 3\}"):
        until(lambda: _Held(held=3), "the queue to drain", timeout=0.05, interval=0.01)


class _Held(dict[str, int]):
    """A status that is not yet what the test waits for (falsy), with a readable repr."""

    def __bool__(self) -> bool:
        return False


def test_until_retries_only_the_exceptions_it_is_told_and_shows_the_last_one() -> None:
    def refused() -> bool:
        raise ConnectionRefusedError("not up yet")

    with pytest.raises(AssertionError, match="the endpoint; last error: ConnectionRefusedError"):
        until(refused, "the endpoint", timeout=0.05, interval=0.01, retry_on=(OSError,))
    with pytest.raises(ConnectionRefusedError):  # not retried: a broken check fails at once, not after the timeout
        until(refused, "the endpoint", timeout=60)


def test_until_adds_the_context_only_on_a_timeout() -> None:
    seen: list[str] = []

    def context() -> str:
        seen.append("asked")
        return "server log tail"

    assert until(lambda: 1, "one", timeout=1, context=context) == 1 and seen == []
    with pytest.raises(AssertionError, match="server log tail"):
        until(lambda: 0, "never", timeout=0.02, interval=0.01, context=context)


def test_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
