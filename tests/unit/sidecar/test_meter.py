"""RelayMeter: bytes held by live relayed streams, bytes relayed per direction."""

from __future__ import annotations

import pytest

from fedkube.sidecar.meter import Counted, RelayMeter


class _Upstream:
    def __init__(self, items: list[bytes]) -> None:
        self.items = items
        self.cancelled = False

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.items)

    def cancel(self) -> None:
        self.cancelled = True


def _meter() -> tuple[RelayMeter, dict[str, int], list[int]]:
    relayed: dict[str, int] = {}
    held: list[int] = []

    def on_relayed(direction: str, n: int) -> None:
        relayed[direction] = relayed.get(direction, 0) + n

    return RelayMeter(on_relayed, held.append), relayed, held


def test_held_bytes_rise_on_read_fall_on_send_and_close() -> None:
    meter, relayed, held = _meter()
    a, b = meter.stream("to_trainer"), meter.stream("to_server")
    a.read(100)
    b.read(50)
    a.read(30)
    assert meter.held == 180 and held[-1] == 180
    a.sent(100)
    assert meter.held == 80 and relayed == {"to_trainer": 100}
    a.close()  # its 30 queued bytes were dropped
    assert meter.held == 50
    a.close()
    a.read(7)  # a closed stream counts nothing
    assert meter.held == 50
    b.sent(50)
    b.close()
    assert meter.held == 0 and held[-1] == 0
    assert relayed == {"to_trainer": 100, "to_server": 50}


def test_counted_counts_reads_and_passes_cancel() -> None:
    meter, _, _ = _meter()
    up = _Upstream([b"x" * 10, b"y" * 5])
    stream = meter.stream("to_trainer")
    it = Counted(up, stream, len)
    assert next(it) == b"x" * 10
    assert meter.held == 10
    assert list(it) == [b"y" * 5]
    assert meter.held == 15
    it.cancel()
    assert up.cancelled
    with pytest.raises(StopIteration):
        next(it)
