"""A client whose result download broke after some verified tensors delivers again: it still counts once."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import add_value

pytestmark = pytest.mark.timeout(60)

SITES = ("site-a", "site-b", "site-c")


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((50_000,), np.float32), "b": np.zeros((10,), np.float32)}  # "w" is pulled first


def test_restarted_sidecar_redelivering_a_partly_pulled_result_is_counted_once(harness: Harness) -> None:
    # Found by bench/soak.py: a sidecar SIGKILLed while the server pulled its result; the server kept
    # the verified first tensor, re-sent the task, pulled the result again and counted that tensor twice.
    srv = harness.server(make_config(SITES, rounds=2, min_clients=2, round_timeout_s=30.0), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    c = harness.sidecar(srv, "site-c", add_value(5.0), start=False)

    def stall_b(req: control_pb2.UploadRequest) -> str:
        return "stall" if req.ref.name == "b" else "ok"

    c.push_mode = stall_b
    c.start()
    c.wait_for(lambda: any(r.ref.name == "b" for r in c.upload_requests), timeout=20, what="w pulled, b asked for")
    c.disconnect()  # the sidecar dies with "w" verified and folded in, "b" not
    harness.sidecar(srv, "site-c", add_value(5.0))  # its restart: no resume id, so the task is sent again
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome
    g2 = a.globals[2]
    # Round 1 is the mean of 1, 3 and 5 in every tensor; counting site-c's "w" twice would give 3.5.
    np.testing.assert_array_equal(g2["w"], np.full((50_000,), 3.0, np.float32))
    np.testing.assert_array_equal(g2["b"], np.full((10,), 3.0, np.float32))
