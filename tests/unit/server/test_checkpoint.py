"""Checkpoints: bit-exact round trips, retention, corrupt/partial fallback, a real kill mid-write."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fedkube.errors import ConfigError
from fedkube.server import checkpoint
from fedkube.server.checkpoint import (
    CheckpointError,
    NoUsableCheckpoint,
    check_resume_rounds,
    completion_message,
    load,
    load_latest,
    resume_point,
    save,
)
from fedkube.server.strategies import FedAdam
from fedkube.server.strategy_api import StrategyState
from fedkube.status import ROUND_HISTORY, EvaluationPoint

BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = Path(__file__).resolve().parents[3]


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        # Arbitrary bit patterns, NaN payloads included: bfloat16 must come back bit for bit.
        "emb": rng.integers(0, 2**16, size=(64, 33), dtype=np.uint16).view(BF16),
        "w": rng.standard_normal((17, 5)).astype(np.float32),
        "h": rng.standard_normal(9).astype(np.float16),
        "steps": np.array(seed, np.int64),
        "mask": rng.integers(0, 2, size=7).astype(np.bool_),
        "empty": np.zeros((0, 3), np.float32),
    }


def _assert_models_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_round_trip_is_bit_exact_with_strategy_state(tmp_path: Path) -> None:
    model = _model(1)
    adam = FedAdam()
    adam.m = {"w": np.full((17, 5), 0.5, np.float32)}
    adam.v = {"w": np.full((17, 5), 0.25, np.float32)}
    adam.step = 4
    path = save(tmp_path, "job-a", 4, model, adam.state(), metrics={"loss": 0.5, "bad": float("nan")})
    assert path == tmp_path / "job-a" / "round-000004"
    ck = load_latest(tmp_path, "job-a")
    assert ck is not None and ck.round == 4 and ck.job == "job-a" and ck.metrics == {"loss": 0.5}
    _assert_models_equal(model, ck.model)
    restored = FedAdam()
    restored.load_state(ck.strategy_state)
    assert restored.step == 4 and np.array_equal(restored.m["w"], adam.m["w"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tensors"][0]["checksum"].startswith("xxh3_64:")


def test_keeps_the_last_k_and_resave_replaces(tmp_path: Path) -> None:
    for r in range(1, 6):
        save(tmp_path, "j", r, _model(r), StrategyState("fedavg"), keep=2)
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["round-000004", "round-000005"]
    save(tmp_path, "j", 5, _model(50), StrategyState("fedavg"), keep=2)
    ck = load_latest(tmp_path, "j")
    assert ck is not None and ck.round == 5
    _assert_models_equal(ck.model, _model(50))


def test_nothing_there_is_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path, "j") is None
    assert load_latest(tmp_path / "missing", "j") is None


def _corrupt_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda d: _corrupt_byte(d / "tensors" / "00001.bin"), "fails its checksum"),
        (lambda d: (d / "tensors" / "00000.bin").write_bytes(b"short"), "has 5 bytes, expected"),
        (lambda d: (d / "tensors" / "00002.bin").unlink(), "is missing"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text('{"format": "fedkube-checkpoint", "ver'), "cannot be read"),
    ],
    ids=["bitflip", "truncated", "missing-file", "no-manifest", "torn-manifest"],
)
def test_corrupt_newest_falls_back_to_previous_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, why: str
) -> None:
    save(tmp_path, "j", 1, _model(1), StrategyState("fedavg"))
    newest = save(tmp_path, "j", 2, _model(2), StrategyState("fedavg"))
    damage(newest)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="fedkube.server.checkpoint"):
        ck = load_latest(tmp_path, "j")
    assert ck is not None and ck.round == 1
    _assert_models_equal(ck.model, _model(1))
    assert any("skipping checkpoint of round 2" in r.getMessage() and why in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match=why):
        load(newest)


def test_half_written_temp_dir_is_ignored_and_cleaned(tmp_path: Path) -> None:
    save(tmp_path, "j", 1, _model(1), StrategyState("fedavg"))
    # What a crash during save of round 2 leaves: a temp dir with some tensors and no manifest.
    tmp = tmp_path / "j" / ".tmp-round-000002-deadbeef"
    (tmp / "tensors").mkdir(parents=True)
    (tmp / "tensors" / "00000.bin").write_bytes(b"\0" * 100)
    ck = load_latest(tmp_path, "j")
    assert ck is not None and ck.round == 1
    save(tmp_path, "j", 2, _model(2), StrategyState("fedavg"))
    assert not tmp.exists()


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fedkube.server.checkpoint import save
    from fedkube.server.strategy_api import StrategyState

    root = sys.argv[1]
    for r in range(1, 10_000):
        model = {f"t{i}": np.full(256 * 1024, r * 10 + i, np.float32) for i in range(8)}  # 8 MiB per round
        save(root, "killed", r, model, StrategyState("fedavg", {"round": r}), keep=3)
        print(r, flush=True)
    """
)


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        last = 0
        while last < 3:
            line = proc.stdout.readline()
            assert line, "the writer exited early"
            last = int(line)
        proc.send_signal(signal.SIGKILL)  # most likely in the middle of writing round 4's tensors
    finally:
        proc.kill()
        proc.wait(timeout=30)
    ck = load_latest(tmp_path, "killed")
    assert ck is not None and ck.round >= last
    assert ck.strategy_state.meta == {"round": ck.round}
    for i in range(8):
        assert np.all(ck.model[f"t{i}"] == ck.round * 10 + i)
    # The next save cleans up whatever the killed writer left.
    save(tmp_path, "killed", ck.round + 1, ck.model, ck.strategy_state, keep=3)
    assert not list((tmp_path / "killed").glob(".tmp-*"))


def test_load_latest_without_job(tmp_path: Path) -> None:
    path = save(tmp_path, "only-job", 3, _model(3), StrategyState("fedavg"))
    for where in (tmp_path, tmp_path / "only-job", path):
        ck = load_latest(where, None)
        assert ck is not None and ck.round == 3
    save(tmp_path, "other-job", 1, _model(1), StrategyState("fedavg"))
    assert load_latest(tmp_path, None) is None  # two jobs: ambiguous


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot name a checkpoint directory"):
        save(tmp_path, "../evil", 1, _model(1), StrategyState("fedavg"))
    with pytest.raises(CheckpointError, match="empty model"):
        save(tmp_path, "j", 1, {}, StrategyState("fedavg"))
    with pytest.raises(CheckpointError, match="not a numpy array"):
        save(tmp_path, "j", 1, {"w": [1.0]}, StrategyState("fedavg"))  # type: ignore[dict-item]
    assert not list((tmp_path / "j").glob("round-*"))
    assert checkpoint.DEFAULT_KEEP >= 1


def test_resaving_after_fallback_never_loses_the_new_checkpoint(tmp_path: Path) -> None:
    for r in (1, 2, 3):
        save(tmp_path, "j", r, _model(r), StrategyState("fedavg"), keep=3)
    _corrupt_byte(tmp_path / "j" / "round-000002" / "tensors" / "00001.bin")
    _corrupt_byte(tmp_path / "j" / "round-000003" / "tensors" / "00001.bin")
    ck = load_latest(tmp_path, "j")
    assert ck is not None and ck.round == 1
    # The resumed server redoes round 2 and saves it with keep=1.
    save(tmp_path, "j", 2, _model(20), StrategyState("fedavg"), keep=1)
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["round-000002"]
    ck = load_latest(tmp_path, "j")
    assert ck is not None and ck.round == 2
    _assert_models_equal(ck.model, _model(20))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_point_refuses_when_every_checkpoint_is_unusable_and_deletes_none(tmp_path: Path) -> None:
    """Issue 11 §2.5: no silent restart from round 1, each checkpoint named with why, nothing deleted."""
    for r in (1, 2, 3):
        save(tmp_path, "j", r, _model(r), StrategyState("fedavg"))
    _corrupt_byte(tmp_path / "j" / "round-000003" / "tensors" / "00001.bin")
    (tmp_path / "j" / "round-000002" / "manifest.json").unlink()
    other = save(tmp_path, "other", 1, _model(1), StrategyState("fedavg"))  # a copy from another job
    shutil.rmtree(tmp_path / "j" / "round-000001")
    shutil.copytree(other, tmp_path / "j" / "round-000001")
    before = _tree(tmp_path / "j")
    with pytest.raises(NoUsableCheckpoint) as err:
        resume_point(tmp_path, "j")
    assert isinstance(err.value, ConfigError)  # the server's configuration error: exit code 2
    message = str(err.value)
    assert "none of the 3 checkpoint(s)" in message
    assert "round-000003: " in message and "fails its checksum" in message
    assert "round-000002: " in message and "no manifest.json" in message
    assert "round-000001: it belongs to job 'other'" in message
    assert "spec.server.checkpoint.onUnusable: StartFresh" in message
    assert [(r.round, r.path.name) for r in err.value.rejected] == [
        (3, "round-000003"), (2, "round-000002"), (1, "round-000001")]
    assert _tree(tmp_path / "j") == before  # every file kept, unchanged
    with pytest.raises(NoUsableCheckpoint):
        resume_point(tmp_path, "j")  # and refused again on the next start


def test_resume_point_starts_fresh_only_when_asked_and_moves_the_unusable_ones_aside(tmp_path: Path) -> None:
    for r in (1, 2):
        save(tmp_path, "j", r, _model(r), StrategyState("fedavg"))
    for r in (1, 2):
        _corrupt_byte(tmp_path / "j" / f"round-00000{r}" / "tensors" / "00001.bin")
    before = _tree(tmp_path / "j")
    assert resume_point(tmp_path, "j", start_fresh=True) is None
    aside = sorted(p.name for p in (tmp_path / "j").iterdir())
    assert [n.rsplit("-", 1)[0] for n in aside] == ["unusable-round-000001", "unusable-round-000002"]
    assert sorted(_tree(tmp_path / "j").values()) == sorted(before.values())  # moved, not deleted
    # The fresh run's saves neither read nor prune what was set aside.
    save(tmp_path, "j", 1, _model(10), StrategyState("fedavg"), keep=1)
    ck = resume_point(tmp_path, "j")
    assert ck is not None and ck.round == 1
    assert sum(p.name.startswith("unusable-") for p in (tmp_path / "j").iterdir()) == 2


def test_resume_point_is_load_latest_when_one_loads_or_there_is_none(tmp_path: Path) -> None:
    assert resume_point(tmp_path, "j") is None  # a new job: nothing to resume, no error
    save(tmp_path, "j", 1, _model(1), StrategyState("fedavg"))
    save(tmp_path, "j", 2, _model(2), StrategyState("fedavg"))
    _corrupt_byte(tmp_path / "j" / "round-000002" / "tensors" / "00001.bin")
    ck = resume_point(tmp_path, "j")
    assert ck is not None and ck.round == 1  # the documented fallback to an older valid checkpoint


def test_resuming_with_fewer_rounds_than_completed_is_refused_and_a_finished_job_says_it_was_finished() -> None:
    """Issue 11 §2.7: not "completed 2 round(s)" with rounds 3/2."""
    with pytest.raises(ConfigError, match=r"holds 3 completed round\(s\) but spec.rounds is 2.*set spec.rounds to 3"):
        check_resume_rounds("j", 3, 2)
    check_resume_rounds("j", 2, 2)
    check_resume_rounds("j", 1, 2)
    assert completion_message(2, 1) == "completed 2 round(s)"
    assert completion_message(2, 2) == "completed 2 round(s)"
    assert completion_message(2, 3) == (
        "completed 2 round(s); this server resumed after the checkpoint of round 2, the last, and finished the job "
        "from it")


def test_the_evaluation_curve_is_kept_bounded_and_an_old_or_unreadable_one_loads_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    curve = [EvaluationPoint(round=r, metrics={"acc": r / 100}, sites=2, examples=10 * r) for r in range(1, 26)]
    path = save(tmp_path, "job-a", 25, _model(1), StrategyState("fedavg"), evaluation=curve)
    ck = load(path)
    assert ck.evaluation == curve[-ROUND_HISTORY:]  # what the status shows, no more

    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["evaluation"]  # a checkpoint written before the curve was kept
    (path / "manifest.json").write_text(json.dumps(manifest))
    old = load(path)
    assert old.evaluation == [] and old.round == 25
    _assert_models_equal(old.model, _model(1))

    manifest["evaluation"] = [{"round": "7", "metrics": {}, "sites": 1, "examples": 1}]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        damaged = load(path)
    assert damaged.evaluation == [] and damaged.round == 25  # status only: the model is not lost over it
    assert "evaluation curve" in caplog.text and "left out" in caplog.text
