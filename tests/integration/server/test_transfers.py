"""Result downloads over the reverse path: retries, corrupt chunks, failures, lost clients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedkube.server import checkpoint
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply, add_value

pytestmark = pytest.mark.timeout(60)

SITES = ("site-a", "site-b", "site-c")


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((50_000,), np.float32), "b": np.zeros((10,), np.float32)}  # w: 4 chunks of 64 KiB


def test_corrupt_chunk_is_refetched_and_only_verified_bytes_are_aggregated(harness: Harness) -> None:
    srv = harness.server(make_config(rounds=2), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    b = harness.sidecar(srv, "site-b", add_value(3.0), start=False)
    seen: set[str] = set()

    def corrupt_once(req: control_pb2.UploadRequest) -> str:
        key = f"{req.ref.transaction_id}/{req.ref.ref_id}"
        first = key not in seen
        seen.add(key)
        return "corrupt" if first else "ok"

    b.push_mode = corrupt_once
    b.start()
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    # Every first fetch of b's tensors was corrupted; the checksum caught it and the refetch from 0 was used.
    assert len(b.upload_requests) >= 2 * len(seen)
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((50_000,), 2.0, np.float32))


def test_failing_transfer_excludes_the_client_for_the_round_only(harness: Harness) -> None:
    srv = harness.server(make_config(SITES, rounds=2, min_clients=2), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    c = harness.sidecar(srv, "site-c", add_value(100.0), start=False)
    c.push_mode = lambda req: "error"
    c.start()
    c.wait_for(lambda: bool(c.received), timeout=20, what="round 1's answer")
    answer = next(iter(c.received.values()))
    assert not answer.ok and answer.reason == "TransferFailed"
    assert "trainer's download service is gone" in answer.message
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((50_000,), 2.0, np.float32))  # c left out
    assert len(c.tasks) == 2  # excluded for round 1 only


def test_stalled_push_times_out_and_the_round_closes_without_it(harness: Harness) -> None:
    srv = harness.server(make_config(SITES, rounds=1, min_clients=2), model())
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    c = harness.sidecar(srv, "site-c", add_value(5.0), start=False)
    c.push_mode = lambda req: "stall"
    c.start()
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome
    status = {cl.name: cl for cl in srv.workflow.status().clients}
    assert status["site-c"].reason == "TransferFailed"
    assert status["site-a"].rounds_completed == 1 and status["site-c"].rounds_completed == 0


def test_trainer_exit_before_download_fails_the_client(harness: Harness) -> None:
    srv = harness.server(make_config(SITES, rounds=1, min_clients=2), model())
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    c = harness.sidecar(srv, "site-c", add_value(5.0), start=False)
    exited = control_pb2.TrainerState(phase=control_pb2.TRAINER_PHASE_EXITED, exit_code=137)

    def die_while_uploading(req: control_pb2.UploadRequest) -> str:
        c.send(control_pb2.ClientMessage(trainer_state=exited))
        return "stall"

    c.push_mode = die_while_uploading
    c.start()
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    status = {cl.name: cl for cl in srv.workflow.status().clients}
    assert status["site-c"].state == "Failed" and status["site-c"].reason == "ExitedBeforeDownload"
    assert not c.wait_stop().success


def test_silent_client_is_lost_and_never_registered_one_is_not(harness: Harness) -> None:
    cfg = make_config(SITES, rounds=1, min_clients=1, heartbeat_timeout_s=0.6, registration_timeout_s=0.5)
    srv = harness.server(cfg, model())
    harness.sidecar(srv, "site-a", add_value(1.0))
    b = harness.sidecar(srv, "site-b", lambda task, params: Reply(None), heartbeat_s=60.0)  # never heartbeats
    b.wait_for(lambda: bool(b.tasks), what="its task")
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    status = {cl.name: cl for cl in srv.workflow.status().clients}
    assert status["site-b"].state == "Lost" and "no heartbeat" in status["site-b"].message
    assert status["site-c"].state == "Pending" and status["site-c"].reason == "NotRegistered"


def test_partly_downloaded_result_leaves_nothing_in_the_average(harness: Harness, tmp_path: Path) -> None:
    """The tensor of a failed result that was already folded is emptied and rebuilt from the others' results."""
    srv = harness.server(make_config(SITES, rounds=1, min_clients=2, checkpoint_dir=tmp_path), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    b = harness.sidecar(srv, "site-b", add_value(3.0))

    def after_a_and_b(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        # site-c delivers after both, so its first tensor is folded into theirs before the rest of it fails.
        a.wait_for(lambda: bool(a.received), timeout=20, what="site-a's answer")
        b.wait_for(lambda: bool(b.received), timeout=20, what="site-b's answer")
        return add_value(5000.0)(task, params)

    c = harness.sidecar(srv, "site-c", after_a_and_b, start=False)
    asked: list[str] = []

    def first_only(req: control_pb2.UploadRequest) -> str:
        # The server pulls each client's tensors from its own starting point: whichever comes first
        # arrives and verifies, every later one fails.
        if not asked:
            asked.append(req.ref.name)
        return "ok" if req.ref.name == asked[0] else "error"

    c.push_mode = first_only
    c.start()
    c.wait_for(lambda: bool(c.received), timeout=20, what="round 1's answer")
    answer = next(iter(c.received.values()))
    assert not answer.ok and answer.reason == "TransferFailed"
    assert f"nothing of it kept: {asked[0]} rebuilt from 2 other client(s) (site-a, site-b)" in answer.message
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    final = checkpoint.load_latest(tmp_path, "job1")
    assert final is not None
    for name, arr in model().items():  # the mean of site-a's +1 and site-b's +3 alone
        np.testing.assert_array_equal(final.model[name], arr + 2.0, err_msg=name)
    # The metric counts each pull: the two results, then the emptied tensor pulled again from each of them.
    nbytes = sum(v.nbytes for v in model().values())
    moved = srv.metrics_registry.get_sample_value("fedkube_server_transfer_bytes_total",
                                                  {"fljob": "job1", "direction": "from_clients"})  # fmt: skip
    assert moved == 2 * nbytes + 2 * model()[asked[0]].nbytes


def test_a_tensor_that_cannot_be_rebuilt_fails_the_round_naming_it(harness: Harness, tmp_path: Path) -> None:
    """An exclusion that cannot be made exact (a contributor stopped serving its result) fails loudly."""
    srv = harness.server(make_config(SITES, rounds=1, min_clients=2, checkpoint_dir=tmp_path), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    b = harness.sidecar(srv, "site-b", add_value(3.0))
    # Once its result was taken, site-a serves it no more (as a trainer whose arrays changed, or gone).
    a.push_mode = lambda req: "error" if a.received else "ok"

    def after_a_and_b(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        a.wait_for(lambda: bool(a.received), timeout=20, what="site-a's answer")
        b.wait_for(lambda: bool(b.received), timeout=20, what="site-b's answer")
        return add_value(5000.0)(task, params)

    c = harness.sidecar(srv, "site-c", after_a_and_b, start=False)
    c.push_mode = lambda req: "ok" if req.ref.name == "b" else "error"  # b is folded, then w fails
    c.start()
    outcome = srv.wait(40)
    assert outcome is not None and not outcome.success, outcome
    assert outcome.reason == "RebuildFailed", outcome
    assert "round 1:" in outcome.message and "'b' of site-a could not be pulled again" in outcome.message, outcome
    assert checkpoint.load_latest(tmp_path, "job1") is None  # no round with an inexact tensor was kept


def test_a_nan_made_by_corruption_is_refetched_not_blamed_on_the_client(harness: Harness) -> None:
    # The NaN check runs while the bytes arrive; a NaN that only a corrupted fetch carries must end as a
    # checksum mismatch and refetch (the verdict is reset), never as InvalidResult.
    srv = harness.server(make_config(rounds=2), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    b = harness.sidecar(srv, "site-b", add_value(3.0), start=False)
    seen: set[str] = set()

    def corrupt_once(req: control_pb2.UploadRequest) -> str:
        key = f"{req.ref.transaction_id}/{req.ref.ref_id}"
        first = key not in seen
        seen.add(key)
        return "corrupt_nan" if first else "ok"

    b.push_mode = corrupt_once
    b.start()
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    assert all(answer.ok for answer in b.received.values())
    assert len(b.upload_requests) >= 2 * len(seen)
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((50_000,), 2.0, np.float32))


def test_a_genuine_nan_result_is_rejected_and_the_others_aggregate_exactly(harness: Harness) -> None:
    # Whichever download claims a tensor first (straight into the accumulator), the NaN client's claim must
    # leave no trace: the others' mean is exact.
    def diverged(task: object, params: dict[str, np.ndarray]) -> Reply:
        out = {k: v + 7.0 for k, v in params.items()}
        out["w"][12_345] = np.nan
        return Reply(out, 5)

    srv = harness.server(make_config(SITES, rounds=2, min_clients=2), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    c = harness.sidecar(srv, "site-c", diverged)
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    answers = list(c.received.values())
    assert answers and not answers[0].ok and answers[0].reason == "InvalidResult"
    assert "'w' contains NaN or Inf" in answers[0].message
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((50_000,), 2.0, np.float32))
