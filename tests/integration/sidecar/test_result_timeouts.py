"""The job's transfer settings reach the trainer: send() gives up on a stalled download when the job says.

A real server, a real sidecar whose link to the server goes through a TCP
proxy, and a trainer session with the SDK's default timeouts (idle 300 s).
The proxy stops forwarding (both ways) once the result's upload is under
way, so neither the rest of the bytes nor the server's verdict gets through:
the trainer must give up on its own, after the idle timeout the server sent
with the task (idleTimeoutSeconds + chunkTimeoutSeconds + 5 s), not the SDK's.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedkube.protocol import ResultTimeouts
from fedkube.server.app import FedkubeServer
from fedkube.server.config import TransferSettings
from fedkube.sidecar.app import Sidecar
from fedkube.sidecar.config import SidecarConfig
from fedkube.trainer_sdk import FLModel, ResultTransferError
from fedkube.trainer_sdk._session import Session, SessionSettings
from tests.faults.support import UP, TcpProxy, until
from tests.integration.server.conftest import JOB, make_config, token_of
from tests.support.tls import session_pki

SITE = "site-a"
NBYTES = 32 << 20  # more than the socket buffers between the sidecar and the stopped proxy can hold


@pytest.mark.timeout(90)
def test_send_gives_up_after_the_jobs_idle_timeout_not_the_sdk_default() -> None:
    idle_s, chunk_s = 2.0, 1.0
    expected = ResultTimeouts.for_job(idle_timeout_s=idle_s, chunk_timeout_s=chunk_s, round_timeout_s=60.0)
    defaults = SessionSettings(connect_timeout_s=5, poll_ms=200)
    assert expected.idle_s < defaults.result_idle_timeout_s / 10
    config = make_config(
        (SITE,), round_timeout_s=60.0, heartbeat_timeout_s=60.0,
        transfer=TransferSettings(chunk_bytes=256 << 10, chunk_timeout_s=chunk_s, idle_timeout_s=idle_s,
                                  max_attempts=3),
    )  # fmt: skip
    server = FedkubeServer(config, model_loader=lambda: {"w": np.zeros(NBYTES // 4, np.float32)})
    server.start()
    proxy = TcpProxy(("127.0.0.1", server.grpc_port), name="server").start()
    sidecar = Sidecar(SidecarConfig(
        job=JOB, site=SITE, server_address=proxy.address, token=token_of(SITE), trainer_port=0,
        backoff_base_s=0.1, backoff_max_s=0.5, tls=session_pki().site_settings(SITE),
    ))  # fmt: skip
    sidecar.start()
    session = Session(f"127.0.0.1:{sidecar.port}", site=SITE, job=JOB, settings=defaults)
    try:
        session.connect()
        params = session.receive().params
        assert params is not None
        # Stop everything between the sidecar and the server 1 MiB into the result's upload.
        proxy.pause_at(proxy.bytes[UP] + (1 << 20), UP)
        outcome: list[BaseException | bool] = []

        def send() -> None:
            try:
                outcome.append(session.send(FLModel(params={"w": params["w"] + 1}, num_examples=1)))
            except BaseException as exc:
                outcome.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        until(lambda: proxy.paused, "the result's upload to reach the stopped proxy", 30)
        paused_at = time.monotonic()
        sender.join(expected.idle_s + 30)
        waited = time.monotonic() - paused_at
        assert outcome, f"send() still waiting {waited:.0f} s after the upload stopped"
        err = outcome[0]
        assert isinstance(err, ResultTransferError), err
        assert f"for {expected.idle_s:.0f} s (idle timeout)" in str(err), err
        # The bytes already in the socket buffers moved a little after the pause: the idle timer started then.
        assert expected.idle_s <= waited < expected.idle_s + 25, waited
    finally:
        proxy.close()
        session.close()
        server.request_stop("test ended")
        server.wait(10)
        server.shutdown(grace_s=0.5)
        sidecar.stop(grace=0.5)

