"""The gRPC :class:`~fedkube.transfer.sources.ChunkSource`: Fetch and Complete calls on a Download service or relay."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from fedkube.transfer.errors import ChunkTimeoutError, ProtocolError, TransferAbortedError
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.watchdog import Watchdog
from fedkube.transfer.wire import COMPLETE_METHOD, FETCH_METHOD, decode_chunk, error_from_rpc
from fedkube.wire.v1 import tensor_pb2


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
        self._watchdog = Watchdog(
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
