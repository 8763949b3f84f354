"""The soak trainer's memory probe (issue 4's RSS-creep hunt) over both tensor transports.

A short real soak job with ``SOAK_TRAINER_DEBUG_DIR`` set: every trainer must write one probe record per round,
and what a per-round leak would pile up (threads, open fds, live Python objects) must stay level from round 3 on,
on the bulk data plane and on the gRPC fallback alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 8
SITES = [f"site-{i}" for i in range(3)]


@pytest.mark.parametrize("transport", ["bulk", "grpc"])
def test_trainer_threads_fds_and_objects_stay_level_across_rounds(tmp_path: Path, transport: str) -> None:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    argv = [sys.executable, str(ROOT / "bench" / "soak.py"), "--rounds", str(ROUNDS), "--fault-rate", "0",
            "--seed", "1", "--size-mib", "1", "--transport", transport,
            "--keep-dir", str(tmp_path / "run")]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "SOAK_TRAINER_DEBUG_DIR": str(probe_dir),
    }
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and len(lines) == 1, f"stdout={proc.stdout!r} stderr={proc.stderr[-2000:]!r}"
    out = json.loads(lines[0])
    assert out["transport"] == transport and out["rounds_completed"] == ROUNDS, json.dumps(out)[:2000]
    for site in SITES:
        records = [json.loads(ln) for ln in (probe_dir / f"trainer-{site}.jsonl").read_text().splitlines()]
        by_round = {r["round"]: r for r in records}
        assert sorted(by_round) == list(range(1, ROUNDS + 1)), f"{site}: probed rounds {sorted(by_round)}"
        early, last = by_round[3], by_round[ROUNDS]
        where = f"{transport} {site}: round 3 {early} / round {ROUNDS} {last}"
        # A thread, socket or object kept per round would add ROUNDS - 3 of them; pools may add a worker or two.
        assert len(last["threads"]) - len(early["threads"]) < 3, where
        assert sum(last["fds"].values()) - sum(early["fds"].values()) < 3, where
        assert last["gc_objects"] - early["gc_objects"] < 500, where
        assert last["rss_kib"] > 10 * 1024 and last["malloc"]["uordblks"] > 0, where
