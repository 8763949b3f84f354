"""Fault 4: the server SIGKILLed after round k's checkpoint and restarted (as its pod would be).

Documented outcome (DESIGN.md §4-5, issue 4): the new server resumes at round
k+1 from the checkpoint, the sidecars reconnect to it, the job succeeds, and the
final model equals an uninterrupted run's with the same seeds, bit for bit.
"""

from __future__ import annotations

import functools
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedkube.server.checkpoint import Checkpoint
from tests.faults._procs_b import DOWN, LocalJob, Samples, try_scrape, value, wait_for, write_job

# Every update depends on the model it got (so resuming from the wrong model shows) and on a
# seeded draw per (site, round) (the "same seeds"). Values are dyadic (k / 2**n) and the weights
# 1:3, so every step of the server's running mean is exact in float32: the aggregate does not
# depend on which result arrives first, and two runs can be compared bit for bit. With GATE_DIR
# set, the trainers hold round HOLD_ROUND's result until the file "go" exists, so the test can
# kill the server in that round.
SCRIPT = textwrap.dedent("""
    import os
    import time
    from pathlib import Path

    import numpy as np
    import fedkube.trainer_sdk as fk

    fk.init()
    site = os.environ["FEDKUBE_SITE"]
    gate = os.environ.get("GATE_DIR")
    seed = {"site-a": 11, "site-b": 23}[site]
    while fk.is_running():
        model = fk.receive()
        rng = np.random.default_rng(seed * 1000 + model.round)
        params = {n: (v * np.float32(0.5) + rng.integers(-8, 8, v.shape).astype(np.float32))
                  for n, v in model.params.items()}
        if gate and model.round == int(os.environ["HOLD_ROUND"]) and not (Path(gate) / "go").exists():
            (Path(gate) / f"holding-{site}").touch()
            deadline = time.monotonic() + 60
            while not (Path(gate) / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        fk.send(fk.FLModel(params=params, num_examples=1 if site == "site-a" else 3))
""")
ROUNDS = 3
K = 1  # the server dies after round K's checkpoint, during round K+1
INITIAL: dict[str, np.ndarray] = {
    "w": (np.arange(4096, dtype=np.float32) / 1024 - 2).reshape(64, 64),
    "b": np.ones(64, np.float32),
}


def _job(tmp_path: Path, name: str, env: dict[str, str] | None) -> Path:
    return write_job(tmp_path / name, SCRIPT, name="f04", rounds=ROUNDS, initial=INITIAL, checkpoint_enabled=True,
                     client_env={"site-a": env or {}, "site-b": env or {}},
                     timeouts={"heartbeatSeconds": 30, "registrationSeconds": 30})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """The final checkpoint of the same job, same seeds, with no fault."""
    tmp_path = tmp_path_factory.mktemp("f04-plain")
    with LocalJob(_job(tmp_path, "plain", None), tmp_path / "run") as plain:
        assert plain.wait_server(60).phase == "Succeeded", plain.log_text(None, "server")[-3000:]
        expected = plain.checkpoint()
    assert expected.round == ROUNDS
    return expected


def _assert_bit_exact(got: Checkpoint, expected: Checkpoint) -> None:
    assert got.round == expected.round == ROUNDS
    assert sorted(got.model) == sorted(expected.model) == ["b", "w"]
    for name in ("w", "b"):
        assert got.model[name].dtype == expected.model[name].dtype
        assert got.model[name].tobytes() == expected.model[name].tobytes(), f"tensor {name} differs"


@pytest.mark.timeout(90)
def test_server_killed_after_round_k_resumes_at_k_plus_1_with_a_bit_exact_final_model(
    tmp_path: Path, uninterrupted: Checkpoint
) -> None:
    expected = uninterrupted
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {"GATE_DIR": str(gate), "HOLD_ROUND": str(K + 1)}
    with LocalJob(_job(tmp_path, "faulted", env), tmp_path / "run") as job:
        first = job.server
        assert first is not None
        wait_for(lambda: _checkpointed(job) == K, 30, f"round {K}'s checkpoint")
        # Both trainers have round K+1's model and hold their results: the server dies mid-round.
        wait_for(lambda: len(list(gate.glob("holding-*"))) == 2, 20, f"both trainers to hold round {K + 1}")
        server = first.container_process("server")
        assert server is not None
        server.signal_group(signal.SIGKILL)
        killed = job.wait_server(15)
        assert killed.phase == "Failed" and killed.containers[0].exit_code == 128 + signal.SIGKILL
        # The pod comes back on the same claim and address; nothing else is touched.
        job.start_server()
        url = job.server_metrics_url()
        wait_for(lambda: value(try_scrape(url) or {}, "fedkube_server_current_round") == K + 1, 30,
                 f"the new server to start round {K + 1}")
        resumed = try_scrape(url)
        status = job.status()
        sidecars: dict[str, Samples] = {}
        for site in ("site-a", "site-b"):
            sidecar_url = job.sidecar_metrics_url(site)
            wait_for(functools.partial(_connected, sidecar_url), 30, f"{site}'s sidecar to reconnect")
            sidecars[site] = try_scrape(sidecar_url) or {}
        (gate / "go").touch()
        result = job.wait_server(60)
        assert result.phase == "Succeeded", job.log_text(None, "server")[-3000:]
        summary = job.summary()
        got = job.checkpoint()
    # (a) resumed at K+1: the restarted server ran only rounds K+1..ROUNDS, and the model is bit-exact.
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == ROUNDS
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}
    _assert_bit_exact(got, expected)
    # (b) the restarted server's status: round K+1 in progress, K completed, no failure reason.
    assert status["round"] == K + 1 and status["completedRounds"] == K, status
    assert not status.get("reason"), status
    assert "reason" not in summary
    # (c) metrics: the new process starts from the checkpoint (last completed = K, none completed by it yet);
    # each sidecar counted its reconnect.
    assert resumed is not None
    assert value(resumed, "fedkube_server_last_completed_round") == K
    assert value(resumed, "fedkube_server_rounds_completed_total") == 0
    for site, samples in sidecars.items():
        assert value(samples, "fedkube_sidecar_reconnects_total") >= 1, site


def _connected(url: str) -> bool:
    return value(try_scrape(url) or {}, "fedkube_sidecar_upstream_connected") == 1


def _checkpointed(job: LocalJob) -> int:
    try:
        return job.checkpoint().round
    except AssertionError:
        return 0


@pytest.mark.timeout(90)
def test_server_killed_while_a_trainer_fetches_the_round_model_the_stale_task_is_skipped(
    tmp_path: Path, uninterrupted: Checkpoint
) -> None:
    """The dead server's round-K+1 model is half-way to site-a's trainer: the new server's task replaces it."""
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {"GATE_DIR": str(gate), "HOLD_ROUND": str(K)}
    with LocalJob(_job(tmp_path, "faulted", env), tmp_path / "run", proxied_sites=["site-a"]) as job:
        proxy = job.proxy("site-a")
        wait_for(lambda: len(list(gate.glob("holding-*"))) == 2, 30, f"both trainers to hold round {K}")
        # Only small control messages (round K's answer, round K+1's task: well under 4 KiB) pass before
        # round K+1's 16 KiB model; the proxy stops site-a's traffic inside that model.
        proxy.pause_at(proxy.bytes[DOWN] + 4096, DOWN)
        (gate / "go").touch()
        wait_for(lambda: proxy.paused and _checkpointed(job) == K, 30,
                 f"round {K}'s checkpoint and site-a's round {K + 1} download to stop")
        server = job.servers[0].container_process("server")
        assert server is not None
        server.signal_group(signal.SIGKILL)
        job.wait_server(15)
        proxy.resume()  # what was held goes to a dead server's connection: it breaks
        job.start_server()
        result = job.wait_server(60)
        assert result.phase == "Succeeded", job.log_text(None, "server")[-3000:]
        summary = job.summary()
        got = job.checkpoint()
        trainer_log = job.log_text("site-a", "trainer")
    # The trainer met the dead server's transaction gone, skipped that task instead of failing, and trained
    # the new server's copy of round K+1.
    assert f"round {K + 1}: task" in trainer_log and "its model cannot be fetched" in trainer_log, trainer_log
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == ROUNDS and "reason" not in summary
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}
    _assert_bit_exact(got, uninterrupted)
