"""Hand-encoded messages on the wire (Chunk, PushedChunk), the Download service's method names, gRPC options.

Chunks are built and parsed here without the generated protobuf classes: the
publisher writes the ``fedkube.v1.Chunk`` bytes straight from a memoryview of
the tensor (one copy, into the message; ``Chunk(data=bytes(view))`` would make
two) and the receiver reads the payload as a memoryview into the received
message (zero copies before the final write into the caller's buffer). The
bytes are ordinary ``fedkube.v1.Chunk`` messages: the generated stub parses
them, and a test checks both directions against it. The sidecar's
``fedkube.v1.PushedChunk`` (a result chunk on its way up to the server) is
written the same way, and nowhere else: this is the one module that encodes
protobuf messages by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from fedkube.transfer import errors as e
from fedkube.wire.v1 import tensor_pb2

FETCH_METHOD = "/fedkube.v1.Download/Fetch"
COMPLETE_METHOD = "/fedkube.v1.Download/Complete"
SERVICE_NAME = "fedkube.v1.Download"

# Measured on loopback (bench/README.md): 1 MiB chunks reach the throughput
# plateau; larger ones only grow per-stream memory.
DEFAULT_CHUNK_BYTES = 1 << 20
# Upper bound a request may ask for. Messages are sized for it plus headroom
# for the offset/tag bytes, so no gRPC limit below a chunk exists anywhere.
MAX_CHUNK_BYTES = 16 << 20
MESSAGE_HEADROOM = 64 << 10
MAX_CHUNK_MESSAGE = MAX_CHUNK_BYTES + MESSAGE_HEADROOM
# Requests (FetchRequest, CompleteRequest) are a few hundred bytes: a server
# rejects anything bigger than this with RESOURCE_EXHAUSTED.
MAX_REQUEST_MESSAGE = 1 << 20

# Calls one sidecar connection runs at once: a control stream, a fetch, a push, one spare (the server's budget
# per site is twice this, fedkube.server.admission.CALLS_PER_SITE). NOT applied as HTTP/2
# SETTINGS_MAX_CONCURRENT_STREAMS: grpcio refuses calls above such a cap with UNAVAILABLE instead of retrying
# them, and cancelled calls whose handlers still run hold their streams (docs/networking.md, measured with
# bench/stream_cap.py). Tests spread calls over connections by it.
STREAMS_PER_CONNECTION = 4

_KEEPALIVE = [
    # Long fetches are mostly one-way; pings detect a dead peer within ~40 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def server_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Options for a gRPC server that serves Download (sized for the largest chunk)."""
    return [
        ("grpc.max_send_message_length", MAX_CHUNK_MESSAGE),
        ("grpc.max_receive_message_length", MAX_REQUEST_MESSAGE),
        *_KEEPALIVE,
        # Accept the clients' keepalive pings instead of answering GOAWAY(too_many_pings).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
        *extra,
    ]


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Options for a channel that fetches chunks (receives messages up to the largest chunk)."""
    return [
        ("grpc.max_receive_message_length", MAX_CHUNK_MESSAGE),
        ("grpc.max_send_message_length", MAX_CHUNK_MESSAGE),
        *_KEEPALIVE,
        *extra,
    ]


# What a relay lets gRPC buffer upstream: a fixed HTTP/2 receive window instead of
# one grown by BDP probing (measured: relay peak RSS 150-170 MiB with BDP, 80-90 MiB
# with 4 MiB, same throughput; bench/README.md).
RELAY_LOOKAHEAD_BYTES = 4 << 20


def relay_channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Options for a relay's upstream channel: :func:`channel_options` with a fixed, small receive window,
    so the relay's memory stays bounded whatever the tensor size (LESSONS.md 4)."""
    return channel_options([("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", RELAY_LOOKAHEAD_BYTES), *extra])


def insecure_channel(address: str, extra: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A plaintext channel with :func:`channel_options`: for pod-local links (trainer <-> sidecar) and tests.

    Links between pods go through :func:`fedkube.transfer.endpoints.channel`, which is mutual TLS unless the
    job says ``security.tls: disabled``.
    """
    return grpc.insecure_channel(address, options=channel_options(extra))


# --- Chunk encoding -----------------------------------------------------------------

_TAG_OFFSET = 0x08  # field 1, varint
_TAG_DATA = 0x12  # field 2, length-delimited


def encode_varint(value: int) -> bytes:
    """A non-negative int as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_chunk(offset: int, data: Any) -> bytes:
    """The wire bytes of ``fedkube.v1.Chunk(offset=offset, data=data)``, copying ``data`` once."""
    mv = memoryview(data)
    if offset < 0 or offset >= 1 << 64:
        raise ValueError(f"chunk offset {offset} is outside uint64")
    header = bytes((_TAG_OFFSET,)) + encode_varint(offset) + bytes((_TAG_DATA,)) + encode_varint(mv.nbytes)
    return header + mv  # bytes + buffer -> one new bytes object


# Field tags of fedkube.v1.PushedChunk (control.proto): request_id = 1, offset = 2, data = 3, error = 4.
_PUSH_REQUEST_ID = b"\x0a"  # field 1, length-delimited
_PUSH_OFFSET = b"\x10"  # field 2, varint
_PUSH_DATA = b"\x1a"  # field 3, length-delimited
_PUSH_ERROR = b"\x22"  # field 4, length-delimited


def encode_pushed_chunk(request_id: str, offset: int, data: bytes | memoryview = b"", error: str = "") -> bytes:
    """The wire bytes of ``fedkube.v1.PushedChunk``, copying ``data`` exactly once.

    The sidecar relays every result chunk up a ``Control.Push`` stream in one
    of these; building the message by hand avoids a second copy of each chunk
    into a protobuf object. The bytes are a valid PushedChunk for any parser
    (fields in tag order, defaults left out, as protobuf writes them).
    """
    if offset < 0 or offset >= 1 << 64:
        raise ValueError(f"pushed chunk offset {offset} is outside uint64")
    parts = []
    if request_id:
        rid = request_id.encode()
        parts.append(_PUSH_REQUEST_ID + encode_varint(len(rid)) + rid)
    if offset:
        parts.append(_PUSH_OFFSET + encode_varint(offset))
    mv = memoryview(data).cast("B")
    if mv.nbytes:
        parts.append(_PUSH_DATA + encode_varint(mv.nbytes))
    if error:
        err = error.encode()
        tail = _PUSH_ERROR + encode_varint(len(err)) + err
    else:
        tail = b""
    return b"".join(parts) + mv + tail if mv.nbytes else b"".join(parts) + tail


_U64 = (1 << 64) - 1


def _read_varint(buf: memoryview, pos: int, *, wrap: bool = False) -> tuple[int, int]:
    """A varint at ``pos``; ``wrap``: keep its low 64 bits, as protobuf does for a field value
    (a tag or a length over 64 bits is refused, as protobuf refuses it)."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in Chunk message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _U64:
                if not wrap:
                    raise ValueError("varint larger than 64 bits in Chunk message")
                result &= _U64
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes in Chunk message")


def decode_chunk(raw: bytes) -> tuple[int, memoryview]:
    """Parse ``fedkube.v1.Chunk`` wire bytes into (offset, data view into ``raw``).

    Follows protobuf rules: fields in any order, the last occurrence wins,
    unknown fields are skipped. Raises ValueError on malformed input and on
    (obsolete) groups, which protobuf would skip.
    """
    buf = memoryview(raw).cast("B")
    pos = 0
    offset = 0
    data = buf[0:0]
    end = len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0 or key >= 1 << 32:
            raise ValueError(f"invalid field tag {key} in Chunk message")
        # A known field with an unexpected wire type is skipped as unknown, as protobuf does.
        if wire_type == 0:
            value, pos = _read_varint(buf, pos, wrap=True)
            if field == 1:
                offset = value
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if length > end - pos:
                raise ValueError("length-delimited field runs past the end of the Chunk message")
            if field == 2:
                data = buf[pos : pos + length]
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            # Groups (wire types 3/4) are obsolete and never sent by fedkube: refuse rather than guess.
            raise ValueError(f"unsupported wire type {wire_type} (group) in Chunk message")
        if pos > end:
            raise ValueError("truncated field at the end of the Chunk message")
    return offset, data


def _identity(raw: bytes) -> bytes:
    return raw


def add_download_servicer(server: grpc.Server, servicer: Any) -> None:
    """Register a Download servicer whose ``Fetch`` yields already-encoded Chunk bytes.

    ``servicer.Fetch(FetchRequest, context)`` must yield ``bytes`` from
    :func:`encode_chunk` (or relayed raw Chunk messages); ``servicer.Complete``
    returns a ``CompleteResponse``. Use this instead of the generated
    ``add_DownloadServicer_to_server``, whose serializer expects Chunk objects.
    """
    handlers = {
        "Fetch": grpc.unary_stream_rpc_method_handler(
            servicer.Fetch,
            request_deserializer=tensor_pb2.FetchRequest.FromString,
            response_serializer=_identity,
        ),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete,
            request_deserializer=tensor_pb2.CompleteRequest.FromString,
            response_serializer=tensor_pb2.CompleteResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


# --- status codes <-> errors ---------------------------------------------------------


def status_code_for(error: Exception) -> grpc.StatusCode:
    """The gRPC status a server answers for a transfer error.

    An expired (released) transaction is FAILED_PRECONDITION, not NOT_FOUND:
    the ids were right, but the state no longer allows the fetch, and retrying
    the same request cannot help (the publisher must publish again).
    """
    table: list[tuple[type[Exception], grpc.StatusCode]] = [
        (e.TransactionExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
        (e.RefNotFoundError, grpc.StatusCode.NOT_FOUND),
        (e.OffsetOutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
        (e.ReceiverNotExpectedError, grpc.StatusCode.PERMISSION_DENIED),
        (e.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
        (e.InvalidRefError, grpc.StatusCode.INVALID_ARGUMENT),
        (e.TransactionExistsError, grpc.StatusCode.ALREADY_EXISTS),
        (e.TransferAbortedError, grpc.StatusCode.CANCELLED),
        (e.ChunkTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (e.StreamBrokenError, grpc.StatusCode.UNAVAILABLE),
        (e.ChecksumMismatchError, grpc.StatusCode.DATA_LOSS),
    ]
    for kind, code in table:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


# Codes a retry (after backoff, from the last good offset) may fix.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.CANCELLED,
    }
)


def error_from_rpc(
    err: grpc.RpcError, *, transaction_id: str | None, ref_id: str | None, receiver: str | None
) -> Exception:
    """Classify a failed call into the matching transfer error (retryable ones are StreamBrokenError)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    return error_from_status(code, details, transaction_id=transaction_id, ref_id=ref_id, receiver=receiver)


def error_from_status(
    code: grpc.StatusCode, details: str, *, transaction_id: str | None, ref_id: str | None, receiver: str | None
) -> e.TransferError:
    """The transfer error for a status a source answered (gRPC or the bulk protocol's BulkStatus)."""
    kinds: dict[grpc.StatusCode, type[e.TransferError]] = {
        grpc.StatusCode.NOT_FOUND: e.RefNotFoundError,
        grpc.StatusCode.FAILED_PRECONDITION: e.TransactionExpiredError,
        grpc.StatusCode.OUT_OF_RANGE: e.OffsetOutOfRangeError,
        grpc.StatusCode.PERMISSION_DENIED: e.ReceiverNotExpectedError,
        grpc.StatusCode.INVALID_ARGUMENT: e.InvalidRequestError,
        grpc.StatusCode.ALREADY_EXISTS: e.TransactionExistsError,
    }
    ids = {"transaction_id": transaction_id, "ref_id": ref_id, "receiver": receiver}
    if code in kinds:
        return kinds[code](f"source answered {code.name}: {details}", **ids)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return e.ChunkTimeoutError(f"source answered {code.name}: {details}", **ids)
    if code in RETRYABLE_CODES:
        return e.SourceUnavailableError(f"source answered {code.name}: {details}", **ids)
    return e.TransferError(f"source answered {code.name}: {details}", **ids)
