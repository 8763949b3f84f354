"""Bulk listeners: the accept loop every bulk endpoint shares, and :class:`BulkServer`, which answers requests."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

from fedkube.protocol import (
    CONNECTION_LIMIT,
    PEER_CONNECTION_LIMIT,
    REQUEST_DEADLINE,
    UNAUTHENTICATED_LIMIT,
)
from fedkube.security.contexts import HANDSHAKE_FAILED, TOKEN_SITE_MISMATCH, handshake_refusal, peer_site_identity
from fedkube.security.identity import PeerIdentityError
from fedkube.transfer import endpoints, handoff, peercred
from fedkube.transfer.bulk.frames import (
    END,
    FRAME_BYTES,
    MAX_FRAME_BYTES,
    U32,
    Refused,
    read_request,
    send_failed,
    send_status,
)
from fedkube.transfer.endpoints import ServerTls, close_socket, set_keepalive
from fedkube.transfer.errors import TransferError
from fedkube.transfer.service import DownloadService
from fedkube.transfer.wire import MAX_CHUNK_BYTES, status_code_for
from fedkube.wire.v1 import tensor_pb2

log = logging.getLogger(__name__)

#: ``authorize(site, token, receiver)`` -> (None, "") to admit, or (code, message) to refuse. ``receiver`` is
#: the fetch's or completion's (None for an upload); an authorizer refuses one that is not ``site``. On a TLS
#: listener it is also given ``cert_site=`` (the client certificate's site, which ``site`` already equals:
#: the token must be that site's) and ``peer=`` (the address, for its log line).
Authorize = Callable[..., tuple["grpc.StatusCode | None", str]]
#: ``on_upload(site, upload_id, sock)`` -> (None, "") after taking ownership of ``sock``, or (code, message).
OnUpload = Callable[[str, str, socket.socket], tuple["grpc.StatusCode | None", str]]
#: ``check_peer(site, der)`` after a TLS handshake: None to go on, or (reason, message) to refuse the connection
#: (the server refuses a remote site's superseded certificate, :mod:`fedkube.server.supersede`).
CheckPeer = Callable[[str, bytes], "tuple[str, str] | None"]


#: ``on_refused(reason)``: a connection was refused before it had any effect (one of the bulk port's
#: reasons in :data:`fedkube.protocol.PORT_REFUSALS`).
OnRefused = Callable[[str], None]


_REASONS = {
    CONNECTION_LIMIT: "at its connection limit (every slot is taken)",
    UNAUTHENTICATED_LIMIT: "at its connection limit for connections that have not authenticated yet",
    PEER_CONNECTION_LIMIT: "at its connection limit for one address's unauthenticated connections",
    REQUEST_DEADLINE: "the request did not arrive in time",
}


class Listener:
    """A listener running one daemon thread per connection, at most ``max_connections`` at once.

    TCP on ``host:port`` (made by :func:`fedkube.transfer.endpoints.listen`), or
    a Unix socket when ``host`` is an abstract name (``@...``,
    :mod:`fedkube.transfer.handoff`; ``port`` is then 0). Subclasses answer
    each connection in :meth:`handle`.

    A connection counts as *unauthenticated* until the subclass calls
    :meth:`admitted`: at most ``max_unauthenticated`` of those at once, and at
    most ``max_per_peer`` from one address, so strangers holding idle
    connections cannot take the slots of the sites that authenticated (by
    default both are ``max_connections``: no separate budget).
    """

    def __init__(
        self, host: str, port: int, name: str, max_connections: int, *, max_unauthenticated: int | None = None,
        max_per_peer: int | None = None, on_refused: OnRefused | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.max_connections = max_connections
        self.max_unauthenticated = max_connections if max_unauthenticated is None else max_unauthenticated
        self.max_per_peer = max_connections if max_per_peer is None else max_per_peer
        self.on_refused = on_refused
        self.host = host
        self._own_user_only = peercred.own_user_only(host)  # pod-local: only this process's user may connect
        if handoff.is_handoff(host):
            self._sock = handoff.listen(host)
            self.port = 0
        else:
            self._sock = endpoints.listen(host, port)
            self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._unauthenticated: dict[socket.socket, str] = {}  # connection -> its peer's address
        self._per_peer: Counter[str] = Counter()  # unauthenticated connections by peer address
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"fedkube-{name}-accept", daemon=True)

    @property
    def address(self) -> str:
        if handoff.is_handoff(self.host):
            return self.host
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _start(self) -> None:
        self._thread.start()
        log.info("%s listening on %s", self.name, self.address)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return  # closed by stop()
            if self._own_user_only and not peercred.admit(conn, self.name):
                if self.on_refused is not None:
                    self.on_refused(peercred.PEER_UID_MISMATCH)
                close_socket(conn)  # no answer: a stranger learns nothing about the endpoint
                continue
            peer = ""
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                set_keepalive(conn)
                peer = str(addr[0])
            with self._lock:
                reason = self._admit_locked(conn, peer)
            if reason:
                self.refuse(reason, peer or "a local process")
                threading.Thread(target=self._refuse_busy, args=(conn, reason), daemon=True).start()
                continue
            threading.Thread(target=self._run, args=(conn,), name=f"fedkube-{self.name}-conn", daemon=True).start()

    def _admit_locked(self, conn: socket.socket, peer: str) -> str:
        """"" after taking ``conn`` on as unauthenticated, or the reason it is refused."""
        if len(self._conns) >= self.max_connections:
            return CONNECTION_LIMIT
        if len(self._unauthenticated) >= self.max_unauthenticated:
            return UNAUTHENTICATED_LIMIT
        if self._per_peer[peer] >= self.max_per_peer:
            return PEER_CONNECTION_LIMIT
        self._conns.add(conn)
        self._unauthenticated[conn] = peer
        self._per_peer[peer] += 1
        return ""

    def admitted(self, conn: socket.socket) -> None:
        """``conn`` authenticated: it no longer counts against the unauthenticated and per-peer limits."""
        with self._lock:
            self._forget_unauthenticated_locked(conn)

    def _forget_unauthenticated_locked(self, conn: socket.socket) -> None:
        peer = self._unauthenticated.pop(conn, None)
        if peer is not None:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]

    def refuse(self, reason: str, peer: str, detail: str = "") -> None:
        """Log and count a connection refused before it had any effect."""
        log.warning("%s: refused a connection from %s: %s (reason %s)", self.name, peer,
                    detail or _REASONS.get(reason, reason), reason)
        if self.on_refused is not None:
            self.on_refused(reason)

    def _refuse_busy(self, conn: socket.socket, reason: str) -> None:
        # Plain bytes even on a TLS port: a handshake per refused connection would cost the CPU the limit
        # protects. A TLS client sees a failed handshake and retries, as it does for the status.
        try:
            conn.settimeout(5.0)
            send_status(conn, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name}: {_REASONS[reason]}; retry")
        except OSError:
            pass
        finally:
            close_socket(conn)

    def wrap(self, conn: socket.socket) -> socket.socket:
        """``conn`` as :meth:`handle` gets it (a TLS listener wraps it, without I/O); by default itself."""
        return conn

    def _run(self, conn: socket.socket) -> None:
        keep = False
        try:
            wrapped = self.wrap(conn)
            if wrapped is not conn:  # the limits now track the wrapper (the plain socket was detached into it)
                with self._lock:
                    self._conns.discard(conn)
                    self._conns.add(wrapped)
                    peer = self._unauthenticated.pop(conn, None)
                    if peer is not None:
                        self._unauthenticated[wrapped] = peer
                conn = wrapped
            keep = self.handle(conn)
        except Exception:
            log.exception("%s: connection handler failed", self.name)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._forget_unauthenticated_locked(conn)
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


def _peer_of(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername()[0]) if conn.family != socket.AF_UNIX else "a local process"
    except OSError:
        return "a peer that has gone"


class BulkServer(Listener):
    """Serves ``service`` (fetch, complete) over the bulk protocol; pushed uploads go to ``on_upload``.

    ``authorize(site, token, receiver)`` admits or refuses every request before
    it is looked at (None: no check, for pod-local servers). A whole request
    must arrive within ``request_timeout_s`` of the connection's accept (an
    absolute deadline: trickling bytes does not extend it); a receiver that
    stops reading for ``send_timeout_s`` is dropped (it resumes with a new
    fetch). Until its request is authorized a connection counts against
    ``max_unauthenticated`` and ``max_per_peer`` (:class:`Listener`), so the
    rest of ``max_connections`` stays for the sites; ``on_refused(reason)``
    counts each refusal of a connection.

    With ``tls`` every connection is TLS 1.3 with a client certificate from
    the job CA. The handshake runs on the connection's own thread, after the
    connection took its unauthenticated slot and within the same absolute
    request deadline, so stalled or trickled handshakes are bound like
    stalled requests. The request's site must be the one the certificate
    names (:func:`fedkube.security.contexts.peer_site_identity`).
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
        max_unauthenticated: int = 64,
        max_per_peer: int = 16,
        request_timeout_s: float = 10.0,
        send_timeout_s: float = 120.0,
        on_refused: OnRefused | None = None,
        tls: ServerTls | None = None,
        check_peer: CheckPeer | None = None,
    ) -> None:
        if not 0 < frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"frame_bytes must be in 1..{MAX_FRAME_BYTES}, got {frame_bytes}")
        super().__init__(
            host, port, name, max_connections, max_unauthenticated=min(max_unauthenticated, max_connections),
            max_per_peer=max_per_peer, on_refused=on_refused,
        )  # fmt: skip
        self.service = service
        self.authorize = authorize
        self.on_upload = on_upload
        self.frame_bytes = frame_bytes
        self.request_timeout_s = request_timeout_s
        self.send_timeout_s = send_timeout_s
        self.bytes_sent = 0  # over the server's life (a counter; read without a lock)
        self.tls = tls
        self.check_peer = check_peer

    def start(self) -> BulkServer:
        self._start()
        return self

    def wrap(self, conn: socket.socket) -> socket.socket:
        return conn if self.tls is None else endpoints.accept_tls(conn, self.tls)

    def _handshake(self, conn: ssl.SSLSocket, deadline: float) -> str | None:
        """Run ``conn``'s handshake by ``deadline``; the site its certificate names, or None (refused)."""
        assert self.tls is not None
        peer = _peer_of(conn)
        try:
            # ssl's do_handshake bounds the whole handshake by the socket timeout (one deadline, not per read).
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.do_handshake()
            site = peer_site_identity(conn, namespace=self.tls.namespace, job=self.tls.job).site
            refusal = None if self.check_peer is None else self.check_peer(site, conn.getpeercert(True) or b"")
            if refusal is None:
                return site
            self.refuse(refusal[0], peer, refusal[1])
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)
                send_status(conn, grpc.StatusCode.PERMISSION_DENIED, f"{self.name}: {refusal[1]}")
        except PeerIdentityError as exc:
            self.refuse(exc.reason, peer, f"the client certificate is not one of this job's sites: {exc}")
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)
                send_status(conn, grpc.StatusCode.PERMISSION_DENIED, f"{self.name}: {exc}")
        except TimeoutError:
            self.refuse(REQUEST_DEADLINE, peer, f"no TLS handshake within {self.request_timeout_s:g} s")
        except (ssl.SSLError, OSError, EOFError) as exc:
            reason = handshake_refusal(exc)
            why = getattr(exc, "verify_message", "") or getattr(exc, "reason", "") or str(exc)
            self.refuse(reason, peer, f"TLS handshake failed ({reason}: {why})" if reason != HANDSHAKE_FAILED
                        else f"TLS handshake failed: {exc}")
        return None

    def handle(self, conn: socket.socket) -> bool:
        deadline = time.monotonic() + self.request_timeout_s
        cert_site: str | None = None
        if isinstance(conn, ssl.SSLSocket):
            cert_site = self._handshake(conn, deadline)
            if cert_site is None:
                return False
        try:
            request = read_request(conn, deadline)
        except TimeoutError:
            self.refuse(REQUEST_DEADLINE, _peer_of(conn))
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)  # a peer that reads nothing must not hold the thread now
                send_status(conn, grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"{self.name}: no complete request within {self.request_timeout_s:g} s")
            return False
        except Refused as refused:
            log.warning("%s: refused a request: %s", self.name, refused.message)
            with contextlib.suppress(OSError):
                send_status(conn, refused.code, refused.message)
            return False
        except (EOFError, OSError) as exc:
            log.debug("%s: connection ended: %s", self.name, exc)
            return False
        return self.serve(conn, request, cert_site=cert_site)

    def serve(
        self, conn: socket.socket, request: tensor_pb2.BulkRequest, on_frame: Callable[[int], None] | None = None,
        *, cert_site: str | None = None,
    ) -> bool:  # fmt: skip
        """Answer ``request`` on ``conn``; True when ``conn``'s ownership moved elsewhere (an upload).

        ``on_frame(n)`` is told each data frame sent (a handed-over socket
        reports them to the sidecar that dialed it). ``cert_site``: the site of
        the connection's TLS client certificate, which the request must name.
        """
        try:
            op = request.WhichOneof("op")
            if cert_site is not None and request.site != cert_site:
                detail = (f"the client certificate is site {cert_site!r}'s but the request names site "
                          f"{request.site!r}; a site acts only as itself")
                self.refuse(TOKEN_SITE_MISMATCH, _peer_of(conn), detail)
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{detail}; fix: give each sidecar its own "
                              "site's certificate and token")
            if self.authorize is not None:
                receiver = request.fetch.receiver if op == "fetch" else (
                    request.complete.receiver if op == "complete" else None)
                extra: dict[str, Any] = {} if cert_site is None else {"cert_site": cert_site, "peer": _peer_of(conn)}
                code, message = self.authorize(request.site, request.token, receiver, **extra)
                if code is not None:
                    raise Refused(code, message)
            self.admitted(conn)
            if op == "fetch":
                self._fetch(conn, request.fetch, on_frame)
            elif op == "complete":
                self._complete(conn, request.complete)
            elif op == "upload_id":
                return self._upload(conn, request.site, request.upload_id)
            else:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, "BulkRequest names no operation (fetch, complete, upload_id)"
                )
        except Refused as refused:
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
            raise Refused(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} serves no tensors (uploads only)")
        frame = min(req.max_chunk_bytes or self.frame_bytes, self.frame_bytes, MAX_CHUNK_BYTES)
        try:
            stream = self.service.open_stream(req.transaction_id, req.ref_id, req.receiver, req.offset, frame)
        except TransferError as exc:
            raise Refused(status_code_for(exc), str(exc)) from None
        send_status(conn, grpc.StatusCode.OK)
        # sendall's timeout bounds each whole frame; a receiver slower than frame/send_timeout_s is dropped.
        conn.settimeout(self.send_timeout_s)
        try:
            for _, piece in stream:
                conn.sendall(U32.pack(piece.nbytes))
                conn.sendall(piece)  # a slice of the published buffer: no copy in Python
                self.bytes_sent += piece.nbytes
                if on_frame is not None:
                    on_frame(piece.nbytes)
        except TransferError as exc:
            log.warning(
                "%s: fetch of transaction %s ref %s for %s failed: %s",
                self.name, req.transaction_id, req.ref_id, req.receiver, exc,
            )  # fmt: skip
            send_failed(conn, status_code_for(exc), str(exc))
            return
        conn.sendall(U32.pack(END))

    def _complete(self, conn: socket.socket, req: tensor_pb2.CompleteRequest) -> None:
        if self.service is None:
            raise Refused(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} serves no tensors (uploads only)")
        try:
            self.service.complete(req.transaction_id, req.receiver, req.ok, req.error)
        except TransferError as exc:
            raise Refused(status_code_for(exc), str(exc)) from None
        send_status(conn, grpc.StatusCode.OK)

    def _upload(self, conn: socket.socket, site: str, upload_id: str) -> bool:
        if self.on_upload is None:
            raise Refused(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} accepts no uploads")
        if not upload_id:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty upload_id")
        conn.settimeout(None)
        code, message = self.on_upload(site, upload_id, conn)
        if code is not None:
            raise Refused(code, message)
        with contextlib.suppress(OSError):  # the new owner's read sees a broken connection and resumes
            send_status(conn, grpc.StatusCode.OK)
        return True
