"""The bulk protocol's framing: requests, statuses and the data frames of a fetch answer.

A connection carries one request (``tensor.proto``, ``BulkRequest``):

    client -> server   b"FKB1", uint32 length, BulkRequest
    server -> client   uint32 length, BulkStatus                 (code 0 = OK)
    fetch, when OK     data frames: uint32 n (1..MAX_FRAME_BYTES), n bytes
                       then uint32 0 (the tensor's end), or
                       uint32 0xFFFFFFFF, uint32 length, BulkStatus (failed part way)

All integers little-endian. Status codes are gRPC's, so errors map to the same
:class:`~fedkube.transfer.errors.TransferError` subclasses on both paths.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Generator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedkube.transfer.errors import (
    ChunkTimeoutError,
    InvalidRefError,
    ProtocolError,
    StreamBrokenError,
    TransferAbortedError,
    TransferError,
)
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.wire import error_from_status
from fedkube.wire.v1 import tensor_pb2

MAGIC = b"FKB1"
#: Largest BulkRequest / BulkStatus accepted; real ones are a few hundred bytes.
MAX_MESSAGE_BYTES = 64 * 1024
#: Frame size a BulkServer sends: slices of the published buffer, so size costs no memory.
FRAME_BYTES = 4 * 1024 * 1024
#: Largest data frame a reader accepts.
MAX_FRAME_BYTES = 64 * 1024 * 1024
END = 0
FAILED = 0xFFFFFFFF
U32 = struct.Struct("<I")
_HEADER = struct.Struct("<4sI")

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class Refused(Exception):
    """A request that is answered with a status and the connection closed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def recv_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` from ``sock``; EOFError when the peer closed first.

    ``deadline`` (``time.monotonic()``) bounds the whole read, not each ``recv``: TimeoutError past it,
    so a peer trickling a byte at a time cannot stretch it.
    """
    got = 0
    total = view.nbytes
    while got < total:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"deadline passed after {got} of {total} bytes")
            sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError(f"connection closed after {got} of {total} bytes")
        got += n


def recv_u32(sock: socket.socket) -> int:
    buf = bytearray(4)
    recv_into(sock, memoryview(buf))
    return int(U32.unpack(buf)[0])


def _recv_message(sock: socket.socket, length: int, deadline: float | None = None) -> bytes:
    if length > MAX_MESSAGE_BYTES:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"bulk message of {length} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
        )
    buf = bytearray(length)
    recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def send_request(sock: socket.socket, request: tensor_pb2.BulkRequest) -> None:
    data = request.SerializeToString()
    sock.sendall(_HEADER.pack(MAGIC, len(data)) + data)


def read_request(sock: socket.socket, deadline: float | None = None) -> tensor_pb2.BulkRequest:
    """Read one BulkRequest, all of it before ``deadline`` (:func:`recv_into`); :class:`Refused` for a non-request."""
    head = bytearray(_HEADER.size)
    recv_into(sock, memoryview(head), deadline)
    magic, length = _HEADER.unpack(head)
    if magic != MAGIC:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"not a fedkube bulk connection (first bytes {bytes(magic)!r}, expected {MAGIC!r}); "
            "gRPC clients use the server's gRPC port",
        )
    request = tensor_pb2.BulkRequest()
    try:
        request.ParseFromString(_recv_message(sock, length, deadline))
    except DecodeError as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed BulkRequest: {exc}") from None
    return request


def status_bytes(code: grpc.StatusCode, message: str) -> bytes:
    data = tensor_pb2.BulkStatus(code=code.value[0], message=message[:4000]).SerializeToString()
    return U32.pack(len(data)) + data


def send_status(sock: socket.socket, code: grpc.StatusCode, message: str = "") -> None:
    sock.sendall(status_bytes(code, message))


def send_failed(sock: socket.socket, code: grpc.StatusCode, message: str) -> None:
    sock.sendall(U32.pack(FAILED) + status_bytes(code, message))


def read_status(sock: socket.socket) -> tuple[grpc.StatusCode, str]:
    length = recv_u32(sock)
    status = tensor_pb2.BulkStatus()
    try:
        status.ParseFromString(_recv_message(sock, length))
    except (DecodeError, Refused) as exc:
        raise ProtocolError(f"malformed BulkStatus from the source: {exc}") from None
    return _CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message


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
            n = recv_u32(sock)
            if n == END:
                return
            if n == FAILED:
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
            recv_into(sock, buf[pos : pos + n])
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
