"""The sidecar's bulk result push: pumped unchanged, metered, and stopped at once by CancelUpload."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedkube.sidecar.meter import RelayMeter
from fedkube.sidecar.reverse import Pusher
from fedkube.transfer.bulk import BulkServer
from fedkube.transfer.service import DownloadService
from fedkube.wire.v1 import control_pb2, tensor_pb2
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(30)

SITE = "site-a"


class HoldingServer:
    """Stands in for the server's bulk port: takes each upload's socket and reads only when told to."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.arrived = threading.Event()
        self.bulk = BulkServer(None, on_upload=self._take).start()

    def _take(self, site: str, upload_id: str, sock: socket.socket) -> tuple[grpc.StatusCode | None, str]:
        self.sockets.append(sock)
        self.arrived.set()
        return None, ""

    def close(self) -> None:
        self.bulk.stop()
        for s in self.sockets:
            s.close()


@pytest.fixture
def parts() -> Iterator[tuple[HoldingServer, DownloadService, BulkServer, grpc.Channel]]:
    server = HoldingServer()
    service = DownloadService(SITE)
    trainer = BulkServer(service).start()
    channel = grpc.insecure_channel("127.0.0.1:1")  # the gRPC push path is never taken here
    try:
        yield server, service, trainer, channel
    finally:
        channel.close()
        trainer.stop()
        service.close()
        server.close()


def test_cancel_upload_stops_a_blocked_bulk_push_and_frees_its_buffer(
    parts: tuple[HoldingServer, DownloadService, BulkServer, grpc.Channel],
) -> None:
    server, service, trainer, channel = parts
    arr = np.ones(16 << 20, np.float32)  # 64 MiB: more than the sockets buffer, so the pump blocks
    txn = service.publish({"w": arr}, receivers=["server"], ttl_s=60, transaction_id="r-1")
    (ref,) = txn.refs
    held: list[int] = []
    progress: list[int] = []
    meter = RelayMeter(lambda direction, n: None, held.append)
    pusher = Pusher(
        channel, site=SITE, trainer_channel=lambda: None, relayed=lambda r, end: progress.append(end), meter=meter,
        bulk_address=server.bulk.address, token="t0k3n", trainer_bulk=lambda: trainer.address,
    )  # fmt: skip
    try:
        pusher.request(control_pb2.UploadRequest(request_id="up-1", ref=ref.to_proto(), offset=0))
        assert server.arrived.wait(5)
        until(lambda: progress, "push progress", timeout=5)
        assert progress[-1] < ref.nbytes  # moving, and stuck: the server side reads nothing
        assert meter.held > 0
        pusher.cancel("up-1")
        # The push ends without the server side reading anything more, and its buffer is freed.
        until(lambda: meter.held == 0, "the cancelled push's buffer to be freed", timeout=5)
        assert held[-1] == 0
        # Its connections were closed: what the server side can still read is what sat in socket buffers.
        sock = server.sockets[0]
        sock.settimeout(5)
        drained = 0
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            drained += len(chunk)
        assert drained < ref.nbytes // 2  # the rest never left the trainer
    finally:
        pusher.shutdown()


def test_bulk_push_pumps_the_trainers_answer_unchanged(
    parts: tuple[HoldingServer, DownloadService, BulkServer, grpc.Channel],
) -> None:
    server, service, trainer, channel = parts
    arr = np.arange(300_000, dtype=np.float32)
    txn = service.publish({"w": arr}, receivers=["server"], ttl_s=60, transaction_id="r-2")
    (ref,) = txn.refs
    relayed: list[tuple[str, int]] = []
    meter = RelayMeter(lambda direction, n: relayed.append((direction, n)), lambda total: None)
    pusher = Pusher(
        channel, site=SITE, trainer_channel=lambda: None, relayed=lambda r, end: None, meter=meter,
        bulk_address=server.bulk.address, token="t0k3n", trainer_bulk=lambda: trainer.address,
    )  # fmt: skip
    offset = 4000  # a resumed pull asks from its last verified offset
    try:
        pusher.request(control_pb2.UploadRequest(request_id="up-2", ref=ref.to_proto(), offset=offset))
        assert server.arrived.wait(5)
        sock = server.sockets[0]
        sock.settimeout(5)
        raw = bytearray()
        while chunk := sock.recv(1 << 20):
            raw += chunk
    finally:
        pusher.shutdown()
    # The bulk server's status (length + BulkStatus{}), data frames, then the end frame, all from the trainer.
    status_len = int.from_bytes(raw[:4], "little")
    assert tensor_pb2.BulkStatus.FromString(bytes(raw[4 : 4 + status_len])).code == 0
    pos, data = 4 + status_len, bytearray()
    while (n := int.from_bytes(raw[pos : pos + 4], "little")) != 0:
        data += raw[pos + 4 : pos + 4 + n]
        pos += 4 + n
    assert bytes(data) == arr.tobytes()[offset:] and pos + 4 == len(raw)
    assert sum(n for d, n in relayed if d == "to_server") == len(raw)
