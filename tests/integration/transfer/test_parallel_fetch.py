"""A trainer fetches a model of many tensors several at a time (a remote site's link costs a round trip each)."""

from __future__ import annotations

import threading

import grpc
import numpy as np

from fedkube.trainer_sdk._link import Ids
from fedkube.trainer_sdk._receive import ModelFetch
from fedkube.trainer_sdk._task import Task
from fedkube.transfer import FetchSettings
from fedkube.transfer.bulk import BulkServer
from fedkube.transfer.parallel import FETCH_WIDTH
from fedkube.wire.v1 import control_pb2, trainer_pb2
from tests.faults.support import TcpProxy
from tests.integration.transfer.conftest import Publisher
from tests.support.waiting import until

FAST = FetchSettings(chunk_timeout_s=5.0, idle_timeout_s=10.0, max_attempts=2, backoff_base_s=0.02, backoff_max_s=0.1)


def test_a_model_of_many_tensors_is_fetched_width_tensors_at_a_time(
    publisher: Publisher, channel: grpc.Channel
) -> None:
    model = {f"layer{i}": np.arange(1000 + i, dtype=np.float32) * i for i in range(2 * FETCH_WIDTH + 1)}
    txn = publisher.service.publish(model, receivers=["site-a"], ttl_s=30)
    bulk = BulkServer(publisher.service).start()
    link = TcpProxy(("127.0.0.1", bulk.port), name="wan").start()
    try:
        fetch = ModelFetch(channel, Ids(site="site-a", job="j"), FAST, handoff_ok=False)
        fetch.use_route(trainer_pb2.HelloResponse(bulk_address=link.address))
        assert fetch.bulk_fetcher is not None
        task = Task(control_pb2.Task(task_id="t1", round=1, refs=[r.to_proto() for r in txn.refs]))
        link.pause()  # no answer arrives: only fetches started side by side can open connections
        got: dict[str, np.ndarray] = {}
        worker = threading.Thread(target=lambda: got.update(fetch.fetch(task)), daemon=True)
        worker.start()
        until(lambda: link.connections == FETCH_WIDTH, f"{FETCH_WIDTH} fetches open at once", 3)
        assert link.connections == FETCH_WIDTH  # and no more while none has finished
        link.resume()
        worker.join(10)
        assert not worker.is_alive()
    finally:
        link.close()
        bulk.stop()
    assert sorted(got) == sorted(model)
    for name, want in model.items():
        np.testing.assert_array_equal(got[name], want)
    assert txn.wait(5)  # the completion reached the publisher
