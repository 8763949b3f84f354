"""Fault 10: a hostile client hits the server's gRPC port while a real job runs.

Documented outcome (DESIGN.md §8, issue 4): malformed bytes, garbage protobuf,
oversized messages and a flood of connections are each refused with a status
code (or the connection is closed, for bytes that are not HTTP/2), refusals
with an identity are counted by reason, the server's memory does not grow
beyond a small bound, and the real clients finish the job normally.

The job runs with ``security.tls: disabled``: this is the application layer
that anyone on the network reaches in a plaintext job, and that only holders
of a site certificate of the job reach with TLS (whose own refusals, plaintext
and foreign clients included, are tests/integration/server/test_mtls_refusals.py).
"""

from __future__ import annotations

import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from fedkube.protocol import AUTH_METADATA, SITE_METADATA
from fedkube.wire.v1 import control_pb2
from tests.faults.support import (
    CLIENTS,
    ONE_AND_TWO,
    REJECTED,
    Metrics,
    PodJob,
    job_doc,
    save_model,
    trainer_script,
)

INITIAL = np.arange(1 << 16, dtype=np.float32) / 64
CONNECT = "/fedkube.v1.Control/Connect"
PUSH = "/fedkube.v1.Control/Push"
FLOOD_SOCKETS = 200
FLOOD_CALLS = 100
REPEATS = 8  # of each malformed call: 2 x 8 oversized (3 MiB) messages kept would break RSS_BOUND
RSS_BOUND = 24 << 20


def _raw(payload: bytes) -> bytes:
    return payload


def _code(call: Any) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return None


@pytest.mark.timeout(90)
def test_hostile_client_is_refused_memory_stays_flat_and_the_job_succeeds(tmp_path: Path) -> None:
    # Both trainers hold their results while the attack runs.
    doc = job_doc("f10", ("site-a", "site-b"), rounds=1, roomy=True, checkpoint=True, env={"HOLD": "site-a,site-b"},
                  trainer=trainer_script(tmp_path, ONE_AND_TWO), initial=save_model(tmp_path / "initial.npz",
                                                                                   {"w": INITIAL}))
    doc["spec"]["security"] = {"tls": "disabled"}
    with PodJob(doc, tmp_path) as job:
        server = psutil.Process(job.process(None, "server").pid)
        # Both real clients are in the round (trainers hold their results) before the attack starts.
        before = job.until_metrics(lambda m: m.total(CLIENTS, state="Training") == 2,
                                   "both real clients to be training", timeout=30)
        rss_before = server.memory_info().rss
        codes, closed = _attack(job.server_address(), job.tokens["site-a"])
        rss_after = server.memory_info().rss
        after = job.scrape()
        status = job.status()
        job.open_gate()
        summary = job.server_succeeded(30)
        ck = job.checkpoint()
        server_log = job.log("server", "server")

    # (b) every hostile call was refused with a status code that says why.
    assert closed == FLOOD_SOCKETS + 1, "the server kept a connection that sent no HTTP/2 open"
    expected = {
        "garbage bytes on Connect, no identity": grpc.StatusCode.PERMISSION_DENIED,
        "garbage protobuf on Connect, valid token": grpc.StatusCode.INTERNAL,
        "garbage protobuf on Push, valid token": grpc.StatusCode.INTERNAL,
        "oversized message on Connect, valid token": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "oversized message on Push, valid token": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Register for another job, valid token": grpc.StatusCode.FAILED_PRECONDITION,
    }
    for what, code in expected.items():
        assert codes[(what, code)] == REPEATS, (what, codes)
    # The flood: every call refused, by the token check or, before any handler runs, by gRPC itself: the
    # server's concurrent-call limit (maximum_concurrent_rpcs, RESOURCE_EXHAUSTED) or a refused stream
    # (UNAVAILABLE).
    flood = "flood of Connect calls, wrong token"
    refused_by_token = codes[(flood, grpc.StatusCode.UNAUTHENTICATED)]
    refused_by_grpc = codes[(flood, grpc.StatusCode.RESOURCE_EXHAUSTED)] + codes[(flood, grpc.StatusCode.UNAVAILABLE)]
    assert refused_by_token + refused_by_grpc == FLOOD_CALLS, codes
    assert refused_by_token >= 1, codes  # the calls that reach a handler meet the token check
    assert sum(codes.values()) == REPEATS * len(expected) + FLOOD_CALLS
    # Expected conditions: a line each, no stack traces (gRPC's own parse error included).
    assert "Traceback" not in server_log
    assert server_log.count("WARNING grpc._common") == 2 * REPEATS
    # (c) refusals with an identity are counted by reason: exactly the calls made.
    delta = _delta(before, after)
    assert delta.get("UnknownSite") == REPEATS, delta
    # A Connect whose first message is garbage never registers: refused as NotRegistered. One with a message
    # over the limit is too, when gRPC lets the handler start before it refuses the message (a race in gRPC).
    assert REPEATS <= delta.get("NotRegistered", 0) <= 2 * REPEATS, delta
    assert delta.get("BadToken") == refused_by_token, delta
    assert delta.get("WrongJob") == REPEATS, delta
    assert set(delta) == {"UnknownSite", "BadToken", "NotRegistered", "WrongJob"}, delta
    # (d) memory: the server's RSS stayed within a small bound through the whole attack.
    growth = rss_after - rss_before
    print(f"server RSS {rss_before / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB during the attack")
    assert growth < RSS_BOUND, f"server RSS grew by {growth / 2**20:.1f} MiB during the attack"
    # (a) the real clients were never disturbed: in the round all along, and the job's aggregate is exact.
    assert {c["name"]: c["state"] for c in status["clients"]} == {"site-a": "Training", "site-b": "Training"}
    assert summary["phase"] == "Succeeded" and "reason" not in summary
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}
    np.testing.assert_array_equal(ck.model["w"], INITIAL + np.float32(1.75))


def _delta(before: Metrics, after: Metrics) -> dict[str, float]:
    """Reason -> refusals counted between the two scrapes (reasons that did not move left out)."""
    out = {r: after.total(REJECTED, reason=r) - before.total(REJECTED, reason=r) for r in after.by(REJECTED, "reason")}
    return {k: v for k, v in out.items() if v}


def _attack(address: str, token: str) -> tuple[Counter[tuple[str, grpc.StatusCode | None]], int]:
    """Every hostile move once per repeat; returns the status codes seen and how many raw sockets were closed."""
    codes: Counter[tuple[str, grpc.StatusCode | None]] = Counter()
    host, port = address.rsplit(":", 1)
    # Bytes that are not HTTP/2 at all, and a flood of connections that never finish the preface.
    sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(FLOOD_SOCKETS)]
    garbage = socket.create_connection((host, int(port)), timeout=10)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 16)
    closed = int(_closed_by_peer(garbage))
    for s in sockets:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)  # a TLS hello, to a plain port
    closed += sum(_closed_by_peer(s) for s in sockets)
    ident = ((SITE_METADATA, "site-a"), (AUTH_METADATA, f"Bearer {token}"))
    big = b"\x0a" + b"\xff" * 8 + b"\x00" * (3 << 20)
    wrong_job = control_pb2.ClientMessage(
        register=control_pb2.Register(job="another-job", site="site-a", session_id="hostile", protocol_version=1)
    ).SerializeToString()
    def moves(channel: grpc.Channel) -> list[tuple[str, Any]]:
        connect = channel.stream_stream(CONNECT, request_serializer=_raw, response_deserializer=_raw)
        push = channel.stream_unary(PUSH, request_serializer=_raw, response_deserializer=_raw)
        return [
            ("garbage bytes on Connect, no identity", lambda: list(connect(iter([b"\xff" * 64]), timeout=10))),
            ("garbage protobuf on Connect, valid token",
             lambda: list(connect(iter([b"\xff" * 64]), metadata=ident, timeout=10))),
            ("garbage protobuf on Push, valid token", lambda: push(iter([b"\xff" * 64]), metadata=ident, timeout=10)),
            ("oversized message on Connect, valid token", lambda: list(connect(iter([big]), metadata=ident,
                                                                               timeout=10))),
            ("oversized message on Push, valid token", lambda: push(iter([big]), metadata=ident, timeout=10)),
            ("Register for another job, valid token",
             lambda: list(connect(iter([wrong_job]), metadata=ident, timeout=10))),
        ]

    # A connection per repeat, so that what one repeat abandons mid-message cannot change the next one's answer:
    # this test names the server's answer to each bad call.
    for _ in range(REPEATS):
        with grpc.insecure_channel(address) as channel:
            for what, move in moves(channel):
                codes[(what, _code(move))] += 1
    bad = ((SITE_METADATA, "site-b"), (AUTH_METADATA, "Bearer not-the-token"))
    with grpc.insecure_channel(address) as channel:
        connect = channel.stream_stream(CONNECT, request_serializer=_raw, response_deserializer=_raw)

        def flood_call(_: int) -> grpc.StatusCode | None:
            return _code(lambda: list(connect(iter([wrong_job]), metadata=bad, timeout=10)))

        with ThreadPoolExecutor(16) as pool:
            for code in pool.map(flood_call, range(FLOOD_CALLS)):
                codes[("flood of Connect calls, wrong token", code)] += 1
    for s in sockets:
        s.close()
    garbage.close()
    return codes, closed


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the server closed the connection (it may first send its own SETTINGS/GOAWAY frames)."""
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, OSError):
        return False
    return True
