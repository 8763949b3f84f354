"""Forwarding chunk streams with a small bounded window (LESSONS.md 4).

A relay never holds a whole tensor: chunks pass through a queue of at most
``window`` items between the thread reading upstream and the one writing
downstream. When downstream is slow the queue fills, the reader stops asking
upstream for more, and gRPC flow control pushes back on the source: a slow
receiver slows the sender instead of growing a buffer. Chunk messages are
forwarded as raw bytes, never parsed or re-encoded.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import grpc

from fedkube.transfer.errors import TransferAbortedError
from fedkube.transfer.wire import COMPLETE_METHOD, FETCH_METHOD, add_download_servicer
from fedkube.wire.v1 import tensor_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")



@runtime_checkable
class Cancellable(Protocol):
    """An upstream that can be told to stop (a gRPC call, a fetch stream)."""

    def cancel(self) -> Any: ...


class StreamHook(Protocol):
    """The byte hook of one relayed stream: called on the relay's threads, so be quick.

    ``read(n)``: an item of ``n`` bytes entered the relay's window from
    upstream; ``sent(n)``: it left downstream; ``close()``: the stream ended
    (whatever was still queued is dropped). ``close`` may be called twice.
    """

    def read(self, nbytes: int) -> None: ...
    def sent(self, nbytes: int) -> None: ...
    def close(self) -> None: ...


class Counted(Generic[T]):
    """Iterates ``upstream``, telling ``hook.read`` each item's size; ``cancel()`` is passed upstream."""

    def __init__(self, upstream: Iterable[T], hook: StreamHook, size: Callable[[T], int]) -> None:
        self._it: Iterator[T] = iter(upstream)
        self._upstream = upstream
        self._hook = hook
        self._size = size

    def __iter__(self) -> Counted[T]:
        return self

    def __next__(self) -> T:
        item = next(self._it)
        self._hook.read(self._size(item))
        return item

    def cancel(self) -> None:
        """Cancel the upstream call, when it can be cancelled."""
        if isinstance(self._upstream, Cancellable):
            self._upstream.cancel()


_ITEM, _END, _ERROR = 0, 1, 2
# How often blocked puts/gets re-check the stop/abort flags; a put or get
# also wakes at once when the other side moves.
_POLL_S = 0.05


def relay_chunks(upstream: Iterable[T], *, window: int, abort: threading.Event | None = None) -> Iterator[T]:
    """Yield ``upstream``'s items, read ahead by a thread into a queue of at most ``window`` items.

    Errors from upstream are raised to the consumer after the items before
    them. Closing the returned generator (or ``abort`` being set) stops the
    reader and calls ``upstream.cancel()`` when it exists, so cancellation
    travels upstream. Memory held here: at most ``window`` + 1 items.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    q: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=window)
    stop = threading.Event()

    def stopped() -> bool:
        return stop.is_set() or (abort is not None and abort.is_set())

    def put(item: tuple[int, Any]) -> bool:
        while not stopped():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in upstream:
                if not put((_ITEM, item)):
                    return
            put((_END, None))
        except BaseException as exc:  # delivered to the consumer, which re-raises it
            put((_ERROR, exc))

    reader = threading.Thread(target=pump, name="fedkube-relay-reader", daemon=True)
    reader.start()

    def consume() -> Iterator[T]:
        try:
            while True:
                try:
                    kind, value = q.get(timeout=_POLL_S)
                except queue.Empty:
                    if abort is not None and abort.is_set():
                        raise TransferAbortedError("relay aborted") from None
                    continue
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise value
                yield value
                if abort is not None and abort.is_set():
                    raise TransferAbortedError("relay aborted")
        finally:
            stop.set()
            if isinstance(upstream, Cancellable):
                upstream.cancel()
            # Unblock a reader stuck in put() and drop queued chunks now.
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            reader.join(timeout=5)

    return consume()


def _raw(x: bytes) -> bytes:
    return x


def _remaining(context: grpc.ServicerContext) -> float | None:
    """The downstream call's time left, or None when it has no deadline (gRPC reports a huge value then)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 86400:
        return None
    return float(remaining)


class RelayServicer:
    """The Download service, answered by forwarding each call to ``upstream``.

    Each Fetch opens the same Fetch upstream and forwards the raw chunk
    messages through :func:`relay_chunks` (at most ``window_chunks`` queued).
    The downstream deadline and cancellation are passed upstream; an upstream
    error ends the downstream call with the same status code and details.
    Create ``upstream`` with :func:`fedkube.transfer.wire.relay_channel_options`
    so gRPC's own receive buffering upstream stays small too.

    ``on_stream()`` (optional) gives each Fetch its :class:`StreamHook`: it
    is told each chunk message as the window reads it and as downstream
    takes it (whole messages, payload plus a few bytes of framing, since
    they are forwarded without parsing).
    """

    def __init__(
        self,
        upstream: grpc.Channel,
        *,
        window_chunks: int = 4,
        on_stream: Callable[[], StreamHook] | None = None,
    ) -> None:
        if window_chunks < 1:
            raise ValueError(f"window_chunks must be >= 1, got {window_chunks}")
        self.window_chunks = window_chunks
        self._on_stream = on_stream
        self._fetch = upstream.unary_stream(
            FETCH_METHOD, request_serializer=tensor_pb2.FetchRequest.SerializeToString, response_deserializer=_raw
        )
        self._complete = upstream.unary_unary(
            COMPLETE_METHOD,
            request_serializer=tensor_pb2.CompleteRequest.SerializeToString,
            response_deserializer=tensor_pb2.CompleteResponse.FromString,
        )

    def Fetch(self, request: tensor_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._fetch(request, timeout=_remaining(context))
        # Downstream gone (cancelled, deadline, disconnect) -> cancel upstream at once.
        context.add_callback(call.cancel)
        log.debug(
            "relay: transaction %s ref %s for %s from offset %d",
            request.transaction_id, request.ref_id, request.receiver, request.offset,
        )  # fmt: skip
        hook = self._on_stream() if self._on_stream is not None else None
        try:
            if hook is None:
                yield from relay_chunks(call, window=self.window_chunks)
            else:
                for raw in relay_chunks(Counted(call, hook, len), window=self.window_chunks):
                    hook.sent(len(raw))
                    yield raw
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            if context.is_active():
                log.warning(
                    "relay: transaction %s ref %s for %s: upstream failed with %s",
                    request.transaction_id, request.ref_id, request.receiver, code,
                )  # fmt: skip
                context.abort(code, exc.details() or "upstream failed")
        finally:
            if hook is not None:
                hook.close()

    def Complete(
        self, request: tensor_pb2.CompleteRequest, context: grpc.ServicerContext
    ) -> tensor_pb2.CompleteResponse:
        try:
            response: tensor_pb2.CompleteResponse = self._complete(request, timeout=_remaining(context))
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "upstream failed")
        return response

    def add_to_server(self, server: grpc.Server) -> None:
        """Register this relay as the Download service of ``server``."""
        add_download_servicer(server, self)
