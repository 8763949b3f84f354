"""Registries of every component after a few observations of every kind (shared by the metric and dashboard tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from fedkube.metrics import OperatorMetrics, ServerMetrics, SidecarMetrics, new_registry
from fedkube.status import Reason


def exercised() -> dict[str, CollectorRegistry]:
    """One registry per component after a few observations of every kind."""
    regs = {c: new_registry() for c in ("server", "sidecar", "operator")}
    s = ServerMetrics(regs["server"], "mnist", rounds_planned=3)
    s.round_started(1)
    s.clients({"Registered": 2, "Training": 1})
    s.transferred("to_clients", 1000, 0.5)
    s.transferred("from_clients", 400, 0.25)
    s.download_retry("ChunkTimeoutError")
    s.stalled("from_clients")
    s.aggregated(0.2)
    s.checkpointed(0.1)
    with s.timing_aggregation():
        pass
    s.model_size(4096)
    s.client_failed(Reason.EXITED_BEFORE_DOWNLOAD.value)
    s.connection_rejected("Unauthenticated")
    s.enrollment("enrolled")
    s.site_influence("site-a", claimed=1e6, weight=1000.0, norm=12.5, capped=True, clipped=True)
    s.privacy_spent(1.5)
    s.result_selected("site-a")
    s.round_metrics("evaluate", {"accuracy": 0.9})
    s.evaluated(2, 3)
    s.round_completed(12.0, number=1)
    c = SidecarMetrics(regs["sidecar"], "mnist", "site-a")
    c.upstream("connected")
    c.reconnected()
    c.heartbeat()
    c.relayed("to_trainer", 1000)
    c.relayed("to_server", 400)
    c.buffer_bytes(65536)
    c.trainer_state("Running")
    c.trainer_received(0.3)
    c.trainer_sent(0.6, 0.4)
    c.user_metric("loss", 0.25)
    o = OperatorMetrics(regs["operator"])
    o.job_phase("default", "mnist", "Running")
    o.reconcile_error("ApiException")
    o.reconcile_seconds("observe", 0.02)
    o.timeout_fired("PendingTimeout")
    return regs
