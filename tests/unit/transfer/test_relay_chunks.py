"""relay_chunks: the bounded window between a reader and a writer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from fedkube.transfer import TransferAbortedError, relay_chunks


class _Upstream:
    """An upstream that records how far it was read and whether it was cancelled."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n = n
        self.fail_at = fail_at
        self.produced = 0
        self.cancelled = threading.Event()

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            if self.cancelled.is_set():
                return
            if i == self.fail_at:
                raise ConnectionError(f"upstream broke at {i}")
            self.produced = i + 1
            yield i

    def cancel(self) -> None:
        self.cancelled.set()


def _settle(up: _Upstream, timeout: float = 5) -> int:
    """Wait until the reader stops advancing (it is blocked on the full window).

    The tests claim upstream is read no further "however long we wait": a
    negative, so this watches for a quiet 0.1 s rather than for an event; a
    reader that runs ahead is seen moving and the bound check fails.
    """
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        if up.produced == last:
            return last
        last = up.produced
        time.sleep(0.1)
    return up.produced


def test_items_pass_in_order() -> None:
    assert list(relay_chunks(iter(range(1000)), window=3)) == list(range(1000))


@pytest.mark.parametrize("window", [1, 4])
def test_a_slow_consumer_bounds_how_far_upstream_is_read(window: int) -> None:
    up = _Upstream(10_000)
    relayed = relay_chunks(iter(up), window=window)
    assert next(relayed) == 0
    # 1 delivered + `window` queued + 1 in the reader's hand, however long we wait.
    assert _settle(up) <= window + 2
    assert list(relayed) == list(range(1, 10_000))


def test_upstream_error_reaches_the_consumer_after_earlier_items() -> None:
    relayed = relay_chunks(iter(_Upstream(10, fail_at=5)), window=2)
    got = []
    with pytest.raises(ConnectionError, match="upstream broke at 5"):
        for item in relayed:
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_closing_the_consumer_cancels_upstream_and_stops_the_reader() -> None:
    up = _Upstream(10_000)
    relayed = relay_chunks(up, window=2)  # the object itself has cancel()
    assert next(relayed) == 0
    before = threading.active_count()
    relayed.close()  # type: ignore[attr-defined]
    assert up.cancelled.is_set()
    assert threading.active_count() <= before
    assert _settle(up) < 10


def test_abort_ends_a_blocked_consumer() -> None:
    abort = threading.Event()

    def never() -> Iterator[int]:
        yield 1
        abort.wait(10)
        yield 2

    relayed = relay_chunks(never(), window=2, abort=abort)
    assert next(relayed) == 1
    threading.Timer(0.2, abort.set).start()
    with pytest.raises(TransferAbortedError):
        next(relayed)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        relay_chunks(iter([]), window=0)
