"""A sidecar whose connection breaks while its trainer downloads the model reconnects, and the download
completes from where it was, with the server's per-site call budget in place (issue 12, item 5).

The dead connection's calls (the control stream, the relayed fetch) counted against the site's budget;
the reconnect must find them given back, not be refused as over budget, however often it happens.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from fedkube.trainer_sdk import FLModel
from fedkube.trainer_sdk._session import Session
from tests.integration.server.conftest import rejected
from tests.integration.sidecar.one_site import SITE, OneSite
from tests.integration.transfer.helpers import CuttingProxy
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

CUTS = 2
MODEL_FLOATS = 2 << 20  # 8 MiB: a download of many chunks, cut in its middle


def _model() -> dict[str, np.ndarray]:
    return {"w": np.arange(MODEL_FLOATS, dtype=np.float32)}


def _train(session: Session, index: int, _: Any) -> None:
    model = session.receive()
    assert model.params is not None
    np.testing.assert_array_equal(model.params["w"], _model()["w"])
    session.send(FLModel(params={"w": model.params["w"] + 1}, num_examples=3))


def test_a_download_survives_its_sidecars_reconnects_within_the_site_budget(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    site = OneSite(_model, rounds=1)
    proxies: list[CuttingProxy] = []

    def via(address: str) -> str:
        # Every 2.5 MiB the server sends down the gRPC connection, the proxy resets it: mid-download.
        proxies.append(CuttingProxy(int(address.rpartition(":")[2]), cut_after=5 << 19, cuts=CUTS))
        return f"127.0.0.1:{proxies[-1].port}"

    try:
        site.start(_train, bulk="off", via=via)  # gRPC: the calls the budget counts
        site.finish(45)
        assert site.server is not None and site.sidecar is not None
        grpc_proxy = next(p for p in proxies if p.target_port == site.server.grpc_port)
        assert grpc_proxy.cuts_left == 0, "the download ended before every cut"
        assert site.sidecar.registry.get_sample_value(
            "fedkube_sidecar_reconnects_total", {"fljob": site.server.config.job, "site": SITE}) == CUTS
        assert rejected(site.server, "SiteCallBudget") == 0  # no reconnect or retried fetch refused
        # Each cut broke the trainer's fetch in flight, past its start; the fetcher goes on from that offset.
        broken = [r.getMessage() for r in caplog.records if "attempt failed at offset" in r.getMessage()]
        assert len(broken) == CUTS and not any("offset 0/" in m for m in broken), broken
    finally:
        for proxy in proxies:  # first: a sidecar redialing a stopped server would make the proxy's accept fail
            proxy.close()
        site.close()
    server = site.server
    assert server is not None
    until(lambda: server.site_calls.held(SITE) == 0, "every call of the site giving its slot back", 5)
