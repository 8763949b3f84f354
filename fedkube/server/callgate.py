"""Checks that a gRPC call passes on its headers, before the server waits for its request message.

gRPC Python runs a handler that takes one request message only once that message has come. A
check inside such a handler lets a caller that opens calls and never sends a message hold a worker
and a ``maximum_concurrent_rpcs`` slot for as long as it likes (16 such half-open calls once left
no worker for the real sidecars). :func:`gated` turns a method's handler into one that takes a
request *stream* (the client still sends one message; the wire is the same), so gRPC runs it on the
headers, and runs a :class:`CallGate` around the method's own behaviour: admission on the headers,
a check of the request message once it has come, a release when the behaviour is done.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import grpc

Admitted = TypeVar("Admitted")


class CallGate(abc.ABC, Generic[Admitted]):
    """What :func:`gated` runs around one call; ``Admitted`` is what :meth:`admit` hands the later steps."""

    @abc.abstractmethod
    def admit(self, context: grpc.ServicerContext) -> Admitted:
        """Runs on the call's headers; refuses the call with ``context.abort``."""

    def check(self, admitted: Admitted, request: Any, context: grpc.ServicerContext) -> None:
        """Runs on the request message of a method that takes one, before the method; refuses with ``context.abort``.

        A method that takes a request stream reads (and checks) its messages itself.
        """

    def release(self, admitted: Admitted) -> None:
        """Runs once the call was admitted and the method returned, its response stream ended or the call was
        refused by :meth:`check` (also when gRPC drops the response stream of a cancelled call)."""


def gated(handler: Any, gate: CallGate[Any]) -> grpc.RpcMethodHandler:
    """``handler`` behind ``gate``, as a handler that takes a request stream whatever ``handler`` takes."""
    takes_stream = handler.request_streaming
    behavior = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary

    def argument(requests: Iterator[Any], admitted: Any, context: grpc.ServicerContext) -> Any:
        if takes_stream:
            return requests
        request = next(requests, None)
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request message")
        gate.check(admitted, request, context)
        return request

    options = {"request_deserializer": handler.request_deserializer,
               "response_serializer": handler.response_serializer}  # fmt: skip
    if handler.response_streaming:

        def streamed(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            admitted = gate.admit(context)
            try:
                yield from behavior(argument(requests, admitted, context), context)
            finally:
                gate.release(admitted)

        return grpc.stream_stream_rpc_method_handler(streamed, **options)

    def unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        admitted = gate.admit(context)
        try:
            return behavior(argument(requests, admitted, context), context)
        finally:
            gate.release(admitted)

    return grpc.stream_unary_rpc_method_handler(unary, **options)


__all__ = ["CallGate", "gated"]
