"""What a :class:`~fedkube.transfer.fetch.Fetcher` fetches from, and what it calls back: small protocols.

A source yields chunks (:class:`ChunkSource`) or writes them straight into the
caller's buffer (:class:`IntoSource`); a stream it returns may hold something
until closed (:class:`Closeable`); a source may name the receiver it fetches
as (:class:`Receiving`). :class:`RangeInspector` looks at the bytes as they
land (see :mod:`fedkube.transfer.fetch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from fedkube.transfer.refs import TensorRef


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
