"""Pulling a client's announced result, tensor by tensor, into the round's aggregator.

Each download runs on its own thread and reports how it ended through the
``on_finished`` callback it was started with (the workflow posts that to its
event queue); it never touches the workflow's state. Retries and stalls are
reported through callbacks as well, for the metrics.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedkube.protocol import ResultTimeouts
from fedkube.server.aggregate import DiscardOutcome, FoldAbortedError, InvalidResultError
from fedkube.server.config import JobSettings
from fedkube.server.prepass import MeasuresFirst, norm_prepass
from fedkube.server.pulls import WIDE_AFTER_S, Progress, SitePulls
from fedkube.server.reverse import ReverseChunkSource, SendFn, UploadBroker
from fedkube.server.strategy_api import RoundAggregator, StreamingAggregator
from fedkube.status import Reason
from fedkube.transfer.errors import TransferAbortedError, TransferError, TransferStalledError
from fedkube.transfer.fetch import Fetcher, FetchSettings
from fedkube.transfer.parallel import FETCH_WIDTH, BufferBudget
from fedkube.transfer.refs import TensorRef, array_from_buffer

log = logging.getLogger(__name__)


@dataclass
class Download:
    """One client's result being pulled; ``key`` names this attempt in the aggregator."""

    site: str
    task_id: str
    key: str
    num_examples: int
    metrics: dict[str, float]
    abort: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_pulled: int = 0  # verified bytes over every pass (a clipping pre-pass pulls float tensors twice)
    started: float = 0.0
    add_seconds: float = 0.0  # time spent folding this result into the aggregate
    refs: list[TensorRef] = field(default_factory=list)  # what it pulls, in its order


class ResultSink(Protocol):
    """What receives a round's result tensors (downloads ``add``; a failed attempt is discarded)."""

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool: ...
    def discard(self, client: str) -> DiscardOutcome: ...


@runtime_checkable
class ReceivesInPlace(Protocol):
    """A sink that hands out the array each tensor is received into, and keeps it as it is (no copy)."""

    def target(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray: ...


#: Receive buffers one download's concurrent pulls hold together at most: 1/PULL_BUFFER_SHARE of the result,
#: within [PULL_BUFFER_MIN, PULL_BUFFER_BYTES], and always its largest tensor. Tensors received in place into an
#: unclaimed accumulator or a sink's own array need none. Pulled one after another a download held one tensor;
#: the share keeps what pulling ``width`` at once adds in proportion to the model (256 MiB in 4 MiB tensors, two
#: sites: server peak 2.41 -> 2.76 x S with a flat 64 MiB), the floor lets small models go wide.
PULL_BUFFER_BYTES = 64 << 20
PULL_BUFFER_MIN = 8 << 20
PULL_BUFFER_SHARE = 16

# (download, ok, reason, message): how a download ended, called on its own thread.
FinishedFn = Callable[[Download, bool, str, str], None]


def rotated(refs: list[TensorRef], site: str, sites: Mapping[str, object]) -> list[TensorRef]:
    """``refs`` starting at this site's share: each participant pulls its tensors in a different order.

    The first download to reach a tensor receives it straight into the
    accumulator; later ones must fold theirs in. Pulled in the same order,
    one client would be first for nearly every tensor and the other would
    fold them all, finishing last while a core idles. Starting each site at
    its own offset spreads the claims (and the folding) evenly, so the
    downloads end together. The averages do not depend on the order.
    """
    order = sorted(sites)
    if site not in order or len(order) < 2 or not refs:
        return refs
    start = order.index(site) * len(refs) // len(order)
    return refs[start:] + refs[:start]


def fetch_settings(settings: JobSettings) -> FetchSettings:
    """The server's fetch policy for result downloads, from spec.transfer.

    The spec checks these relationships at submission; an inconsistent pair is
    widened here (idle above the chunk timeout) with a warning rather than
    failing a running job.
    """
    t = settings.transfer
    idle = t.idle_timeout_s
    if idle <= t.chunk_timeout_s:
        idle = 2 * t.chunk_timeout_s
        log.warning(
            "job %s: spec.transfer.idleTimeoutSeconds=%g is not above chunkTimeoutSeconds=%g; using %g",
            settings.job, t.idle_timeout_s, t.chunk_timeout_s, idle,
        )  # fmt: skip
    return FetchSettings(
        chunk_timeout_s=t.chunk_timeout_s,
        idle_timeout_s=idle,
        max_attempts=t.max_attempts,
        max_chunk_bytes=t.chunk_bytes,
        backoff_base_s=min(0.2, idle / 8),
        backoff_max_s=min(10.0, idle / 4),
    )


def result_timeouts(settings: JobSettings, fetch: FetchSettings) -> ResultTimeouts:
    """How long a trainer's ``send()`` waits for these downloads of its result (sent with every task)."""
    return ResultTimeouts.for_job(
        idle_timeout_s=fetch.idle_timeout_s, chunk_timeout_s=fetch.chunk_timeout_s,
        round_timeout_s=settings.round_timeout_s,
    )  # fmt: skip


class Downloader:
    """Starts result downloads over the reverse path; each reports back through its ``on_finished``."""

    def __init__(
        self,
        job: str,
        broker: UploadBroker,
        send: SendFn,
        fetch: FetchSettings,
        *,
        clock: Callable[[], float],
        on_retry: Callable[[Exception], None] = lambda err: None,
        on_stalled: Callable[[], None] = lambda: None,
        width: int = FETCH_WIDTH,
        wide_after_s: float = WIDE_AFTER_S,
        buffer_bytes: int = PULL_BUFFER_BYTES,
    ) -> None:
        """``width``: tensors of one result pulled at once (by a site that took ``wide_after_s`` or more to answer);
        ``buffer_bytes``: what their receive buffers hold."""
        if width < 1:
            raise ValueError(f"Downloader needs a width of at least 1 (got {width})")
        self.width = width
        self.wide_after_s = wide_after_s
        self.buffer_bytes = buffer_bytes
        self._job = job
        self._broker = broker
        self._send = send
        self.fetch = fetch
        self._clock = clock
        self._on_retry = on_retry
        self._on_stalled = on_stalled

    def start(
        self, round_: int, dl: Download, refs: list[TensorRef], sink: ResultSink, sites: Mapping[str, object],
        on_finished: FinishedFn,
    ) -> None:  # fmt: skip
        """Pull ``refs`` into ``sink`` on a new thread (``sites``: the round's participants, for the order)."""
        self._spawn(dl, f"fedkube-pull-{dl.site}-r{round_}", self._download, round_, dl, refs, sink, sites, on_finished)

    def rebuild(
        self, round_: int, dl: Download, refs: list[TensorRef], sink: RoundAggregator, on_finished: FinishedFn
    ) -> None:
        """Pull ``refs`` of an already received result again into ``sink.refold``, on a new thread.

        A discard emptied these tensors (``DiscardOutcome.rebuild``); the
        client still serves its result until its next task. The refs carry
        the checksums of the first download, so bytes that changed since
        (a trainer that modified its arrays after ``send()``) fail here.
        """
        self._spawn(dl, f"fedkube-rebuild-{dl.site}-r{round_}", self._rebuild, round_, dl, refs, sink, on_finished)

    @staticmethod
    def _spawn(dl: Download, name: str, target: Callable[..., None], *args: object) -> None:
        dl.thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        dl.thread.start()

    def _fetcher(self, dl: Download) -> tuple[ReverseChunkSource, Fetcher]:
        """A fetcher of ``dl``'s tensors over the reverse path (the server cannot dial a client), and its source."""
        source = ReverseChunkSource(
            dl.site, self._broker, self._send, chunk_timeout_s=self.fetch.chunk_timeout_s,
            max_chunk_bytes=self.fetch.max_chunk_bytes,
        )  # fmt: skip
        return source, Fetcher(source, self.fetch, abort=dl.abort, on_retry=self._on_retry)

    def _budget(self, refs: list[TensorRef]) -> BufferBudget:
        """What one pass's concurrent pulls may hold in receive buffers (:data:`PULL_BUFFER_BYTES`)."""
        share = max(PULL_BUFFER_MIN, sum(r.nbytes for r in refs) // PULL_BUFFER_SHARE)
        return BufferBudget(min(self.buffer_bytes, share), max((r.nbytes for r in refs), default=0))

    def _pulls(self, dl: Download, name: str) -> SitePulls:
        """One pass over ``dl``'s tensors: :attr:`width` at once once the site answered on the bulk port."""
        return SitePulls(functools.partial(self._fetcher, dl), self.width, name=name, wide_after_s=self.wide_after_s)

    def _rebuild(
        self, round_: int, dl: Download, refs: list[TensorRef], sink: RoundAggregator, on_finished: FinishedFn
    ) -> None:
        pulls = self._pulls(dl, f"rebuild-{dl.site}")
        budget = self._budget(refs)
        counted = Progress(lambda n: setattr(dl, "bytes_done", n))
        ok, reason, message = False, "", ""

        def pull(ref: TensorRef) -> None:
            buf = budget.take(ref.nbytes)  # refold copies into the accumulator: the buffer is free again after it
            try:
                data = pulls.fetcher().fetch_into(ref, buf, progress=counted.of(ref.name))
                sink.refold(dl.key, ref.name, array_from_buffer(data, ref.dtype, ref.shape), abort=dl.abort)
                del data
            finally:
                budget.put(buf)

        try:
            pulls.run(refs, pull)
            dl.bytes_done = sum(ref.nbytes for ref in refs)
            ok = True
            log.info("job %s round %s: pulled %d tensor(s) of %s again to rebuild the aggregate (%d bytes on the "
                     "bulk port, %d pushed over gRPC)", self._job, round_, len(refs), dl.site, pulls.bulk_bytes,
                     pulls.pushed_bytes)  # fmt: skip
        except (TransferAbortedError, FoldAbortedError) as exc:
            reason, message = Reason.ABORTED.value, str(exc)
        except Exception as exc:  # transfer error, checksum that no longer matches, bug: the round cannot be exact
            log.warning("job %s round %s: pulling tensors of %s again failed: %s", self._job, round_, dl.site, exc)
            reason, message = Reason.TRANSFER_FAILED.value, f"{type(exc).__name__}: {exc}"
        on_finished(dl, ok, reason, message)

    def _download(
        self, round_: int, dl: Download, refs: list[TensorRef], sink: ResultSink, sites: Mapping[str, object],
        on_finished: FinishedFn,
    ) -> None:  # fmt: skip
        """Pull one client's result into the aggregator, ``self.width`` tensors at a time; then report the outcome."""
        pulls = self._pulls(dl, f"pull-{dl.site}")
        ok, reason, message = False, "", ""
        weight = float(max(dl.num_examples, 1))
        # A streaming aggregator folds each tensor into its accumulator (copying) before add()
        # returns, so receive buffers are reused for tensors of the same size: no fresh allocation
        # and page faults per tensor. Staged aggregation keeps the arrays.
        # Its intake checks float tensors for NaN/Inf while each frame is hot (right after it was
        # hashed) and receives a tensor nobody contributed to yet straight into its accumulator, no copy.
        streaming = sink if isinstance(sink, StreamingAggregator) else None
        # What the tensors pulled at once receive into, bounded together (fedkube.transfer.parallel).
        budget = self._budget(refs)
        counted = Progress(lambda n: setattr(dl, "bytes_done", n))
        lock = threading.Lock()

        def pull(ref: TensorRef) -> None:
            intake = (
                streaming.intake(dl.key, ref.name, ref.dtype, ref.shape, weight, abort=dl.abort)
                if streaming is not None else None
            )  # fmt: skip
            buf: bytearray | None = None
            reserved = 0
            try:
                out: Any = intake.target if intake is not None and intake.target is not None else None
                if out is None and isinstance(sink, ReceivesInPlace):
                    out = sink.target(ref.name, ref.dtype, ref.shape)
                if out is None and streaming is not None:
                    out = buf = budget.take(ref.nbytes)
                elif out is None:  # the fetcher allocates the array a staged sink keeps
                    budget.reserve(ref.nbytes)
                    reserved = ref.nbytes
                data = pulls.fetcher().fetch_into(
                    ref, out, progress=counted.of(ref.name), inspect=intake.check if intake is not None else None
                )
                array = array_from_buffer(data, ref.dtype, ref.shape)
                t0 = time.perf_counter()
                if intake is not None:
                    intake.add(array)
                else:
                    sink.add(dl.key, ref.name, array, weight)
                with lock:
                    dl.add_seconds += time.perf_counter() - t0
                del array, data, out
            finally:
                if intake is not None:
                    intake.close()  # a claim that did not make it in is given back
                if buf is not None:
                    budget.put(buf)
                if reserved:
                    budget.give_back(reserved)

        try:
            if isinstance(sink, MeasuresFirst) and sink.prepasses(dl.key, dl.site):  # clipping: norm before folds
                # Through the same pulls: once the pre-pass saw the site answer on the bulk port, the fold's go
                # wide from their first. The budget keeps the pre-pass's buffers for the fold to reuse.
                norm_prepass(pulls, dl.key, refs, sink, budget, lambda n: setattr(dl, "bytes_done", n))
                dl.bytes_pulled = dl.bytes_done  # the pre-pass's progress ends at the bytes it pulled
                dl.bytes_done = 0
            pulls.run(rotated(refs, dl.site, sites), pull)
            base = sum(ref.nbytes for ref in refs)
            dl.bytes_pulled += base
            ok = True
            log.info("job %s round %s: pulled %d bytes from %s in %.2f s, %.2f s of it folding into the aggregate "
                     "(%d on the bulk port, %d pushed over gRPC)", self._job, round_, base, dl.site,
                     self._clock() - dl.started, dl.add_seconds, pulls.bulk_bytes, pulls.pushed_bytes)
        except (TransferAbortedError, FoldAbortedError) as exc:
            reason, message = Reason.ABORTED.value, str(exc)
        except TransferError as exc:
            if isinstance(exc, TransferStalledError):
                self._on_stalled()
            reason, message = Reason.TRANSFER_FAILED.value, str(exc)
        except InvalidResultError as exc:
            reason, message = Reason.INVALID_RESULT.value, exc.detail
        except Exception as exc:
            log.exception("job %s round %s: the download from %s failed", self._job, round_, dl.site)
            reason, message = Reason.TRANSFER_FAILED.value, f"{type(exc).__name__}: {exc}"
        on_finished(dl, ok, reason, message)
