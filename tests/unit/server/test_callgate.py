"""fedkube.server.callgate: a gate runs on a call's headers, checks its one message, and is released after it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from fedkube.server.callgate import CallGate, gated

pytestmark = pytest.mark.timeout(20)


class _Recorder(CallGate[str]):
    """Admits every call, refuses a request of b"refuse" at the check, and logs each step."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.admitted = threading.Event()
        self.released = threading.Event()

    def admit(self, context: grpc.ServicerContext) -> str:
        self.steps.append("admit")
        self.admitted.set()
        return "ticket"

    def check(self, admitted: str, request: Any, context: grpc.ServicerContext) -> None:
        self.steps.append(f"check {admitted} {request!r}")
        if request == b"refuse":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused by the check")

    def release(self, admitted: str) -> None:
        self.steps.append(f"release {admitted}")
        self.released.set()


@pytest.fixture
def served() -> Iterator[tuple[grpc.Channel, _Recorder]]:
    gate = _Recorder()

    def get(request: bytes, context: grpc.ServicerContext) -> bytes:
        gate.steps.append("get")
        return request.upper()

    def chunks(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        gate.steps.append("chunks")
        yield from (request[:1], request[1:])

    def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    handlers = {"Get": grpc.unary_unary_rpc_method_handler(get), "Chunks": grpc.unary_stream_rpc_method_handler(chunks),
                "Echo": grpc.stream_stream_rpc_method_handler(echo)}  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.Gated", {name: gated(handler, gate) for name, handler in handlers.items()})])  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, gate
    server.stop(None)


def test_the_gate_admits_on_the_headers_and_a_call_without_its_message_is_refused(
    served: tuple[grpc.Channel, _Recorder],
) -> None:
    channel, gate = served
    send = threading.Event()

    def nothing() -> Iterator[bytes]:
        send.wait(5)  # the headers are out; the message never comes
        return
        yield

    call = channel.stream_unary("/t.Gated/Get").future(nothing(), timeout=5)
    assert gate.admitted.wait(5), "the gate did not run before the request message"
    send.set()
    with pytest.raises(grpc.RpcError) as refused:
        call.result()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "without its request message" in refused.value.details()
    assert gate.released.wait(5) and gate.steps == ["admit", "release ticket"]


def test_one_message_is_checked_before_the_method_and_the_gate_released_after(
    served: tuple[grpc.Channel, _Recorder],
) -> None:
    channel, gate = served
    assert channel.unary_unary("/t.Gated/Get")(b"ab", timeout=5) == b"AB"
    assert list(channel.unary_stream("/t.Gated/Chunks")(b"xyz", timeout=5)) == [b"x", b"yz"]
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary("/t.Gated/Get")(b"refuse", timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # a request stream is the method's own to read: admitted and released, no check of its messages
    assert list(channel.stream_stream("/t.Gated/Echo")(iter([b"1", b"2"]), timeout=5)) == [b"1", b"2"]
    assert gate.steps == [
        "admit", "check ticket b'ab'", "get", "release ticket",
        "admit", "check ticket b'xyz'", "chunks", "release ticket",
        "admit", "check ticket b'refuse'", "release ticket",
        "admit", "release ticket",
    ]  # fmt: skip
