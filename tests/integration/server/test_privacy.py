"""Central DP through a real server: noised rounds, the spent budget in status and metrics, the stop and the resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedkube.server import checkpoint
from fedkube.server.dp import spent_epsilon
from fedkube.server.influence import Influence
from fedkube.trainer_sdk.fedprox import proximal_mu
from tests.integration.server.conftest import Harness, make_config
from tests.integration.server.fakes import add_value
from tests.integration.server.test_influence import SITES, model

pytestmark = pytest.mark.timeout(60)

SIGMA, CLIP = 0.5, 500.0


def test_the_job_stops_before_the_round_that_would_exceed_the_budget_and_a_resume_stays_stopped(
    harness: Harness, tmp_path: Path
) -> None:
    budget = (spent_epsilon([(SIGMA, 2)], 1e-5) + spent_epsilon([(SIGMA, 3)], 1e-5)) / 2  # two rounds fit
    options = {"privacy": {"targetEpsilon": budget, "targetDelta": 1e-5, "noiseMultiplier": SIGMA},
               "proximalMu": 0.5}  # FedProx with DP: mu rides along in every task
    cfg = make_config(SITES, rounds=4, checkpoint_dir=tmp_path, strategy_options=options)
    cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, influence=Influence("equal", None, CLIP)))
    srv = harness.server(cfg, model())
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    harness.sidecar(srv, "site-c", add_value(1e6))  # clipped to 500
    outcome = srv.wait(40)
    assert outcome is not None and not outcome.success and outcome.rounds_completed == 2, outcome
    assert outcome.reason == "PrivacyBudgetExhausted" and "one more round" in outcome.message
    spent = spent_epsilon([(SIGMA, 2)], 1e-5)
    assert srv.workflow.status().privacy_epsilon == pytest.approx(spent)
    assert srv.metrics_registry.get_sample_value("fedkube_server_privacy_epsilon_spent", {"fljob": "job1"}) == \
        pytest.approx(spent)  # fmt: skip
    # Round 1's mean of clipped updates plus noise of std sigma*clip/3 on every float coordinate.
    g2 = a.globals[2]
    noise = g2["fc.weight"].astype(np.float64) - float(np.mean(g2["fc.weight"]))
    assert float(np.std(noise)) == pytest.approx(SIGMA * CLIP / 3, rel=0.05)
    assert int(g2["steps"][0]) == 7, "integer tensors keep the global value under DP"
    assert [proximal_mu(dict(t.config)) for t in a.tasks] == [0.5, 0.5]
    saved = checkpoint.load_latest(tmp_path, "job1")
    assert saved is not None and saved.round == 2 and saved.strategy_state is not None
    assert saved.strategy_state.meta["privacy"]["history"] == [[SIGMA, 2]]

    # The budget already spent at resume: refused before any task goes out, with the same reason.
    again = harness.server(cfg, model())
    b = harness.sidecar(again, "site-a", add_value(1.0))
    harness.sidecar(again, "site-b", add_value(3.0))
    harness.sidecar(again, "site-c", add_value(1.0))
    resumed = again.wait(40)
    assert resumed is not None and resumed.reason == "PrivacyBudgetExhausted" and resumed.rounds_completed == 2
    assert b.globals == {}, "no round started after the resume"
