"""Handing a connected bulk socket to the other process of the pod (SCM_RIGHTS).

The sidecar holds the site's identity and dials the server; the trainer holds
the tensors. Relaying every byte between them costs a second loopback TCP hop
per transfer: for a 1 GiB model that was about a quarter of a round's CPU
(bench/README.md). Instead, once the sidecar has dialed the server and sent
the authenticated request, it passes the connected socket itself to the
trainer over a Unix socket, and the trainer reads the answer (or writes its
tensor) on it directly. The token never leaves the sidecar; the trainer gets
one connection that is good for the one request already made on it.

The two containers of a pod share a network namespace and so the abstract
Unix socket namespace: the endpoints are abstract names (``@fedkube-...``)
that need no shared volume. Linux only; elsewhere the TCP relay is used.

On a handoff connection:

    requester -> holder     b"FKB1", uint32 length, BulkRequest   (forward: what to fetch)
    holder -> requester     b"H" carrying the connected socket, or b"S", uint32 length, BulkStatus
    mover -> other side     uint64 byte counts of the data moved, until it closes

The counts keep the sidecar's byte metrics and the trainer's upload progress
(``send()``'s idle timer) what they were with the relay. They are batched
(:class:`Reporter`): a message per 4 MiB frame woke the sidecar 512 times a
round for a 1 GiB model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import struct
import sys
import time
from collections.abc import Callable

from fedkube.transfer import peercred

#: Whether this platform can hand sockets over (abstract Unix sockets + SCM_RIGHTS).
AVAILABLE = sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(socket, "recv_fds")

_HANDED = b"H"
_STATUS = b"S"
_COUNT = struct.Struct("<Q")
#: A :class:`Reporter` tells the other side at least every this many bytes ...
REPORT_BYTES = 32 * 1024 * 1024
#: ... or this many seconds, whichever comes first (slow links still show progress).
REPORT_S = 0.5


def is_handoff(address: str) -> bool:
    """True for a handoff endpoint (an abstract Unix name, ``@...``), False for ``host:port``."""
    return address.startswith("@")


#: A bulk endpoint on an abstract Unix socket that answers requests itself (the sidecar's TLS-terminating relay),
#: unlike a handoff endpoint (``@...``), which hands a connection over: ``unix:@<name>``.
UNIX_PREFIX = "unix:"


def is_unix(address: str) -> bool:
    """True for ``unix:@<name>``: a bulk endpoint spoken to over an abstract Unix socket."""
    return address.startswith(UNIX_PREFIX) and is_handoff(address[len(UNIX_PREFIX):])


def new_name(role: str) -> str:
    """A fresh abstract socket name for this process: ``@fedkube-<role>-<pid>-<random>``."""
    return f"@fedkube-{role}-{os.getpid()}-{secrets.token_hex(6)}"


def _sockaddr(name: str) -> str:
    if not is_handoff(name):
        raise ValueError(f"handoff endpoint {name!r} is not an abstract socket name (@...)")
    return "\0" + name[1:]


def listen(name: str, backlog: int = 128) -> socket.socket:
    """A listening Unix socket bound to the abstract ``name``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_sockaddr(name))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def connect(name: str, timeout_s: float) -> socket.socket:
    """A connection to the handoff endpoint ``name``, served by a process of this process's user.

    PermissionError when another user serves ``name``: an abstract name is free
    for anyone to take once its owner exits (a restarted sidecar), and whoever
    took it would get the trainer's requests and could hand it a socket of
    its own (the listening side is checked by :mod:`fedkube.transfer.peercred`).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(_sockaddr(name))
        peer = peercred.peer_of(sock)
    except OSError:
        sock.close()
        raise
    if peer is None or peer.uid != os.geteuid():
        sock.close()
        who = "a process whose user cannot be told" if peer is None else f"uid {peer.uid} (pid {peer.pid})"
        raise PermissionError(
            errno.EACCES,
            f"handoff endpoint {name} is served by {who}, not by this process's user (uid {os.geteuid()}), so it is "
            "not this pod's sidecar; not using it (fix: run the sidecar and the trainer as the same user)",
        )
    return sock


def send_socket(conn: socket.socket, sock: socket.socket) -> None:
    """Pass ``sock`` over ``conn``; the caller may close its own copy afterwards."""
    socket.send_fds(conn, [_HANDED], [sock.fileno()])


def send_refusal(conn: socket.socket, status: bytes) -> None:
    """Answer a handoff request with a status (``status`` as framed by the bulk protocol) instead."""
    conn.sendall(_STATUS + status)


def recv_socket(conn: socket.socket) -> socket.socket | None:
    """The socket passed over ``conn``, or None when a status follows instead.

    EOFError when ``conn`` closed first; ValueError when the peer sent
    something that is neither.
    """
    msg, fds, _flags, _addr = socket.recv_fds(conn, 1, 1)
    if not msg:
        for fd in fds:
            os.close(fd)
        raise EOFError("the handoff connection closed before its answer")
    if msg == _HANDED and len(fds) == 1:
        return socket.socket(fileno=fds[0])
    for fd in fds:
        os.close(fd)
    if msg == _STATUS and not fds:
        return None
    raise ValueError(f"not a handoff answer (first byte {msg!r}, {len(fds)} descriptors)")


def count(conn: socket.socket, nbytes: int) -> None:
    """Tell the other side ``nbytes`` more moved; a vanished peer is no error (the transfer goes on)."""
    with contextlib.suppress(OSError):
        conn.sendall(_COUNT.pack(nbytes))


class Reporter:
    """Tells the other side of a handoff connection how many bytes moved, in batches; ``close()`` sends the rest."""

    def __init__(self, conn: socket.socket, *, every_bytes: int = REPORT_BYTES, every_s: float = REPORT_S) -> None:
        self.conn = conn
        self.every_bytes = every_bytes
        self.every_s = every_s
        self._pending = 0
        self._sent_at = time.monotonic()

    def add(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending >= self.every_bytes or time.monotonic() - self._sent_at >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            count(self.conn, self._pending)
            self._pending = 0
        self._sent_at = time.monotonic()


def read_counts(conn: socket.socket, on_bytes: Callable[[int], None] | None) -> int:
    """Read byte counts from ``conn`` until it closes; returns their sum.

    Honors ``conn``'s timeout as an idle limit (TimeoutError).
    """
    total = 0
    pending = b""
    while True:
        data = conn.recv(64 * _COUNT.size)
        if not data:
            return total
        pending += data
        whole = len(pending) - len(pending) % _COUNT.size
        for (n,) in _COUNT.iter_unpack(pending[:whole]):
            total += n
            if on_bytes is not None:
                on_bytes(n)
        pending = pending[whole:]


__all__ = [
    "AVAILABLE",
    "Reporter",
    "connect",
    "count",
    "is_handoff",
    "listen",
    "new_name",
    "read_counts",
    "recv_socket",
    "send_refusal",
    "send_socket",
]
