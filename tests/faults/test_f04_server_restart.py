"""Fault 4: the server SIGKILLed after round k's checkpoint and restarted (as its pod would be).

Documented outcome (DESIGN.md §4-5, issue 4): the new server resumes at round
k+1 from the checkpoint, the sidecars reconnect to it, the job succeeds, and the
final model equals an uninterrupted run's with the same seeds, bit for bit.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedkube.server.checkpoint import Checkpoint
from tests.faults.support import DOWN, PodJob, job_doc, save_model, trainer_script

# Every update depends on the model it got (so resuming from the wrong model shows) and on a
# seeded draw per (site, round) (the "same seeds"). Values are dyadic (k / 2**n) and the weights
# 1:3, so every step of the server's running mean is exact in float32: the aggregate does not
# depend on which result arrives first, and two runs can be compared bit for bit. With HOLD_ROUND
# set, the trainers hold that round's result until the gate's "go", so the test can kill the
# server in that round.
BODY = """
    seed = {"site-a": 11, "site-b": 23}[site]
    hold_round = int(os.environ.get("HOLD_ROUND", "0"))
    while fk.is_running():
        model = fk.receive()
        rng = np.random.default_rng(seed * 1000 + model.round)
        params = {n: (v * np.float32(0.5) + rng.integers(-8, 8, v.shape).astype(np.float32))
                  for n, v in model.params.items()}
        if model.round == hold_round and not (gate / "go").exists():
            (gate / f"holding-{site}").touch()
            hold("go")
        fk.send(fk.FLModel(params=params, num_examples=1 if site == "site-a" else 3))
"""
ROUNDS = 3
K = 1  # the server dies after round K's checkpoint, during round K+1
INITIAL: dict[str, np.ndarray] = {
    "w": (np.arange(4096, dtype=np.float32) / 1024 - 2).reshape(64, 64),
    "b": np.ones(64, np.float32),
}


def _job(tmp_path: Path, hold_round: int | None = None, *, rounds: int = ROUNDS) -> dict[str, Any]:
    return job_doc("f04", ("site-a", "site-b"), rounds=rounds, roomy=True, checkpoint=True,
                   timeouts={"registrationSeconds": 30}, trainer=trainer_script(tmp_path, BODY),
                   initial=save_model(tmp_path / "initial.npz", INITIAL),
                   env={} if hold_round is None else {"HOLD_ROUND": str(hold_round)})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """The final checkpoint of the same job, same seeds, with no fault."""
    tmp_path = tmp_path_factory.mktemp("f04-plain")
    with PodJob(_job(tmp_path), tmp_path) as plain:
        plain.server_succeeded(60)
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
    with PodJob(_job(tmp_path, K + 1), tmp_path) as job:
        job.until(lambda: job.checkpoint().round == K, f"round {K}'s checkpoint", 30)
        # Both trainers have round K+1's model and hold their results: the server dies mid-round.
        job.until(lambda: len(list(job.gate.glob("holding-*"))) == 2, f"both trainers to hold round {K + 1}", 20)
        job.process(None, "server").signal_group(signal.SIGKILL)
        killed = job.wait_server(15)
        assert killed.phase == "Failed" and killed.containers[0].exit_code == 128 + signal.SIGKILL
        # The pod comes back on the same claim and address; nothing else is touched.
        job.start_server()
        resumed = job.until_metrics(lambda m: m.total("fedkube_server_current_round") == K + 1,
                                    f"the new server to start round {K + 1}", timeout=30)
        status = job.status()
        sidecars = {site: job.until_metrics(lambda m: m.total("fedkube_sidecar_upstream_connected") == 1,
                                            f"{site}'s sidecar to reconnect", site, 30)
                    for site in ("site-a", "site-b")}
        job.open_gate()
        summary = job.server_succeeded(60)
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
    assert resumed.total("fedkube_server_last_completed_round") == K
    assert resumed.total("fedkube_server_rounds_completed_total") == 0
    for site, samples in sidecars.items():
        assert samples.total("fedkube_sidecar_reconnects_total") >= 1, site


@pytest.mark.timeout(90)
def test_server_killed_while_a_trainer_fetches_the_round_model_the_stale_task_is_skipped(
    tmp_path: Path, uninterrupted: Checkpoint
) -> None:
    """The dead server's round-K+1 model is half-way to site-a's trainer: the new server's task replaces it."""
    with PodJob(_job(tmp_path, K), tmp_path, proxied_sites=["site-a"]) as job:
        proxy = job.proxy("site-a")
        job.until(lambda: len(list(job.gate.glob("holding-*"))) == 2, f"both trainers to hold round {K}", 30)
        # Only small control messages (round K's answer, round K+1's task: well under 4 KiB) pass before
        # round K+1's 16 KiB model; the proxy stops site-a's traffic inside that model.
        proxy.pause_at(proxy.bytes[DOWN] + 4096, DOWN)
        job.open_gate()
        job.until(lambda: proxy.paused and job.checkpoint().round == K,
                  f"round {K}'s checkpoint and site-a's round {K + 1} download to stop", 30)
        job.process(None, "server").signal_group(signal.SIGKILL)
        job.wait_server(15)
        proxy.resume()  # what was held goes to a dead server's connection: it breaks
        job.start_server()
        summary = job.server_succeeded(60)
        got = job.checkpoint()
        trainer_log = job.log("site-a", "trainer")
    # The trainer met the dead server's transaction gone, skipped that task instead of failing, and trained
    # the new server's copy of round K+1.
    assert f"round {K + 1}: task" in trainer_log and "its model cannot be fetched" in trainer_log, trainer_log
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == ROUNDS and "reason" not in summary
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}
    _assert_bit_exact(got, uninterrupted)


# --- restarts the checkpoints cannot serve (issue 11 §2.5, §2.7) ---------------------------------------------------

FINISHED = 2  # rounds of the job whose checkpoints the restarted servers find


def _finished_job(tmp_path: Path) -> Path:
    """Run the job to the end (FINISHED rounds, a checkpoint after each) and return its checkpoint directory."""
    with PodJob(_job(tmp_path, rounds=FINISHED), tmp_path) as job:
        job.server_succeeded(60)
        assert job.checkpoint().round == FINISHED
        return job.checkpoint_dir() / job.name


def _server_alone(doc: dict[str, Any], tmp_path: Path) -> tuple[int, dict[str, Any], str]:
    """Start only the server pod of ``doc`` on ``tmp_path``'s claim; its exit code, summary and log (bounded)."""
    job = PodJob(doc, tmp_path)
    try:
        job.start_server()
        result = job.wait_server(20)  # no round can run without clients: it must decide alone, at once
        return result.containers[0].exit_code, job.summary(), job.log("server", "server")
    finally:
        job.close()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.timeout(150)
def test_every_checkpoint_corrupt_refuses_to_start_keeps_them_and_start_fresh_is_explicit(tmp_path: Path) -> None:
    ck_dir = _finished_job(tmp_path)
    rounds = sorted(p.name for p in ck_dir.iterdir())
    assert rounds == ["round-000001", "round-000002"]
    for name in rounds:
        tensor = ck_dir / name / "tensors" / "00000.bin"
        data = bytearray(tensor.read_bytes())
        data[7] ^= 0xFF
        tensor.write_bytes(bytes(data))
    damaged = _files(ck_dir)
    # A restarted server refuses: no silent round 1, every checkpoint named with why, nothing deleted.
    code, summary, _ = _server_alone(_job(tmp_path, rounds=FINISHED), tmp_path)
    assert code == 2  # 2 where server-side configuration errors exit 2 (issue 11 §2.10)
    assert summary["phase"] == "Failed" and summary["reason"] == "ConfigError", summary
    for name in rounds:
        assert f"{name}: " in summary["message"], summary["message"]
    assert "fails its checksum" in summary["message"] and "onUnusable: StartFresh" in summary["message"]
    assert summary["round"] == 0 and summary["completedRounds"] == 0, summary  # it refused before any round
    assert _files(ck_dir) == damaged
    # Asked to, the job trains from round 1 and sets the unusable checkpoints aside instead of deleting them.
    doc = _job(tmp_path, rounds=FINISHED)
    doc["spec"]["server"]["checkpoint"]["onUnusable"] = "StartFresh"
    with PodJob(doc, tmp_path) as job:
        summary = job.server_succeeded(60)
        fresh = job.checkpoint()
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == FINISHED
    assert fresh.round == FINISHED
    aside = sorted(p for p in ck_dir.iterdir() if p.name.startswith("unusable-"))
    assert [p.name.rsplit("-", 1)[0] for p in aside] == ["unusable-round-000001", "unusable-round-000002"]
    assert sorted(v for p in aside for v in _files(p).values()) == sorted(damaged.values())


@pytest.mark.timeout(120)
def test_restart_after_the_last_round_finishes_the_job_and_fewer_rounds_are_refused(tmp_path: Path) -> None:
    ck_dir = _finished_job(tmp_path)
    kept = _files(ck_dir)
    # Same spec: every round is done; the new server ends the job from the last checkpoint at once (no
    # spec.evaluation: nothing waits for a site) and says so plainly.
    code, summary, _ = _server_alone(_job(tmp_path, rounds=FINISHED), tmp_path)
    assert code == 0 and summary["phase"] == "Succeeded" and summary["completedRounds"] == FINISHED, summary
    assert summary["message"] == (f"completed {FINISHED} round(s); this server resumed after the checkpoint of "
                                  f"round {FINISHED}, the last, and finished the job from it")
    # Fewer rounds than the checkpoint holds: refused with the fix, not "completed 1 round(s)" at rounds 2/1.
    code, summary, _ = _server_alone(_job(tmp_path, rounds=FINISHED - 1), tmp_path)
    assert code == 2  # 2 where server-side configuration errors exit 2 (issue 11 §2.10)
    assert summary["phase"] == "Failed" and summary["reason"] == "ConfigError", summary
    assert (f"holds {FINISHED} completed round(s) but spec.rounds is {FINISHED - 1}" in summary["message"]
            and f"set spec.rounds to {FINISHED} or more" in summary["message"]), summary["message"]
    assert _files(ck_dir) == kept
