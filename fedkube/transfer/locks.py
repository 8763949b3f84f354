"""A lock that refuses re-entry instead of deadlocking (LESSONS.md 10).

Every lock in the transfer layer is a :class:`CheckedLock`. Taking it twice
from one thread is always a bug here (a call-out made while holding it came
back in); a plain ``threading.Lock`` would hang forever, silently. This one
raises :class:`LockReentryError` naming the lock, so the bug fails a test.
"""

from __future__ import annotations

import threading
from types import TracebackType


class LockReentryError(RuntimeError):
    """A thread tried to take a :class:`CheckedLock` it already holds."""


class CheckedLock:
    """A non-reentrant mutex that raises on same-thread re-entry; usable with ``with``."""

    __slots__ = ("_lock", "_owner", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._owner: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        if self._owner == me:
            raise LockReentryError(
                f"lock {self.name!r} re-entered by the thread that holds it; "
                "a call-out (callback, stop, cleanup, I/O) was made while holding it"
            )
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self._owner = me
        return ok

    def release(self) -> None:
        self._owner = None
        self._lock.release()

    def held_by_current_thread(self) -> bool:
        return self._owner == threading.get_ident()

    def __enter__(self) -> CheckedLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
