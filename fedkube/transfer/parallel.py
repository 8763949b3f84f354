"""Several fetches at once, so that a model of many tensors does not pay the link's round trip per tensor.

A bulk fetch is one request on a connection of its own (``fedkube.transfer.bulk``): the sidecar's relay dials
the server for each, so before a tensor's first byte arrives a remote site waits about one round trip in
plaintext and two with TLS (the handshake, then the request). One tensor after another, a model of N tensors
waits N times that: at 100 ms RTT, 32 tensors of 8 MiB moved at 29 MiB/s on mTLS against 131 MiB/s for one
TLS stream on the same link, and at 113 MiB/s 8 at a time (bench/README.md, "Latency"). :data:`FETCH_WIDTH` at
a time wait N / width times.
The upload direction already overlaps its pushes (the sidecar's push pool).
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
