"""spec.model.maxBytes: the first client's initial model is bounded before the server allocates anything for it."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import psutil
import pytest

from fedkube.server.config import TransferSettings
from fedkube.server.jobs import NO_INITIAL_MODEL
from fedkube.transfer.refs import TensorRef
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply

pytestmark = pytest.mark.timeout(60)

GIB = 1 << 30


def _claim(site: str, task: control_pb2.Task, nbytes: int = GIB) -> control_pb2.ClientMessage:
    """A result announcing a float32 tensor that was never published: the claim costs the client nothing."""
    ref = TensorRef(source=site, transaction_id="txn-claim", ref_id="ref-claim", name="w", dtype="float32",
                    shape=(nbytes // 4,), nbytes=nbytes, checksum="xxh3_64:" + "0" * 16).validate()  # fmt: skip
    announcement = control_pb2.ResultAnnouncement(
        task_id=task.task_id, round=task.round, num_examples=1, refs=[ref.to_proto()]
    )
    return control_pb2.ClientMessage(result=announcement)


def test_an_init_model_over_max_bytes_is_refused_before_the_server_allocates_it(harness: Harness) -> None:
    cfg = make_config(("site-a",), rounds=1, model_source="firstClient", model_path=None)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, model_max_bytes=1 << 20))
    rss_before = psutil.Process().memory_info().rss
    srv = harness.server(cfg)
    attacker = harness.sidecar(srv, "site-a", lambda task, params: Reply(None))  # answers by hand below
    attacker.wait_for(lambda: bool(attacker.tasks), what="the init task")
    task = attacker.tasks[0]
    assert task.kind == control_pb2.TASK_KIND_INIT
    # Address space, not only RSS: a buffer of the claimed size is reserved at once but committed only as bytes
    # arrive, so before the bound this claim grew VMS by 1 GiB and RSS by ~5 MiB (0 bytes were sent).
    vms_before = psutil.Process().memory_info().vms
    attacker.send(_claim("site-a", task))
    attacker.wait_for(lambda: task.task_id in attacker.received, what="the answer to the claim")
    reserved = psutil.Process().memory_info().vms - vms_before
    assert reserved < 256 << 20, f"address space grew by {reserved >> 20} MiB for a refused 1 GiB claim"
    answer = attacker.received[task.task_id]
    assert not answer.ok and answer.reason == "InvalidResult", answer
    assert str(GIB) in answer.message and "spec.model.maxBytes=1048576" in answer.message, answer.message
    outcome = srv.wait(20)
    assert outcome is not None and not outcome.success and outcome.reason == NO_INITIAL_MODEL, outcome
    assert "spec.model.maxBytes" in outcome.message, outcome.message
    assert attacker.upload_requests == []  # not one byte was asked for
    grown = psutil.Process().memory_info().rss - rss_before
    assert grown < 256 << 20, f"RSS grew by {grown >> 20} MiB for a refused 1 GiB claim"


def test_an_init_model_within_max_bytes_is_taken(harness: Harness) -> None:
    init = {"w": np.full((1000,), 2.0, np.float32)}  # 4000 bytes, exactly the bound
    cfg = make_config(("site-a",), rounds=1, model_source="firstClient", model_path=None)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, model_max_bytes=4000))

    def trainer(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        if task.kind == control_pb2.TASK_KIND_INIT:
            return Reply({k: v.copy() for k, v in init.items()})
        return Reply({k: v + 1 for k, v in params.items()})

    srv = harness.server(cfg)
    client = harness.sidecar(srv, "site-a", trainer)
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    np.testing.assert_array_equal(client.globals[1]["w"], init["w"])


def test_an_init_model_within_max_bytes_costs_the_server_only_the_bytes_that_arrived(harness: Harness) -> None:
    """A peer announces 1 GiB (within maxBytes), sends 1 MiB and stalls: the server's memory follows the MiB.

    The receive buffer is reserved at the announced size but its pages are committed only as bytes are
    written into them (the buffer is never zeroed or touched ahead of the data), so resident memory grows
    with what arrived; the stalled upload is refused by the chunk timeout and the job ends with a reason.
    """
    one_try = TransferSettings(chunk_bytes=64 * 1024, chunk_timeout_s=0.5, idle_timeout_s=1.0, max_attempts=1)
    cfg = make_config(("site-a",), rounds=1, model_source="firstClient", model_path=None, transfer=one_try)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, model_max_bytes=2 * GIB))
    srv = harness.server(cfg)
    attacker = harness.sidecar(srv, "site-a", lambda task, params: Reply(None))
    attacker.push_mode = lambda req: "trickle"
    attacker.wait_for(lambda: bool(attacker.tasks), what="the init task")
    rss_before = psutil.Process().memory_info().rss
    peak = [0]
    done = threading.Event()

    def sample() -> None:  # the GIL may be held while memory is touched: sample from a thread of its own
        while not done.wait(0.02):
            peak[0] = max(peak[0], psutil.Process().memory_info().rss - rss_before)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attacker.send(_claim("site-a", attacker.tasks[0]))
    srv.wait(20)
    done.set()
    sampler.join()
    assert attacker.upload_requests, "the server never asked for the bytes"
    assert peak[0] < 128 << 20, f"RSS grew by {peak[0] >> 20} MiB for 1 MiB received of a 1 GiB claim"
    outcome = srv.wait(0)
    assert outcome is not None and not outcome.success and outcome.reason == NO_INITIAL_MODEL, outcome
    assert "TransferFailed" in outcome.message and "of 1073741824" in outcome.message, outcome.message
