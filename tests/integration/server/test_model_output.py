"""The model is delivered as safetensors with its sha256; a full output volume fails the job, not its checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedkube.formats import safetensors
from fedkube.server import checkpoint
from tests.integration.server.conftest import JOB, Harness, make_config
from tests.integration.server.fakes import add_value

pytestmark = pytest.mark.timeout(60)


def _config(tmp_path: Path, rounds: int, *, every_round: bool = False):  # type: ignore[no-untyped-def]
    cfg = make_config(rounds=rounds, checkpoint_dir=tmp_path / "ckpt")
    settings = dataclasses.replace(cfg.settings, output_every_round=every_round)
    return dataclasses.replace(cfg, settings=settings, output_dir=tmp_path / "out")


def test_the_final_and_every_rounds_model_are_delivered_with_metadata_and_sha256(
    harness: Harness, tmp_path: Path
) -> None:
    srv = harness.server(_config(tmp_path, 2, every_round=True), {"w": np.zeros(3, np.float32)})
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    out = tmp_path / "out"
    final = out / f"{JOB}.safetensors"
    model, meta = safetensors.load_file(final)
    np.testing.assert_array_equal(model["w"], np.full(3, 4.0, np.float32))  # two rounds of mean(+1, +3)
    assert (meta["job"], meta["round"], meta["strategy"]) == (JOB, "2", "fedavg")
    index = json.loads((out / f"{JOB}.json").read_text())
    assert index == {"file": final.name, "round": 2, "sha256": hashlib.sha256(final.read_bytes()).hexdigest(),
                     "bytes": final.stat().st_size}
    assert safetensors.load_file(out / f"{JOB}-round-000001.safetensors")[1]["round"] == "1"
    summary = srv.summary()  # what the operator reads from the termination message
    assert (summary.model_file, summary.model_sha256) == (final.name, index["sha256"])
    assert not list(out.glob(".tmp-*"))


def test_a_full_output_volume_fails_the_job_and_keeps_the_checkpoint(harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("/dev/full", out / f".tmp-{JOB}.safetensors")  # every write there fails with ENOSPC
    srv = harness.server(_config(tmp_path, 1), {"w": np.zeros(3, np.float32)})
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and not outcome.success
    assert outcome.reason == "CheckpointFailed", outcome
    assert f"could not be written to {out}" in outcome.message and "the volume is full" in outcome.message, outcome
    ck = checkpoint.load_latest(tmp_path / "ckpt", JOB)
    assert ck is not None and ck.round == 1  # the last good checkpoint is kept
    assert not (out / f"{JOB}.safetensors").exists()
