"""The server pulls a result of many tensors several at a time (a remote site's link costs round trips per tensor).

Driven through the server's own ``Downloader`` and ``UploadBroker``: each ``UploadRequest`` the download sends
is held until the test answers it on the broker, as a sidecar does on the bulk port (a socket) or with a Push
stream, so the requests outstanding at once are exactly the tensors in flight.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

import grpc
import numpy as np

from fedkube.server.downloads import Download, Downloader
from fedkube.server.pulls import WIDE_AFTER_S
from fedkube.server.reverse import UploadBroker
from fedkube.server.strategies import FedAvg
from fedkube.transfer.bulk import send_status
from fedkube.transfer.fetch import FetchSettings
from fedkube.transfer.parallel import FETCH_WIDTH
from fedkube.transfer.refs import TensorRef, as_bytes, checksum_of
from fedkube.wire.v1 import control_pb2
from tests.support.waiting import until

FAST = FetchSettings(chunk_timeout_s=5.0, idle_timeout_s=10.0, max_attempts=2, backoff_base_s=0.02, backoff_max_s=0.1)
TENSORS = 2 * FETCH_WIDTH + 1
FLOATS = 1000  # 4000 bytes per tensor: four pushed chunks of 1000


#: How long a remote site takes to answer a pull here: above WIDE_AFTER_S, so its pulls go wide.
REMOTE_S = 2 * WIDE_AFTER_S


class Site:
    """Answers the first upload request ``answer_after_s`` after it was sent, the others once ``answering`` is set."""

    def __init__(self, broker: UploadBroker, name: str, result: dict[str, np.ndarray], *, bulk: bool = True,
                 answer_after_s: float = REMOTE_S) -> None:
        self.broker, self.name, self.result, self.bulk = broker, name, result, bulk
        self.answer_after_s = answer_after_s
        self.requests: queue.Queue[control_pb2.UploadRequest] = queue.Queue()
        self.answering = threading.Event()
        self.stop = threading.Event()
        self.most = 0  # the most requests outstanding when one was sent
        threading.Thread(target=self._serve, daemon=True).start()

    def send(self, site: str, msg: control_pb2.ServerMessage) -> bool:
        assert site == self.name
        if msg.WhichOneof("msg") == "upload":
            self.most = max(self.most, self.broker.pending())
            self.requests.put(msg.upload)
        return True

    def _serve(self) -> None:
        served = 0
        while not self.stop.is_set():
            if served and not self.answering.wait(0.05):
                continue
            try:
                req = self.requests.get(timeout=0.05)
            except queue.Empty:
                continue
            if not served:
                time.sleep(self.answer_after_s)  # the link's round trips and handshakes
            served += 1
            data = as_bytes(self.result[req.ref.name])
            if not self.bulk:  # a Push stream's chunks
                up = self.broker.claim(self.name, req.request_id)
                for offset in range(req.offset, len(data), 1000):
                    up.put((offset, bytes(data[offset : offset + 1000])))
                continue
            # What a sidecar pumps up from its trainer on the bulk port: a status, frames, the end.
            mine, theirs = socket.socketpair()
            self.broker.claim(self.name, req.request_id, theirs)
            send_status(mine, grpc.StatusCode.OK)
            for offset in range(req.offset, len(data), 1000):
                piece = bytes(data[offset : offset + 1000])
                mine.sendall(len(piece).to_bytes(4, "little") + piece)
            mine.sendall((0).to_bytes(4, "little"))
            mine.close()

    def refs(self) -> list[TensorRef]:
        return [TensorRef.for_array(a, source=self.name, transaction_id="t", ref_id=f"{self.name}.{n}", name=n,
                                    checksum=checksum_of(as_bytes(a))) for n, a in self.result.items()]  # fmt: skip


def _pull(downloader: Downloader, site: Site, agg: object, in_flight: int) -> None:
    """Start ``site``'s download; exactly ``in_flight`` requests must be outstanding before any is answered."""
    ended: list[tuple[bool, str, str]] = []
    done = threading.Event()

    def finished(d: Download, ok: bool, reason: str, message: str) -> None:
        ended.append((ok, reason, message))
        done.set()

    dl = Download(site=site.name, task_id="t", key=site.name, num_examples=1, metrics={})
    downloader.start(1, dl, site.refs(), agg, {site.name: 1}, finished)  # type: ignore[arg-type]
    try:
        # Only the first pull was answered (how the site answers decides the width): only pulls started side by
        # side can each have asked for their tensor since.
        until(lambda: downloader_pending(downloader) == in_flight, f"{in_flight} pulls of {site.name} at once", 3)
        assert downloader_pending(downloader) == in_flight  # and no more while none has finished
        site.answering.set()
        assert done.wait(10) and ended == [(True, "", "")], ended
        assert dl.bytes_pulled == TENSORS * FLOATS * 4
        assert site.most == in_flight  # never more, over the whole download
    finally:
        site.stop.set()


def downloader_pending(downloader: Downloader) -> int:
    return downloader._broker.pending()


def test_a_result_of_many_tensors_is_pulled_width_tensors_at_a_time_and_buffers_bound_the_width() -> None:
    model = {f"layer{i}": np.zeros(FLOATS, np.float32) for i in range(TENSORS)}
    agg = FedAvg().begin_round(model)
    broker = UploadBroker()
    a = Site(broker, "site-a", {n: np.full(FLOATS, 1.0 + i, np.float32) for i, n in enumerate(model)})
    b = Site(broker, "site-b", {n: np.full(FLOATS, 3.0 + i, np.float32) for i, n in enumerate(model)})
    # site-a's tensors arrive straight into the accumulators they claim: no buffer, FETCH_WIDTH at once.
    _pull(Downloader("job1", broker, a.send, FAST, clock=time.monotonic), a, agg, FETCH_WIDTH)
    agg.commit("site-a")
    # site-b's must be received beside the accumulators: its buffers (here room for two tensors) bound it.
    _pull(Downloader("job1", broker, b.send, FAST, clock=time.monotonic, buffer_bytes=2 * FLOATS * 4), b, agg, 2)
    agg.commit("site-b")
    got = agg.finish()
    for i, name in enumerate(model):
        np.testing.assert_array_equal(got[name], np.full(FLOATS, 2.0 + i, np.float32), err_msg=name)


def test_a_site_that_answers_with_push_streams_is_pulled_one_tensor_at_a_time() -> None:
    """Each Push stream holds one of the site's gRPC calls on the server (fedkube.server.admission)."""
    model = {f"layer{i}": np.zeros(FLOATS, np.float32) for i in range(TENSORS)}
    agg = FedAvg().begin_round(model)
    broker = UploadBroker()
    a = Site(broker, "site-a", {n: np.full(FLOATS, 1.0 + i, np.float32) for i, n in enumerate(model)}, bulk=False)
    _pull(Downloader("job1", broker, a.send, FAST, clock=time.monotonic), a, agg, 1)
    agg.commit("site-a")
    assert agg.finish()["layer3"][0] == 4.0


def test_a_site_that_answers_within_a_few_milliseconds_is_pulled_one_tensor_at_a_time() -> None:
    """In the cluster the waits are too short to pay for the buffers and threads of pulls at once."""
    model = {f"layer{i}": np.zeros(FLOATS, np.float32) for i in range(TENSORS)}
    agg = FedAvg().begin_round(model)
    broker = UploadBroker()
    a = Site(broker, "site-a", {n: np.full(FLOATS, 1.0 + i, np.float32) for i, n in enumerate(model)},
             answer_after_s=0.0)
    _pull(Downloader("job1", broker, a.send, FAST, clock=time.monotonic), a, agg, 1)
    agg.commit("site-a")
    assert agg.finish()["layer3"][0] == 4.0


def test_the_buffers_of_wide_pulls_grow_with_the_model_within_their_bounds() -> None:
    # With a flat 64 MiB, 256 MiB in 4 MiB tensors over two sites raised the server's peak from 2.41 to 2.76 x S.
    def limit(tensors: int, mib: float) -> float:
        size = int(mib * (1 << 20))
        refs = [TensorRef("s", "t", f"r{i}", f"w{i}", "uint8", (size,), size, "") for i in range(tensors)]
        return Downloader("job1", UploadBroker(), lambda msg: None, FAST, clock=time.monotonic)._budget(refs).limit / (
            1 << 20)

    assert limit(64, 4) == 16  # 1/16 of the result
    assert limit(8, 0.001) == 8  # small models still go wide
    assert limit(1024, 4) == 64  # at most 64 MiB
    assert limit(2, 100) == 100  # and always one tensor
