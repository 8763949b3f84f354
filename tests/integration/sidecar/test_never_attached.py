"""A trainer that dies before fk.init(): its sidecar, told to stop, says so and the server's reason is immediate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedkube import envvars
from fedkube.sidecar.state import NEVER_ATTACHED, TrainerTracker
from fedkube.wire.v1 import control_pb2
from tests.integration.server.conftest import JOB, Harness, make_config, token_of
from tests.integration.server.conftest import harness as harness  # the server tests' real-server fixture
from tests.integration.server.fakes import add_value
from tests.support.tls import session_pki
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]


def test_tracker_reports_never_attached_only_when_no_trainer_ever_came() -> None:
    fresh = TrainerTracker()
    snap = fresh.never_attached()
    assert snap is not None and snap.phase == control_pb2.TRAINER_PHASE_EXITED and snap.message == NEVER_ATTACHED
    assert fresh.never_attached() is None  # said once
    seen = TrainerTracker()
    session, _ = seen.attached()
    seen.gone(session, downloads_outstanding=False)
    assert seen.never_attached() is None  # it attached, then left: the session's end already said so


def test_sidecar_stopped_without_a_trainer_tells_the_server_at_once(harness: Harness, tmp_path: Path) -> None:
    # heartbeatSeconds is long, so only the sidecar's own report can explain site-a quickly.
    srv = harness.server(
        make_config(("site-a", "site-b"), rounds=2, min_clients=1, heartbeat_timeout_s=30.0, round_timeout_s=40.0),
        {"w": np.zeros(100, np.float32)},
    )
    token = tmp_path / "token"
    token.write_text(token_of("site-a") + "\n")
    env = {
        **os.environ,
        envvars.JOB: JOB,
        envvars.SITE: "site-a",
        envvars.SERVER_ADDRESS: f"127.0.0.1:{srv.grpc_port}",
        envvars.TOKEN_FILE: str(token),
        **session_pki().site_env("site-a"),
        envvars.TRAINER_PORT: "0",
        "PYTHONPATH": str(ROOT),
    }
    sidecar = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedkube.sidecar.app import main; sys.exit(main())"],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        harness.sidecar(srv, "site-b", add_value(1.0))
        until(lambda: _client(srv, "site-a").state == "Training", "site-a to get its task", timeout=20,
              context=lambda: str(_client(srv, "site-a")))
        # The trainer container crashed before fk.init(); the kubelet (or fedkube run) stops the sidecar.
        trainer = subprocess.run([sys.executable, "-c", "raise SystemExit('dataset not found')"], check=False)
        assert trainer.returncode != 0
        stopped = time.monotonic()
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(15) == 0
        while _client(srv, "site-a").state != "Failed":
            assert time.monotonic() - stopped < 10, f"the server did not learn it: {_client(srv, 'site-a')}"
            time.sleep(0.05)
        rec = _client(srv, "site-a")
        assert rec.reason == "TrainerExited"
        assert "never attached to its sidecar" in rec.message and "fk.init()" in rec.message
        assert time.monotonic() - stopped < 10  # far inside heartbeatSeconds=30
        outcome = srv.wait(30)
        assert outcome is not None and outcome.success, outcome  # site-b carries the job (minClients 1)
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait(10)
    assert "no trainer ever attached" in (sidecar.stdout.read() if sidecar.stdout else "")


def _client(srv, site):  # type: ignore[no-untyped-def]
    return next(c for c in srv.workflow.status().clients if c.name == site)
