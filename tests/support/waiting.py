"""Waiting in tests: poll for a condition (bounded) and pick a free port for a listener the test owns.

Every test that waits for something another thread or process does uses
:func:`until` instead of a fixed sleep: it returns as soon as the condition
holds, and a timeout names what never happened and what was last seen.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_NOTHING = object()


def until(check: Callable[[], T | None], what: str, timeout: float = 10.0, *, interval: float = 0.05,
          retry_on: tuple[type[BaseException], ...] = (), context: Callable[[], str] = lambda: "") -> T:
    """Call ``check`` until it returns something truthy, and return that; AssertionError after ``timeout`` s.

    The error names ``what`` was awaited, the last value ``check`` returned
    and, when ``retry_on`` lets exceptions count as "not yet" (an endpoint not
    up yet, a file not written yet), the last of those. Any other exception
    from ``check`` fails at once. ``context`` adds what a person needs on a
    timeout (logs, the last status); it is only called then.
    """
    deadline = time.monotonic() + timeout
    last: object = _NOTHING
    last_error: BaseException | None = None
    while True:
        try:
            got = check()
        except retry_on as exc:
            last_error = exc
        else:
            if got:
                return got
            last = got
        if time.monotonic() >= deadline:
            seen = f"; last value: {last!r}" if last is not _NOTHING else ""
            error = f"; last error: {last_error!r}" if last_error is not None else ""
            extra = context()
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{seen}{error}"
                                 + (f"\n{extra}" if extra else ""))
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago, for a listener the test itself starts next.

    Only for test-owned listeners whose port the test must know before they
    start (e.g. to write it into a config). Another process may take the port
    in between, so product code never reserves ports this way: a listener
    binds port 0 and reports the port it got.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
