"""Fixtures: a real fedkube server on a localhost port, and fake sidecars to drive it.

Mutual TLS is on by default, as in the product (the session's job PKI, tests.support.tls); a test about
plaintext passes ``make_config(..., tls=False)``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedkube.security.settings import TlsSettings
from fedkube.server.app import FedkubeServer
from fedkube.server.config import JobSettings, ServerConfig, TransferSettings
from fedkube.transfer import endpoints
from fedkube.transfer.endpoints import ClientTls
from tests.integration.server.fakes import Behaviour, FakeSidecar
from tests.support.tls import NAMESPACE, session_pki

JOB = "job1"


def token_of(site: str) -> str:
    return f"token-of-{site}"


def make_config(
    clients: tuple[str, ...] = ("site-a", "site-b"),
    *,
    rounds: int = 1,
    min_clients: int | None = None,
    checkpoint_dir: Path | None = None,
    transfer: TransferSettings | None = None,
    tls: bool = True,
    **timeouts: Any,
) -> ServerConfig:
    settings = JobSettings(
        job=JOB,
        rounds=rounds,
        min_clients=min_clients if min_clients is not None else len(clients),
        clients=clients,
        model_source=timeouts.pop("model_source", "file"),
        model_path=timeouts.pop("model_path", "unused.npz"),
        round_timeout_s=timeouts.pop("round_timeout_s", 20.0),
        heartbeat_timeout_s=timeouts.pop("heartbeat_timeout_s", 5.0),
        registration_timeout_s=timeouts.pop("registration_timeout_s", 10.0),
        transfer=transfer
        or TransferSettings(chunk_bytes=64 * 1024, chunk_timeout_s=2.0, idle_timeout_s=4.0, max_attempts=3),
        strategy=timeouts.pop("strategy", "fedavg"),
        strategy_options=timeouts.pop("strategy_options", {}),
    )
    assert not timeouts, timeouts
    return ServerConfig(
        settings=settings,
        tokens={c: token_of(c).encode() for c in clients},
        grpc_port=0,
        status_port=0,
        checkpoint_dir=checkpoint_dir,
        bind_host="127.0.0.1",
        tls=session_pki().server_settings() if tls else TlsSettings.disabled(),
        namespace=NAMESPACE,
    )


def client_tls(srv: FedkubeServer, site: str) -> ClientTls | None:
    """``site``'s TLS towards ``srv``: the session PKI's certificate when the server runs TLS, else None."""
    return session_pki().client_tls(site) if srv.config.tls.enabled else None


class Harness:
    """A started server plus the fake sidecars of a test; everything is closed at the end."""

    def __init__(self) -> None:
        self.servers: list[FedkubeServer] = []
        self.sidecars: list[FakeSidecar] = []

    def server(self, config: ServerConfig, model: dict[str, np.ndarray] | None = None, **kw: Any) -> FedkubeServer:
        loader: Callable[[], dict[str, np.ndarray]] | None = (lambda: model) if model is not None else None
        srv = FedkubeServer(config, model_loader=loader, **kw)
        srv.start()
        self.servers.append(srv)
        return srv

    def sidecar(
        self,
        srv: FedkubeServer,
        site: str,
        behaviour: Behaviour,
        *,
        token: str | None = None,
        start: bool = True,
        **kw: Any,
    ) -> FakeSidecar:
        kw.setdefault("tls", client_tls(srv, site))
        sc = FakeSidecar(f"127.0.0.1:{srv.grpc_port}", srv.config.job, site, token or token_of(site), behaviour, **kw)
        self.sidecars.append(sc)
        return sc.start() if start else sc

    def close(self) -> None:
        for srv in self.servers:
            srv.request_stop("test ended")
            srv.wait(10)
            srv.shutdown(grace_s=0.5)
        for sc in self.sidecars:
            sc.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def grpc_channel(srv: FedkubeServer, site: str = "site-a") -> grpc.Channel:
    """A channel to ``srv``'s gRPC port as ``site``'s sidecar would open it (mutual TLS when the server runs it)."""
    return endpoints.channel(f"127.0.0.1:{srv.grpc_port}", [], client_tls(srv, site))


def dial_bulk(
    srv: FedkubeServer, site: str = "site-a", timeout_s: float = 5.0, host: str = "127.0.0.1"
) -> socket.socket:
    """A connection to ``srv``'s bulk port as ``site``'s sidecar would dial it (TLS done when the server runs it)."""
    address = f"[{host}]:{srv.bulk_port}" if ":" in host else f"{host}:{srv.bulk_port}"
    return endpoints.dial(address, timeout_s, client_tls(srv, site))


def rejected(srv: FedkubeServer, reason: str, plane: str | None = None) -> float:
    """``fedkube_server_rejected_connections_total`` for ``reason`` on ``plane`` (None: every plane)."""
    planes = ("grpc", "bulk", "status") if plane is None else (plane,)
    return sum(srv.metrics_registry.get_sample_value(
        "fedkube_server_rejected_connections_total", {"fljob": srv.config.job, "plane": p, "reason": reason}) or 0.0
        for p in planes)  # fmt: skip
