"""The console filter of `fedkube run`: routine log lines out, everything else in."""

from __future__ import annotations

import pytest

from fedkube.runtime.process import QuietSink


class Collect:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def emit(self, prefix: str, line: str) -> None:
        self.lines.append((prefix, line))


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("2026-11-22 04:18:29,220 INFO fedkube.server.http: status endpoint listening", False),
        ("2026-11-22T04:18:29.220Z DEBUG fedkube.sidecar.app [sidecar job=j] hello", False),
        ('{"time": "2026-11-22T04:18:29.220Z", "level": "INFO", "logger": "fedkube.server", "msg": "x"}', False),
        ("2026-11-22 04:18:29,220 WARNING fedkube.sidecar.upstream: server not reachable, retrying", True),
        ('{"time": "2026-11-22T04:18:29.220Z", "level": "ERROR", "logger": "fedkube.server", "msg": "x"}', True),
        ("site site-a round 3: global model loss 0.0136 -> local loss 0.0107", True),  # the user's print
        ("Traceback (most recent call last):", True),
        ("INFO is a word a user may print", True),
    ],
)
def test_routine_log_lines_are_filtered_and_the_rest_passes(line: str, shown: bool) -> None:
    inner = Collect()
    QuietSink(inner).emit("site-a trainer", line)
    assert inner.lines == ([("site-a trainer", line)] if shown else [])
