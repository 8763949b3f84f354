"""Fixtures: a fake server, an in-process sidecar on real ports, a trainer session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fedkube.sidecar.app import Sidecar
from fedkube.sidecar.config import SidecarConfig
from fedkube.trainer_sdk._session import Session, SessionSettings
from fedkube.transfer.fetch import FetchSettings
from tests.integration.sidecar.fake_server import FakeServer
from tests.support.tls import session_pki

JOB = "job1"
SITE = "site-a"
TOKEN = "tok-a"


@pytest.fixture
def server() -> Iterator[FakeServer]:
    s = FakeServer(JOB, {SITE: TOKEN}).start()
    yield s
    s.stop()


def make_sidecar(address: str, token: str = TOKEN, **kw: Any) -> Sidecar:
    """A sidecar of SITE towards ``address``, with mutual TLS (the session PKI) unless ``tls=`` says otherwise."""
    settings: dict[str, Any] = {"trainer_port": 0, "backoff_base_s": 0.1, "backoff_max_s": 0.5,
                                "tls": session_pki().site_settings(SITE), **kw}
    cfg = SidecarConfig(job=JOB, site=SITE, server_address=address, token=token, **settings)
    return Sidecar(cfg)


@pytest.fixture
def sidecar(server: FakeServer) -> Iterator[Sidecar]:
    sc = make_sidecar(server.address)
    sc.start()
    server.wait_registered(SITE)
    yield sc
    sc.stop(grace=0.5)


SETTINGS = SessionSettings(
    connect_timeout_s=5,
    poll_ms=200,
    result_idle_timeout_s=5,
    result_start_timeout_s=5,
    fetch=FetchSettings(chunk_timeout_s=5, idle_timeout_s=10, backoff_max_s=1, max_chunk_bytes=256 << 10),
)


@pytest.fixture
def trainer(sidecar: Sidecar) -> Iterator[Session]:
    s = Session(f"127.0.0.1:{sidecar.port}", site=SITE, job=JOB, settings=SETTINGS)
    s.connect()
    yield s
    s.close()
