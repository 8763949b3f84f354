"""Robust strategies against a real server: one poisoned site (x1e6 update, 10^6 examples) cannot move the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedkube.server.robust import STAGING_DIR
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply, add_value

pytestmark = pytest.mark.timeout(90)

SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")


def model() -> dict[str, np.ndarray]:
    return {
        "fc.weight": np.ones((64, 300), np.float32),  # 75 KiB: several chunks of 64 KiB
        "fc.bias": np.arange(8, dtype=np.float32),
        "steps": np.array([7], np.int64),
    }


def poisoned(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
    """Scales its update by 1e6 and claims a million examples: under FedAvg it would own the model."""
    out = {k: v + np.float32(1e6) if v.dtype.kind == "f" else v + 1000 for k, v in params.items()}
    return Reply(out, num_examples=1_000_000)


@pytest.mark.parametrize(
    ("strategy", "options", "expected"),
    [
        # Honest updates +1, +2, +3, +4; the poisoned one +1e6.
        ("median", {}, 3.0),
        ("trimmedmean", {"trimFraction": 0.2}, 3.0),  # drops +1 and +1e6: mean of 2, 3, 4
        ("krum", {"byzantine": 1, "krumSelect": 3}, 2.0),  # b and c score best, then a (tie with d, smaller key)
    ],
)
def test_one_poisoned_site_does_not_move_the_global_model(
    harness: Harness, tmp_path: Path, strategy: str, options: dict[str, Any], expected: float
) -> None:
    cfg = make_config(SITES, rounds=2, checkpoint_dir=tmp_path, strategy=strategy, strategy_options=options)
    srv = harness.server(cfg, model())
    honest = [harness.sidecar(srv, site, add_value(float(i + 1), num_examples=10)) for i, site in enumerate(SITES[:4])]
    harness.sidecar(srv, SITES[4], poisoned)
    outcome = srv.wait(60)
    assert outcome is not None and outcome.success, outcome
    g2 = honest[0].globals[2]  # round 1's aggregate, as every client fetched it for round 2
    np.testing.assert_array_equal(g2["fc.weight"], np.full((64, 300), 1.0 + expected, np.float32))
    np.testing.assert_array_equal(g2["fc.bias"], np.arange(8, dtype=np.float32) + np.float32(expected))
    np.testing.assert_array_equal(g2["steps"], [7])  # integers: the lower median, not the poisoned 1007
    staging = tmp_path / STAGING_DIR
    assert staging.is_dir() and list(staging.iterdir()) == []  # staged on the checkpoint volume, then removed
    reg = srv.metrics_registry
    selected = {s: reg.get_sample_value("fedkube_server_selected_results_total", {"fljob": "job1", "site": s})
                for s in SITES}  # fmt: skip
    # Krum's selection, both rounds, by site (not by result key); the poisoned site never. The others select none.
    want = dict.fromkeys(SITES[:3], 2.0) if strategy == "krum" else {}
    assert selected == {site: want.get(site) for site in SITES}


def test_fedavg_is_moved_by_the_same_poisoned_site(harness: Harness) -> None:
    """The control: what the robust strategies prevent does happen under FedAvg."""
    srv = harness.server(make_config(SITES, rounds=2), model())
    honest = [harness.sidecar(srv, site, add_value(float(i + 1), num_examples=10)) for i, site in enumerate(SITES[:4])]
    harness.sidecar(srv, SITES[4], poisoned)
    outcome = srv.wait(60)
    assert outcome is not None and outcome.success, outcome
    assert float(np.min(honest[0].globals[2]["fc.weight"])) > 1e5


def test_too_few_results_fail_the_round_with_the_reason(harness: Harness, tmp_path: Path) -> None:
    """Two of three clients suffice for the quorum but not for the median: the job fails, no aggregate."""
    cfg = make_config(SITES[:3], min_clients=2, registration_timeout_s=1.0, checkpoint_dir=tmp_path,
                      strategy="median")  # fmt: skip
    srv = harness.server(cfg, model())
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(2.0))
    outcome = srv.wait(30)
    assert outcome is not None and not outcome.success
    assert outcome.reason == "TooFewResults" and outcome.rounds_completed == 0
    assert "median needs at least 3 results" in outcome.message and "2 delivered" in outcome.message
    assert "spec.minClients" in outcome.message
    assert list((tmp_path / STAGING_DIR).iterdir()) == []
