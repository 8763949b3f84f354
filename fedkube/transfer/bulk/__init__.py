"""The bulk data plane: tensor bytes over plain TCP, control stays on gRPC.

gRPC-Python copies every message twice (a serializer returns a whole
``bytes`` that the core copies again; a received message is a new ``bytes``)
and costs about 1 CPU-second per GiB on each side (bench/README.md). On a
plain socket the sender ``sendall``s memoryview slices of the published
buffers and the receiver ``recv_into``s the destination array: the kernel's
copies are the only ones.

A connection carries one request; the framing is in
:mod:`fedkube.transfer.bulk.frames`. A fetch starts at
``FetchRequest.offset``, so a broken connection resumes exactly as with
``Download.Fetch``; the whole-tensor checksum is verified by
:class:`~fedkube.transfer.fetch.Fetcher` as before.

Modules:

* ``frames``: the protocol (requests, statuses, data frames);
* ``listener``: the accept loop every endpoint shares, and :class:`BulkServer`,
  which serves a :class:`DownloadService` (fetch, complete) and hands sockets
  of pushed uploads (``upload_id``) to a callback;
* ``source``: :class:`BulkChunkSource`, a :class:`Fetcher` source that writes
  frames straight into the caller's buffer (``stream_into``);
* ``relay``: the sidecar's forward endpoints, :class:`BulkRelay` (pumps the
  server's answer back) and :class:`BulkHandoff` (hands the trainer the
  server's socket), with their byte hooks;
* ``push``: the reverse path, :func:`push_upload` (sidecar) and
  :class:`BulkHandoffServer` (trainer).

Which of bulk, handoff or gRPC a transfer takes is decided by
:func:`fedkube.transfer.route.choose_route`; sockets to other pods are made by
:mod:`fedkube.transfer.endpoints` (where TLS plugs in).
"""

from fedkube.transfer.bulk.frames import (
    FRAME_BYTES,
    MAGIC,
    MAX_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    Refused,
    read_fetch_response,
    read_request,
    read_status,
    send_request,
    send_status,
)
from fedkube.transfer.bulk.listener import Authorize, BulkServer, Listener, OnUpload
from fedkube.transfer.bulk.push import BulkHandoffServer, push_upload
from fedkube.transfer.bulk.relay import (
    PUMP_BUFFER_BYTES,
    BulkHandoff,
    BulkRelay,
    ByteHook,
    ForwardEndpoint,
    ForwardLimits,
)
from fedkube.transfer.bulk.source import BulkChunkSource, BulkStream
from fedkube.transfer.endpoints import close_socket, parse_address

__all__ = [
    "FRAME_BYTES",
    "MAGIC",
    "MAX_FRAME_BYTES",
    "MAX_MESSAGE_BYTES",
    "PUMP_BUFFER_BYTES",
    "Authorize",
    "BulkChunkSource",
    "BulkHandoff",
    "BulkHandoffServer",
    "BulkRelay",
    "BulkServer",
    "BulkStream",
    "ByteHook",
    "ForwardEndpoint",
    "ForwardLimits",
    "Listener",
    "OnUpload",
    "Refused",
    "close_socket",
    "parse_address",
    "push_upload",
    "read_fetch_response",
    "read_request",
    "read_status",
    "send_request",
    "send_status",
]
