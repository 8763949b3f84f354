"""SCAFFOLD through a real server: c travels with each task, the variates come back, and a restart resumes exactly.

Two sites minimise their own quadratic ``0.5·||w - t_i||²`` with K corrected
SGD steps (the client side of fedkube.trainer_sdk.scaffold, in numpy). The
first server runs round 1 and is stopped; a second one resumes from the
checkpoint and runs round 2. The final x and c must equal two uninterrupted
rounds computed by hand, the second round's tasks must carry round 1's c,
and a third, plain-fedavg server refuses a result with variates by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedkube.server import checkpoint
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import JOB, Harness, make_config
from tests.integration.server.fakes import Reply
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

K, LR = 4, 0.1
TARGETS = {"site-a": np.array([1.0, -2.0, 3.0], np.float32), "site-b": np.array([-3.0, 0.0, 1.0], np.float32)}


def _local(x: np.ndarray, c: np.ndarray, c_i: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K corrected steps on 0.5||w - t||²: the model y_i and Δc_i (option II)."""
    y = x.copy()
    for _ in range(K):
        y = y - np.float32(LR) * ((y - target) - c_i + c)
    c_plus = c_i - c + (x - y) / np.float32(K * LR)
    return y, c_plus - c_i


def _reference(rounds: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """x and c after ``rounds`` uninterrupted rounds (serverLr 1, N = |S| = 2, equal weights); c sent each round."""
    x, c = np.zeros(3, np.float32), np.zeros(3, np.float32)
    c_i = {s: np.zeros(3, np.float32) for s in TARGETS}
    sent = []
    for _ in range(rounds):
        sent.append(c.copy())
        outs = {s: _local(x, c, c_i[s], t) for s, t in TARGETS.items()}
        for s, (_, dc) in outs.items():
            c_i[s] = c_i[s] + dc
        x = (outs["site-a"][0] + outs["site-b"][0]) / np.float32(2)
        c = c + (outs["site-a"][1] + outs["site-b"][1]) / np.float32(2)
    return x, c, sent


def _site(name: str, states: dict[str, np.ndarray], *, stop_at: int | None = None):  # type: ignore[no-untyped-def]
    def behave(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        if stop_at is not None and task.round >= stop_at:
            return Reply(None)
        c_i = states.setdefault(name, np.zeros(3, np.float32))  # the site's workdir, across server restarts
        y, dc = _local(params["w"], params["scaffold/w"], c_i, TARGETS[name])
        states[name] = c_i + dc
        return Reply({"w": y, "scaffold/w": dc}, num_examples=10)

    return behave


def test_two_rounds_across_a_restart_match_the_uninterrupted_hand_computation(
    harness: Harness, tmp_path: Path
) -> None:
    cfg = make_config(rounds=2, checkpoint_dir=tmp_path, strategy="scaffold", strategy_options={"serverLr": 1.0})
    start = {"w": np.zeros(3, np.float32)}
    states: dict[str, np.ndarray] = {}
    first = harness.server(cfg, start)
    for site in TARGETS:
        harness.sidecar(first, site, _site(site, states, stop_at=2))
    until(lambda: first.workflow.status().completed_rounds == 1, "round 1 of the first server")
    first.request_stop("test: simulated restart")
    assert first.wait(10) is not None
    first.shutdown(grace_s=0.5)

    second = harness.server(cfg, start)
    a = harness.sidecar(second, "site-a", _site("site-a", states))
    harness.sidecar(second, "site-b", _site("site-b", states))
    out = second.wait(20)
    assert out is not None and out.success, out
    want_x, want_c, sent = _reference(2)
    assert [t.round for t in a.tasks] == [2]
    np.testing.assert_allclose(a.globals[2]["scaffold/w"], sent[1], rtol=1e-6)  # round 1's c, from the checkpoint
    assert np.abs(sent[1]).max() > 0.1  # the check above compares something
    saved = checkpoint.load_latest(tmp_path, JOB)
    assert saved is not None and saved.round == 2
    np.testing.assert_allclose(saved.model["w"], want_x, rtol=1e-6)
    np.testing.assert_allclose(saved.strategy_state.tensors["c/w"], want_c, rtol=1e-6, atol=1e-6)
    # SCAFFOLD's c is the mean of the sites' c_i (N = |S|), and the model moves toward the mean target.
    np.testing.assert_allclose(saved.strategy_state.tensors["c/w"], (states["site-a"] + states["site-b"]) / 2,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    optimum = (TARGETS["site-a"] + TARGETS["site-b"]) / 2
    after1 = np.linalg.norm(_reference(1)[0] - optimum)
    assert np.linalg.norm(saved.model["w"] - optimum) < 0.7 * after1 < 0.7 * np.linalg.norm(optimum)

    # A checkpoint whose c does not fit its model is refused at resume, before any round, and stays as it was.
    broken = tmp_path / "broken"
    state = saved.strategy_state
    checkpoint.save(broken, JOB, 2, saved.model, type(state)(state.name, state.meta, {"c/w": np.zeros(2, np.float32)}))
    third = harness.server(make_config(rounds=3, checkpoint_dir=broken, strategy="scaffold"), start)
    refused = third.wait(10)
    assert refused is not None and refused.reason == "ConfigError" and "does not fit its model" in refused.message
    kept = checkpoint.load_latest(broken, JOB)
    assert kept is not None and kept.round == 2 and kept.strategy_state.tensors["c/w"].shape == (2,)

    # A plain job refuses variates by name: an InvalidResult for the site, nothing of it aggregated.
    plain = harness.server(make_config(("site-a",), rounds=1, round_timeout_s=5.0), start)
    bad = harness.sidecar(plain, "site-a", lambda task, params: Reply({**params, "scaffold/w": params["w"]}))
    bad.wait_for(lambda: bool(bad.received), what="the server's answer")
    answer = next(iter(bad.received.values()))
    assert not answer.ok and answer.reason == "InvalidResult", answer
    assert "only a job with spec.strategy.name scaffold" in answer.message
