"""The reverse path: a ``ChunkSource`` over the control stream.

The server cannot dial a client (sites sit behind NAT), so to pull a result
tensor it sends an ``UploadRequest`` down the site's control stream; the
sidecar answers by opening a ``Push`` stream (dialed from the client side)
whose first message names the request, then streams chunks in offset order.

:class:`ReverseChunkSource` turns that exchange into the transfer layer's
``ChunkSource`` protocol, so the transfer layer's ``Fetcher`` gives the reverse
path the same resume-from-offset, retry with backoff, idle timeout and
checksum verification as the forward path. :class:`UploadBroker` matches Push
streams to outstanding requests; between the two sits a bounded queue of a few
chunks, so a slow aggregator slows the client's push (gRPC flow control) instead
of growing our memory.

A sidecar with a bulk path answers the same request on a plain TCP connection
to the server's bulk port instead (``BulkRequest.upload_id``, docs/protocol.md):
the bulk server hands that socket to the request's :class:`Upload`
(:meth:`Upload.attach_socket`), and :meth:`ReverseChunkSource.stream_into`
reads the frames straight into the fetcher's buffer, with no copy in Python
and no gRPC message in between. Either kind of answer works for any request.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass

import grpc

from fedkube.protocol import SERVER
from fedkube.server import outbox
from fedkube.transfer.bulk import close_socket, read_fetch_response
from fedkube.transfer.errors import (
    ChunkTimeoutError,
    ProtocolError,
    SourceUnavailableError,
    StreamBrokenError,
    TransferAbortedError,
)
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.wire import DEFAULT_CHUNK_BYTES
from fedkube.wire.v1 import control_pb2

log = logging.getLogger(__name__)

# The receiver name of every result fetch: the server pulls, clients serve.
SERVER_RECEIVER = SERVER

# Sends one ServerMessage to the site's current control stream; False when the
# site has no live stream.
SendFn = Callable[[str, control_pb2.ServerMessage], bool]


@dataclass(frozen=True)
class _End:
    """The Push stream ended (cleanly or not)."""

    reason: str


@dataclass(frozen=True)
class _Failed:
    """The sidecar said it cannot serve the request (e.g. its trainer is gone)."""

    error: str


@dataclass(frozen=True)
class _Socket:
    """The sidecar answered on a bulk connection: the fetch answer arrives on this socket."""

    sock: socket.socket


_Item = tuple[int, bytes] | _End | _Failed | _Socket


class Upload:
    """One outstanding UploadRequest and the chunks its Push stream delivers."""

    def __init__(self, request_id: str, site: str, ref: TensorRef, window: int) -> None:
        self.request_id = request_id
        self.site = site
        self.ref = ref
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=max(1, window))
        self.cancelled = threading.Event()
        self._attached = False
        self._lock = threading.Lock()
        # Set (never queued) when the push stream or the whole control stream ended, so
        # ending never waits for room in the window; queued chunks are still delivered first.
        self._ended: str | None = None

    def attach(self) -> bool:
        """Claim the request for one Push stream; a second stream for it is refused."""
        with self._lock:
            if self._attached or self.cancelled.is_set():
                return False
            self._attached = True
            return True

    def attach_socket(self, sock: socket.socket) -> bool:
        """Claim the request for a bulk connection and hand its socket to the fetcher.

        False (the caller keeps the socket) when the request already has a
        stream or was given up. On True the upload owns the socket: the
        fetcher reads and closes it, or :meth:`cancel` closes it.
        """
        with self._lock:
            if self._attached or self.cancelled.is_set():
                return False
            self._attached = True
            # Never blocks: nothing was queued before the request was attached.
            self._queue.put_nowait(_Socket(sock))
        return True

    def put(self, item: _Item, *, poll_s: float = 0.1) -> bool:
        """Hand an item to the fetcher, blocking while its window is full; False once cancelled."""
        while not self.cancelled.is_set():
            try:
                self._queue.put(item, timeout=poll_s)
                return True
            except queue.Full:
                continue
        return False

    def end(self, reason: str) -> None:
        with self._lock:
            if self._ended is None:
                self._ended = reason

    def get(self, timeout: float) -> _Item | None:
        """The next chunk, the end of the stream, or None after ``timeout`` without either."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self._queue.get(timeout=max(0.0, min(remaining, 0.05)))
            except queue.Empty:
                pass
            with self._lock:
                ended = self._ended
            if ended is not None and self._queue.empty():
                return _End(ended)
            if remaining <= 0:
                return None

    def cancel(self) -> None:
        with self._lock:  # so attach_socket either sees it cancelled or queued its socket before the drain
            self.cancelled.set()
        # Free a Push handler blocked on a full window right away; close a bulk socket nobody took.
        try:
            while True:
                item = self._queue.get_nowait()
                if isinstance(item, _Socket):
                    close_socket(item.sock)
        except queue.Empty:
            pass


class ClaimRefused(Exception):
    """An answer to an upload request that is not taken: the status to end it with.

    ``reason`` is the ``connections_rejected`` label when the refusal says
    something about the caller (another site's request), "" otherwise.
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


class UploadBroker:
    """Outstanding upload requests by id; a Push stream or a bulk connection claims its request here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uploads: dict[str, Upload] = {}

    def open(self, site: str, ref: TensorRef, window: int) -> Upload:
        upload = Upload(f"up-{uuid.uuid4().hex}", site, ref, window)
        with self._lock:
            self._uploads[upload.request_id] = upload
        return upload

    def close(self, request_id: str) -> None:
        with self._lock:
            upload = self._uploads.pop(request_id, None)
        if upload is not None:
            upload.cancel()

    def find(self, request_id: str) -> Upload | None:
        with self._lock:
            return self._uploads.get(request_id)

    def claim(self, site: str, request_id: str, sock: socket.socket | None = None) -> Upload:
        """The upload ``request_id``, now answered by ``site``'s Push stream or bulk connection ``sock``.

        ``site`` is the caller's authenticated identity. On success a bulk
        ``sock`` belongs to the upload (:meth:`Upload.attach_socket`). Raises
        :class:`ClaimRefused` for a request that is not outstanding, is
        another site's, was cancelled or already has an answer.
        """
        upload = self.find(request_id)
        if upload is None:
            raise ClaimRefused(grpc.StatusCode.NOT_FOUND,
                               f"upload request {request_id!r} is not outstanding (finished, cancelled or never sent)")
        if upload.site != site:
            raise ClaimRefused(grpc.StatusCode.PERMISSION_DENIED,
                               f"upload request {request_id!r} is not for {site!r}", reason="WrongSite")
        if not (upload.attach_socket(sock) if sock is not None else upload.attach()):
            if upload.cancelled.is_set():
                raise ClaimRefused(grpc.StatusCode.CANCELLED, f"upload {request_id} was cancelled by the server")
            raise ClaimRefused(grpc.StatusCode.ALREADY_EXISTS, f"upload request {request_id!r} already has a stream")
        return upload

    def site_gone(self, site: str, reason: str) -> None:
        """End every upload of a site whose control stream went away; fetchers resume on the next one."""
        with self._lock:
            uploads = [u for u in self._uploads.values() if u.site == site]
        for upload in uploads:
            upload.end(reason)

    def pending(self) -> int:
        with self._lock:
            return len(self._uploads)


class ReverseChunkSource:
    """``ChunkSource`` for the tensors of one client's result, pulled over its control stream.

    ``send`` goes through the site's *current* stream, so after a sidecar
    reconnects the fetcher's next attempt reaches the new stream and resumes
    at its last verified offset.
    """

    def __init__(
        self,
        site: str,
        broker: UploadBroker,
        send: SendFn,
        *,
        chunk_timeout_s: float,
        window_chunks: int = 4,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        """``max_chunk_bytes`` bounds the Push chunks that :meth:`stream_into` asks for (``stream`` is told)."""
        self.site = site
        self._broker = broker
        self._send = send
        self._chunk_timeout_s = chunk_timeout_s
        self._window = window_chunks
        self._max_chunk_bytes = max_chunk_bytes
        # Bytes that reached a buffer, by how they came (for logs and tests; one fetcher thread writes them).
        self.bulk_bytes = 0
        self.pushed_bytes = 0
        # Seconds from asking for a tensor to the site's bulk answer (the link's round trips and handshakes).
        self.answered_after_s: float | None = None

    def stream(self, ref: TensorRef, offset: int, max_chunk_bytes: int) -> ReverseStream:
        """Ask the site for ``ref``'s bytes from ``offset``; iterate the result for the chunks as they arrive."""
        upload = self._broker.open(self.site, ref, self._window)
        return ReverseStream(upload, self._chunks(upload, ref, offset, max_chunk_bytes))

    def stream_into(self, ref: TensorRef, offset: int, buf: memoryview) -> ReverseIntoStream:
        """Like :meth:`stream`, but the bytes land in ``buf`` (the whole tensor's buffer) from ``offset`` on.

        Yields the byte count of each piece written. A bulk answer is read
        from its socket straight into ``buf``; a Push stream's chunks are
        copied in (the one copy the gRPC path needs anyway).
        """
        upload = self._broker.open(self.site, ref, self._window)
        stream = ReverseIntoStream(upload)
        stream.attach(self._into(upload, stream, ref, offset, buf))
        return stream

    def _into(
        self, upload: Upload, stream: ReverseIntoStream, ref: TensorRef, offset: int, buf: memoryview
    ) -> Generator[int, None, None]:
        expected = offset
        asked = time.monotonic()
        exchange = self._exchange(upload, ref, offset, self._max_chunk_bytes, lambda: expected)
        with contextlib.closing(exchange) as items:
            for item in items:
                if isinstance(item, _Socket):
                    stream.sock = item.sock
                    if self.answered_after_s is None:
                        self.answered_after_s = time.monotonic() - asked
                    log.debug("upload %s: site %s answers on a bulk connection", upload.request_id, self.site)
                    for n in read_fetch_response(
                        item.sock, ref, expected, buf, chunk_timeout_s=self._chunk_timeout_s,
                        receiver=SERVER_RECEIVER, cancelled=upload.cancelled.is_set,
                    ):  # fmt: skip
                        self.bulk_bytes += n
                        yield n
                    return
                chunk_offset, data = item
                n = len(data)
                buf[chunk_offset : chunk_offset + n] = data
                expected += n
                self.pushed_bytes += n
                yield n

    def _chunks(
        self, upload: Upload, ref: TensorRef, offset: int, max_chunk_bytes: int
    ) -> Generator[tuple[int, bytes], None, None]:
        expected = offset
        with contextlib.closing(self._exchange(upload, ref, offset, max_chunk_bytes, lambda: expected)) as items:
            for item in items:
                if isinstance(item, _Socket):
                    close_socket(item.sock)
                    # stream() has no buffer to read a bulk answer into; the fetcher uses stream_into.
                    raise ProtocolError(
                        f"site {self.site!r} answered upload {upload.request_id} on a bulk connection, which only "
                        "stream_into can read",
                        transaction_id=ref.transaction_id, ref_id=ref.ref_id, receiver=SERVER_RECEIVER,
                    )  # fmt: skip
                expected += len(item[1])
                yield item

    def _exchange(
        self, upload: Upload, ref: TensorRef, offset: int, max_chunk_bytes: int, position: Callable[[], int]
    ) -> Generator[tuple[int, bytes] | _Socket, None, None]:
        """Send the UploadRequest; yield checked Push chunks, or the bulk socket that answers instead."""
        ids = {"transaction_id": ref.transaction_id, "ref_id": ref.ref_id, "receiver": SERVER_RECEIVER}
        finished = False
        try:
            request = outbox.upload_request(upload.request_id, ref, offset, max_chunk_bytes)
            if not self._send(self.site, request):
                raise SourceUnavailableError(f"site {self.site!r} has no live control stream to ask for bytes", **ids)
            log.debug("upload %s: asked site %s for ref %s from offset %s", upload.request_id, self.site,
                      ref.ref_id, offset)
            while position() < ref.nbytes:
                expected = position()
                item = upload.get(self._chunk_timeout_s)
                if item is None:
                    raise ChunkTimeoutError(
                        f"site {self.site!r} sent no chunk for {self._chunk_timeout_s:g}s (upload {upload.request_id}, "
                        f"offset {expected})",
                        **ids,
                    )
                if isinstance(item, _End):
                    if upload.cancelled.is_set():
                        raise TransferAbortedError(f"upload {upload.request_id} cancelled by the server", **ids)
                    raise StreamBrokenError(
                        f"push stream from site {self.site!r} ended at offset {expected} of {ref.nbytes}: "
                        f"{item.reason}",
                        **ids,
                    )
                if isinstance(item, _Failed):
                    # The sidecar may be restarting its trainer link; let the fetcher's bounded retries decide.
                    raise SourceUnavailableError(f"site {self.site!r} cannot serve the upload: {item.error}", **ids)
                if isinstance(item, _Socket):
                    # From here the bulk connection carries the answer and its reader reports any failure;
                    # the sidecar sees the socket close, so no CancelUpload is needed.
                    finished = True
                    yield item
                    return
                chunk_offset, data = item
                if chunk_offset != expected or not data or len(data) > max_chunk_bytes:
                    raise ProtocolError(
                        f"site {self.site!r} pushed {len(data)} bytes at offset {chunk_offset}; expected offset "
                        f"{expected} and 1..{max_chunk_bytes} bytes",
                        **ids,
                    )
                if chunk_offset + len(data) > ref.nbytes:
                    raise ProtocolError(f"site {self.site!r} pushed bytes past the tensor's end ({ref.nbytes})", **ids)
                yield chunk_offset, data
            finished = True
        finally:
            self._broker.close(upload.request_id)
            if not finished:
                # Best effort: a sidecar that is gone cannot be told, and needs not be.
                self._send(
                    self.site,
                    outbox.cancel_upload(upload.request_id),
                )

    def complete(self, transaction_id: str, ok: bool, error: str = "") -> None:
        """Nothing to tell here: the client learns the outcome from ``ResultReceived``."""


class ReverseStream:
    """The chunks of one upload; ``cancel()`` (any thread) ends a wait for the next chunk at once.

    The Fetcher calls ``cancel`` when its abort event is set, so aborting a
    round never waits out a chunk timeout.
    """

    def __init__(self, upload: Upload, chunks: Generator[tuple[int, bytes], None, None]) -> None:
        self._upload = upload
        self._chunks = chunks

    def __iter__(self) -> ReverseStream:
        return self

    def __next__(self) -> tuple[int, bytes]:
        return next(self._chunks)

    def cancel(self) -> None:
        self._upload.end("cancelled by the server")

    def close(self) -> None:
        self._chunks.close()


def _no_pieces() -> Generator[int, None, None]:
    yield from ()


class ReverseIntoStream:
    """The pieces of one upload written into the fetcher's buffer; ``cancel()`` works from any thread."""

    def __init__(self, upload: Upload) -> None:
        self._upload = upload
        self._pieces: Generator[int, None, None] = _no_pieces()
        self.sock: socket.socket | None = None  # set once the sidecar answered on a bulk connection

    def attach(self, pieces: Generator[int, None, None]) -> None:
        self._pieces = pieces

    def __iter__(self) -> ReverseIntoStream:
        return self

    def __next__(self) -> int:
        return next(self._pieces)

    def cancel(self) -> None:
        self._upload.cancelled.set()
        self._upload.end("cancelled by the server")
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # wakes the reader blocked in recv_into
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._pieces.close()
        close_socket(self.sock)


def push_error(upload: Upload, error: str) -> None:
    """The Push stream's first message said the sidecar cannot serve the request."""
    upload.put(_Failed(error or "no reason given"))


def push_chunk(upload: Upload, offset: int, data: bytes) -> bool:
    """Queue one pushed chunk (blocks while the window is full); False when the fetcher gave up."""
    return upload.put((offset, data))


def push_end(upload: Upload, reason: str) -> None:
    """The Push stream ended; the fetcher sees a broken stream if bytes are still missing."""
    upload.end(reason)


__all__ = [
    "SERVER_RECEIVER",
    "ClaimRefused",
    "ReverseChunkSource",
    "ReverseIntoStream",
    "Upload",
    "UploadBroker",
    "push_chunk",
    "push_end",
    "push_error",
]
