"""The receiver side: resumable, verified, progress-aware chunk fetching.

:class:`Fetcher` downloads one ref into a preallocated buffer from any
:class:`ChunkSource` (protocols in :mod:`~fedkube.transfer.sources`; gRPC in
:mod:`~fedkube.transfer.grpc_source`, also the bulk protocol and the server's
control stream). Rules it follows:

* resume from the last good offset after a broken stream (bytes already
  received are kept and already hashed);
* verify the checksum before returning; on mismatch refetch from 0, a bounded
  number of times, then :class:`ChecksumMismatchError` (never hand out bad bytes);
* retry retryable failures with exponential backoff and jitter; give up after
  ``max_attempts`` consecutive attempts without progress, or when no byte
  arrived for ``idle_timeout_s`` (LESSONS.md 3: no fixed total deadline, a
  large tensor may take as long as it needs while bytes keep moving);
* stop promptly when the ``abort`` event is set.

A caller may pass an ``inspect`` object (:class:`RangeInspector`) to look at
each piece of bytes right after it landed and was hashed, while it is still in
the CPU cache (the server checks float tensors for NaN/Inf there instead of in
a second pass over the whole tensor). The fetcher knows nothing of what it
checks: it calls ``update`` for consecutive byte ranges from the start of the
tensor, and ``reset`` whenever it starts over from byte 0 (a checksum refetch),
so the inspector's verdict always describes exactly the bytes that were
finally verified. A verdict reached on a corrupted first fetch is thus wiped by
the refetch; acting on it is the caller's business, after ``fetch_into``
returned.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from fedkube.transfer.errors import (
    ChecksumMismatchError,
    InvalidRefError,
    InvalidRequestError,
    ProtocolError,
    TransferAbortedError,
    TransferError,
    TransferStalledError,
)
from fedkube.transfer.fetch_settings import FetchSettings, SettingsProblem, validate_settings
from fedkube.transfer.grpc_source import GrpcChunkSource
from fedkube.transfer.refs import Hasher, TensorRef, array_from_buffer, numpy_dtype
from fedkube.transfer.relay import Cancellable
from fedkube.transfer.sources import ChunkSource, Closeable, IntoSource, RangeInspector, Receiving
from fedkube.transfer.watchdog import Watchdog
from fedkube.transfer.wire import error_from_rpc

# The fetcher's vocabulary, importable from here as before the settings, the sources and the gRPC
# source got modules of their own.
__all__ = [
    "ChunkSource",
    "Closeable",
    "FetchSettings",
    "Fetcher",
    "GrpcChunkSource",
    "IntoSource",
    "RangeInspector",
    "Receiving",
    "SettingsProblem",
    "validate_settings",
]

log = logging.getLogger(__name__)


class Fetcher:
    """Fetches refs from one :class:`ChunkSource` with the given settings; see the module doc."""

    def __init__(
        self,
        source: ChunkSource | IntoSource,
        settings: FetchSettings | None = None,
        *,
        abort: threading.Event | None = None,
        on_retry: Callable[[Exception], None] | None = None,
    ) -> None:
        """``on_retry(error)`` is called before each retry (a broken stream, a checksum refetch), for metrics."""
        self.source = source
        self.settings = settings if settings is not None else FetchSettings()
        problems = validate_settings(self.settings)
        if problems:
            raise InvalidRequestError("inconsistent fetch settings: " + "; ".join(map(str, problems)))
        self.abort = abort
        self.on_retry = on_retry
        self.attempts = 0  # streams opened, over the fetcher's life (for logs, metrics and tests)

    def _ids(self, ref: TensorRef) -> dict[str, Any]:
        return {
            "transaction_id": ref.transaction_id,
            "ref_id": ref.ref_id,
            "receiver": self.source.receiver if isinstance(self.source, Receiving) else None,
        }

    def _check_abort(self, ref: TensorRef, offset: int) -> None:
        if self.abort is not None and self.abort.is_set():
            raise TransferAbortedError(f"aborted at offset {offset} of {ref.nbytes}", **self._ids(ref))

    def fetch_into(
        self,
        ref: TensorRef,
        out: Any = None,
        *,
        progress: Callable[[int], None] | None = None,
        inspect: RangeInspector | None = None,
    ) -> memoryview:
        """Download ``ref`` into ``out`` (a writable buffer of exactly ``ref.nbytes``, or None to allocate).

        Returns a flat byte memoryview of the verified data. ``progress(done)``
        is called with the number of bytes received so far after each chunk;
        ``inspect`` sees each piece after it was hashed (reset on a refetch
        from 0); an exception it raises ends the fetch.
        """
        ref.validate()
        if out is None:
            buf = memoryview(bytearray(ref.nbytes))
        else:
            buf = (out.reshape(-1).view(np.uint8).data if isinstance(out, np.ndarray) else memoryview(out)).cast("B")
            if buf.readonly:
                raise InvalidRequestError("the output buffer is read-only; pass a writable one", **self._ids(ref))
            if buf.nbytes != ref.nbytes:
                raise InvalidRequestError(
                    f"the output buffer holds {buf.nbytes} bytes, the tensor needs {ref.nbytes}", **self._ids(ref)
                )
        s = self.settings
        hasher = Hasher(ref.checksum_algo)
        offset = 0
        failures = 0
        checksum_failures = 0
        last_progress = time.monotonic()
        if inspect is not None:
            inspect.reset()
        while True:
            self._check_abort(ref, offset)
            if offset == ref.nbytes:
                got = hasher.checksum()
                if got == ref.checksum:
                    if failures or checksum_failures:
                        log.info(
                            "transaction %s ref %s: verified after %d retries", ref.transaction_id, ref.ref_id,
                            failures + checksum_failures,
                        )  # fmt: skip
                    return buf
                checksum_failures += 1
                if checksum_failures > s.max_checksum_retries:
                    raise ChecksumMismatchError(
                        f"checksum {got} != {ref.checksum} after {checksum_failures} full fetches; the source's "
                        "data is corrupt or changed after publishing",
                        **self._ids(ref),
                    )
                self._notify_retry(
                    ChecksumMismatchError(f"checksum {got} != {ref.checksum}; refetching", **self._ids(ref))
                )
                log.warning(
                    "transaction %s ref %s: checksum mismatch (%s != %s); refetching from 0 (%d/%d)",
                    ref.transaction_id, ref.ref_id, got, ref.checksum, checksum_failures, s.max_checksum_retries,
                )  # fmt: skip
                offset = 0
                hasher = Hasher(ref.checksum_algo)
                if inspect is not None:
                    inspect.reset()
                if progress is not None:
                    progress(0)
                continue
            stream: Any = None
            guard: Watchdog | None = None
            start = offset
            try:
                self.attempts += 1
                pieces: Iterator[int]
                if isinstance(self.source, IntoSource):
                    stream = pieces = self.source.stream_into(ref, offset, buf)
                else:
                    stream = self.source.stream(ref, offset, s.max_chunk_bytes)
                    pieces = self._copy_chunks(stream, ref, buf, offset)
                if self.abort is not None and isinstance(stream, Cancellable):
                    guard = Watchdog(None, stream.cancel, self.abort, f"fedkube-fetch-abort-{ref.transaction_id}")
                for n in pieces:
                    if not isinstance(n, int) or n <= 0 or offset + n > ref.nbytes:
                        raise ProtocolError(f"source reported {n!r} bytes written at offset {offset}", **self._ids(ref))
                    hasher.update(buf[offset : offset + n])
                    if inspect is not None:
                        inspect.update(buf, offset, offset + n)
                    offset += n
                    last_progress = time.monotonic()
                    failures = 0
                    if progress is not None:
                        progress(offset)
                    self._check_abort(ref, offset)
                if offset < ref.nbytes:
                    # A broken transport ends with an error; a clean end this early means the
                    # source's tensor is shorter than the reference claims, and retrying cannot help.
                    raise InvalidRefError(
                        f"the source's tensor ends at byte {offset} but the reference says {ref.nbytes} bytes "
                        f"({ref.dtype}{list(ref.shape)}): dtype, shape or length do not match what was published",
                        **self._ids(ref),
                    )
            except grpc.RpcError as exc:
                err = error_from_rpc(exc, **self._ids(ref))
                self._retry_or_raise(ref, err, offset, start, failures + 1, last_progress)
                failures += 1
            except TransferError as exc:
                if self.abort is not None and self.abort.is_set():
                    raise TransferAbortedError(f"aborted at offset {offset} of {ref.nbytes}", **self._ids(ref)) from exc
                self._retry_or_raise(ref, exc, offset, start, failures + 1, last_progress)
                failures += 1
            finally:
                if guard is not None:
                    guard.stop()
                if isinstance(stream, Closeable):
                    stream.close()

    def _copy_chunks(
        self, chunks: Iterator[tuple[int, bytes | memoryview]], ref: TensorRef, buf: memoryview, offset: int
    ) -> Iterator[int]:
        """A (offset, data) chunk stream as an ``stream_into`` one: copy each chunk into ``buf``, yield its size."""
        for chunk_offset, data in chunks:
            n = len(data) if isinstance(data, bytes) else data.nbytes
            if chunk_offset != offset or n == 0:
                raise ProtocolError(
                    f"source sent {n} bytes at offset {chunk_offset}; expected data at {offset}", **self._ids(ref)
                )
            if offset + n > ref.nbytes:
                raise InvalidRefError(
                    f"the source's tensor is longer than the reference says ({ref.nbytes} bytes for "
                    f"{ref.dtype}{list(ref.shape)}): dtype, shape or length do not match what was published",
                    **self._ids(ref),
                )
            buf[offset : offset + n] = data
            offset += n
            yield n

    def _retry_or_raise(
        self, ref: TensorRef, err: Exception, offset: int, start: int, failures: int, last_progress: float
    ) -> None:
        s = self.settings
        if not (isinstance(err, TransferError) and err.retryable):
            raise err
        if offset > start:
            failures = 1  # this attempt made progress: the streak of failures starts again
        idle = time.monotonic() - last_progress
        if failures >= s.max_attempts:
            raise TransferStalledError(
                f"gave up after {failures} attempts without progress at offset {offset} of {ref.nbytes}; "
                f"last error: {err}",
                **self._ids(ref),
            ) from err
        delay = s.backoff(failures)
        if idle + delay > s.idle_timeout_s:
            raise TransferStalledError(
                f"no progress for {idle:.1f}s (idle timeout {s.idle_timeout_s}s) at offset {offset} of {ref.nbytes}; "
                f"last error: {err}",
                **self._ids(ref),
            ) from err
        self._notify_retry(err)
        log.warning(
            "transaction %s ref %s: attempt failed at offset %d/%d (%s); retry %d in %.2fs",
            ref.transaction_id, ref.ref_id, offset, ref.nbytes, err, failures, delay,
        )  # fmt: skip
        if self.abort is not None:
            if self.abort.wait(delay):
                raise TransferAbortedError(f"aborted at offset {offset} of {ref.nbytes}", **self._ids(ref)) from err
        else:
            time.sleep(delay)

    def _notify_retry(self, err: Exception) -> None:
        if self.on_retry is None:
            return
        try:
            self.on_retry(err)
        except Exception:  # a metrics hook must never break a transfer
            log.exception("fetch: on_retry hook failed")

    def fetch_array(
        self, ref: TensorRef, out: np.ndarray | None = None, *, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Download ``ref`` and return it as an array of its dtype and shape (into ``out`` when given)."""
        if out is not None:
            if out.shape != ref.shape or out.dtype != numpy_dtype(ref.dtype):
                raise InvalidRequestError(
                    f"output array is {out.dtype}{list(out.shape)}, the tensor is {ref.dtype}{list(ref.shape)}",
                    **self._ids(ref),
                )
            if not out.flags.c_contiguous:
                raise InvalidRequestError("the output array must be C-contiguous", **self._ids(ref))
        data = self.fetch_into(ref, out, progress=progress)
        if out is not None:
            return out
        return array_from_buffer(data, ref.dtype, ref.shape)

    def fetch_transaction(
        self, refs: Sequence[TensorRef], *, progress: Callable[[str, int], None] | None = None
    ) -> dict[str, np.ndarray]:
        """Fetch every ref of one transaction (by name), then report completion to the publisher.

        On failure the publisher is told this receiver gave up (best effort)
        and the error is raised.
        """
        if not refs:
            return {}
        tids = {r.transaction_id for r in refs}
        if len(tids) != 1:
            raise InvalidRequestError(f"refs of several transactions given together: {sorted(tids)}")
        tid = tids.pop()
        result: dict[str, np.ndarray] = {}
        try:
            for ref in refs:
                cb = functools.partial(progress, ref.name) if progress is not None else None
                result[ref.name] = self.fetch_array(ref, progress=cb)
        except BaseException as exc:
            try:
                self.source.complete(tid, False, str(exc))
            except Exception:
                log.warning("transaction %s: could not report the failure to the publisher", tid, exc_info=True)
            raise
        self.source.complete(tid, True)
        return result
