"""The bulk data plane: tensor bytes over plain TCP, control stays on gRPC.

gRPC-Python copies every message twice (a serializer returns a whole
``bytes`` that the core copies again; a received message is a new ``bytes``)
and costs about 1 CPU-second per GiB on each side (bench/README.md). On a
plain socket the sender ``sendall``s memoryview slices of the published
buffers and the receiver ``recv_into``s the destination array: the kernel's
copies are the only ones.

A connection carries one request (``tensor.proto``, ``BulkRequest``):

    client -> server   b"FKB1", uint32 length, BulkRequest
    server -> client   uint32 length, BulkStatus                 (code 0 = OK)
    fetch, when OK     data frames: uint32 n (1..MAX_FRAME_BYTES), n bytes
                       then uint32 0 (the tensor's end), or
                       uint32 0xFFFFFFFF, uint32 length, BulkStatus (failed part way)

All integers little-endian. A fetch starts at ``FetchRequest.offset``, so a
broken connection resumes exactly as with ``Download.Fetch``; the whole-tensor
checksum is verified by :class:`~fedkube.transfer.fetch.Fetcher` as before.
Status codes are gRPC's, so errors map to the same
:class:`~fedkube.transfer.errors.TransferError` subclasses on both paths.

Pieces:

* :class:`BulkServer` serves a :class:`DownloadService` (fetch, complete) and
  hands sockets of pushed uploads (``upload_id``) to a callback;
* :class:`BulkChunkSource` is a :class:`Fetcher` source that writes frames
  straight into the caller's buffer (``stream_into``);
* :class:`BulkRelay` is the sidecar's forward relay: it stamps the site's
  identity on a trainer's request and pumps the server's answer back with one
  fixed buffer per connection (bounded memory, backpressure by TCP);
* :func:`push_upload` is the sidecar's reverse path: it dials the server with
  an ``upload_id`` and pumps the trainer's answer to it unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Generator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedkube.transfer import handoff
from fedkube.transfer.errors import (
    ChunkTimeoutError,
    InvalidRefError,
    ProtocolError,
    SourceUnavailableError,
    StreamBrokenError,
    TransferAbortedError,
    TransferError,
)
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.service import DownloadService
from fedkube.transfer.wire import MAX_CHUNK_BYTES, error_from_status, status_code_for
from fedkube.wire.v1 import tensor_pb2

log = logging.getLogger(__name__)

MAGIC = b"FKB1"
#: Largest BulkRequest / BulkStatus accepted; real ones are a few hundred bytes.
MAX_MESSAGE_BYTES = 64 * 1024
#: Frame size a BulkServer sends: slices of the published buffer, so size costs no memory.
FRAME_BYTES = 4 * 1024 * 1024
#: Largest data frame a reader accepts.
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: The relay's and the pusher's one buffer per connection.
PUMP_BUFFER_BYTES = 1024 * 1024
_END = 0
_FAILED = 0xFFFFFFFF
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<4sI")

#: ``authorize(site, token)`` -> (None, "") to admit, or (code, message) to refuse.
Authorize = Callable[[str, str], tuple["grpc.StatusCode | None", str]]
#: ``on_upload(site, upload_id, sock)`` -> (None, "") after taking ownership of ``sock``, or (code, message).
OnUpload = Callable[[str, str, socket.socket], tuple["grpc.StatusCode | None", str]]

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Refused(Exception):
    """A request that is answered with a status and the connection closed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- framing --------------------------------------------------------------------------


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; EOFError when the peer closed first."""
    got = 0
    total = view.nbytes
    while got < total:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError(f"connection closed after {got} of {total} bytes")
        got += n


def _recv_u32(sock: socket.socket) -> int:
    buf = bytearray(4)
    _recv_into(sock, memoryview(buf))
    return int(_U32.unpack(buf)[0])


def _recv_message(sock: socket.socket, length: int) -> bytes:
    if length > MAX_MESSAGE_BYTES:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"bulk message of {length} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
        )
    buf = bytearray(length)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def send_request(sock: socket.socket, request: tensor_pb2.BulkRequest) -> None:
    data = request.SerializeToString()
    sock.sendall(_HEADER.pack(MAGIC, len(data)) + data)


def read_request(sock: socket.socket) -> tensor_pb2.BulkRequest:
    """Read one BulkRequest; raises _Refused for anything that is not one."""
    head = bytearray(_HEADER.size)
    _recv_into(sock, memoryview(head))
    magic, length = _HEADER.unpack(head)
    if magic != MAGIC:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"not a fedkube bulk connection (first bytes {bytes(magic)!r}, expected {MAGIC!r}); "
            "gRPC clients use the server's gRPC port",
        )
    request = tensor_pb2.BulkRequest()
    try:
        request.ParseFromString(_recv_message(sock, length))
    except DecodeError as exc:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed BulkRequest: {exc}") from None
    return request


def _status_bytes(code: grpc.StatusCode, message: str) -> bytes:
    data = tensor_pb2.BulkStatus(code=code.value[0], message=message[:4000]).SerializeToString()
    return _U32.pack(len(data)) + data


def send_status(sock: socket.socket, code: grpc.StatusCode, message: str = "") -> None:
    sock.sendall(_status_bytes(code, message))


def _send_failed(sock: socket.socket, code: grpc.StatusCode, message: str) -> None:
    sock.sendall(_U32.pack(_FAILED) + _status_bytes(code, message))


def read_status(sock: socket.socket) -> tuple[grpc.StatusCode, str]:
    length = _recv_u32(sock)
    status = tensor_pb2.BulkStatus()
    try:
        status.ParseFromString(_recv_message(sock, length))
    except (DecodeError, _Refused) as exc:
        raise ProtocolError(f"malformed BulkStatus from the source: {exc}") from None
    return _CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError with the fix otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bulk address {address!r} is not host:port (e.g. 127.0.0.1:8471)")
    return host.strip("[]"), int(port)


def _connect(address: str, timeout_s: float) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def close_socket(sock: socket.socket | None) -> None:
    """Shut ``sock`` down both ways (waking any thread blocked on it) and close it; None is fine."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# --- reading a fetch answer -------------------------------------------------------------


def read_fetch_response(
    sock: socket.socket,
    ref: TensorRef,
    offset: int,
    buf: memoryview,
    *,
    chunk_timeout_s: float,
    receiver: str | None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Generator[int, None, None]:
    """Read a fetch answer from ``sock`` straight into ``buf[offset:]``; yield each frame's byte count.

    ``buf`` is the whole tensor's buffer. Failures raise the same
    :class:`TransferError` subclasses as the gRPC path: a status from the
    source maps by code, a silent source past ``chunk_timeout_s`` is a
    :class:`ChunkTimeoutError`, a broken connection a
    :class:`StreamBrokenError` (both resumable from the last yielded byte).
    """
    ids: dict[str, Any] = {"transaction_id": ref.transaction_id, "ref_id": ref.ref_id, "receiver": receiver}
    pos = offset
    try:
        sock.settimeout(chunk_timeout_s)
        code, message = read_status(sock)
        if code != grpc.StatusCode.OK:
            raise error_from_status(code, message, **ids)
        while True:
            n = _recv_u32(sock)
            if n == _END:
                return
            if n == _FAILED:
                code, message = read_status(sock)
                raise error_from_status(code, message, **ids)
            if n > MAX_FRAME_BYTES:
                raise ProtocolError(f"data frame of {n} bytes is over the {MAX_FRAME_BYTES}-byte limit", **ids)
            if pos + n > buf.nbytes:
                raise InvalidRefError(
                    f"the source's tensor is longer than the reference says ({ref.nbytes} bytes for "
                    f"{ref.dtype}{list(ref.shape)}): dtype, shape or length do not match what was published",
                    **ids,
                )
            _recv_into(sock, buf[pos : pos + n])
            pos += n
            yield n
    except TransferError as exc:
        if cancelled():
            raise TransferAbortedError("fetch cancelled by the caller", **ids) from exc
        raise
    except TimeoutError:
        if cancelled():
            raise TransferAbortedError("fetch cancelled by the caller", **ids) from None
        raise ChunkTimeoutError(f"no data for {chunk_timeout_s}s at offset {pos}", **ids) from None
    except (EOFError, OSError) as exc:
        if cancelled():
            raise TransferAbortedError("fetch cancelled by the caller", **ids) from None
        raise StreamBrokenError(f"bulk connection broke at offset {pos}: {exc}", **ids) from None


class _BulkStream:
    """One fetch over one connection, as an iterator of frame sizes; cancellable from another thread."""

    def __init__(self, source: BulkChunkSource, ref: TensorRef, offset: int, buf: memoryview) -> None:
        self._cancelled = False
        self._sock: socket.socket | None = None
        self._counts: handoff.Reporter | None = None  # tells the handoff connection the bytes read
        ids: dict[str, Any] = {"transaction_id": ref.transaction_id, "ref_id": ref.ref_id, "receiver": source.receiver}
        request = tensor_pb2.BulkRequest(
            site=source.site,
            token=source.token,
            fetch=tensor_pb2.FetchRequest(
                transaction_id=ref.transaction_id, ref_id=ref.ref_id, receiver=source.receiver, offset=offset
            ),
        )
        self._sock, conn = source.open(request, ids)
        self._counts = handoff.Reporter(conn) if conn is not None else None
        self._frames = read_fetch_response(
            self._sock, ref, offset, buf, chunk_timeout_s=source.chunk_timeout_s, receiver=source.receiver,
            cancelled=lambda: self._cancelled,
        )  # fmt: skip

    def __iter__(self) -> _BulkStream:
        return self

    def __next__(self) -> int:
        n = next(self._frames)
        if self._counts is not None:
            self._counts.add(n)
        return n

    def cancel(self) -> None:
        self._cancelled = True
        if self._sock is not None:
            with contextlib.suppress(OSError):  # wakes a recv blocked in another thread
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._frames.close()
        close_socket(self._sock)
        if self._counts is not None:
            self._counts.flush()
            close_socket(self._counts.conn)


class BulkChunkSource:
    """A :class:`~fedkube.transfer.fetch.Fetcher` source over the bulk protocol.

    ``Fetcher(BulkChunkSource(address, "site-a", chunk_timeout_s=30)).fetch_into(ref, out)``
    writes each frame straight into ``out``. ``site``/``token`` are sent for
    authentication (a sidecar talking to the server); a trainer talking to its
    sidecar leaves them empty (the sidecar adds them). ``address`` may be a
    sidecar's :class:`BulkHandoff` (``@...``): each request is then answered
    by handing over the sidecar's connection to the server.
    """

    def __init__(
        self,
        address: str,
        receiver: str,
        *,
        chunk_timeout_s: float,
        site: str = "",
        token: str = "",
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not handoff.is_handoff(address):
            parse_address(address)
        self.address = address
        self.receiver = receiver
        self.chunk_timeout_s = chunk_timeout_s
        self.site = site
        self.token = token
        self.connect_timeout_s = connect_timeout_s

    def open(
        self, request: tensor_pb2.BulkRequest, ids: dict[str, Any]
    ) -> tuple[socket.socket, socket.socket | None]:
        """Send ``request``; the socket its answer arrives on, and the handoff connection (or None).

        SourceUnavailableError when the endpoint cannot be reached; a handoff
        the sidecar refused raises the error its status maps to.
        """
        if not handoff.is_handoff(self.address):
            sock: socket.socket | None = None
            try:
                sock = _connect(self.address, self.connect_timeout_s)
                send_request(sock, request)
            except OSError as exc:
                close_socket(sock)
                raise SourceUnavailableError(f"cannot reach the bulk endpoint {self.address}: {exc}", **ids) from None
            return sock, None
        conn: socket.socket | None = None
        try:
            conn = handoff.connect(self.address, self.connect_timeout_s)
            send_request(conn, request)
            conn.settimeout(self.chunk_timeout_s)
            sock = handoff.recv_socket(conn)
            if sock is None:
                code, message = read_status(conn)
                close_socket(conn)
                raise error_from_status(code, message, **ids)
        except (OSError, EOFError, ValueError) as exc:
            close_socket(conn)
            raise SourceUnavailableError(f"no connection handed over by {self.address}: {exc}", **ids) from None
        return sock, conn  # TCP_NODELAY as the sidecar set it

    def stream_into(self, ref: TensorRef, offset: int, buf: memoryview) -> _BulkStream:
        return _BulkStream(self, ref, offset, buf)

    def complete(self, transaction_id: str, ok: bool, error: str = "") -> None:
        ids: dict[str, Any] = {"transaction_id": transaction_id, "ref_id": None, "receiver": self.receiver}
        request = tensor_pb2.BulkRequest(
            site=self.site,
            token=self.token,
            complete=tensor_pb2.CompleteRequest(
                transaction_id=transaction_id, receiver=self.receiver, ok=ok, error=error[:4000]
            ),
        )
        sock: socket.socket | None = None
        counts: socket.socket | None = None
        try:
            sock, counts = self.open(request, ids)
            sock.settimeout(self.chunk_timeout_s)
            code, message = read_status(sock)
        except (OSError, EOFError) as exc:
            raise SourceUnavailableError(f"cannot report completion to {self.address}: {exc}", **ids) from None
        finally:
            close_socket(sock)
            close_socket(counts)
        if code != grpc.StatusCode.OK:
            raise error_from_status(code, message, **ids)


# --- serving --------------------------------------------------------------------------------


class _Listener:
    """A listener running one daemon thread per connection, at most ``max_connections`` at once.

    TCP on ``host:port``, or a Unix socket when ``host`` is an abstract name
    (``@...``, :mod:`fedkube.transfer.handoff`; ``port`` is then 0).
    """

    def __init__(self, host: str, port: int, name: str, max_connections: int) -> None:
        self.name = name
        self.max_connections = max_connections
        self.host = host
        if handoff.is_handoff(host):
            self._sock = handoff.listen(host)
            self.port = 0
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            # "::" means every address, IPv4 included (a dual-stack pod network); create_server alone
            # would make it IPv6-only.
            dual = host == "::" and socket.has_dualstack_ipv6()
            self._sock = socket.create_server((host, port), family=family, backlog=128, dualstack_ipv6=dual)
            self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"fedkube-{name}-accept", daemon=True)

    @property
    def address(self) -> str:
        if handoff.is_handoff(self.host):
            return self.host
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        log.info("%s listening on %s", self.name, self.address)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                log.warning("%s: %d connections open; refusing one more", self.name, self.max_connections)
                threading.Thread(target=self._refuse_busy, args=(conn,), daemon=True).start()
                continue
            threading.Thread(target=self._run, args=(conn,), name=f"fedkube-{self.name}-conn", daemon=True).start()

    def _refuse_busy(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)
            send_status(conn, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name} is at its connection limit; retry")
        except OSError:
            pass
        finally:
            close_socket(conn)

    def _run(self, conn: socket.socket) -> None:
        keep = False
        try:
            keep = self.handle(conn)
        except Exception:
            log.exception("%s: connection handler failed", self.name)
        finally:
            with self._lock:
                self._conns.discard(conn)
            if not keep:
                close_socket(conn)

    def handle(self, conn: socket.socket) -> bool:
        """Serve one connection; True when its ownership moved elsewhere (do not close it)."""
        raise NotImplementedError

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


class BulkServer(_Listener):
    """Serves ``service`` (fetch, complete) over the bulk protocol; pushed uploads go to ``on_upload``.

    ``authorize(site, token)`` admits or refuses every request before it is
    looked at (None: no check, for pod-local servers). A request is read
    within ``request_timeout_s``; a receiver that stops reading for
    ``send_timeout_s`` is dropped (it resumes with a new fetch).
    """

    def __init__(
        self,
        service: DownloadService | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        authorize: Authorize | None = None,
        on_upload: OnUpload | None = None,
        name: str = "bulk",
        frame_bytes: int = FRAME_BYTES,
        max_connections: int = 256,
        request_timeout_s: float = 10.0,
        send_timeout_s: float = 120.0,
    ) -> None:
        if not 0 < frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"frame_bytes must be in 1..{MAX_FRAME_BYTES}, got {frame_bytes}")
        super().__init__(host, port, name, max_connections)
        self.service = service
        self.authorize = authorize
        self.on_upload = on_upload
        self.frame_bytes = frame_bytes
        self.request_timeout_s = request_timeout_s
        self.send_timeout_s = send_timeout_s
        self.bytes_sent = 0  # over the server's life (a counter; read without a lock)

    def start(self) -> BulkServer:  # type: ignore[override]
        super().start()
        return self

    def handle(self, conn: socket.socket) -> bool:
        conn.settimeout(self.request_timeout_s)
        try:
            request = read_request(conn)
        except _Refused as refused:
            log.warning("%s: refused a request: %s", self.name, refused.message)
            with contextlib.suppress(OSError):
                send_status(conn, refused.code, refused.message)
            return False
        except (EOFError, OSError) as exc:
            log.debug("%s: connection ended: %s", self.name, exc)
            return False
        return self.serve(conn, request)

    def serve(
        self, conn: socket.socket, request: tensor_pb2.BulkRequest, on_frame: Callable[[int], None] | None = None
    ) -> bool:
        """Answer ``request`` on ``conn``; True when ``conn``'s ownership moved elsewhere (an upload).

        ``on_frame(n)`` is told each data frame sent (a handed-over socket
        reports them to the sidecar that dialed it).
        """
        try:
            if self.authorize is not None:
                code, message = self.authorize(request.site, request.token)
                if code is not None:
                    raise _Refused(code, message)
            op = request.WhichOneof("op")
            if op == "fetch":
                self._fetch(conn, request.fetch, on_frame)
            elif op == "complete":
                self._complete(conn, request.complete)
            elif op == "upload_id":
                return self._upload(conn, request.site, request.upload_id)
            else:
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, "BulkRequest names no operation (fetch, complete, upload_id)"
                )
        except _Refused as refused:
            log.warning("%s: refused a request: %s", self.name, refused.message)
            with contextlib.suppress(OSError):
                send_status(conn, refused.code, refused.message)
        except (EOFError, OSError) as exc:  # the peer went away; it resumes with a new request
            log.debug("%s: connection ended: %s", self.name, exc)
        return False

    def _fetch(
        self, conn: socket.socket, req: tensor_pb2.FetchRequest, on_frame: Callable[[int], None] | None = None
    ) -> None:
        if self.service is None:
            raise _Refused(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} serves no tensors (uploads only)")
        frame = min(req.max_chunk_bytes or self.frame_bytes, self.frame_bytes, MAX_CHUNK_BYTES)
        try:
            stream = self.service.open_stream(req.transaction_id, req.ref_id, req.receiver, req.offset, frame)
        except TransferError as exc:
            raise _Refused(status_code_for(exc), str(exc)) from None
        send_status(conn, grpc.StatusCode.OK)
        # sendall's timeout bounds each whole frame; a receiver slower than frame/send_timeout_s is dropped.
        conn.settimeout(self.send_timeout_s)
        try:
            for _, piece in stream:
                conn.sendall(_U32.pack(piece.nbytes))
                conn.sendall(piece)  # a slice of the published buffer: no copy in Python
                self.bytes_sent += piece.nbytes
                if on_frame is not None:
                    on_frame(piece.nbytes)
        except TransferError as exc:
            log.warning(
                "%s: fetch of transaction %s ref %s for %s failed: %s",
                self.name, req.transaction_id, req.ref_id, req.receiver, exc,
            )  # fmt: skip
            _send_failed(conn, status_code_for(exc), str(exc))
            return
        conn.sendall(_U32.pack(_END))

    def _complete(self, conn: socket.socket, req: tensor_pb2.CompleteRequest) -> None:
        if self.service is None:
            raise _Refused(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} serves no tensors (uploads only)")
        try:
            self.service.complete(req.transaction_id, req.receiver, req.ok, req.error)
        except TransferError as exc:
            raise _Refused(status_code_for(exc), str(exc)) from None
        send_status(conn, grpc.StatusCode.OK)

    def _upload(self, conn: socket.socket, site: str, upload_id: str) -> bool:
        if self.on_upload is None:
            raise _Refused(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} accepts no uploads")
        if not upload_id:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty upload_id")
        conn.settimeout(None)
        code, message = self.on_upload(site, upload_id, conn)
        if code is not None:
            raise _Refused(code, message)
        with contextlib.suppress(OSError):  # the new owner's read sees a broken connection and resumes
            send_status(conn, grpc.StatusCode.OK)
        return True


# --- relaying ---------------------------------------------------------------------------------


def _copy_pump(src: socket.socket, dst: socket.socket, buf: memoryview, on_bytes: Callable[[int], None] | None) -> int:
    """Copy ``src`` to ``dst`` until ``src`` ends, through one fixed buffer (TCP does the backpressure)."""
    moved = 0
    while True:
        n = src.recv_into(buf)
        if n == 0:
            return moved
        dst.sendall(buf[:n])
        moved += n
        if on_bytes is not None:
            on_bytes(n)


def _wait(sock: socket.socket, events: int, timeout_s: float | None) -> None:
    poller = select.poll()
    poller.register(sock.fileno(), events | select.POLLERR | select.POLLHUP)
    if not poller.poll(None if timeout_s is None else int(timeout_s * 1000)):
        raise TimeoutError(f"no progress for {timeout_s}s")


def _splice_pump(
    src: socket.socket, dst: socket.socket, pipe_bytes: int, on_bytes: Callable[[int], None] | None
) -> int:
    """Move ``src`` to ``dst`` through a kernel pipe with splice(2): the bytes never enter this process.

    Honors each socket's timeout as an idle limit. Raises OSError(EINVAL)
    before moving anything when the kernel cannot splice these sockets.
    """
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):  # a bigger pipe means fewer syscalls; the default 64 KiB still works
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, pipe_bytes)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        moved = 0
        while True:
            try:
                n = os.splice(src.fileno(), w, pipe_bytes, flags=flags)
            except BlockingIOError:
                _wait(src, select.POLLIN, src.gettimeout())
                continue
            if n == 0:
                return moved
            left = n
            while left:
                try:
                    left -= os.splice(r, dst.fileno(), left, flags=flags)
                except BlockingIOError:
                    _wait(dst, select.POLLOUT, dst.gettimeout())
            moved += n
            if on_bytes is not None:
                on_bytes(n)
    finally:
        os.close(r)
        os.close(w)


#: splice(2) the relays' bytes when the platform has it (Linux); tests flip it to cover the copy path.
USE_SPLICE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


def _pump(src: socket.socket, dst: socket.socket, buffer_bytes: int, on_bytes: Callable[[int], None] | None) -> int:
    """Forward ``src`` to ``dst`` until ``src`` ends, holding at most ``buffer_bytes`` in flight here."""
    if USE_SPLICE:
        try:
            return _splice_pump(src, dst, buffer_bytes, on_bytes)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.debug("splice refused (%s); relaying through a buffer", exc)
    return _copy_pump(src, dst, memoryview(bytearray(buffer_bytes)), on_bytes)


class BulkRelay(_Listener):
    """The sidecar's forward relay: a trainer's bulk request goes upstream with the site's identity.

    Each connection holds one ``buffer_bytes`` buffer while it is open (so
    memory is connections x buffer whatever the tensor size); the server's
    answer is pumped back unchanged. The trainer may only fetch and complete
    as its own site; uploads are refused (the server never asks a trainer
    directly).
    """

    def __init__(
        self,
        upstream_address: str,
        *,
        site: str,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout_s: float = 60.0,
        on_bytes: Callable[[int], None] | None = None,
        buffer_bytes: int = PUMP_BUFFER_BYTES,
        max_connections: int = 32,
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        parse_address(upstream_address)
        super().__init__(host, port, "bulk relay", max_connections)
        self.upstream_address = upstream_address
        self.site = site
        self.token = token
        self.idle_timeout_s = idle_timeout_s
        self.on_bytes = on_bytes
        self.buffer_bytes = buffer_bytes
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self._in_use = 0
        self._count_lock = threading.Lock()

    def start(self) -> BulkRelay:  # type: ignore[override]
        super().start()
        return self

    @property
    def buffer_bytes_in_use(self) -> int:
        return self._in_use

    def handle(self, conn: socket.socket) -> bool:
        conn.settimeout(self.request_timeout_s)
        up: socket.socket | None = None
        try:
            request = read_request(conn)
            op = request.WhichOneof("op")
            if op == "fetch":
                receiver = request.fetch.receiver
            elif op == "complete":
                receiver = request.complete.receiver
            else:
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"the trainer may fetch or complete, not {op or 'nothing'}"
                )
            if receiver != self.site:
                raise _Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"receiver {receiver!r} is not this pod's site {self.site!r}; fix: fetch as the site from Hello",
                )
            request.site = self.site
            request.token = self.token
            try:
                up = _connect(self.upstream_address, self.connect_timeout_s)
                send_request(up, request)
            except OSError as exc:
                log.warning("bulk relay: cannot reach the server's bulk endpoint %s: %s", self.upstream_address, exc)
                raise _Refused(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the sidecar cannot reach the server at {self.upstream_address}: {exc}",
                ) from None
            up.settimeout(self.idle_timeout_s)
            conn.settimeout(self.idle_timeout_s)
            up = self._answer(conn, up)
        except _Refused as refused:
            log.warning("%s: refused a trainer request: %s", self.name, refused.message)
            with contextlib.suppress(OSError):
                self._refuse(conn, refused.code, refused.message)
        except (EOFError, OSError) as exc:  # either side went away; the fetcher resumes
            log.debug("%s: connection ended: %s", self.name, exc)
        finally:
            close_socket(up)
        return False

    def _answer(self, conn: socket.socket, up: socket.socket) -> socket.socket | None:
        """Get the server's answer on ``up`` to the trainer on ``conn``; the socket left to close, if any."""
        with self._count_lock:
            self._in_use += self.buffer_bytes
        try:
            _pump(up, conn, self.buffer_bytes, self.on_bytes)
        finally:
            with self._count_lock:
                self._in_use -= self.buffer_bytes
        return up

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, message: str) -> None:
        send_status(conn, code, message)


class BulkHandoff(BulkRelay):
    """The sidecar's forward path without the second hop: the trainer gets the server's socket itself.

    Listens on an abstract Unix socket (``@...``, :mod:`fedkube.transfer.handoff`).
    A trainer's request is checked and sent upstream with the site's identity
    exactly as :class:`BulkRelay` does; then the connected socket is passed to
    the trainer, which reads the answer straight from the server. No bytes
    pass through the sidecar, so it holds no buffer; the trainer reports the
    bytes it read (:class:`~fedkube.transfer.handoff.Reporter`), for the
    sidecar's byte metrics.
    """

    def __init__(self, upstream_address: str, *, site: str, token: str, name: str = "", **options: Any) -> None:
        options.pop("buffer_bytes", None)
        super().__init__(
            upstream_address, site=site, token=token, host=name or handoff.new_name(f"relay-{site}"),
            buffer_bytes=0, **options,
        )  # fmt: skip
        self.name = "bulk handoff"
        self.handed = 0  # connections handed to the trainer (a counter; read without a lock)

    def _answer(self, conn: socket.socket, up: socket.socket) -> socket.socket | None:
        handoff.send_socket(conn, up)
        self.handed += 1
        up.close()  # the trainer holds it now; shutting it down here would cut the trainer off
        conn.settimeout(self.idle_timeout_s)
        with contextlib.suppress(TimeoutError):
            handoff.read_counts(conn, self.on_bytes)
        return None

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, message: str) -> None:
        handoff.send_refusal(conn, _status_bytes(code, message))


class BulkHandoffServer(_Listener):
    """Receives sockets the sidecar dialed to the server, and answers the request that comes with each.

    The trainer's reverse path without the second hop: the sidecar answers the
    server's UploadRequest by passing its connection here along with the
    fetch to serve on it (:func:`push_upload`); ``server`` writes the tensor
    straight into that socket and the bytes sent are reported back.
    """

    def __init__(self, server: BulkServer, *, name: str = "", max_connections: int = 32) -> None:
        super().__init__(name or handoff.new_name("results"), 0, f"{server.name} handoff", max_connections)
        self.server = server
        self.served = 0  # handed-over requests answered (a counter; read without a lock)

    def start(self) -> BulkHandoffServer:  # type: ignore[override]
        super().start()
        return self

    def handle(self, conn: socket.socket) -> bool:
        conn.settimeout(self.server.request_timeout_s)
        sock: socket.socket | None = None
        try:
            sock = handoff.recv_socket(conn)
            if sock is None:
                raise ValueError("a status instead of a socket")
            request = read_request(conn)
        except (_Refused, ValueError, EOFError, OSError) as exc:
            log.warning("%s: not a handed-over request: %s", self.name, getattr(exc, "message", exc))
            close_socket(sock)
            return False
        self.served += 1
        counts = handoff.Reporter(conn)
        try:
            if self.server.serve(sock, request, on_frame=counts.add):
                sock = None  # not for a trainer (uploads are refused), but keep the contract
        finally:
            counts.flush()
            if sock is not None:
                sock.close()  # the sidecar still holds it and closes it (with a shutdown) when told we are done
        return False


def push_upload(
    server_address: str,
    *,
    site: str,
    token: str,
    upload_id: str,
    source_address: str,
    fetch: tensor_pb2.FetchRequest,
    chunk_timeout_s: float,
    abort: threading.Event | None = None,
    on_bytes: Callable[[int], None] | None = None,
    connect_timeout_s: float = 10.0,
    buffer_bytes: int = PUMP_BUFFER_BYTES,
) -> int:
    """Answer the server's UploadRequest ``upload_id`` with the trainer's bytes; returns the bytes moved.

    Dials the server's bulk endpoint (the server cannot dial a client), then
    the trainer's bulk server with ``fetch``, and pumps the trainer's answer
    up unchanged; if the trainer cannot be reached the server gets an
    UNAVAILABLE status instead. When ``source_address`` is the trainer's
    :class:`BulkHandoffServer` (``@...``) the connection to the server is
    handed to the trainer with ``fetch`` instead, and the trainer writes its
    answer itself; the bytes moved are what it reports, in batches.
    Setting ``abort`` closes both connections.
    Raises :class:`SourceUnavailableError` when the server cannot be reached
    or refuses the upload (the server then retries with a new request).
    """
    ids: dict[str, Any] = {"transaction_id": fetch.transaction_id, "ref_id": fetch.ref_id, "receiver": fetch.receiver}
    up: socket.socket | None = None
    src: socket.socket | None = None
    done = threading.Event()

    def watch() -> None:
        assert abort is not None
        while not done.wait(0.05):
            if abort.is_set():
                for s in (up, src):
                    if s is not None:
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                return

    if abort is not None:
        threading.Thread(target=watch, name=f"fedkube-push-abort-{upload_id}", daemon=True).start()
    try:
        try:
            up = _connect(server_address, connect_timeout_s)
            up.settimeout(chunk_timeout_s)
            send_request(up, tensor_pb2.BulkRequest(site=site, token=token, upload_id=upload_id))
            code, message = read_status(up)
        except (OSError, EOFError) as exc:
            raise SourceUnavailableError(f"cannot push upload {upload_id} to {server_address}: {exc}", **ids) from None
        if code != grpc.StatusCode.OK:
            raise error_from_status(code, f"server refused upload {upload_id}: {message}", **ids)
        handing = handoff.is_handoff(source_address)
        try:
            if handing:
                src = handoff.connect(source_address, connect_timeout_s)
                handoff.send_socket(src, up)
            else:
                src = _connect(source_address, connect_timeout_s)
            send_request(src, tensor_pb2.BulkRequest(fetch=fetch))
        except OSError as exc:
            log.warning("upload %s: cannot reach the trainer's bulk server %s: %s", upload_id, source_address, exc)
            with contextlib.suppress(OSError):
                send_status(up, grpc.StatusCode.UNAVAILABLE, f"the trainer's bulk server {source_address}: {exc}")
            return 0
        src.settimeout(chunk_timeout_s)
        try:
            moved = handoff.read_counts(src, on_bytes) if handing else _pump(src, up, buffer_bytes, on_bytes)
            if abort is not None and abort.is_set():  # the shutdown ended the stream early, not the trainer
                raise TransferAbortedError(f"upload {upload_id} cancelled after {moved} bytes", **ids)
            return moved
        except (OSError, EOFError) as exc:
            if abort is not None and abort.is_set():
                raise TransferAbortedError(f"upload {upload_id} cancelled", **ids) from None
            raise StreamBrokenError(f"upload {upload_id} broke: {exc}", **ids) from None
    finally:
        done.set()
        close_socket(src)
        close_socket(up)


__all__ = [
    "FRAME_BYTES",
    "MAGIC",
    "MAX_FRAME_BYTES",
    "MAX_MESSAGE_BYTES",
    "BulkChunkSource",
    "BulkHandoff",
    "BulkHandoffServer",
    "BulkRelay",
    "BulkServer",
    "close_socket",
    "parse_address",
    "push_upload",
    "read_fetch_response",
]
