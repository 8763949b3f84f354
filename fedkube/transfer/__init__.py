"""Tensor references, the download service, resumable fetch and the relay.

Publisher::

    service = DownloadService("server")
    server, port = serve(service)
    txn = service.publish({"w": weights}, receivers=["site-a", "site-b"], ttl_s=round_timeout)
    send_refs_somehow([r.to_proto() for r in txn.refs])

Receiver::

    source = GrpcChunkSource(insecure_channel(f"host:{port}"), "site-a", chunk_timeout_s=30)
    arrays = Fetcher(source, FetchSettings()).fetch_transaction(refs)

The same bytes over plain TCP (``fedkube.transfer.bulk``, what fedkube's
processes use for tensors)::

    bulk = BulkServer(service, host="0.0.0.0", port=8471).start()
    arrays = Fetcher(BulkChunkSource("host:8471", "site-a", chunk_timeout_s=30)).fetch_transaction(refs)
"""

from fedkube.transfer.allocator import ALLOCATOR_ENV, tune_allocator
from fedkube.transfer.bulk import BulkChunkSource, BulkRelay, BulkServer, push_upload
from fedkube.transfer.errors import (
    ChecksumMismatchError,
    ChunkTimeoutError,
    InvalidRefError,
    InvalidRequestError,
    OffsetOutOfRangeError,
    ProtocolError,
    ReceiverNotExpectedError,
    RefNotFoundError,
    SourceUnavailableError,
    StreamBrokenError,
    TransactionExistsError,
    TransactionExpiredError,
    TransferAbortedError,
    TransferError,
    TransferStalledError,
)
from fedkube.transfer.fetch import (
    ChunkSource,
    Fetcher,
    FetchSettings,
    GrpcChunkSource,
    SettingsProblem,
    validate_settings,
)
from fedkube.transfer.locks import CheckedLock, LockReentryError
from fedkube.transfer.refs import (
    DTYPE_NAMES,
    Hasher,
    TensorRef,
    array_from_buffer,
    as_bytes,
    checksum_of,
    dtype_name,
    numpy_dtype,
)
from fedkube.transfer.relay import RelayServicer, relay_chunks
from fedkube.transfer.service import DownloadService, Transaction, TransferEvent, serve
from fedkube.transfer.wire import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    channel_options,
    decode_chunk,
    encode_chunk,
    insecure_channel,
    server_options,
)

__all__ = [
    "ALLOCATOR_ENV",
    "DEFAULT_CHUNK_BYTES",
    "DTYPE_NAMES",
    "MAX_CHUNK_BYTES",
    "BulkChunkSource",
    "BulkRelay",
    "BulkServer",
    "CheckedLock",
    "ChecksumMismatchError",
    "ChunkSource",
    "ChunkTimeoutError",
    "DownloadService",
    "FetchSettings",
    "Fetcher",
    "GrpcChunkSource",
    "Hasher",
    "InvalidRefError",
    "InvalidRequestError",
    "LockReentryError",
    "OffsetOutOfRangeError",
    "ProtocolError",
    "ReceiverNotExpectedError",
    "RefNotFoundError",
    "RelayServicer",
    "SettingsProblem",
    "SourceUnavailableError",
    "StreamBrokenError",
    "TensorRef",
    "Transaction",
    "TransactionExistsError",
    "TransactionExpiredError",
    "TransferAbortedError",
    "TransferError",
    "TransferEvent",
    "TransferStalledError",
    "array_from_buffer",
    "as_bytes",
    "channel_options",
    "checksum_of",
    "decode_chunk",
    "dtype_name",
    "encode_chunk",
    "insecure_channel",
    "numpy_dtype",
    "push_upload",
    "relay_chunks",
    "serve",
    "server_options",
    "tune_allocator",
    "validate_settings",
]
