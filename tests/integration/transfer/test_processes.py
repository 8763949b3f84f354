"""Publisher, relay and receiver in separate processes, talking over localhost TCP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedkube.transfer import Fetcher, FetchSettings, GrpcChunkSource, TensorRef, insecure_channel
from fedkube.wire.v1 import tensor_pb2
from tests.integration.transfer.procs import model

ROOT = Path(__file__).resolve().parents[3]
SETTINGS = FetchSettings(chunk_timeout_s=10, idle_timeout_s=30, backoff_base_s=0.05, backoff_max_s=0.5)


def _spawn(*args: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.transfer.procs", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded by pytest-timeout; the child prints at once
    assert line, f"child {args} exited with {proc.wait(10)} before announcing itself"
    return proc, json.loads(line)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.mark.slow
def test_receivers_direct_and_through_a_relay_process(procs: list[subprocess.Popen[str]]) -> None:
    publisher, info = _spawn("publisher", "--seed", "7", "--receivers", "direct,relayed", "--ttl", "60")
    procs.append(publisher)
    relay, relay_info = _spawn("relay", "--upstream", f"127.0.0.1:{info['port']}")
    procs.append(relay)
    refs = [TensorRef.from_proto(tensor_pb2.TensorRef.FromString(bytes.fromhex(h))) for h in info["refs"]]  # type: ignore[attr-defined]
    expected = model(7)
    for receiver, port in (("direct", info["port"]), ("relayed", relay_info["port"])):
        channel = insecure_channel(f"127.0.0.1:{port}")
        try:
            arrays = Fetcher(GrpcChunkSource(channel, receiver, chunk_timeout_s=10), SETTINGS).fetch_transaction(refs)
        finally:
            channel.close()
        for name, original in expected.items():
            assert arrays[name].tobytes() == original.tobytes(), (receiver, name)
    # The publisher exits on its own, and only now that both receivers finished (LESSONS.md 1).
    assert publisher.wait(20) == 0
    assert relay.stdin is not None
    relay.stdin.close()
    assert relay.wait(20) == 0


@pytest.mark.slow
def test_publisher_process_exits_with_failure_when_the_ttl_expires(procs: list[subprocess.Popen[str]]) -> None:
    publisher, _ = _spawn("publisher", "--receivers", "never-comes", "--ttl", "0.5")
    procs.append(publisher)
    assert publisher.wait(20) == 3
