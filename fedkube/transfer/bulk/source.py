"""The dialing side of a fetch: :class:`BulkChunkSource`, a :class:`~fedkube.transfer.fetch.Fetcher` source."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import grpc

from fedkube.transfer import endpoints, handoff
from fedkube.transfer.bulk.frames import read_fetch_response, read_status, send_request
from fedkube.transfer.endpoints import close_socket
from fedkube.transfer.errors import SourceUnavailableError
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.wire import error_from_status
from fedkube.wire.v1 import tensor_pb2


class BulkStream:
    """One fetch over one connection, as an iterator of frame sizes; cancellable from another thread."""

    def __init__(self, source: BulkChunkSource, ref: TensorRef, offset: int, buf: memoryview) -> None:
        self._cancelled = False
        self._sock: socket.socket | None = None
        self._counts: handoff.Reporter | None = None  # tells the handoff connection the bytes read
        request = tensor_pb2.BulkRequest(
            site=source.site,
            token=source.token,
            fetch=tensor_pb2.FetchRequest(
                transaction_id=ref.transaction_id, ref_id=ref.ref_id, receiver=source.receiver, offset=offset
            ),
        )
        ids: dict[str, Any] = {"transaction_id": ref.transaction_id, "ref_id": ref.ref_id, "receiver": source.receiver}
        self._sock, conn = source.open(request, ids)
        self._counts = handoff.Reporter(conn) if conn is not None else None
        self._frames = read_fetch_response(
            self._sock, ref, offset, buf, chunk_timeout_s=source.chunk_timeout_s, receiver=source.receiver,
            cancelled=lambda: self._cancelled,
        )  # fmt: skip

    def __iter__(self) -> BulkStream:
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
    sidecar's :class:`~fedkube.transfer.bulk.BulkHandoff` (``@...``): each
    request is then answered by handing over the sidecar's connection to the
    server.
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
        tls: endpoints.ClientTls | None = None,
    ) -> None:
        """``tls``: dial a TLS port (the server's) as that site; a pod-local or handoff address takes none."""
        if not handoff.is_handoff(address) and not handoff.is_unix(address):
            endpoints.parse_address(address)
        self.address = address
        self.receiver = receiver
        self.chunk_timeout_s = chunk_timeout_s
        self.site = site
        self.token = token
        self.connect_timeout_s = connect_timeout_s
        self.tls = tls

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
                if handoff.is_unix(self.address):  # the sidecar's relay on the pod-local Unix socket
                    sock = handoff.connect(self.address[len(handoff.UNIX_PREFIX):], self.connect_timeout_s)
                else:
                    sock = endpoints.dial(self.address, self.connect_timeout_s, self.tls)
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

    def stream_into(self, ref: TensorRef, offset: int, buf: memoryview) -> BulkStream:
        return BulkStream(self, ref, offset, buf)

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
