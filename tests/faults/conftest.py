"""Fixtures of the fault-injection suite (helpers that need no fixture live in ``tests.faults.support``).

``operator_cluster`` is the e2e suite's emulated cluster (``tests/e2e``: the
real kopf operator, the emulated Kubernetes API, pods run as real fedkube
processes) with the operator's metrics switched on and served on a real
/metrics endpoint, as ``fedkube operator`` does with FEDKUBE_METRICS_PORT.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import tests.e2e.conftest as e2e
from fedkube.metrics import OperatorMetrics, new_registry, serve_metrics
from fedkube.operator import handlers
from fedkube.runtime.resolver import LOCAL_HOST
from tests.e2e.conftest import fl  # noqa: F401  (the e2e cluster fixture, used through operator_cluster)


@dataclass
class OperatorCluster:
    """The e2e cluster (``fl``) and the URL of its operator's /metrics."""

    fl: e2e.FL
    metrics_url: str


@pytest.fixture
def operator_cluster(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[OperatorCluster]:
    registry = new_registry()
    metrics = OperatorMetrics(registry)
    start_operator = e2e.running_operator

    def with_metrics(url: str, kopf_registry: Any, *, memo: Any = None, **kw: Any) -> Any:
        # The operator reads its metrics from the memo (handlers.Memo.METRICS), as fedkube.operator.main sets it.
        memo[handlers.Memo.METRICS] = metrics
        return start_operator(url, kopf_registry, memo=memo, **kw)

    monkeypatch.setattr(e2e, "running_operator", with_metrics)
    server, port = serve_metrics(registry, 0, addr=LOCAL_HOST)
    try:
        cluster: e2e.FL = request.getfixturevalue("fl")
        yield OperatorCluster(cluster, f"http://{LOCAL_HOST}:{port}/metrics")
    finally:
        server.close()
