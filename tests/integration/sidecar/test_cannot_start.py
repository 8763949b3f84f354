"""A sidecar that cannot start tells the server at once (issue 11 §2.4): no wait for registrationSeconds."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedkube import envvars
from tests.integration.server.conftest import JOB, Harness, make_config, token_of
from tests.integration.server.conftest import harness as harness  # the server tests' real-server fixture
from tests.integration.server.fakes import add_value
from tests.integration.sidecar.conftest import make_sidecar
from tests.integration.sidecar.fake_server import FakeServer
from tests.support.tls import session_pki
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]


def test_sidecar_that_cannot_listen_for_its_trainer_fails_its_client_at_once(
    harness: Harness, tmp_path: Path
) -> None:
    # heartbeatSeconds and the registration wait are long: only the sidecar's own report explains site-a quickly.
    srv = harness.server(
        make_config(("site-a", "site-b"), rounds=1, min_clients=1, heartbeat_timeout_s=30.0, round_timeout_s=40.0),
        {"w": np.zeros(10, np.float32)},
    )
    token = tmp_path / "token"
    token.write_text(token_of("site-a") + "\n")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()  # the trainer port is someone else's
    env = {
        **os.environ,
        envvars.JOB: JOB,
        envvars.SITE: "site-a",
        envvars.SERVER_ADDRESS: f"127.0.0.1:{srv.grpc_port}",
        envvars.TOKEN_FILE: str(token),
        **session_pki().site_env("site-a"),
        envvars.TRAINER_PORT: str(taken.getsockname()[1]),
        "PYTHONPATH": str(ROOT),
    }
    try:
        started = time.monotonic()
        sidecar = subprocess.run(
            [sys.executable, "-c", "import sys; from fedkube.sidecar.app import main; sys.exit(main())"],
            env=env, text=True, capture_output=True, timeout=30,
        )  # fmt: skip
    finally:
        taken.close()
    assert sidecar.returncode == 2, sidecar.stderr[-3000:]
    assert "cannot listen" in sidecar.stderr and "telling the server" in sidecar.stderr
    deadline = time.monotonic() + 5  # the report went out before the sidecar exited; it is being processed
    while (rec := _client(srv, "site-a")).state != "Failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rec.state == "Failed", rec  # not after 30 s of heartbeats or the registration wait
    assert "could not start" in rec.message and "cannot listen" in rec.message, rec
    assert time.monotonic() - started < 20
    harness.sidecar(srv, "site-b", add_value(1.0))
    outcome = srv.wait(30)
    assert outcome is not None and outcome.success, outcome  # site-b carries the job (minClients 1)


def _client(srv, site):  # type: ignore[no-untyped-def]
    return next(c for c in srv.workflow.status().clients if c.name == site)


def test_a_server_whose_certificate_fails_is_refused_naming_its_address_and_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server of another job (its own CA): the sidecar must never register there, and must say why.
    other = FakeServer("job2", {"site-a": "tok-a"}).start()
    sidecar = make_sidecar(other.address)
    try:
        with caplog.at_level(logging.ERROR, logger="fedkube.sidecar.upstream"):
            sidecar.start()
            until(lambda: [r for r in caplog.records if "failed TLS verification" in r.getMessage()],
                  what="the TLS error", timeout=15)
        message = next(r.getMessage() for r in caplog.records if "failed TLS verification" in r.getMessage())
        assert other.address in message and "fix:" in message and "FEDKUBE_TLS_DIR" in message
        assert not sidecar.upstream.connected.is_set() and not other.registrations
    finally:
        sidecar.stop(grace=0.5)
        other.stop()
