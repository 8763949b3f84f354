"""Byte accounting of the sidecar's relays: bytes relayed per direction and bytes held right now.

A relay reads chunks ahead into a bounded window (``relay_chunks``); what sits
in that window is what the sidecar holds in memory for transfers. Each relayed
stream gets a :class:`StreamMeter`: ``read`` when a chunk enters the window,
``sent`` when it left downstream, ``close`` when the stream ends (chunks still
queued by a cancelled stream are dropped, so they stop counting as held).

The bulk paths pump bytes through one fixed buffer per connection instead of a
window of chunks; they report those buffers with :meth:`RelayMeter.fixed`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fedkube.transfer.bulk import BulkHandoff, BulkRelay
from fedkube.transfer.endpoints import ClientTls
from fedkube.transfer.relay import Counted, RelayServicer

__all__ = ["Counted", "RelayMeter", "StreamMeter", "metered_bulk_handoff", "metered_bulk_relay", "metered_relay"]


class RelayMeter:
    """Sums the bytes held by every live relayed stream and reports each change.

    ``on_relayed(direction, nbytes)`` is called for bytes that went downstream;
    ``on_buffer(total)`` with the bytes held across all streams after each change.
    """

    def __init__(self, on_relayed: Callable[[str, int], None], on_buffer: Callable[[int], None]) -> None:
        self._on_relayed = on_relayed
        self._on_buffer = on_buffer
        self._lock = threading.Lock()
        self._held = 0
        self._fixed: dict[str, int] = {}

    @property
    def held(self) -> int:
        """Bytes read from upstream and not yet sent downstream, plus the fixed buffers in use."""
        with self._lock:
            return self._held

    def fixed(self, holder: str, nbytes: int) -> None:
        """``holder`` (a bulk relay, one bulk push) now holds ``nbytes`` of buffers; 0 when it let go."""
        with self._lock:
            delta = nbytes - self._fixed.pop(holder, 0)
            if nbytes:
                self._fixed[holder] = nbytes
            if delta:
                self._held += delta
                self._on_buffer(self._held)

    def relayed(self, direction: str, nbytes: int) -> None:
        """``nbytes`` went downstream in ``direction`` outside any :class:`StreamMeter` (the bulk paths)."""
        self._on_relayed(direction, nbytes)

    def stream(self, direction: str) -> StreamMeter:
        """A meter for one relayed stream going ``direction``."""
        return StreamMeter(self, direction)

    def _change(self, delta: int) -> None:
        # Reported under the lock so two streams cannot publish totals out of order; the callback only sets a gauge.
        with self._lock:
            self._held += delta
            self._on_buffer(self._held)

    def _relayed(self, direction: str, nbytes: int) -> None:
        self._on_relayed(direction, nbytes)


class StreamMeter:
    """Accounting of one relayed stream (see :class:`RelayMeter`): a relay's ``StreamHook``."""

    def __init__(self, meter: RelayMeter, direction: str) -> None:
        self._meter = meter
        self.direction = direction
        self._lock = threading.Lock()
        self._held = 0
        self._closed = False

    def read(self, nbytes: int) -> None:
        """A chunk of ``nbytes`` was read from upstream into the relay window."""
        with self._lock:
            if self._closed:
                return
            self._held += nbytes
        self._meter._change(nbytes)

    def sent(self, nbytes: int) -> None:
        """A chunk of ``nbytes`` left downstream."""
        with self._lock:
            release = min(nbytes, self._held) if not self._closed else 0
            self._held -= release
        if release:
            self._meter._change(-release)
        self._meter._relayed(self.direction, nbytes)

    def close(self) -> None:
        """The stream ended: whatever it still held is gone. Safe to call more than once."""
        with self._lock:
            release, self._held, self._closed = self._held, 0, True
        if release:
            self._meter._change(-release)


def metered_relay(upstream: Any, *, window_chunks: int, meter: RelayMeter, direction: str) -> RelayServicer:
    """A :class:`~fedkube.transfer.relay.RelayServicer` whose Fetch streams are counted by ``meter``.

    Each Fetch gets its own :class:`StreamMeter` through the relay's public
    ``on_stream`` hook; sizes are whole chunk messages (the payload plus a few
    bytes of framing), since the relay forwards them without parsing.
    """
    return RelayServicer(upstream, window_chunks=window_chunks, on_stream=lambda: meter.stream(direction))


def metered_bulk_relay(
    upstream_address: str, *, site: str, token: str, meter: RelayMeter, direction: str, tls: ClientTls | None = None,
    host: str = "127.0.0.1",
) -> BulkRelay:
    """A :class:`~fedkube.transfer.bulk.BulkRelay` whose bytes and buffers are counted by ``meter``.

    Through the relay's byte hooks: every pumped piece counts as relayed in
    ``direction`` (the server's answer as it is, framing included, like
    :func:`metered_relay`), and the buffers it holds are reported as they
    change, so the gauge drops back when a transfer is over.
    """
    holder = f"bulk relay {direction}"
    return BulkRelay(
        upstream_address, site=site, token=token, host=host, on_bytes=lambda n: meter.relayed(direction, n),
        on_buffer=lambda n: meter.fixed(holder, n), tls=tls,
    )  # fmt: skip


def metered_bulk_handoff(
    upstream_address: str, *, site: str, token: str, meter: RelayMeter, direction: str
) -> BulkHandoff:
    """A :class:`~fedkube.transfer.bulk.BulkHandoff` whose bytes (what the trainer reports reading) go to ``meter``."""
    return BulkHandoff(upstream_address, site=site, token=token, on_bytes=lambda n: meter.relayed(direction, n))
