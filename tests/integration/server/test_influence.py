"""Bounded influence through a real server: one of three sites poisons the round; the model stays honest.

The poisoner scales its update by 1e6 (clipped to spec.strategy.clipNorm, the
fold corrected by pulling the round's results again) or claims 1e6 examples
(capped at maxExamplesPerSite). The status and the metrics show each site's
weight, update norm and what was bounded.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from fedkube.server import checkpoint
from fedkube.server.config import ServerConfig
from fedkube.server.influence import Influence
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import Reply, add_value

pytestmark = pytest.mark.timeout(60)

SITES = ("site-a", "site-b", "site-c")
FLOATS = 64 * 300 + 8  # float elements of the model


def model() -> dict[str, np.ndarray]:
    return {
        "fc.weight": np.zeros((64, 300), np.float32),  # 75 KiB: several chunks of 64 KiB
        "fc.bias": np.arange(8, dtype=np.float32),
        "steps": np.array([7], np.int64),
    }


def _config(influence: Influence, rounds: int = 2) -> ServerConfig:
    cfg = make_config(SITES, rounds=rounds)
    return dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, influence=influence))


def test_an_update_scaled_by_1e6_is_clipped_and_the_global_model_stays_near_the_honest_average(
    harness: Harness,
) -> None:
    clip = 500.0  # honest norms: 1*sqrt(FLOATS) ~ 139 and 3*sqrt(FLOATS) ~ 416
    srv = harness.server(_config(Influence(clip_norm=clip)), model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    harness.sidecar(srv, "site-c", add_value(1e6))
    outcome = srv.wait(40)
    assert outcome is not None and outcome.success, outcome

    scale = clip / (1e6 * math.sqrt(FLOATS))
    want = (1.0 + 3.0 + 1e6 * scale) / 3  # ~2.54; the honest average is 2, unclipped it would be ~333335
    g2 = a.globals[2]
    np.testing.assert_allclose(g2["fc.weight"], np.full((64, 300), want), rtol=1e-5)
    np.testing.assert_allclose(g2["fc.bias"], np.arange(8) + want, rtol=1e-5)
    assert abs(float(g2["fc.weight"][0, 0]) - 2.0) < 0.6
    clients = {c.name: c for c in srv.workflow.status().clients}
    c = clients["site-c"]
    assert c.update_norm == pytest.approx(1e6 * math.sqrt(FLOATS), rel=1e-4) and c.weight == 1.0
    assert "clipped to 500" in c.bounded
    assert clients["site-a"].update_norm == pytest.approx(math.sqrt(FLOATS), rel=1e-4)
    assert clients["site-a"].bounded == "" and clients["site-a"].rounds_completed == 2
    assert "updateNorm" in c.to_dict() and "bounded" in c.to_dict()
    reg, labels = srv.metrics_registry, {"fljob": "job1", "site": "site-c"}
    assert reg.get_sample_value("fedkube_server_bounded_results_total", {**labels, "reason": "clipped"}) == 2
    assert reg.get_sample_value("fedkube_server_site_update_norm", labels) == pytest.approx(
        1e6 * math.sqrt(FLOATS), rel=1e-4
    )
    assert reg.get_sample_value("fedkube_server_bounded_results_total", {**labels, "site": "site-a",
                                                                          "reason": "clipped"}) is None  # fmt: skip
    # Each pull is network cost: round 1 pre-passes every result's float tensors before folding it, round 2
    # those of site-b (its norm above HEADROOM x clipNorm) and site-c (clipped); site-a's is pulled once.
    nbytes = sum(v.nbytes for v in model().values())
    moved = reg.get_sample_value("fedkube_server_transfer_bytes_total", {"fljob": "job1", "direction": "from_clients"})
    assert moved == 2 * 3 * nbytes + (3 + 2) * FLOATS * 4


def test_a_claim_of_1e6_examples_is_capped_and_counts_as_the_cap(harness: Harness) -> None:
    srv = harness.server(_config(Influence(max_examples=10), rounds=1), model())
    harness.sidecar(srv, "site-a", add_value(1.0, num_examples=10, metrics={"loss": 1.0}))
    harness.sidecar(srv, "site-b", add_value(3.0, num_examples=10, metrics={"loss": 1.0}))
    harness.sidecar(srv, "site-c", add_value(50.0, num_examples=10**6, metrics={"loss": 100.0}))
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome
    final = srv.workflow.status()
    clients = {c.name: c for c in final.clients}
    assert clients["site-c"].weight == 10.0 and "capped to 10" in clients["site-c"].bounded
    assert clients["site-c"].update_norm is None  # measured only with clipNorm
    assert final.metrics == {"loss": pytest.approx(34.0)}  # the round's metrics are weighted as the model was
    reg = srv.metrics_registry
    assert reg.get_sample_value("fedkube_server_site_claimed_examples", {"fljob": "job1", "site": "site-c"}) == 1e6
    assert reg.get_sample_value("fedkube_server_site_weight", {"fljob": "job1", "site": "site-c"}) == 10


def test_a_result_claiming_zero_examples_is_refused_and_the_others_aggregate(harness: Harness) -> None:
    cfg = make_config(SITES, rounds=1, min_clients=2)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, influence=Influence(max_examples=5)))
    srv = harness.server(cfg, model())
    harness.sidecar(srv, "site-a", add_value(3.0))
    harness.sidecar(srv, "site-b", add_value(1.0))
    c = harness.sidecar(srv, "site-c", add_value(1e6, num_examples=0))  # uint64 on the wire: never negative
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome
    clients = {s.name: s for s in srv.workflow.status().clients}
    assert clients["site-c"].reason == "InvalidResult" and "num_examples is 0" in clients["site-c"].message
    assert clients["site-c"].weight is None and clients["site-a"].weight == 1.0
    assert not any(r.ok for r in c.received.values())


def test_an_unchanged_model_counts_with_its_weight_and_norm_zero(harness: Harness) -> None:
    cfg = make_config(("site-a", "site-b"), rounds=2)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, influence=Influence(clip_norm=1e3)))
    srv = harness.server(cfg, model())

    def unchanged(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        return Reply({k: v.copy() for k, v in params.items()}, 2)

    a = harness.sidecar(srv, "site-a", add_value(3.0, num_examples=1))
    harness.sidecar(srv, "site-b", unchanged)
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome
    np.testing.assert_allclose(a.globals[2]["fc.weight"], 1.0)  # (1*3 + 2*0)/3
    b = {c.name: c for c in srv.workflow.status().clients}["site-b"]
    assert b.update_norm == 0.0 and b.weight == 2.0 and "update is zero" in b.bounded
    reason = {"fljob": "job1", "site": "site-b", "reason": "unchanged"}
    assert srv.metrics_registry.get_sample_value("fedkube_server_bounded_results_total", reason) == 2  # each round


def test_the_adaptive_bound_moves_each_round_and_is_kept_in_the_checkpoint(harness: Harness, tmp_path: Path) -> None:
    cfg = make_config(SITES, rounds=2, checkpoint_dir=tmp_path)
    influence = Influence(clip_norm=200.0, clip_quantile=0.5)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, influence=influence))
    srv = harness.server(cfg, model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))  # norm ~139: within 200
    harness.sidecar(srv, "site-b", add_value(3.0))  # ~416: clipped
    harness.sidecar(srv, "site-c", add_value(1e6))  # clipped
    outcome = srv.wait(40)
    assert outcome is not None and outcome.success, outcome
    # Round 1 clipped site-b and site-c to 200 (each counts global + 200/norm * update); 1 of 3 within.
    step = 200.0 / math.sqrt(FLOATS)
    np.testing.assert_allclose(a.globals[2]["fc.weight"], (1.0 + step + step) / 3, rtol=1e-5)
    after_1 = 200.0 * math.exp(-0.2 * (1 / 3 - 0.5))
    after_2 = after_1 * math.exp(-0.2 * (1 / 3 - 0.5))  # round 2: the same norms, still only site-a within
    saved = checkpoint.load_latest(tmp_path, "job1")
    assert saved is not None and saved.round == 2 and saved.strategy_state is not None
    assert saved.strategy_state.meta["clipNorm"] == pytest.approx(after_2)
