"""One pass over a site's tensors, several pulls at once: shared by the fold, the clipping pre-pass and rebuilds.

Each pull waits about one round trip (two with TLS) before its first byte, so a remote site's result of N
tensors pulled one after another pays N of them; :class:`SitePulls` runs :data:`FETCH_WIDTH` at once
(fedkube.transfer.parallel). But a pull the site answers with a gRPC Push stream holds one of the site's calls on
the server until it ends (fedkube.server.admission budgets a control stream, a push, a fetch and a spare), while
one answered on the bulk port holds none. So a pass goes wide only once the site answered on the bulk port; a
gRPC-only site stays one tensor at a time, and so does every pass until its first pull was answered. And it
goes wide only when the site took :data:`WIDE_AFTER_S` or more to answer: on a link of a millisecond (in the
cluster) the waits are too short to pay for the receive buffers and threads of pulls at once (256 MiB in 4 MiB
tensors on loopback, two sites: server peak 2.38 -> 2.63 x S and no faster).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from fedkube.transfer.fetch import Fetcher
from fedkube.transfer.parallel import run_bounded
from fedkube.transfer.refs import TensorRef

T = TypeVar("T")

#: A site answering a pull this slowly or slower (seconds: the link's round trips and handshakes) is pulled
#: :attr:`SitePulls.width` tensors at once; a faster one one at a time.
WIDE_AFTER_S = 0.02


class CountsBytes(Protocol):
    """Where a fetcher's bytes came from (fedkube.server.reverse.ReverseChunkSource)."""

    bulk_bytes: int
    pushed_bytes: int
    answered_after_s: float | None


class SitePulls:
    """The pulls of one pass over a site's tensors: one at a time until the site answered on the bulk port."""

    def __init__(self, connect: Callable[[], tuple[CountsBytes, Fetcher]], width: int, *, name: str,
                 wide_after_s: float = WIDE_AFTER_S) -> None:
        """``connect()``: a new fetcher and its source (one per pull: its byte counters have a single writer)."""
        if width < 1:
            raise ValueError(f"SitePulls needs a width of at least 1 (got {width})")
        self.width = width
        self.wide_after_s = wide_after_s
        self.name = name
        self._connect = connect
        self._lock = threading.Lock()
        self._sources: list[CountsBytes] = []

    def fetcher(self) -> Fetcher:
        source, fetcher = self._connect()
        with self._lock:
            self._sources.append(source)
        return fetcher

    @property
    def bulk_bytes(self) -> int:
        with self._lock:
            return sum(s.bulk_bytes for s in self._sources)

    @property
    def answered_after_s(self) -> float | None:
        """The slowest answer of the site's bulk port so far (None before its first)."""
        with self._lock:
            times = [s.answered_after_s for s in self._sources if s.answered_after_s is not None]
        return max(times, default=None)

    @property
    def pushed_bytes(self) -> int:
        with self._lock:
            return sum(s.pushed_bytes for s in self._sources)

    def run(self, refs: Sequence[TensorRef], pull: Callable[[TensorRef], T]) -> list[T]:
        """``pull(ref)`` for each of ``refs`` (each takes its fetcher from :meth:`fetcher`); results in their order.

        Sequential until the site answered on the bulk port (a pull that fetched nothing, e.g. of a tensor a pass
        skips, tells nothing), then :attr:`width` at once if it took :attr:`wide_after_s` or more to answer; after
        a failure no further pull starts and the first failure is raised (``run_bounded``).
        """
        done: list[T] = []
        order = list(refs)
        while order and not self.bulk_bytes:
            done.append(pull(order.pop(0)))
        answered = self.answered_after_s
        wide = self.width if self.bulk_bytes and answered is not None and answered >= self.wide_after_s else 1
        return done + run_bounded([functools.partial(pull, ref) for ref in order], wide, name=self.name)


class Progress:
    """A pass's bytes so far over pulls running at once: each pull reports its own tensor's count."""

    def __init__(self, report: Callable[[int], None] | None) -> None:
        self._report = report
        self._lock = threading.Lock()
        self._done: dict[str, int] = {}

    def of(self, name: str) -> Callable[[int], None] | None:
        """The ``progress`` callback of the pull of tensor ``name`` (None when nobody listens)."""
        if self._report is None:
            return None
        report = self._report

        def progress(n: int) -> None:
            with self._lock:  # reported under the lock: the count never goes back
                self._done[name] = n
                report(sum(self._done.values()))

        return progress
