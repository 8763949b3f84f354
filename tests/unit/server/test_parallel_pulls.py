"""The server pulls a result of many tensors several at a time (a remote site's link costs round trips per tensor).

Driven through the server's own ``Downloader`` and ``UploadBroker``: each ``UploadRequest`` the download sends
is held until the test answers it on the broker, as a sidecar's Push stream would, so the requests outstanding
at once are exactly the tensors in flight.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from fedkube.server.downloads import Download, Downloader
from fedkube.server.reverse import UploadBroker
from fedkube.server.strategies import FedAvg
from fedkube.transfer.fetch import FetchSettings
from fedkube.transfer.parallel import FETCH_WIDTH
from fedkube.transfer.refs import TensorRef, as_bytes, checksum_of
from fedkube.wire.v1 import control_pb2
from tests.support.waiting import until

FAST = FetchSettings(chunk_timeout_s=5.0, idle_timeout_s=10.0, max_attempts=2, backoff_base_s=0.02, backoff_max_s=0.1)
TENSORS = 2 * FETCH_WIDTH + 1
FLOATS = 1000  # 4000 bytes per tensor: four pushed chunks of 1000


class Site:
    """Answers the upload requests sent to it once ``answering`` is set, from its result."""

    def __init__(self, broker: UploadBroker, name: str, result: dict[str, np.ndarray]) -> None:
        self.broker, self.name, self.result = broker, name, result
        self.requests: queue.Queue[control_pb2.UploadRequest] = queue.Queue()
        self.answering = threading.Event()
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def send(self, site: str, msg: control_pb2.ServerMessage) -> bool:
        assert site == self.name
        if msg.WhichOneof("msg") == "upload":
            self.requests.put(msg.upload)
        return True

    def _serve(self) -> None:
        self.answering.wait()
        while not self.stop.is_set():
            try:
                req = self.requests.get(timeout=0.05)
            except queue.Empty:
                continue
            up = self.broker.claim(self.name, req.request_id)
            data = as_bytes(self.result[req.ref.name])
            for offset in range(req.offset, len(data), 1000):
                up.put((offset, bytes(data[offset : offset + 1000])))

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
        # Nothing is answered yet: only pulls started side by side can each have asked for their tensor.
        until(lambda: downloader_pending(downloader) == in_flight, f"{in_flight} pulls of {site.name} at once", 3)
        assert downloader_pending(downloader) == in_flight  # and no more while none has finished
        site.answering.set()
        assert done.wait(10) and ended == [(True, "", "")], ended
        assert dl.bytes_pulled == TENSORS * FLOATS * 4
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
