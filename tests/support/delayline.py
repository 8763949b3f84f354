"""One direction of a link with latency, fast enough not to be the bottleneck of what it carries.

:func:`forward_delayed` moves bytes from one socket to another so that each byte leaves ``delay_s`` after it
arrived, with at most ``capacity`` bytes on the way: a ring buffer of exactly that size, which a reader fills with
``recv_into`` (large reads, no copies in Python) and a writer drains with ``sendall`` of memoryview slices as each
piece falls due. When the ring is full the reader stops reading and the sender's TCP waits, as on a real path
whose bandwidth-delay product is ``capacity``: the link carries at most ``capacity / delay_s`` bytes per second.

A link's capacity is shared by every connection across it (:class:`Budget`, one per direction): a receiver that
opens eight connections gets the path's bandwidth, not eight paths'. Each read is sized to what was free when it
started, so connections that read at the same moment may together overshoot by what they read; one connection
never holds more than ``capacity``.

The fault suite's :class:`tests.faults.support.TcpProxy` uses it for ``delay_s``; bench/latency.py measures what it
moves (bench/README.md, "Latency").
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable

#: The most one ``recv_into`` asks for: large reads keep the per-call cost of Python out of the throughput.
READ_BYTES = 1 << 20


class Budget:
    """The bytes on the way in one direction of a link, over all its connections; at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"a link's capacity must be positive (got {capacity} bytes)")
        self.capacity = capacity
        self.held = 0
        self.changed = threading.Condition()

    def release(self, n: int) -> None:
        with self.changed:
            self.held -= n
            self.changed.notify_all()


def forward_delayed(
    src: socket.socket,
    dst: socket.socket,
    *,
    delay_s: float,
    budget: Budget,
    edit: Callable[[memoryview], None],
    flowing: threading.Event,
    closed: threading.Event,
    name: str,
) -> None:
    """Forward ``src`` to ``dst`` with ``delay_s`` latency until ``src`` ends or either side fails.

    ``budget`` is the link's capacity in this direction, shared with its other connections.

    ``edit`` sees (and may change in place) every piece as it is read; nothing is sent while ``flowing`` is
    clear; ``closed`` set ends the forwarding. Both sockets are shut down at the end, as the link's other
    forwarders expect (a link that ends one way ends both ways).
    """
    capacity = budget.capacity
    ring = memoryview(bytearray(capacity))
    # (due time, start in the ring, length): the pieces on the way, oldest first
    line: collections.deque[tuple[float, int, int]] = collections.deque()
    held = 0  # bytes in ``line``
    ended = False
    changed = threading.Condition()
    # Wake the reader only when a useful read fits: a sliver of free ring would mean many tiny reads.
    room = min(capacity, READ_BYTES // 4)

    def write() -> None:
        nonlocal held
        try:
            while True:
                with changed:
                    while not line and not ended:
                        changed.wait()
                    if not line:
                        return
                    due, start, n = line[0]
                    # Send every piece that is due and contiguous with the first in one call.
                    now = time.monotonic()
                    for next_due, next_start, next_n in list(line)[1:]:
                        if next_due > now or next_start != start + n:
                            break
                        n += next_n
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                while not flowing.wait(0.1):
                    if closed.is_set():
                        return
                dst.sendall(ring[start : start + n])
                with changed:
                    sent = n
                    while sent:
                        _, _, piece = line.popleft()
                        sent -= piece
                    held -= n
                    changed.notify_all()
                budget.release(n)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    writer = threading.Thread(target=write, daemon=True, name=f"{name}-out")
    writer.start()
    at = 0  # where the next read goes in the ring
    try:
        while not closed.is_set():
            with budget.changed:
                while budget.capacity - budget.held < room and writer.is_alive():
                    budget.changed.wait(0.1)  # the path is full: stop reading, TCP back-pressure does the rest
                free = budget.capacity - budget.held
            with changed:
                free = min(free, capacity - held)  # this connection's ring never holds more than the link
            if at == capacity:
                at = 0
            # The free space starts at ``at`` and runs to the ring's end or to the oldest byte on the way.
            n = src.recv_into(ring[at : at + min(free, capacity - at, READ_BYTES)])
            if n == 0:
                break
            piece = ring[at : at + n]
            edit(piece)
            with budget.changed:
                budget.held += n
            with changed:
                line.append((time.monotonic() + delay_s, at, n))
                held += n
                changed.notify_all()
            at += n
    except OSError:
        pass
    finally:
        with changed:
            ended = True
            changed.notify_all()
        writer.join()
        budget.release(held)  # what a broken connection left on the way no longer takes the link's room
