"""Fixtures: a real DownloadService behind a real gRPC server on a localhost port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from fedkube.transfer import DownloadService, insecure_channel, serve


@dataclass
class Publisher:
    service: DownloadService
    server: grpc.Server
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    service = DownloadService("server", chunk_bytes=64 << 10)
    server, port = serve(service, max_workers=24)
    yield Publisher(service, server, port)
    server.stop(grace=None).wait(5)
    service.close()


@pytest.fixture
def channel(publisher: Publisher) -> Iterator[grpc.Channel]:
    ch = insecure_channel(publisher.address)
    yield ch
    ch.close()
