"""`fedkube run` with the bulk data plane (the default) and without it: real processes, the model checked exactly."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedkube.server import checkpoint
from tests.integration.runtime.test_run_cli import fedkube_run

pytestmark = pytest.mark.timeout(120)

JOB = "bulkrun"
SITES = ("site-0", "site-1")
ROUNDS = 2

# Adds 0.5*(i+1) in place to every received array of site-i and sends the same arrays back.
TRAINER = textwrap.dedent("""
    import numpy as np
    import fedkube.trainer_sdk as fk

    offset = np.float32(0.5 * (int(fk.site().rsplit("-", 1)[1]) + 1))
    fk.init()
    while fk.is_running():
        model = fk.receive()
        for arr in model.params.values():
            np.add(arr, offset, out=arr)
        fk.send(fk.FLModel(params=model.params, num_examples=100))
        del model
""")


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    # ~3 MiB over several frames and chunks; odd sizes so no frame boundary lines up with a tensor's end.
    return {"w": rng.standard_normal((700, 1025)).astype(np.float32), "b": rng.standard_normal(333).astype(np.float32)}


def _expected(arr: np.ndarray) -> np.ndarray:
    e = arr.copy()
    for _ in range(ROUNDS):
        e = ((e + np.float32(0.5)).astype(np.float64) + (e + np.float32(1.0))) / 2
        e = e.astype(np.float32)
    return e


def _job(tmp_path: Path) -> Path:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    np.savez(job_dir / "init.npz", **_initial())
    (job_dir / "train.py").write_text(TRAINER)
    manifest = {
        "apiVersion": "fedkube.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": JOB},
        "spec": {
            "rounds": ROUNDS,
            "minClients": len(SITES),
            "model": {"source": "file", "path": str(job_dir / "init.npz")},
            "clients": [{"name": s} for s in SITES],
            "trainer": {"image": "local", "command": ["python", "train.py"]},
            "transfer": {"chunkBytes": 256 * 1024},
            "timeouts": {"roundSeconds": 120},
        },
    }
    path = job_dir / "fljob.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc-only"])
def test_job_moves_every_byte_exactly_with_and_without_bulk(tmp_path: Path, bulk: bool) -> None:
    run_dir = tmp_path / "run"
    proc = fedkube_run(str(_job(tmp_path)), "--json", "--no-progress", "--run-dir", str(run_dir),
                       *(() if bulk else ("--no-bulk",)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout)["summary"]["completedRounds"] == ROUNDS

    manifests = sorted(run_dir.glob(f"pods/*/volumes/*/{JOB}/round-*/manifest.json"))
    ck = checkpoint.load(manifests[-1].parent)
    assert ck.round == ROUNDS
    for name, arr in _initial().items():
        np.testing.assert_allclose(ck.model[name], _expected(arr), rtol=0, atol=1e-6)

    logs = run_dir / "logs"
    server = (logs / f"{JOB}-server.server.log").read_text()
    pulled = [line for line in server.splitlines() if " pulled " in line]
    assert len(pulled) == ROUNDS * len(SITES)
    total = sum(a.nbytes for a in _initial().values())
    if bulk:
        assert all(f"({total} on the bulk port, 0 pushed over gRPC)" in line for line in pulled), pulled
    else:
        assert "bulk port off" in server
        assert all(f"(0 on the bulk port, {total} pushed over gRPC)" in line for line in pulled), pulled
    for site in SITES:
        trainer = (logs / f"{JOB}-client-{site}.trainer.log").read_text()
        assert ("global model over bulk via" in trainer) is bulk
        assert "fetching over gRPC from now on" not in trainer
        for kind in ("sidecar", "trainer"):
            assert "Traceback" not in (logs / f"{JOB}-client-{site}.{kind}.log").read_text()
