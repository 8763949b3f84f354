"""A per-stream timer: cancels a stream that went quiet for too long, or whose caller aborted."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Watchdog:
    """Calls ``on_fire`` once when ``kick()`` was not called for ``timeout_s`` (or ``abort`` is set)."""

    def __init__(
        self, timeout_s: float | None, on_fire: Callable[[], None], abort: threading.Event | None, name: str
    ) -> None:
        self._timeout = timeout_s
        self._on_fire = on_fire
        self._abort = abort
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self.fired = False
        self.aborted = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._last = time.monotonic()  # a float store is atomic; no lock needed

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        poll = 0.05 if self._abort is not None else None
        while True:
            if self._timeout is not None:
                remaining = self._last + self._timeout - time.monotonic()
                if remaining <= 0:
                    self.fired = True
                    break
                wait = remaining if poll is None else min(poll, remaining)
            else:
                wait = poll if poll is not None else 3600.0
            if self._stopped.wait(wait):
                return
            if self._abort is not None and self._abort.is_set():
                self.aborted = True
                break
        try:
            self._on_fire()
        except Exception:  # cancelling a finished call is harmless
            log.debug("watchdog %s: cancel raised", self._thread.name, exc_info=True)
