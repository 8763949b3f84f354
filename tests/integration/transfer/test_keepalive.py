"""Bulk sockets keep their connections alive below load balancers' idle limits (issue 16 item 5).

A connection that waits (a fetch before the model is published, an upload between chunks) must not be
dropped by an idle NAT or load balancer on a remote site's path, and a peer that vanished must be noticed.
"""

from __future__ import annotations

import queue
import socket

from fedkube.transfer import endpoints
from fedkube.transfer.bulk.listener import Listener


def _keepalive(sock: socket.socket) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


class _Recording(Listener):
    def __init__(self) -> None:
        super().__init__("127.0.0.1", 0, "keepalive-test", 4)
        self.seen: queue.Queue[tuple[int, int, int, int]] = queue.Queue()

    def handle(self, conn: socket.socket) -> bool:
        self.seen.put(_keepalive(conn))
        return False


def test_both_ends_of_a_bulk_connection_probe_an_idle_peer_within_a_minute() -> None:
    listener = _Recording()
    listener._start()
    try:
        with endpoints.dial(listener.address, 2.0) as sock:
            dialed = _keepalive(sock)
            accepted = listener.seen.get(timeout=2)
    finally:
        listener.stop()
    expected = (1, endpoints.KEEPALIVE_IDLE_S, endpoints.KEEPALIVE_INTERVAL_S, endpoints.KEEPALIVE_PROBES)
    assert dialed == expected and accepted == expected, (dialed, accepted)
    # Below the shortest common idle limit (60 s, L7 proxies), and a dead peer noticed in about a minute.
    assert endpoints.KEEPALIVE_IDLE_S < 60
    assert endpoints.KEEPALIVE_IDLE_S + endpoints.KEEPALIVE_INTERVAL_S * endpoints.KEEPALIVE_PROBES <= 60


def test_grpc_keepalive_pings_below_idle_limits_are_what_the_server_accepts() -> None:
    """The sidecar's channel pings every 30 s even without calls; the server must not answer GOAWAY to that."""
    from fedkube.transfer.wire import relay_channel_options, server_options

    client, server = dict(relay_channel_options()), dict(server_options())
    assert client["grpc.keepalive_time_ms"] < 60_000 and client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert server["grpc.http2.max_pings_without_data"] == 0  # pings need no data in between (idle control streams)
