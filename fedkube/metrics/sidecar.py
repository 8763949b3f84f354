"""Metrics of the job-cell sidecar, including what its trainer reports through it.

Trainers are user code and are never scraped: the trainer SDK reports its
timings and ``log_metric()`` values to the sidecar, which exports them here as
``fedkube_trainer_*`` series labelled with the sidecar's own job and site.

User metric names are the one label whose values come from user code, so they
are capped: the first :data:`USER_METRIC_NAMES` distinct names each get a
series; any later new name is counted under ``name="_other"`` (in
``fedkube_trainer_metric_reports_total`` only: a "last value" of unrelated
metrics mixed together would mean nothing) and logged once. Names longer than
:data:`USER_METRIC_NAME_LEN` characters are truncated.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedkube.metrics.core import (
    OVERFLOW,
    CappedValues,
    StateSet,
    add_process_collectors,
    check_labels,
    component_info,
    one_of,
)
from fedkube.protocol import DOWNLOAD_WAIT_SECONDS, RECEIVE_SECONDS, RESERVED_METRIC_PREFIX, SEND_SECONDS

#: States of the sidecar's control stream to the server.
UPSTREAM_STATES = ("connecting", "connected", "backoff", "stopped")
#: Trainer phases as the wire names them (fedkube.wire.v1 TrainerPhase), "Unknown" before the first report.
TRAINER_STATES = ("Unknown", "Starting", "Running", "Finished", "Failed", "Exited")
#: ``direction`` of relayed chunk streams: the global model down to the trainer, results up to the server.
DIRECTIONS = ("to_trainer", "to_server")
# The trainer SDK's own timings arrive under fedkube.protocol's reserved metric names.

log = logging.getLogger(__name__)

USER_METRIC_NAMES = 32
USER_METRIC_NAME_LEN = 64

#: Receiving a model, sending a result or waiting for the server to pull it: milliseconds to hours.
TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600)


class SidecarMetrics:
    """The sidecar's metrics for one site of one FL job, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, job: str, site: str, *,
                 clock: Callable[[], float] = time.monotonic, user_metric_names: int = USER_METRIC_NAMES) -> None:
        if not job or not site:
            raise ValueError(f"SidecarMetrics needs the job and site names (FEDKUBE_JOB, FEDKUBE_SITE); "
                             f"got job={job!r} site={site!r}")
        self.job, self.site = job, site
        self._clock = clock
        add_process_collectors(registry)
        component_info(registry, "sidecar", job, site)
        js = check_labels(["fljob", "site"])
        self._labels = {"fljob": job, "site": site}
        self._connected = Gauge("fedkube_sidecar_upstream_connected",
                                "1 while the control stream to the server is up, else 0.", js, registry=registry)
        self._upstream = StateSet(
            Gauge("fedkube_sidecar_upstream_state", "State of the control stream to the server (1 = current).",
                  check_labels(["fljob", "site", "state"]), registry=registry),
            "upstream", UPSTREAM_STATES, self._labels)
        self._reconnects = Counter("fedkube_sidecar_reconnects_total",
                                   "Times the control stream was re-established after a loss.", js, registry=registry)
        self._local_rejected = Counter(
            "fedkube_sidecar_rejected_local_connections_total",
            "Connections to the sidecar's own endpoints refused, by reason (PeerUidMismatch: a process of another "
            "user on the trainer port, bulk relay or handoff; Status*/Metrics*: the status or /metrics port's "
            "connection cap or deadline).", check_labels(["fljob", "site", "reason"]),
            registry=registry)
        self._relayed = Counter("fedkube_sidecar_relayed_bytes_total", "Chunk bytes relayed, by direction.",
                                check_labels(["fljob", "site", "direction"]), registry=registry)
        self._buffer = Gauge("fedkube_sidecar_relay_buffer_bytes",
                             "Bytes of chunks held by the relay right now (bounded; never a whole model).",
                             js, registry=registry)
        self._trainer = StateSet(
            Gauge("fedkube_sidecar_trainer_state", "Phase of this site's trainer (1 = current).",
                  check_labels(["fljob", "site", "state"]), registry=registry),
            "trainer", TRAINER_STATES, self._labels)
        self._last_heartbeat: float | None = None
        self._hb_lock = threading.Lock()
        Gauge("fedkube_sidecar_heartbeat_age_seconds",
              "Seconds since the last heartbeat reached the server (0 before the first one).",
              js, registry=registry).labels(**self._labels).set_function(self._heartbeat_age)

        self._receive = Histogram("fedkube_trainer_receive_seconds",
                                  "Trainer: time from asking for a task to holding its tensors.", js,
                                  buckets=TRANSFER_BUCKETS, registry=registry)
        self._send = Histogram("fedkube_trainer_send_seconds",
                               "Trainer: time spent in send(), download gating included.", js,
                               buckets=TRANSFER_BUCKETS, registry=registry)
        self._gating = Histogram("fedkube_trainer_download_wait_seconds",
                                 "Trainer: time send() waited for the server to pull the result.", js,
                                 buckets=TRANSFER_BUCKETS, registry=registry)
        self._user_value = Gauge("fedkube_trainer_metric", "Trainer: last value logged with log_metric(), by name.",
                                 check_labels(["fljob", "site", "name"]), registry=registry)
        self._user_reports = Counter("fedkube_trainer_metric_reports_total",
                                     f"Trainer: log_metric() calls by name; names past the first "
                                     f"{user_metric_names} count as {OVERFLOW}.",
                                     check_labels(["fljob", "site", "name"]), registry=registry)
        self._user_names = CappedValues("user metric name", user_metric_names)

        self._connected.labels(**self._labels).set(0)
        self._upstream.set("connecting")
        self._trainer.set("Unknown")
        self._reconnects.labels(**self._labels)
        # fedkube.transfer.peercred.PEER_UID_MISMATCH, spelled out: importing the transfer layer here would
        # bring grpc into the operator, which imports fedkube.metrics.
        self._local_rejected.labels(**self._labels, reason="PeerUidMismatch")
        self._buffer.labels(**self._labels).set(0)
        for d in DIRECTIONS:
            self._relayed.labels(**self._labels, direction=d)
        for h in (self._receive, self._send, self._gating):
            h.labels(**self._labels)

    # --- upstream -------------------------------------------------------------

    def upstream(self, state: str) -> None:
        """The control stream entered ``state`` (one of :data:`UPSTREAM_STATES`)."""
        self._upstream.set(state)
        self._connected.labels(**self._labels).set(1 if state == "connected" else 0)

    def reconnected(self) -> None:
        """The control stream came back after a loss (not counted for the first connection)."""
        self._reconnects.labels(**self._labels).inc()

    def local_connection_rejected(self, reason: str) -> None:
        """A pod-local endpoint refused a connection (``reason``: see :mod:`fedkube.transfer.peercred`)."""
        self._local_rejected.labels(**self._labels, reason=reason).inc()

    def heartbeat(self) -> None:
        """A heartbeat was delivered to the server now."""
        with self._hb_lock:
            self._last_heartbeat = self._clock()

    def _heartbeat_age(self) -> float:
        with self._hb_lock:
            last = self._last_heartbeat
        return 0.0 if last is None else max(0.0, self._clock() - last)

    # --- relay -----------------------------------------------------------------

    def relayed(self, direction: str, nbytes: int) -> None:
        """``nbytes`` of chunk data were relayed in ``direction``."""
        one_of(direction, DIRECTIONS, "relay direction")
        self._relayed.labels(**self._labels, direction=direction).inc(nbytes)

    def buffer_bytes(self, nbytes: int) -> None:
        """The relay now holds ``nbytes`` of chunk data."""
        self._buffer.labels(**self._labels).set(nbytes)

    def trainer_state(self, state: str) -> None:
        """The trainer reported phase ``state`` (one of :data:`TRAINER_STATES`)."""
        self._trainer.set(state)

    # --- reported by the trainer ---------------------------------------------

    def trainer_received(self, seconds: float) -> None:
        """The trainer took ``seconds`` to receive one task's tensors."""
        self._receive.labels(**self._labels).observe(seconds)

    def trainer_sent(self, seconds: float, gating_wait_s: float | None = None) -> None:
        """One ``send()`` took ``seconds``, of which ``gating_wait_s`` waiting for the server's download."""
        self._send.labels(**self._labels).observe(seconds)
        if gating_wait_s is not None:
            self.trainer_download_wait(gating_wait_s)

    def trainer_download_wait(self, seconds: float) -> None:
        """``send()`` waited ``seconds`` for the server to pull a result (download gating)."""
        self._gating.labels(**self._labels).observe(seconds)

    def record_report(self, values: Mapping[str, float]) -> dict[str, float]:
        """Record one ``MetricReport`` from the trainer; return the user metrics to forward to the server.

        Values under the reserved names (:data:`RECEIVE_SECONDS`, ...) feed the
        timing histograms; other names starting with :data:`RESERVED_METRIC_PREFIX`
        are dropped (reserved for future SDK timings, so an older sidecar does
        not forward them as user metrics); everything else is a user metric.
        The trainer is user code: a timing that is negative or not finite is
        skipped with a debug line, never raised.
        """
        timings = {RECEIVE_SECONDS: self.trainer_received, SEND_SECONDS: self.trainer_sent,
                   DOWNLOAD_WAIT_SECONDS: self.trainer_download_wait}
        user: dict[str, float] = {}
        for name, value in values.items():
            if not name.startswith(RESERVED_METRIC_PREFIX):
                self.user_metric(name, value)
                user[name] = value
            elif name in timings and math.isfinite(value) and value >= 0:
                timings[name](value)
            else:
                log.debug("job %s site %s: ignored trainer report %s=%r", self.job, self.site, name, value)
        return user

    def user_metric(self, name: str, value: float) -> str:
        """Record a ``log_metric(name, value)`` call; returns the label value used (``_other`` past the cap)."""
        label = self._user_names.admit(name[:USER_METRIC_NAME_LEN])
        self._user_reports.labels(**self._labels, name=label).inc()
        if label != OVERFLOW:
            self._user_value.labels(**self._labels, name=label).set(value)
        return label
