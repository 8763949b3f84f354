"""The fault suite's link proxy can add latency (bench/latency.py measures fedkube behind it)."""

from __future__ import annotations

import os
import socket
import threading
import time

from tests.faults.support import UP, TcpProxy
from tests.support import delayline
from tests.support.waiting import until


def test_a_delayed_link_adds_its_delay_each_way_and_keeps_every_byte_in_order() -> None:
    payload = os.urandom(3 << 20)  # above in_flight_bytes: the reader must wait for the path to drain
    with socket.create_server(("127.0.0.1", 0)) as echo:

        def serve() -> None:
            conn, _ = echo.accept()
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

        threading.Thread(target=serve, daemon=True).start()
        proxy = TcpProxy(echo.getsockname()[:2], name="latency", delay_s=0.05, in_flight_bytes=1 << 20).start()
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                start = time.monotonic()
                sock.sendall(b"p")
                assert sock.recv(1) == b"p"
                rtt = time.monotonic() - start
                sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
                sender.start()
                got = bytearray()
                while len(got) < len(payload):
                    got += sock.recv(1 << 20)
                sender.join(5)
        finally:
            proxy.close()
    assert 0.1 <= rtt < 1.0, rtt  # 50 ms each way
    assert bytes(got) == payload


def test_a_full_delayed_link_stops_reading_at_its_capacity_and_delivers_everything_after() -> None:
    """Like a real path: no more than its bandwidth-delay product on the way over all its connections; the
    senders' TCP waits beyond it."""
    capacity = 384 << 10  # not a divisor of the payload: the ring wraps mid-piece
    payload = os.urandom(16 << 20)  # beyond what the kernel buffers on both sides of the proxy take
    with socket.create_server(("127.0.0.1", 0)) as sink:
        got: list[bytearray] = [bytearray(), bytearray()]

        def drain() -> None:
            conn, _ = sink.accept()
            with conn:
                first = conn.recv(1)  # which connection this is
                while data := conn.recv(1 << 16):
                    got[first[0]].extend(data)

        readers = [threading.Thread(target=drain, daemon=True) for _ in got]
        for reader in readers:
            reader.start()
        proxy = TcpProxy(sink.getsockname()[:2], name="full", delay_s=0.001, in_flight_bytes=capacity).start()
        try:
            proxy.pause()  # nothing leaves: the line fills
            with (socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as first,
                  socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as second):  # fmt: skip
                senders = [threading.Thread(target=sock.sendall, args=(bytes([i]) + payload,), daemon=True)
                           for i, sock in enumerate((first, second))]  # fmt: skip
                senders[0].start()
                # It reads while a useful read fits (a quarter MiB), then waits with megabytes still unsent.
                full = capacity - min(capacity, delayline.READ_BYTES // 4)
                until(lambda: proxy.bytes[UP] > full, "the delay line to fill", 5)
                senders[1].start()  # a second connection over the same full link: the link has no room for it
                until(lambda: proxy.connections == 2, "the second connection", 5)
                time.sleep(0.2)  # what must not happen has no event to wait for: give it time to
                assert full < proxy.bytes[UP] <= capacity and not any(got) and senders[0].is_alive()
                proxy.resume()
                for sender, sock in zip(senders, (first, second), strict=True):
                    sender.join(5)
                    assert not sender.is_alive()
                    sock.shutdown(socket.SHUT_WR)
                for reader in readers:
                    reader.join(5)
        finally:
            proxy.close()
    assert [bytes(g) for g in got] == [payload, payload]
