"""An authenticated control stream that never sends Register is closed after the registration timeout."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.protocol import AUTH_METADATA, SITE_METADATA
from fedkube.server.config import DEFAULT_REGISTER_TIMEOUT_S, ServerConfig, _seconds_env
from fedkube.server.control import REGISTER_TIMEOUT
from fedkube.wire.v1 import control_pb2, control_pb2_grpc
from tests.integration.server.conftest import Harness, grpc_channel, make_config, rejected, token_of
from tests.integration.server.fakes import add_value
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)


def _silent(until: threading.Event) -> Iterator[control_pb2.ClientMessage]:
    """A client that opens the stream and then says nothing (until the test lets go)."""
    until.wait(30)
    return
    yield  # a generator that yields nothing


def test_stream_without_register_is_closed_with_a_reason_log_and_metric(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    config = dataclasses.replace(make_config(rounds=1), register_timeout_s=0.5)
    srv = harness.server(config, {"w": np.zeros(100, np.float32)})
    release = threading.Event()
    channel = grpc_channel(srv)
    try:
        stub = control_pb2_grpc.ControlStub(channel)
        md = ((SITE_METADATA, "site-a"), (AUTH_METADATA, f"Bearer {token_of('site-a')}"))
        started = time.monotonic()
        call = stub.Connect(_silent(release), metadata=md, timeout=20)
        with caplog.at_level(logging.WARNING, logger="fedkube.server.control"):
            got = list(_drain(call))
        waited = time.monotonic() - started
        assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent no Register within 0.5 s" in (call.details() or "")
        assert [m.rejected.reason for m in got] == [REGISTER_TIMEOUT]
        assert waited < 10, f"the silent stream was held {waited:.1f} s"
        assert any("sent no Register" in r.getMessage() and "site-a" in r.getMessage() for r in caplog.records)
        assert rejected(srv, REGISTER_TIMEOUT, "grpc") == 1.0
        # The helper thread that waited for the first message ends with the call.
        until(lambda: not any(t.name == "fedkube-register-site-a" for t in threading.enumerate()),
              "the registration reader to end with its call", timeout=5)
    finally:
        release.set()
        channel.close()
    # The site can still join properly, and the job runs.
    harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome


def _drain(call: Iterator[control_pb2.ServerMessage]) -> Iterator[control_pb2.ServerMessage]:
    try:
        yield from call
    except grpc.RpcError:
        return


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, 1e9])
def test_registration_timeout_must_be_positive_and_bounded(bad: float) -> None:
    config = make_config()
    with pytest.raises(ConfigError, match=envvars.REGISTER_TIMEOUT):
        dataclasses.replace(config, register_timeout_s=bad)


def test_registration_timeout_env_is_parsed_with_a_clear_error() -> None:
    assert _seconds_env({}, envvars.REGISTER_TIMEOUT, DEFAULT_REGISTER_TIMEOUT_S) == 30.0
    assert _seconds_env({envvars.REGISTER_TIMEOUT: " 7.5 "}, envvars.REGISTER_TIMEOUT, 30.0) == 7.5
    with pytest.raises(ConfigError, match="FEDKUBE_REGISTER_TIMEOUT_SECONDS='soon' is not a number of seconds"):
        _seconds_env({envvars.REGISTER_TIMEOUT: "soon"}, envvars.REGISTER_TIMEOUT, 30.0)
    assert ServerConfig(settings=make_config().settings, tokens={}).register_timeout_s == DEFAULT_REGISTER_TIMEOUT_S
