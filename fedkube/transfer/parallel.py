"""Several fetches at once, so that a model of many tensors does not pay the link's round trip per tensor.

A bulk fetch is one request on a connection of its own (``fedkube.transfer.bulk``): the sidecar's relay dials
the server for each, so before a tensor's first byte arrives a remote site waits about one round trip in
plaintext and two with TLS (the handshake, then the request). One tensor after another, a model of N tensors
waits N times that: at 100 ms RTT, 32 tensors of 8 MiB moved at 29 MiB/s on mTLS against 131 MiB/s for one
TLS stream on the same link, and at 113 MiB/s 8 at a time (bench/README.md, "Latency"). :data:`FETCH_WIDTH` at
a time wait N / width times.
The upload direction pays the same per tensor (an UploadRequest down the control stream, then the sidecar dials
the server's bulk port), so the server pulls a result's tensors :data:`FETCH_WIDTH` at a time as well
(fedkube.server.downloads), its receive buffers bounded together by a :class:`BufferBudget`; the sidecar's push
pool serves that many at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: Fetches a receiver runs at once. Each holds one connection on the sidecar's relay (32 at most) and one on the
#: server's bulk port (256 over all sites); more would add connections, not speed, once the round trips overlap.
FETCH_WIDTH = 8


class _NotStarted(Exception):
    """A job skipped because an earlier one failed."""


def run_bounded(jobs: Sequence[Callable[[], T]], width: int = FETCH_WIDTH, *, name: str = "fetch") -> list[T]:
    """Run ``jobs`` with at most ``width`` running at once; their results, in the order of ``jobs``.

    After a job fails no further job starts; the ones already running finish (each is bounded by its own
    timeouts) and the first failure is raised. One job, or ``width`` 1, runs on the calling thread.
    """
    if width < 1:
        raise ValueError(f"run_bounded needs a width of at least 1 (got {width})")
    if width == 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    failed = threading.Event()
    first: list[BaseException] = []
    lock = threading.Lock()

    def run(job: Callable[[], T]) -> T:
        if failed.is_set():
            raise _NotStarted
        try:
            return job()
        except BaseException as exc:
            with lock:
                if not first:
                    first.append(exc)
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=min(width, len(jobs)), thread_name_prefix=name) as pool:
        futures = [pool.submit(run, job) for job in jobs]
    # The pool has joined: every job ran, failed or was skipped.
    if first:
        raise first[0]
    return [f.result() for f in futures]


class BufferBudget:
    """Receive buffers for fetches running at once, holding at most ``limit`` bytes between them.

    A fetch that cannot receive in place needs a buffer of its tensor's size; with several at once the
    buffers add up. ``limit`` (raised to the largest tensor, so any one fits) bounds what they hold together,
    free buffers kept for reuse included; :meth:`take` waits for room. :meth:`reserve` counts bytes the
    caller allocates itself (e.g. arrays a sink keeps) until :meth:`give_back`.
    """

    def __init__(self, limit: int, largest: int) -> None:
        self.limit = max(limit, largest)
        self._cond = threading.Condition()
        self._in_use = 0
        self._free: list[bytearray] = []

    def take(self, nbytes: int) -> bytearray:
        """A buffer of ``nbytes`` (a reused one when one of that size is free); hand it back with :meth:`put`."""
        with self._cond:
            self._claim_locked(nbytes)
            for i, buf in enumerate(self._free):
                if len(buf) == nbytes:
                    return self._free.pop(i)
            self._trim_locked()
        return bytearray(nbytes)

    def put(self, buf: bytearray) -> None:
        with self._cond:
            self._in_use -= len(buf)
            self._free.append(buf)
            self._cond.notify_all()

    def reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` the caller allocates itself, waiting for room; :meth:`give_back` ends it."""
        with self._cond:
            self._claim_locked(nbytes)
            self._trim_locked()

    def give_back(self, nbytes: int) -> None:
        with self._cond:
            self._in_use -= nbytes
            self._cond.notify_all()

    def _claim_locked(self, nbytes: int) -> None:
        self._cond.wait_for(lambda: self._in_use + nbytes <= self.limit)
        self._in_use += nbytes

    def _trim_locked(self) -> None:
        """Drop free buffers (oldest first) until what is in use and what is kept fit the limit together."""
        while self._free and self._in_use + sum(len(b) for b in self._free) > self.limit:
            self._free.pop(0)
