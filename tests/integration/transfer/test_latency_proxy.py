"""The fault suite's link proxy can add latency (bench/latency.py measures fedkube behind it)."""

from __future__ import annotations

import os
import socket
import threading
import time

from tests.faults.support import TcpProxy


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
