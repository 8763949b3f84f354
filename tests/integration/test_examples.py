"""The examples run with `fedkube run`, exactly as their READMEs say, and learn something."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedkube.runtime.pod import fedkube_command

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _run(job: Path, run_dir: Path, timeout: float) -> dict:
    proc = subprocess.run(
        [*fedkube_command(), "run", str(job), "--json", "--no-progress", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout)
    assert result["outcome"] == "Succeeded"
    return result


@pytest.mark.timeout(120)
def test_quickstart_numpy_converges(tmp_path: Path) -> None:
    result = _run(EXAMPLES / "quickstart-numpy" / "fljob.yaml", tmp_path / "run", timeout=100)
    assert result["summary"]["completedRounds"] == 3
    log = (tmp_path / "run" / "logs" / "quickstart-numpy-client-site-a.trainer.log").read_text()
    losses = [float(m) for m in re.findall(r"global model loss ([0-9.]+)", log)]
    assert len(losses) >= 3, log[-2000:]
    assert losses[-1] < losses[1] / 2, losses  # the global model of round 3 beats that of round 1 clearly
    # spec.evaluation every round: the held-out loss of the global model, over both sites' 100 examples each.
    curve = result["summary"]["evaluation"]
    assert [(p["round"], p["sites"], p["examples"]) for p in curve] == [(1, 2, 200), (2, 2, 200), (3, 2, 200)], curve
    assert curve[-1]["metrics"]["loss"] < curve[0]["metrics"]["loss"] / 2, curve
    assert len(re.findall(r"evaluation of the global model: held-out loss", log)) == 3, log[-2000:]


@pytest.mark.timeout(180)
def test_digits_pytorch_learns_with_three_non_iid_clients(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the digits example needs torch: pip install 'fedkube[torch]'")
    example = EXAMPLES / "digits-pytorch"
    job_dir = tmp_path / "digits"
    job_dir.mkdir()
    for name in ("train.py", "data.py"):
        shutil.copy(example / name, job_dir / name)
    # Few rounds keep the test short; the README's table comes from the full 20.
    (job_dir / "fljob.yaml").write_text(re.sub(r"rounds: 20", "rounds: 6", (example / "fljob.yaml").read_text()))
    result = _run(job_dir / "fljob.yaml", tmp_path / "run", timeout=170)
    assert result["summary"]["completedRounds"] == 6
    log = (tmp_path / "run" / "logs" / "digits-pytorch-client-site-a.trainer.log").read_text()
    accs = [float(a) for a in re.findall(r"global model test accuracy ([0-9.]+)", log)]
    assert len(accs) == 6, log[-2000:]  # rounds 1-6 (the init round only sends the initial weights)
    # accs[i] is the global model after i aggregations: accs[0] is the untrained initial model
    assert accs[0] < 0.3 and accs[-1] > 0.7, accs
