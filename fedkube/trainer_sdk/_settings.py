"""The trainer side's timeouts."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedkube.protocol import ResultTimeouts
from fedkube.transfer.fetch import FetchSettings


@dataclass(frozen=True)
class SessionSettings:
    """Timeouts of the trainer side.

    * ``connect_timeout_s``: how long ``init()`` waits for the sidecar to answer, and how long a trainer waits
      for a restarted sidecar when the one it was talking to went away.
    * ``poll_ms``: long-poll length of each NextTask call.
    * ``result_idle_timeout_s``: ``send()`` fails when the server's download of
      the result made no progress for this long (LESSONS.md 3).
    * ``result_start_timeout_s``: ``send()`` fails when the download did not
      start within this long (the server pulls results as they arrive).
    * ``result_ttl_s``: the result's transaction is dropped after this long even
      if the server never completed it.

    The three ``result_*`` values are defaults: the server sends its job's own
    with every task (:class:`fedkube.protocol.ResultTimeouts`), and those win.
    """

    connect_timeout_s: float = 60.0
    poll_ms: int = 1000
    result_idle_timeout_s: float = 300.0
    result_start_timeout_s: float = 900.0
    result_ttl_s: float = 3 * 3600.0
    fetch: FetchSettings = field(default_factory=FetchSettings)

    def result_timeouts(self) -> ResultTimeouts:
        """The ``result_*`` defaults, for a task whose config does not set them."""
        return ResultTimeouts(self.result_idle_timeout_s, self.result_start_timeout_s, self.result_ttl_s)
