"""A gRPC channel whose new calls use a site's newest TLS credentials (:mod:`fedkube.transfer.reload`).

gRPC fixes a channel's credentials when the channel is made, and its reconnects reuse them. After a renewal a
new channel is made for the new credentials and every new call goes there; calls already running stay on the
channel they started on (a renewal must not cut the site's Connect stream or a transfer). A replaced channel is
kept, not closed: closing it would cancel those calls, and once it has none gRPC's client idle timeout (30 min
by default) drops its connection. Renewals come days apart, so the replaced channels stay few.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from fedkube.transfer.reload import ReloadingCredentials

Factory = Callable[[grpc.ChannelCredentials], grpc.Channel]


class ReloadingChannel(grpc.Channel):
    """Routes each call to the channel made for the credentials current at the call's start."""

    def __init__(self, credentials: ReloadingCredentials, factory: Factory) -> None:
        self._credentials = credentials
        self._factory = factory
        self._lock = threading.Lock()
        loaded = credentials.current()
        self._generation = loaded.generation
        self._channel = factory(loaded.grpc_credentials)
        self._retired: list[grpc.Channel] = []

    def current(self) -> tuple[grpc.Channel, int]:
        """The channel for a new call, made anew when the credentials were reloaded since the last one."""
        loaded = self._credentials.current()
        with self._lock:
            if loaded.generation != self._generation:
                self._retired.append(self._channel)
                self._channel, self._generation = self._factory(loaded.grpc_credentials), loaded.generation
            return self._channel, self._generation

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        self.current()[0].subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            channels = [self._channel, *self._retired]
        for channel in channels:
            channel.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Call(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Call(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Call(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Call(self, "stream_stream", method, args, kwargs)

    def close(self) -> None:
        with self._lock:
            channels, self._retired = [self._channel, *self._retired], []
        for channel in channels:
            channel.close()

    def __enter__(self) -> ReloadingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Call:
    """A multi-callable (as a stub holds one) bound to the channel of the credentials current at each call."""

    def __init__(self, owner: ReloadingChannel, kind: str, method: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:  # fmt: skip
        self._owner, self._kind, self._method, self._args, self._kwargs = owner, kind, method, args, kwargs
        self._lock = threading.Lock()
        self._generation = -1
        self._callable: Any = None

    def _target(self) -> Any:
        channel, generation = self._owner.current()
        with self._lock:
            if generation != self._generation:
                self._callable = getattr(channel, self._kind)(self._method, *self._args, **self._kwargs)
                self._generation = generation
            return self._callable

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._target().with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._target().future(*args, **kwargs)


__all__ = ["ReloadingChannel"]
