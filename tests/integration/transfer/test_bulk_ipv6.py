"""A bulk listener on "::" serves IPv4 and IPv6 clients alike (dual-stack pod networks), with a dialable address."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from fedkube.transfer import DownloadService, Fetcher, FetchSettings
from fedkube.transfer.bulk import BulkChunkSource, BulkServer, parse_address

FAST = FetchSettings(chunk_timeout_s=2.0, idle_timeout_s=6.0, max_attempts=2, backoff_base_s=0.02, backoff_max_s=0.1)


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6 or not socket.has_dualstack_ipv6():
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_a_listener_on_every_address_takes_ipv4_and_ipv6_clients() -> None:
    service = DownloadService("server")
    server = BulkServer(service, host="::", port=0).start()
    try:
        assert server.address == f"[::]:{server.port}" and parse_address(server.address) == ("::", server.port)
        w = np.arange(4096, dtype=np.float32)
        for host in ("127.0.0.1", "[::1]"):
            (ref,) = service.publish({"w": w}, receivers=["a"], ttl_s=30).refs
            got = Fetcher(BulkChunkSource(f"{host}:{server.port}", "a", chunk_timeout_s=2), FAST).fetch_array(ref)
            assert np.array_equal(got, w), host
    finally:
        server.stop()
        service.close()
