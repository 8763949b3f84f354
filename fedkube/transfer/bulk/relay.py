"""The sidecar's forward endpoints: a trainer's bulk request goes upstream with the site's identity.

:class:`ForwardEndpoint` holds what both variants share: it reads the
trainer's request, lets the trainer fetch or complete only as its own site,
stamps the site's name and token on it and dials the server. The variants
differ only in how the server's answer reaches the trainer:

* :class:`BulkRelay` pumps it back through one fixed buffer per connection
  (bounded memory, backpressure by TCP; splice(2) where the kernel can);
* :class:`BulkHandoff` passes the connected socket itself to the trainer
  (:mod:`fedkube.transfer.handoff`), which reports the bytes it read.

Both report through the same public hooks, given to the constructor:
``on_bytes(n)`` for bytes that reached the trainer (per pumped piece, or per
batch the trainer reports) and ``on_buffer(total)`` with the buffer bytes all
of the endpoint's connections hold, each time that changes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from fedkube.transfer import endpoints, handoff
from fedkube.transfer.bulk.frames import Refused, read_request, send_request, send_status, status_bytes
from fedkube.transfer.bulk.listener import Listener
from fedkube.transfer.endpoints import ClientTls, close_socket

log = logging.getLogger(__name__)

#: The relay's and the pusher's one buffer per connection.
PUMP_BUFFER_BYTES = 1024 * 1024
#: A transport's byte hook: told a count of bytes (moved, or held now). Called on transfer threads: be quick.
ByteHook = Callable[[int], None]


# --- pumping ------------------------------------------------------------------------------------


def _copy_pump(src: socket.socket, dst: socket.socket, buf: memoryview, on_bytes: ByteHook | None) -> int:
    """Copy ``src`` to ``dst`` until ``src`` ends, through one fixed buffer (TCP does the backpressure).

    A TLS read returns one record (16 KiB) at most, so from a TLS socket the buffer is topped up with
    whatever more is ready before it is sent: one send per record would cost more CPU than the decryption
    (bench/README.md, "TLS": 1.45-2.0 against 0.2-0.5 CPU-s/GiB for the hop). It never waits for bytes
    that are not there, so a reply the other side waits for is never held back.
    """
    moved = 0
    ready = _readiness(src) if isinstance(src, ssl.SSLSocket) else None
    while True:
        n = src.recv_into(buf)
        if n == 0:
            return moved
        ended = False
        while ready is not None and n < len(buf) and ready():
            got = src.recv_into(buf[n:])
            if got == 0:
                ended = True
                break
            n += got
        dst.sendall(buf[:n])
        moved += n
        if on_bytes is not None:
            on_bytes(n)
        if ended:
            return moved


def _readiness(sock: ssl.SSLSocket) -> Callable[[], bool]:
    """Whether a read of ``sock`` returns at once: bytes TLS already decrypted, or bytes in the kernel."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return lambda: sock.pending() > 0 or bool(poller.poll(0))


def _wait(sock: socket.socket, events: int, timeout_s: float | None) -> None:
    poller = select.poll()
    poller.register(sock.fileno(), events | select.POLLERR | select.POLLHUP)
    if not poller.poll(None if timeout_s is None else int(timeout_s * 1000)):
        raise TimeoutError(f"no progress for {timeout_s}s")


def _splice_pump(src: socket.socket, dst: socket.socket, pipe_bytes: int, on_bytes: ByteHook | None) -> int:
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


def pump(src: socket.socket, dst: socket.socket, buffer_bytes: int, on_bytes: ByteHook | None) -> int:
    """Forward ``src`` to ``dst`` until ``src`` ends, holding at most ``buffer_bytes`` in flight here.

    A TLS socket is always copied: its file descriptor carries records, not the bytes, and splice(2) would
    move the ciphertext (or steal it from under the TLS state).
    """
    if USE_SPLICE and not isinstance(src, ssl.SSLSocket) and not isinstance(dst, ssl.SSLSocket):
        try:
            return _splice_pump(src, dst, buffer_bytes, on_bytes)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.debug("splice refused (%s); relaying through a buffer", exc)
    return _copy_pump(src, dst, memoryview(bytearray(buffer_bytes)), on_bytes)


# --- the endpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardLimits:
    """Timeouts and limits of a forward endpoint.

    ``idle_timeout_s``: either side silent this long ends a connection (the
    fetcher resumes); ``request_timeout_s``: the trainer's request must
    arrive within it; ``connect_timeout_s``: for dialing the server.
    """

    idle_timeout_s: float = 60.0
    max_connections: int = 32
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 10.0


class ForwardEndpoint(Listener):
    """A trainer-facing endpoint that forwards each bulk request to the server as this site.

    The trainer may only fetch and complete as its own site; uploads are
    refused (the server never asks a trainer directly). Subclasses deliver the
    server's answer (:meth:`_answer`) or a refusal (:meth:`_refuse`).
    """

    def __init__(
        self,
        upstream_address: str,
        *,
        site: str,
        token: str,
        host: str,
        port: int,
        name: str,
        limits: ForwardLimits,
        on_bytes: ByteHook | None,
        on_buffer: ByteHook | None,
        tls: ClientTls | None = None,
    ) -> None:
        endpoints.parse_address(upstream_address)
        super().__init__(host, port, name, limits.max_connections)
        self.upstream_address = upstream_address
        self.tls = tls  # the server hop's TLS (None: plaintext); the trainer's side is pod-local and plain
        self.site = site
        self.token = token
        self.limits = limits
        self.on_bytes = on_bytes
        self.on_buffer = on_buffer

    @property
    def buffer_bytes_in_use(self) -> int:
        """Buffer bytes this endpoint's connections hold right now."""
        return 0

    def handle(self, conn: socket.socket) -> bool:
        up: socket.socket | None = None
        try:
            request = read_request(conn, time.monotonic() + self.limits.request_timeout_s)
            op = request.WhichOneof("op")
            if op == "fetch":
                receiver = request.fetch.receiver
            elif op == "complete":
                receiver = request.complete.receiver
            else:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"the trainer may fetch or complete, not {op or 'nothing'}"
                )
            if receiver != self.site:
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"receiver {receiver!r} is not this pod's site {self.site!r}; fix: fetch as the site from Hello",
                )
            request.site = self.site
            request.token = self.token
            try:
                up = endpoints.dial(self.upstream_address, self.limits.connect_timeout_s, self.tls)
                send_request(up, request)
            except OSError as exc:
                log.warning("%s: cannot reach the server's bulk endpoint %s: %s", self.name, self.upstream_address,
                            exc)
                raise Refused(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the sidecar cannot reach the server at {self.upstream_address}: {exc}",
                ) from None
            up.settimeout(self.limits.idle_timeout_s)
            conn.settimeout(self.limits.idle_timeout_s)
            up = self._answer(conn, up)
        except Refused as refused:
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
        raise NotImplementedError

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, message: str) -> None:
        raise NotImplementedError


class BulkRelay(ForwardEndpoint):
    """The forward endpoint that pumps the server's answer back to the trainer over TCP.

    Each connection holds one ``buffer_bytes`` buffer while it is open (so
    memory is connections x buffer whatever the tensor size); the server's
    answer is pumped back unchanged.
    """

    def __init__(
        self,
        upstream_address: str,
        *,
        site: str,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        buffer_bytes: int = PUMP_BUFFER_BYTES,
        limits: ForwardLimits = ForwardLimits(),
        on_bytes: ByteHook | None = None,
        on_buffer: ByteHook | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        super().__init__(
            upstream_address, site=site, token=token, host=host, port=port, name="bulk relay", limits=limits,
            on_bytes=on_bytes, on_buffer=on_buffer, tls=tls,
        )  # fmt: skip
        self.buffer_bytes = buffer_bytes
        self._in_use = 0
        self._count_lock = threading.Lock()

    def start(self) -> BulkRelay:
        self._start()
        return self

    @property
    def buffer_bytes_in_use(self) -> int:
        return self._in_use

    def _held(self, delta: int) -> None:
        # Reported under the lock so two connections cannot publish totals out of order.
        with self._count_lock:
            self._in_use += delta
            if self.on_buffer is not None:
                self.on_buffer(self._in_use)

    def _answer(self, conn: socket.socket, up: socket.socket) -> socket.socket | None:
        self._held(self.buffer_bytes)
        try:
            pump(up, conn, self.buffer_bytes, self.on_bytes)
        finally:
            self._held(-self.buffer_bytes)
        return up

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, message: str) -> None:
        send_status(conn, code, message)


class BulkHandoff(ForwardEndpoint):
    """The forward endpoint without the second hop: the trainer gets the server's socket itself.

    Listens on an abstract Unix socket (``@...``, :mod:`fedkube.transfer.handoff`).
    After the request went upstream the connected socket is passed to the
    trainer, which reads the answer straight from the server. No bytes pass
    through the sidecar, so it holds no buffer; ``on_bytes`` gets the counts
    the trainer reports (:class:`~fedkube.transfer.handoff.Reporter`).

    Plaintext server hops only: a TLS session lives in the process that made it and the site's key must
    stay in the sidecar, so with TLS :func:`fedkube.transfer.route.handoff_enabled` keeps this off.
    """

    def __init__(
        self,
        upstream_address: str,
        *,
        site: str,
        token: str,
        name: str = "",
        limits: ForwardLimits = ForwardLimits(),
        on_bytes: ByteHook | None = None,
        on_buffer: ByteHook | None = None,
    ) -> None:
        super().__init__(
            upstream_address, site=site, token=token, host=name or handoff.new_name(f"relay-{site}"), port=0,
            name="bulk handoff", limits=limits, on_bytes=on_bytes, on_buffer=on_buffer,
        )  # fmt: skip
        self.handed = 0  # connections handed to the trainer (a counter; read without a lock)

    def start(self) -> BulkHandoff:
        self._start()
        return self

    def _answer(self, conn: socket.socket, up: socket.socket) -> socket.socket | None:
        handoff.send_socket(conn, up)
        self.handed += 1
        up.close()  # the trainer holds it now; shutting it down here would cut the trainer off
        conn.settimeout(self.limits.idle_timeout_s)
        with contextlib.suppress(TimeoutError):
            handoff.read_counts(conn, self.on_bytes)
        return None

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, message: str) -> None:
        handoff.send_refusal(conn, status_bytes(code, message))
