"""run_bounded: several fetches at once, results in order, no new start after a failure."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from fedkube.transfer.parallel import BufferBudget, run_bounded


def test_width_jobs_run_at_once_and_results_keep_the_jobs_order() -> None:
    width = 4
    together = threading.Barrier(width, timeout=2)  # broken unless `width` jobs wait on it at the same time

    def job(i: int) -> Callable[[], int]:
        def run() -> int:
            together.wait()
            return i * i

        return run

    assert run_bounded([job(i) for i in range(2 * width)], width) == [i * i for i in range(2 * width)]


def test_after_a_failure_no_further_job_starts_and_the_failure_is_raised() -> None:
    started: list[int] = []
    one_started, failed = threading.Event(), threading.Event()

    def job(i: int) -> Callable[[], int]:
        def run() -> int:
            started.append(i)
            if i == 1:
                one_started.set()
            if i == 0:
                one_started.wait(2)
                failed.set()
                raise ValueError("tensor 0 is gone")
            failed.wait(2)  # the failure happened while this one ran
            return i

        return run

    with pytest.raises(ValueError, match="tensor 0 is gone"):
        run_bounded([job(i) for i in range(10)], 2)
    # 0 and 1 ran together; at most one more slipped in before the failure was recorded.
    assert sorted(started[:2]) == [0, 1] and len(started) <= 3, started


def test_one_job_or_width_one_runs_on_the_calling_thread() -> None:
    me = threading.get_ident()
    assert run_bounded([threading.get_ident]) == [me]
    assert run_bounded([threading.get_ident] * 3, 1) == [me] * 3
    with pytest.raises(ValueError, match="width of at least 1"):
        run_bounded([threading.get_ident], 0)


def test_buffer_budget_waits_for_room_reuses_buffers_and_always_fits_the_largest() -> None:
    budget = BufferBudget(100, largest=60)
    assert budget.limit == 100 and BufferBudget(10, largest=60).limit == 60  # one tensor always fits
    first = budget.take(60)
    got: list[bytearray] = []
    waiting = threading.Thread(target=lambda: got.append(budget.take(60)), daemon=True)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and not got  # 60 + 60 > 100: it waits for room
    budget.put(first)
    waiting.join(2)
    assert got and got[0] is first  # the freed buffer of that size is handed out again, not a new one
    budget.reserve(40)  # 60 + 40: full, so the free list keeps nothing beyond the limit
    budget.put(got[0])
    budget.give_back(40)
    assert len(budget.take(30)) == 30  # another size: the 60-byte buffer is dropped to make room if needed
