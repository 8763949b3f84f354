"""The whole data plane in one process: real server, real sidecar, real trainer session, bulk on, off or broken.

Over real sockets on localhost: the trainer fetches the global model through the
sidecar's bulk relay and the server pulls results on its bulk port; with no bulk
address everything goes over gRPC; with a dead bulk port the sidecar and the SDK
say so once, without a stack trace, and fall back to gRPC so the job succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from fedkube import envvars
from fedkube.sidecar.app import Sidecar
from fedkube.trainer_sdk import FLModel
from fedkube.trainer_sdk._session import Session
from fedkube.transfer import handoff
from tests.integration.server.conftest import JOB
from tests.integration.sidecar.one_site import SITE, OneSite

pytestmark = pytest.mark.timeout(60)

ROUNDS = 2


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "w": rng.standard_normal((300, 257)).astype(np.float32),  # several frames and chunks
        "b16": rng.standard_normal(1000).astype(ml_dtypes.bfloat16),
        "step": np.array([7], dtype=np.int64),
    }


class Stack(OneSite):
    """One site whose trainer updates the received arrays in place, as the in-place benchmark trainer does."""

    def __init__(self) -> None:
        super().__init__(_model, ROUNDS)
        self.received: list[dict[str, np.ndarray]] = []

    def train(self, session: Session, index: int, _: Any) -> None:
        model = session.receive()
        assert model.params is not None
        self.received.append({k: v.copy() for k, v in model.params.items()})
        for arr in model.params.values():
            arr += np.ones((), dtype=arr.dtype)
        session.send(FLModel(params=model.params, num_examples=10))


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.close()


def _sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.registry.get_sample_value(name, {"fljob": JOB, "site": SITE, **labels})
    return value or 0.0


def _run(stack: Stack, bulk: str, handoff: bool = True, tls: bool = True) -> None:
    stack.start(stack.train, bulk, handoff=handoff, tls=tls)
    stack.finish()
    first = _model()
    assert len(stack.received) == ROUNDS
    for name, arr in first.items():
        np.testing.assert_array_equal(stack.received[0][name], arr)
        np.testing.assert_array_equal(stack.received[1][name], arr + np.ones((), dtype=arr.dtype))


def _pulled(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if "pulled" in r.getMessage()]


@pytest.mark.parametrize(
    ("handoff", "trainer_offers", "tls"),
    [
        # The handoff exists only on a plaintext server hop (security.tls: disabled).
        pytest.param(True, True, False, id="plaintext-handoff",
                     marks=pytest.mark.skipif(not handoff.AVAILABLE, reason="Linux only")),
        pytest.param(False, True, False, id="plaintext-relay"),
        pytest.param(True, False, False, id="plaintext-trainer-without-handoff"),  # an older SDK: the sidecar relays
        # mTLS on both planes: the sidecar terminates TLS and relays, whatever the handoff setting says.
        pytest.param(True, True, True, id="tls"),
    ],
)
def test_bulk_on_both_directions_and_metered(
    stack: Stack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, handoff: bool,
    trainer_offers: bool, tls: bool,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    if not trainer_offers:
        monkeypatch.setenv(envvars.BULK_HANDOFF, "0")  # read by the trainer's Session only here
    _run(stack, "on", handoff=handoff, tls=tls)
    if tls:
        assert stack.server is not None and stack.server.tls is not None and stack.server.bulk is not None
        assert stack.server.bulk.tls is not None and stack.sidecar is not None and stack.sidecar.tls is not None
        # The relay copies every byte: its pod-local leg is an abstract Unix socket (cheaper than loopback TCP).
        assert stack.sidecar.bulk_relay is not None and stack.sidecar.bulk_relay.address.startswith("@")
        handoff = False  # what the sidecar did: relay every byte
    total = sum(a.nbytes for a in _model().values())
    pulled = _pulled(caplog.records)
    assert len(pulled) == ROUNDS and all(f"({total} on the bulk port, 0 pushed over gRPC)" in m for m in pulled)
    assert stack.session is not None and stack.session.model.bulk_fetcher is not None  # never fell back to gRPC
    assert stack.sidecar is not None
    relayed = "fedkube_sidecar_relayed_bytes_total"
    # Framing adds a few bytes per frame to what went through a relay; a handoff counts the data bytes.
    assert _sample(stack.sidecar, relayed, direction="to_trainer") >= ROUNDS * total
    assert _sample(stack.sidecar, relayed, direction="to_server") >= ROUNDS * total
    assert _sample(stack.sidecar, "fedkube_sidecar_relay_buffer_bytes") == 0  # every pump buffer let go
    assert stack.sidecar.bulk_relay is not None and stack.sidecar.bulk_relay.buffer_bytes_in_use == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "bulk" in r.getMessage()]
    handed = stack.sidecar.bulk_handoff
    taker = stack.session.results.handoff_server
    if handoff:
        assert handed is not None
        if trainer_offers:
            # Every fetch and completion of the global model went over the handoff: 3 tensors + 1 completion a
            # round, and every result tensor was written by the trainer on the server's socket.
            assert handed.handed == ROUNDS * (len(_model()) + 1)
            assert stack.session.model.bulk_via == handed.address
            assert taker is not None and taker.served == ROUNDS * len(_model())
        else:
            assert handed.handed == 0 and taker is None  # the relay carried it all
    else:
        assert handed is None
        assert taker is not None and taker.served == 0  # offered, never used: the sidecar relays


def test_no_bulk_address_means_grpc_both_ways(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _run(stack, "off")
    total = sum(a.nbytes for a in _model().values())
    assert stack.sidecar is not None and stack.sidecar.bulk_relay is None
    assert stack.session is not None and stack.session.model.bulk_fetcher is None
    pulled = _pulled(caplog.records)
    assert len(pulled) == ROUNDS and all(f"(0 on the bulk port, {total} pushed over gRPC)" in m for m in pulled)


def test_dead_bulk_port_falls_back_to_grpc_with_one_clear_line_each(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _run(stack, "dead")
    total = sum(a.nbytes for a in _model().values())
    pulled = _pulled(caplog.records)
    assert len(pulled) == ROUNDS and all(f"(0 on the bulk port, {total} pushed over gRPC)" in m for m in pulled)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = "\n".join(r.getMessage() for r in warnings)
    assert "cannot reach the server's bulk endpoint" in text  # the relay, for the trainer's fetch
    assert "fetching over gRPC from now on" in text  # the SDK, once
    assert "pushing it over gRPC instead and trying bulk again in 30 s" in text  # the sidecar's upload
    assert not [r for r in warnings if r.exc_info], "a fallback is not a crash: no stack traces"
    # The SDK fell back once and stayed on gRPC; the pusher tried bulk once within its retry interval.
    assert sum("fetching over gRPC from now on" in r.getMessage() for r in warnings) == 1
    assert sum("trying bulk again" in r.getMessage() for r in warnings) == 1
