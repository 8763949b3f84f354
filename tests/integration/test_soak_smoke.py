"""Smoke test of the soak benchmark: a 3-round job with a fault after every round, checked end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]
SLOTS = {"server", *(f"{role}:site-{i}" for role in ("sidecar", "trainer") for i in range(3))}


def test_soak_three_rounds_with_faults_completes_and_verifies(tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "bench" / "soak.py"), "--rounds", "3", "--fault-rate", "1", "--seed", "1",
            "--size-mib", "1", "--keep-dir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=40, env=env, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line; stdout={proc.stdout!r} stderr={proc.stderr[-2000:]!r}"
    out = json.loads(lines[0])
    where = f"run dir {tmp_path}: {json.dumps(out)[:3000]}"
    assert proc.returncode == 0 and out["pass"] is True, where
    assert out["exit_code"] == 0 and out["rounds_completed"] == 3, where
    assert out["verified"]["ok"] is True and out["verified"]["max_abs_err"] == 0.0, where
    assert out["faults_injected"] >= 1, where
    assert out["faults_survived"] == out["faults_injected"], where
    assert sum(k["injected"] for k in out["faults"].values()) == out["faults_injected"], where
    assert all(f["survived"] for f in out["fault_log"]), where
    assert all(v["why"] for v in out["faults_voided"]), where  # set aside only with a reason
    # Every component's RSS was sampled at the round ends it lived through.
    assert set(out["rss_mib_by_round"]) == SLOTS, where
    assert all(samples and all(mib > 10 for _, mib in samples) for samples in out["rss_mib_by_round"].values()), where
    assert out["wall_s"] > 0
