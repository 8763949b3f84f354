"""The examples run with `fedkube run`, exactly as their READMEs say, and learn something."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedkube.formats import safetensors
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
    # Few rounds keep the test short; the README's table comes from the full 20. spec.evaluation runs the
    # script's evaluate branch (real torch, the shipped data) after rounds 3 and 6: a few ms per site.
    (job_dir / "fljob.yaml").write_text(
        re.sub(r"rounds: 20", "rounds: 6\n  evaluation:\n    every: 3", (example / "fljob.yaml").read_text())
    )
    result = _run(job_dir / "fljob.yaml", tmp_path / "run", timeout=170)
    assert result["summary"]["completedRounds"] == 6
    log = (tmp_path / "run" / "logs" / "digits-pytorch-client-site-a.trainer.log").read_text()
    accs = [float(a) for a in re.findall(r"global model test accuracy ([0-9.]+)", log)]
    assert len(accs) == 6, log[-2000:]  # rounds 1-6 (the init round only sends the initial weights)
    # accs[i] is the global model after i aggregations: accs[0] is the untrained initial model
    assert accs[0] < 0.3 and accs[-1] > 0.7, accs
    # Every site measures on the same 360 held-out digits, so the weighted mean is each site's own accuracy;
    # after round 3 it is that of the model round 4 trained from (accs[3]): the evaluated model is the new global.
    evaluated = [float(a) for a in re.findall(r"evaluation of the global model: held-out accuracy ([0-9.]+)", log)]
    curve = result["summary"]["evaluation"]
    assert [(p["round"], p["sites"], p["examples"]) for p in curve] == [(3, 3, 1080), (6, 3, 1080)], curve
    assert [round(p["metrics"]["accuracy"], 4) for p in curve] == evaluated, (curve, evaluated)
    assert evaluated[0] == accs[3] and evaluated[1] > 0.7, (evaluated, accs)


@pytest.mark.timeout(120)
def test_lora_transformers_federates_only_the_adapter_and_perplexity_falls(tmp_path: Path) -> None:
    # find_spec, not importorskip: importing transformers and peft here would cost seconds for nothing.
    for module in ("torch", "transformers", "peft"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the LoRA example needs {module}: pip install -e '.[lora]'")
    example = EXAMPLES / "lora-transformers"
    job_dir = tmp_path / "lora"
    job_dir.mkdir()
    for name in ("train.py", "data.py"):
        shutil.copy(example / name, job_dir / name)
    # Three rounds keep the test under a minute; the README's table comes from the full 8.
    (job_dir / "fljob.yaml").write_text(re.sub(r"rounds: 8", "rounds: 3", (example / "fljob.yaml").read_text()))
    run_dir = tmp_path / "run"
    result = _run(job_dir / "fljob.yaml", run_dir, timeout=110)
    assert result["summary"]["completedRounds"] == 3
    first = []
    for site in ("site-a", "site-b", "site-c"):
        log = (run_dir / "logs" / f"lora-transformers-client-{site}.trainer.log").read_text()
        ppl = {int(r): float(p) for r, p in re.findall(r"round (\d+)/3: global model perplexity ([0-9.]+)", log)}
        assert sorted(ppl) == [1, 2, 3], log[-2000:]
        # ppl[1] is the untrained initial adapter (the base model), ppl[3] the global adapter of round 2
        assert ppl[1] > ppl[2] > ppl[3] and ppl[3] < ppl[1] / 4, (site, ppl)
        first.append(ppl[1])
        adapter, total = (int(n.replace(",", "")) for n in re.search(r"([\d,]+) of ([\d,]+) parameters", log).groups())
        # Each result of this site (round 0 is site-a's initial adapter) carried the adapter alone, in float32.
        sidecar = (run_dir / "logs" / f"lora-transformers-client-{site}.sidecar.log").read_text()
        moved = re.findall(r"\(round (\d+)\): (\d+) tensors, (\d+) bytes", sidecar)
        rounds = ["0", "1", "2", "3"] if site == "site-a" else ["1", "2", "3"]
        assert moved == [(r, "28", str(4 * adapter)) for r in rounds], moved
        assert 4 * adapter < 4 * total / 5  # the base (the other ~83 % of the parameters) never travelled
    assert result["summary"]["metrics"]["global_perplexity"] < min(first) / 4  # round 3's, averaged over sites
    # The delivered global model (and each round's, spec.output.everyRound) is the adapter and nothing else.
    model_dir = run_dir / "model"
    assert sorted(p.name for p in model_dir.glob("*-round-*")) == [
        f"lora-transformers-round-00000{r}.safetensors" for r in (1, 2, 3)
    ]
    tensors, meta = safetensors.load_file(model_dir / "lora-transformers.safetensors")
    assert meta["round"] == "3"
    assert len(tensors) == 28 and all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in tensors), list(tensors)
    assert sum(t.nbytes for t in tensors.values()) == 4 * adapter
