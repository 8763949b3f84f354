"""Configuration errors the server finds itself exit 2, as the process contract says, and fail before clients start."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedkube import envvars
from fedkube.runtime.pod import fedkube_command
from fedkube.server import checkpoint
from fedkube.server.strategy_api import StrategyState
from tests.integration.server.conftest import token_of
from tests.support.tls import session_pki

JOB = """\
apiVersion: fedkube.dev/v1alpha1
kind: FLJob
metadata: {{name: {name}}}
spec:
  rounds: 3
  clients: [{{name: site-a}}]
  strategy: {{name: {strategy}}}
  model: {model}
  trainer: {{image: example/trainer:1, command: [python, train.py]}}
"""


@pytest.mark.timeout(60)
def test_resuming_a_checkpoint_of_another_strategy_exits_2(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    checkpoint.save(ckpt, "resume", 1, {"w": np.zeros(4, np.float32)}, StrategyState("fedavg"))
    spec = tmp_path / "fljob.yaml"
    spec.write_text(JOB.format(name="resume", strategy="fedadam", model="{source: firstClient}"))
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "site-a").write_text(token_of("site-a"))
    term = tmp_path / "termination-log"
    env = {
        **os.environ,
        envvars.JOB: "resume",
        envvars.SPEC_FILE: str(spec),
        envvars.TOKENS_DIR: str(tokens),
        envvars.CHECKPOINT_DIR: str(ckpt),
        envvars.GRPC_PORT: "0",
        envvars.STATUS_PORT: "0",
        envvars.TERMINATION_LOG: str(term),
        **session_pki("resume").server_env(),
    }
    proc = subprocess.run([*fedkube_command(), "server", "--bind", "127.0.0.1"], env=env, capture_output=True,
                          text=True, timeout=50)
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = json.loads(term.read_text())
    assert (summary["exitCode"], summary["reason"]) == (2, "ConfigError")
    assert "strategy 'fedavg'" in summary["message"] and "'fedadam'" in summary["message"]


# The grace is far longer than the test may run: passing means no client was ever waited for.
@pytest.mark.timeout(120)
def test_a_missing_model_file_exits_2_before_any_client_starts(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    missing = tmp_path / "no-such-model.npz"
    (job_dir / "fljob.yaml").write_text(
        JOB.format(name="nomodel", strategy="fedavg", model=f"{{source: file, path: {missing}}}")
    )
    (job_dir / "train.py").write_text(textwrap.dedent("""
        import fedkube.trainer_sdk as fk
        fk.init()
        while fk.is_running():
            fk.send(fk.FLModel(params=fk.receive().params, num_examples=1))
    """))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*fedkube_command(), "run", str(job_dir / "fljob.yaml"), "--json", "--no-progress", "--grace", "600",
         "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["outcome"] == "ConfigError"
    assert f"spec.model.path={str(missing)!r} does not exist" in proc.stderr
    # Refused before the server listened, so no client was started, let alone waited for.
    assert "listening on gRPC port" not in (run_dir / "logs" / "nomodel-server.server.log").read_text()
    assert not list((run_dir / "logs").glob("*client*")), sorted(p.name for p in (run_dir / "logs").iterdir())
