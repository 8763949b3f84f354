"""The reverse path over bulk: the sidecar answers the server's upload request with the trainer's bytes.

:func:`push_upload` (sidecar) dials the server's bulk port with the request's
``upload_id`` and either pumps the trainer's bulk answer up, or hands that
connection to the trainer's :class:`BulkHandoffServer`, which writes its
answer itself and reports the bytes sent.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

import grpc

from fedkube.transfer import endpoints, handoff
from fedkube.transfer.bulk.frames import Refused, read_request, read_status, send_request, send_status
from fedkube.transfer.bulk.listener import BulkServer, Listener
from fedkube.transfer.bulk.relay import PUMP_BUFFER_BYTES, ByteHook, pump
from fedkube.transfer.endpoints import ClientTls, close_socket
from fedkube.transfer.errors import SourceUnavailableError, StreamBrokenError, TransferAbortedError
from fedkube.transfer.wire import error_from_status
from fedkube.wire.v1 import tensor_pb2

log = logging.getLogger(__name__)


class BulkHandoffServer(Listener):
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

    def start(self) -> BulkHandoffServer:
        self._start()
        return self

    def handle(self, conn: socket.socket) -> bool:
        conn.settimeout(self.server.request_timeout_s)
        sock: socket.socket | None = None
        try:
            sock = handoff.recv_socket(conn)
            if sock is None:
                raise ValueError("a status instead of a socket")
            request = read_request(conn)
        except Refused as exc:
            log.warning("%s: not a handed-over request: %s", self.name, exc.message)
            close_socket(sock)
            return False
        except (ValueError, EOFError, OSError) as exc:
            log.warning("%s: not a handed-over request: %s", self.name, exc)
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
    on_bytes: ByteHook | None = None,
    connect_timeout_s: float = 10.0,
    buffer_bytes: int = PUMP_BUFFER_BYTES,
    tls: ClientTls | None = None,
) -> int:
    """Answer the server's UploadRequest ``upload_id`` with the trainer's bytes; returns the bytes moved.

    Dials the server's bulk endpoint (the server cannot dial a client), then
    the trainer's bulk server with ``fetch``, and pumps the trainer's answer
    up unchanged; if the trainer cannot be reached the server gets an
    UNAVAILABLE status instead. When ``source_address`` is the trainer's
    :class:`BulkHandoffServer` (``@...``) the connection to the server is
    handed to the trainer with ``fetch`` instead, and the trainer writes its
    answer itself; the bytes moved are what it reports, in batches.
    ``on_bytes`` is the byte hook (per pumped piece or reported batch).
    Setting ``abort`` closes both connections. ``tls``: the server hop's TLS; a TLS connection cannot be
    handed to the trainer (:func:`fedkube.transfer.route.choose_route` never picks a handoff then).
    Raises :class:`SourceUnavailableError` when the server cannot be reached
    or refuses the upload (the server then retries with a new request).
    """
    ids: dict[str, Any] = {"transaction_id": fetch.transaction_id, "ref_id": fetch.ref_id, "receiver": fetch.receiver}
    if tls is not None and handoff.is_handoff(source_address):
        raise ValueError(f"upload {upload_id}: a TLS connection to the server cannot be handed to the trainer "
                         f"({source_address}); choose_route must pick the relay")
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
            up = endpoints.dial(server_address, connect_timeout_s, tls)
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
                src = endpoints.dial(source_address, connect_timeout_s)
            send_request(src, tensor_pb2.BulkRequest(fetch=fetch))
        except OSError as exc:
            log.warning("upload %s: cannot reach the trainer's bulk server %s: %s", upload_id, source_address, exc)
            with contextlib.suppress(OSError):
                send_status(up, grpc.StatusCode.UNAVAILABLE, f"the trainer's bulk server {source_address}: {exc}")
            return 0
        src.settimeout(chunk_timeout_s)
        try:
            moved = handoff.read_counts(src, on_bytes) if handing else pump(src, up, buffer_bytes, on_bytes)
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
