"""A fault-injecting TCP proxy for the soak benchmark: sits between one sidecar and the server.

It forwards bytes both ways, one thread per direction per connection, and on
request:

* ``stall(seconds)``: stops forwarding in both directions for that long (the
  sockets stay open, as with a congested or flapping link);
* ``flip()``: XORs one byte in the middle of the next large data frame (in the
  direction asked for): an HTTP/2 DATA frame on the gRPC connection, or a
  bulk-protocol data frame (``docs/protocol.md``) on the bulk connection. The
  framing is parsed just enough to find frame boundaries, so the flipped byte
  lands in tensor bytes: what the per-tensor checksum must catch. Frame headers
  are never touched (that would only kill the connection, a weaker test).

A dead upstream (the server restarting) closes the accepted connection, so the
sidecar sees what it would see without the proxy.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = 9
_DATA = 0
FLIP_MIN_FRAME = 8192  # control messages are far smaller; a DATA frame this large carries tensor bytes
UP, DOWN = "up", "down"  # sidecar -> server, server -> sidecar


def _middle_hit(frame_len: int, remaining: int, step: int, i: int) -> int | None:
    """Where the middle byte of a large frame's payload falls in the ``step`` bytes at ``i``, if it does."""
    offset, middle = frame_len - remaining, frame_len // 2
    if frame_len >= FLIP_MIN_FRAME and offset <= middle < offset + step:
        return i + (middle - offset)
    return None


@dataclass
class _Framer:
    """Tracks HTTP/2 frame boundaries in one direction of a connection."""

    skip: int = 0  # bytes of the connection preface still to pass (client side only)
    header: bytearray = field(default_factory=bytearray)
    remaining: int = 0  # payload bytes left in the current frame
    frame_type: int = -1
    frame_len: int = 0

    def flip_at(self, data: bytearray) -> int | None:
        """Walk ``data``; the index of a byte in the middle of a large DATA frame's payload, if one passes."""
        i = 0
        hit: int | None = None
        n = len(data)
        while i < n:
            if self.skip:
                step = min(self.skip, n - i)
                self.skip -= step
                i += step
                continue
            if self.remaining == 0:
                need = _FRAME_HEADER - len(self.header)
                take = data[i : i + need]
                self.header += take
                i += len(take)
                if len(self.header) == _FRAME_HEADER:
                    self.frame_len = int.from_bytes(self.header[0:3], "big")
                    self.frame_type = self.header[3]
                    self.remaining = self.frame_len
                    self.header.clear()
                continue
            step = min(self.remaining, n - i)
            if hit is None and self.frame_type == _DATA:
                hit = _middle_hit(self.frame_len, self.remaining, step, i)
            self.remaining -= step
            i += step
        return hit


@dataclass
class _BulkFramer:
    """Tracks bulk-protocol frame boundaries in one direction of a bulk connection.

    A direction carries, in order: an optional request (``FKB1``, length,
    message), a length-prefixed status, then data frames (uint32 n, n bytes)
    ended by 0, or 0xFFFFFFFF and a length-prefixed status.
    """

    word: bytearray = field(default_factory=bytearray)
    stage: str = "first"  # first | request | status | frames | failed | done
    remaining: int = 0
    payload: bool = False
    frame_len: int = 0

    def flip_at(self, data: bytearray) -> int | None:
        i = 0
        hit: int | None = None
        n = len(data)
        while i < n:
            if self.remaining:
                step = min(self.remaining, n - i)
                if self.payload and hit is None:
                    hit = _middle_hit(self.frame_len, self.remaining, step, i)
                self.remaining -= step
                i += step
                if not self.remaining:
                    self.payload = False
                continue
            take = data[i : i + 4 - len(self.word)]
            self.word += take
            i += len(take)
            if len(self.word) < 4 or self.stage == "done":
                continue
            raw, self.word = bytes(self.word), bytearray()
            value = int.from_bytes(raw, "little")
            if self.stage == "first" and raw == b"FKB1":
                self.stage = "request"
            elif self.stage == "request":  # the request message; a pushed upload's answer follows it
                self.remaining, self.stage = value, "status"
            elif self.stage in ("first", "status", "failed"):
                self.remaining, self.stage = value, ("done" if self.stage == "failed" else "frames")
            elif value == 0:
                self.stage = "done"
            elif value == 0xFFFFFFFF:
                self.stage = "failed"
            else:
                self.remaining, self.payload, self.frame_len = value, True, value
        return hit


class FaultProxy:
    """``127.0.0.1:<port>`` -> ``target``; ``stall()`` and ``flip()`` inject faults (thread-safe)."""

    def __init__(self, target: tuple[str, int], *, bulk: bool = False) -> None:
        self.target = target
        self.bulk = bulk  # the bulk data connection (plain TCP) rather than gRPC's HTTP/2
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._stall_until = 0.0
        self._flip: set[str] = set()
        self.flipped: list[str] = []  # directions in which a byte was flipped
        self.connections = 0
        self._closed = threading.Event()
        self._socks: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="soak-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def stall(self, seconds: float) -> None:
        """Forward nothing, either way, for ``seconds``."""
        with self._lock:
            self._stall_until = max(self._stall_until, time.monotonic() + seconds)

    def flip(self, direction: str) -> None:
        """Flip one byte of the next large DATA frame going ``direction`` (UP or DOWN)."""
        with self._lock:
            self._flip.add(direction)

    def flip_pending(self, direction: str) -> bool:
        with self._lock:
            return direction in self._flip

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is down (restarting): the sidecar retries, as without a proxy
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks.update((client, upstream))
                self.connections += 1
            up: _Framer | _BulkFramer = _BulkFramer() if self.bulk else _Framer(skip=len(_PREFACE))
            down: _Framer | _BulkFramer = _BulkFramer() if self.bulk else _Framer()
            threading.Thread(target=self._pump, args=(client, upstream, UP, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, DOWN, down), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, framer: _Framer | _BulkFramer) -> None:
        buf = bytearray(256 << 10)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(view)
                if n == 0:
                    break
                data = bytearray(view[:n])
                hit = framer.flip_at(data)
                with self._lock:
                    wait = self._stall_until - time.monotonic()
                    do_flip = hit is not None and direction in self._flip
                    if do_flip:
                        self._flip.discard(direction)
                        self.flipped.append(direction)
                if do_flip and hit is not None:
                    data[hit] ^= 0xFF
                    log.info("soak proxy: flipped one byte going %s", direction)
                while wait > 0:  # stalled: hold the bytes (TCP back-pressure builds up behind us)
                    time.sleep(min(wait, 0.05))
                    with self._lock:
                        wait = self._stall_until - time.monotonic()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._socks.discard(src)
                self._socks.discard(dst)
