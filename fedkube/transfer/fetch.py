"""The receiver side: resumable, verified, progress-aware chunk fetching.

:class:`Fetcher` downloads one ref into a preallocated buffer from any
:class:`ChunkSource` (gRPC here; the server implements another one over its
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
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import grpc
import numpy as np

from fedkube.transfer.errors import (
    ChecksumMismatchError,
    ChunkTimeoutError,
    InvalidRefError,
    InvalidRequestError,
    ProtocolError,
    TransferAbortedError,
    TransferError,
    TransferStalledError,
)
from fedkube.transfer.refs import Hasher, TensorRef, array_from_buffer, numpy_dtype
from fedkube.transfer.relay import Cancellable
from fedkube.transfer.wire import (
    COMPLETE_METHOD,
    DEFAULT_CHUNK_BYTES,
    FETCH_METHOD,
    MAX_CHUNK_BYTES,
    decode_chunk,
    error_from_rpc,
)
from fedkube.wire.v1 import tensor_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchSettings:
    """Timeouts and retry policy of a fetch. Check them with :func:`validate_settings`.

    * ``chunk_timeout_s``: longest wait for the next chunk of a stream (or the
      first one) before the stream is cancelled and resumed.
    * ``idle_timeout_s``: give up when no byte arrived for this long, across
      retries; never a limit on the total duration.
    * ``max_attempts``: consecutive failed attempts without progress before giving up.
    * ``backoff_base_s`` / ``backoff_max_s``: retry delay ``base * 2**(n-1)``
      capped at max, with jitter (a uniform factor in [0.5, 1]).
    * ``max_chunk_bytes``: chunk size asked of the source (at most the wire limit).
    * ``max_checksum_retries``: refetches from 0 after a checksum mismatch.
    """

    chunk_timeout_s: float = 30.0
    idle_timeout_s: float = 120.0
    max_attempts: int = 8
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_checksum_retries: int = 2

    def backoff(self, failures: int) -> float:
        """Delay before retry number ``failures`` (1-based), with jitter."""
        exp = min(self.backoff_max_s, self.backoff_base_s * (2 ** min(failures - 1, 60)))
        return exp * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class SettingsProblem:
    """One inconsistent setting: which field, what is wrong, and the fix to apply."""

    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}; fix: {self.fix}"


def validate_settings(
    settings: FetchSettings, *, ttl_s: float | None = None, round_timeout_s: float | None = None
) -> list[SettingsProblem]:
    """Every inconsistency between the fetch settings, the transaction TTL and the round timeout.

    Meant for job submission time (LESSONS.md 22), so a bad combination is
    reported with its fix before any transfer starts; empty means consistent.
    """
    s = settings
    out: list[SettingsProblem] = []
    for f in fields(s):
        value = getattr(s, f.name)
        if isinstance(value, float) and not (math.isfinite(value) and value > 0):
            out.append(SettingsProblem(f.name, f"must be a finite number > 0, got {value}", f"set {f.name} > 0"))
    if s.max_attempts < 1:
        out.append(SettingsProblem("max_attempts", f"must be >= 1, got {s.max_attempts}", "set max_attempts >= 1"))
    if s.max_checksum_retries < 0:
        out.append(
            SettingsProblem(
                "max_checksum_retries", "must be >= 0", "set max_checksum_retries to 0 or more (2 is usual)"
            )
        )
    if not 0 < s.max_chunk_bytes <= MAX_CHUNK_BYTES:
        out.append(
            SettingsProblem(
                "max_chunk_bytes",
                f"{s.max_chunk_bytes} is outside 1..{MAX_CHUNK_BYTES}",
                f"use {DEFAULT_CHUNK_BYTES} (the measured best) or any value up to {MAX_CHUNK_BYTES}",
            )
        )
    if s.idle_timeout_s <= s.chunk_timeout_s:
        out.append(
            SettingsProblem(
                "idle_timeout_s",
                f"idle timeout {s.idle_timeout_s}s is not above the per-chunk timeout {s.chunk_timeout_s}s, "
                "so a single slow chunk ends the whole transfer without a retry",
                f"set idle_timeout_s to at least 2x chunk_timeout_s (e.g. {2 * s.chunk_timeout_s:g})",
            )
        )
    if s.backoff_max_s < s.backoff_base_s:
        out.append(
            SettingsProblem(
                "backoff_max_s",
                f"backoff_max_s {s.backoff_max_s}s is below backoff_base_s {s.backoff_base_s}s",
                "set backoff_max_s >= backoff_base_s",
            )
        )
    if s.backoff_max_s >= s.idle_timeout_s:
        out.append(
            SettingsProblem(
                "backoff_max_s",
                f"a retry may wait {s.backoff_max_s}s, not less than the idle timeout {s.idle_timeout_s}s, "
                "so the transfer is declared stalled while it is only backing off",
                f"set backoff_max_s below idle_timeout_s (e.g. {s.idle_timeout_s / 4:g})",
            )
        )
    if ttl_s is not None:
        if ttl_s <= s.idle_timeout_s:
            out.append(
                SettingsProblem(
                    "ttl_s",
                    f"transaction TTL {ttl_s}s is not above the idle timeout {s.idle_timeout_s}s: the publisher "
                    "may drop the tensors while a receiver is still allowed to resume",
                    f"set the TTL well above idle_timeout_s (e.g. {4 * s.idle_timeout_s:g}s or the round timeout)",
                )
            )
        if round_timeout_s is not None and ttl_s < round_timeout_s:
            out.append(
                SettingsProblem(
                    "ttl_s",
                    f"transaction TTL {ttl_s}s is shorter than the round timeout {round_timeout_s}s: a slow but "
                    "healthy client loses the model mid-round (LESSONS.md 7)",
                    "derive the TTL from the round timeout (ttl_s >= round_timeout_s)",
                )
            )
    if round_timeout_s is not None and round_timeout_s <= s.idle_timeout_s:
        out.append(
            SettingsProblem(
                "round_timeout_s",
                f"round timeout {round_timeout_s}s is not above the idle timeout {s.idle_timeout_s}s, "
                "so a stalled transfer is never detected before the round ends",
                "lower idle_timeout_s or raise the round timeout",
            )
        )
    return out


class ChunkSource(Protocol):
    """Where a :class:`Fetcher` gets chunks from (gRPC, or the server's control stream)."""

    def stream(self, ref: TensorRef, offset: int, max_chunk_bytes: int) -> Iterator[tuple[int, bytes | memoryview]]:
        """Yield (offset, data) chunks of ``ref`` from ``offset`` on.

        Raise :class:`TransferError` subclasses (retryable ones derive from
        :class:`StreamBrokenError`) or ``grpc.RpcError``. The returned
        iterator may have a ``cancel()`` method; the fetcher calls it (from
        another thread) when its abort event is set.
        """
        ...

    def complete(self, transaction_id: str, ok: bool, error: str = "") -> None:
        """Tell the publisher this receiver finished (or gave up on) the transaction."""
        ...


@runtime_checkable
class IntoSource(Protocol):
    """A source that writes chunks straight into the caller's buffer (the bulk protocol).

    ``stream_into(ref, offset, buf)`` returns an iterator (with optional
    ``cancel()``/``close()``) that writes the tensor's bytes into ``buf`` (the
    whole tensor's flat byte buffer) from ``offset`` on, in order, and yields
    the byte count of each piece written; it raises like ``stream``.
    :class:`Fetcher` prefers it to ``stream`` when a source has both.
    """

    def stream_into(self, ref: TensorRef, offset: int, buf: memoryview) -> Iterator[int]: ...

    def complete(self, transaction_id: str, ok: bool, error: str = "") -> None: ...


@runtime_checkable
class Closeable(Protocol):
    """A stream that holds something (a socket, a call) until closed."""

    def close(self) -> Any: ...


@runtime_checkable
class Receiving(Protocol):
    """A source that fetches as a named receiver (named in errors)."""

    receiver: str


class RangeInspector(Protocol):
    """Looks at a tensor's bytes as they arrive; see the module docstring."""

    def reset(self) -> None:
        """Forget everything seen: the fetch starts again from byte 0."""
        ...

    def update(self, buf: memoryview, start: int, stop: int) -> None:
        """Bytes ``buf[start:stop]`` arrived and were hashed; all of ``buf[:start]`` came before.

        ``buf`` is the whole tensor's flat byte buffer, so an inspector may
        look back at bytes of an earlier range (a range can end in the middle
        of an element, e.g. after a resumed stream). Must not write to ``buf``.
        """
        ...


class _Watchdog:
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


def _raw(x: bytes) -> bytes:
    return x


class GrpcChunkSource:
    """A :class:`ChunkSource` over a gRPC channel to a Download service (or a relay).

    ``chunk_timeout_s`` bounds the wait for each chunk (the stream is
    cancelled and reported as :class:`ChunkTimeoutError`, so the fetcher
    resumes) and each Complete call.
    """

    def __init__(self, channel: grpc.Channel, receiver: str, *, chunk_timeout_s: float) -> None:
        self.receiver = receiver
        self.chunk_timeout_s = chunk_timeout_s
        self._fetch = channel.unary_stream(
            FETCH_METHOD, request_serializer=tensor_pb2.FetchRequest.SerializeToString, response_deserializer=_raw
        )
        self._complete = channel.unary_unary(
            COMPLETE_METHOD,
            request_serializer=tensor_pb2.CompleteRequest.SerializeToString,
            response_deserializer=tensor_pb2.CompleteResponse.FromString,
        )

    def stream(self, ref: TensorRef, offset: int, max_chunk_bytes: int) -> Iterator[tuple[int, bytes | memoryview]]:
        return _GrpcStream(self, ref, offset, max_chunk_bytes)

    def complete(self, transaction_id: str, ok: bool, error: str = "") -> None:
        request = tensor_pb2.CompleteRequest(
            transaction_id=transaction_id, receiver=self.receiver, ok=ok, error=error[:4000]
        )
        try:
            self._complete(request, timeout=self.chunk_timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, transaction_id=transaction_id, ref_id=None, receiver=self.receiver) from None


class _GrpcStream:
    """One Fetch call as an iterator of (offset, data); cancellable from another thread."""

    def __init__(self, source: GrpcChunkSource, ref: TensorRef, offset: int, max_chunk_bytes: int) -> None:
        self._ref = ref
        self._receiver = source.receiver
        request = tensor_pb2.FetchRequest(
            transaction_id=ref.transaction_id,
            ref_id=ref.ref_id,
            receiver=source.receiver,
            offset=offset,
            max_chunk_bytes=max_chunk_bytes,
        )
        self._call = source._fetch(request)
        self._cancelled_by_caller = False
        self._watchdog = _Watchdog(
            source.chunk_timeout_s, self._call.cancel, None, f"fedkube-fetch-watchdog-{ref.transaction_id}-{ref.ref_id}"
        )

    def __iter__(self) -> _GrpcStream:
        return self

    def __next__(self) -> tuple[int, memoryview]:
        try:
            raw = next(self._call)
        except StopIteration:
            self._watchdog.stop()
            raise
        except grpc.RpcError as exc:
            self._watchdog.stop()
            ids = {"transaction_id": self._ref.transaction_id, "ref_id": self._ref.ref_id, "receiver": self._receiver}
            if self._watchdog.fired:
                raise ChunkTimeoutError(
                    "no chunk within the per-chunk timeout; the stream was cancelled", **ids
                ) from None
            if self._cancelled_by_caller:
                raise TransferAbortedError("fetch cancelled by the caller", **ids) from None
            raise error_from_rpc(exc, **ids) from None
        self._watchdog.kick()
        try:
            return decode_chunk(raw)
        except ValueError as exc:
            self.cancel()
            raise ProtocolError(
                f"malformed Chunk message: {exc}",
                transaction_id=self._ref.transaction_id,
                ref_id=self._ref.ref_id,
                receiver=self._receiver,
            ) from None

    def cancel(self) -> None:
        self._cancelled_by_caller = True
        self._watchdog.stop()
        self._call.cancel()

    def close(self) -> None:
        self._watchdog.stop()
        self._call.cancel()


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
            guard: _Watchdog | None = None
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
                    guard = _Watchdog(None, stream.cancel, self.abort, f"fedkube-fetch-abort-{ref.transaction_id}")
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
