"""CheckedLock: re-entry from the holding thread raises instead of deadlocking (LESSONS.md 10)."""

from __future__ import annotations

import threading

import pytest

from fedkube.transfer import CheckedLock, LockReentryError


def test_reentry_from_the_same_thread_raises_naming_the_lock() -> None:
    lock = CheckedLock("transaction tx1")
    with lock:
        assert lock.held_by_current_thread()
        with pytest.raises(LockReentryError, match="transaction tx1"):
            lock.acquire()
    assert not lock.held_by_current_thread()


def test_other_threads_wait_normally() -> None:
    lock = CheckedLock("l")
    acquired = threading.Event()
    lock.acquire()

    def other() -> None:
        with lock:
            acquired.set()

    t = threading.Thread(target=other)
    t.start()
    assert not acquired.wait(0.1)
    lock.release()
    assert acquired.wait(5)
    t.join(5)
    assert lock.acquire(timeout=0)  # free again
    lock.release()
