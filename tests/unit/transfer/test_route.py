"""The one place that chooses a transfer's path (fedkube.transfer.route)."""

from __future__ import annotations

import pytest

from fedkube.transfer import handoff, route
from fedkube.transfer.route import GRPC, Path, Route, choose_route, handoff_enabled


@pytest.fixture(params=[True, False], ids=["linux", "no-handoff-platform"])
def platform(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(handoff, "AVAILABLE", request.param)
    return bool(request.param)


def test_the_fastest_offered_path_wins(platform: bool) -> None:
    both = choose_route(bulk="127.0.0.1:1", handoff="@h")
    assert both == (Route(Path.HANDOFF, "@h") if platform else Route(Path.BULK, "127.0.0.1:1"))
    assert choose_route(bulk="127.0.0.1:1") == Route(Path.BULK, "127.0.0.1:1")
    assert choose_route(bulk="") == GRPC
    # A handoff alone (the sidecar's relay failed to start) is still taken where it works.
    assert choose_route(bulk="", handoff="@h") == (Route(Path.HANDOFF, "@h") if platform else GRPC)


def test_switched_off_paths_are_skipped(platform: bool) -> None:
    assert choose_route(bulk="127.0.0.1:1", handoff="@h", handoff_ok=False) == Route(Path.BULK, "127.0.0.1:1")
    # No bulk on this side (or it failed lately): gRPC, whatever the other side offers.
    assert choose_route(bulk="127.0.0.1:1", handoff="@h", bulk_ok=False) == GRPC
    assert handoff_enabled(False) is False
    assert handoff_enabled(True) is platform


def test_grpc_needs_no_address() -> None:
    assert route.GRPC.address == "" and route.GRPC.path is Path.GRPC
