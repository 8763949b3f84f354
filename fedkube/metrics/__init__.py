"""Prometheus metric definitions shared by fedkube's processes.

One facade per process kind, each on a registry the process creates (no
global registry, nothing registered at import)::

    from fedkube.metrics import ServerMetrics, new_registry, serve_metrics

    registry = new_registry()                  # + process RSS/CPU and platform collectors
    metrics = ServerMetrics(registry, job="mnist", rounds_planned=10)
    server, port = serve_metrics(registry, 9090)
    metrics.round_completed(42.0, number=1)
    ...
    server.close()

docs/observability.md lists every metric with its labels.
"""

from typing import TYPE_CHECKING, Any

from fedkube.metrics.core import (
    ALLOWED_LABELS,
    OVERFLOW,
    CappedValues,
    MetricsServer,
    StateSet,
    add_process_collectors,
    metrics_port_from_env,
    new_registry,
    serve_metrics,
)
from fedkube.metrics.operator import OperatorMetrics
from fedkube.metrics.sidecar import SidecarMetrics

if TYPE_CHECKING:
    from fedkube.metrics.server import ServerMetrics


def __getattr__(name: str) -> Any:
    # ServerMetrics loads on first use: its label values come from fedkube.status, which needs pydantic, and the
    # sidecar imports this package and starts without pydantic (tests/unit/sidecar/test_startup_imports.py).
    if name == "ServerMetrics":
        from fedkube.metrics.server import ServerMetrics

        return ServerMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALLOWED_LABELS",
    "OVERFLOW",
    "CappedValues",
    "MetricsServer",
    "OperatorMetrics",
    "ServerMetrics",
    "SidecarMetrics",
    "StateSet",
    "add_process_collectors",
    "metrics_port_from_env",
    "new_registry",
    "serve_metrics",
]
