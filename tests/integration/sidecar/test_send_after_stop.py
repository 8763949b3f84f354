"""A trainer that sends after the job was stopped learns so at once (JobStoppedError), instead of waiting.

Real server, sidecar and trainer session in one process over localhost: the
trainer holds a task while the server stops the job; its ``send()`` must fail
fast with the reason, and nothing is announced to the server.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedkube.server.app import FedkubeServer
from fedkube.sidecar.app import Sidecar
from fedkube.sidecar.config import SidecarConfig
from fedkube.trainer_sdk import FLModel, JobStoppedError
from fedkube.trainer_sdk._session import Session
from tests.integration.server.conftest import JOB, make_config, token_of
from tests.integration.sidecar.conftest import SETTINGS
from tests.support.tls import session_pki
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)
SITE = "site-a"


def test_send_after_the_job_stopped_raises_job_stopped_at_once() -> None:
    server = FedkubeServer(make_config((SITE,), rounds=3), model_loader=lambda: {"w": np.zeros(16, np.float32)})
    server.start()
    sidecar = Sidecar(SidecarConfig(
        job=JOB, site=SITE, server_address=f"127.0.0.1:{server.grpc_port}", token=token_of(SITE), trainer_port=0,
        backoff_base_s=0.1, backoff_max_s=0.5, tls=session_pki().site_settings(SITE),
    ))  # fmt: skip
    sidecar.start()
    session = Session(f"127.0.0.1:{sidecar.port}", site=SITE, job=JOB, settings=SETTINGS)
    try:
        session.connect()
        model = session.receive()  # round 1's task, held by the "user code" while the job is stopped
        server.request_stop("stopped by the test")
        until(lambda: sidecar.tasks.stopped is not None, "the job's Stop to reach the sidecar", timeout=20)
        started = time.monotonic()
        with pytest.raises(JobStoppedError, match=r"the job is over \(.*\).*fix: check fk.is_running\(\)"):
            session.send(FLModel(params=model.params, num_examples=1))
        assert time.monotonic() - started < 5  # refused, not waited out
    finally:
        session.close()
        sidecar.stop(grace=0.5)
        server.wait(10)
        server.shutdown(grace_s=0.5)
