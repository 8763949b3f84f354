"""Metrics of the FL server (aggregator): rounds, clients, failures, transfers, aggregation, checkpoints.

Wiring into the server is one object per process::

    registry = new_registry()
    metrics = ServerMetrics(registry, job, rounds_planned=spec.rounds)
    serve_metrics(registry, port)
    ...
    metrics.round_started(n); ...; metrics.round_completed(seconds, number=n)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedkube.metrics.core import (
    OVERFLOW,
    CappedValues,
    add_process_collectors,
    check_labels,
    component_info,
    one_of,
)
from fedkube.protocol import PORT_REFUSALS
from fedkube.security.contexts import TLS_REFUSALS
from fedkube.status import ClientState, Reason

#: Client states, as the server's registry moves them (defined once, in fedkube.status).
CLIENT_STATES = tuple(s.value for s in ClientState)

#: ``direction`` of server transfers: the global model going out, results coming in.
DIRECTIONS = ("to_clients", "from_clients")

#: Round durations range from a second (tests, tiny models) to many hours (LLM fine-tuning on slow links).
ROUND_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600)
#: Aggregating or checkpointing takes milliseconds for small models, minutes for tens of GB.
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)

#: ``plane`` of a refused connection: the gRPC port, the bulk port, the status port, the /metrics port.
PLANES = ("grpc", "bulk", "status", "metrics")

# Failure reasons beyond fedkube.status.Reason get their own series up to this many; the rest are _other.
EXTRA_REASONS = 16

#: ``reason`` of a result whose influence was bounded (fedkube.server.influence).
BOUNDS = ("capped", "clipped", "unchanged")
#: ``kind`` of an aggregated round metric: a training round's results, or an evaluation of the global model.
METRIC_KINDS = ("train", "evaluate")
# Trainers name their metrics freely: the first this many names get series, the rest are not exported.
MAX_METRIC_SERIES = 32
# Only the spec's sites can deliver a result (the server refuses any other), so the site label is bounded by the
# spec; this cap is a second line behind it.
MAX_SITE_SERIES = 1024


class ServerMetrics:
    """The server's metrics for one FL job, registered on ``registry``.

    Also puts the process and platform collectors on the registry (once) and
    exports ``fedkube_component_info{component="server"}``.
    """

    def __init__(self, registry: CollectorRegistry, job: str, *, rounds_planned: int | None = None) -> None:
        if not job:
            raise ValueError("ServerMetrics needs the FL job's name (FEDKUBE_JOB); got an empty string")
        self.job = job
        add_process_collectors(registry)
        component_info(registry, "server", job)
        j = check_labels(["fljob"])
        self._rounds = Counter("fedkube_server_rounds_completed_total",
                               "Rounds aggregated and checkpointed.", j, registry=registry)
        self._round_seconds = Histogram("fedkube_server_round_seconds",
                                        "Wall time of a round, from sending tasks to the aggregate.", j,
                                        buckets=ROUND_BUCKETS, registry=registry)
        self._current = Gauge("fedkube_server_current_round",
                              "Round in progress (the last completed one between rounds); 0 before round 1.",
                              j, registry=registry)
        self._last_done = Gauge("fedkube_server_last_completed_round",
                                "Number of the last round completed, across server restarts (resumed jobs "
                                "continue from their checkpoint); 0 before round 1.", j, registry=registry)
        self._last_done_value = 0
        self._last_done_lock = threading.Lock()
        self._planned = Gauge("fedkube_server_rounds_planned", "Rounds the job runs in total (spec.rounds).",
                              j, registry=registry)
        self._clients = Gauge("fedkube_server_clients", "Clients of the job by state.",
                              check_labels(["fljob", "state"]), registry=registry)
        self._failures = Counter("fedkube_server_client_failures_total",
                                 "Clients failed or excluded (for a round or the job), by reason.",
                                 check_labels(["fljob", "reason"]), registry=registry)
        self._bytes = Counter("fedkube_server_transfer_bytes_total",
                              "Verified tensor bytes transferred (each pull of a result counts), by direction.",
                              check_labels(["fljob", "direction"]), registry=registry)
        self._seconds = Counter("fedkube_server_transfer_seconds_total",
                                "Wall time of finished tensor transfers, by direction.",
                                check_labels(["fljob", "direction"]), registry=registry)
        self._retries = Counter("fedkube_server_download_retries_total",
                                "Result chunk fetches retried after a retryable failure, by error kind.",
                                check_labels(["fljob", "reason"]), registry=registry)
        self._stalls = Counter("fedkube_server_stalls_total",
                               "Transfers that made no progress for the idle timeout, by direction.",
                               check_labels(["fljob", "direction"]), registry=registry)
        self._aggregation = Histogram("fedkube_server_aggregation_seconds",
                                      "Time spent folding results into the aggregate and applying the strategy.",
                                      j, buckets=STEP_BUCKETS, registry=registry)
        self._checkpoint = Histogram("fedkube_server_checkpoint_seconds", "Time to write one round's checkpoint.",
                                     j, buckets=STEP_BUCKETS, registry=registry)
        self._model_bytes = Gauge("fedkube_server_model_bytes", "Size of the global model's tensors in bytes.",
                                  j, registry=registry)
        self._rejected = Counter("fedkube_server_rejected_connections_total",
                                 "Calls and connections refused before any effect (a TLS handshake or certificate, "
                                 "a bad token, an unknown site, a bad message, a port limit), by port and reason.",
                                 check_labels(["fljob", "plane", "reason"]), registry=registry)
        self._enrollments = Counter("fedkube_server_enrollments_total",
                                    "Enrollment and renewal requests of remote sites by outcome (enrolled, renewed, "
                                    "or why one was refused).", check_labels(["fljob", "reason"]), registry=registry)
        s = check_labels(["fljob", "site"])
        self._site_weight = Gauge("fedkube_server_site_weight",
                                  "Weight the site's last result was averaged with (after spec.strategy.weighting "
                                  "and maxExamplesPerSite).", s, registry=registry)
        self._site_claimed = Gauge("fedkube_server_site_claimed_examples",
                                   "num_examples the site's last result claimed.", s, registry=registry)
        self._site_norm = Gauge("fedkube_server_site_update_norm",
                                "L2 norm of the site's last update (result minus global model) before clipping; "
                                "measured only with spec.strategy.clipNorm.", s, registry=registry)
        self._bounded = Counter("fedkube_server_bounded_results_total",
                                "Results whose influence was bounded or that did not move, by site and reason "
                                "(capped: num_examples above maxExamplesPerSite; clipped: update norm above "
                                "clipNorm; unchanged: a zero update).",
                                check_labels(["fljob", "site", "reason"]), registry=registry)
        self._epsilon = Gauge("fedkube_server_privacy_epsilon_spent",
                              "Central DP: epsilon spent by the rounds so far (spec.strategy.privacy, at its "
                              "targetDelta).", j, registry=registry)
        self._selected = Counter("fedkube_server_selected_results_total",
                                 "Rounds in which a selecting strategy (krum) used the site's result.",
                                 s, registry=registry)
        self._round_metric = Gauge("fedkube_server_round_metric",
                                   "The last aggregated value of a trainer metric (mean weighted by num_examples), "
                                   "by name and phase: train (a training round's results) or evaluate "
                                   "(spec.evaluation).", check_labels(["fljob", "phase", "name"]), registry=registry)
        self._evaluated = Gauge("fedkube_server_last_evaluated_round",
                                "Training round after which the global model was last evaluated (spec.evaluation).",
                                j, registry=registry)
        self._evaluation_sites = Gauge("fedkube_server_evaluation_sites",
                                       "Sites whose results the last evaluation averaged.", j, registry=registry)
        self._metric_names = CappedValues("metric name", MAX_METRIC_SERIES)
        self._sites = CappedValues("site", MAX_SITE_SERIES)
        self._reasons = CappedValues("failure reason", EXTRA_REASONS, known=(r.value for r in Reason))
        self._retry_kinds = CappedValues("retry reason", EXTRA_REASONS)
        self._reject_reasons = CappedValues("rejection reason", EXTRA_REASONS, known=PORT_REFUSALS + TLS_REFUSALS)
        # Series that exist from the start read 0 instead of "no data" on the dashboard.
        self._rounds.labels(fljob=job)
        for h in (self._round_seconds, self._aggregation, self._checkpoint):
            h.labels(fljob=job)
        self._current.labels(fljob=job).set(0)
        self._last_done.labels(fljob=job).set(0)
        for d in DIRECTIONS:
            self._bytes.labels(fljob=job, direction=d)
            self._seconds.labels(fljob=job, direction=d)
            self._stalls.labels(fljob=job, direction=d)
        for reason in Reason:  # the documented reasons are a fixed, bounded set
            self._failures.labels(fljob=job, reason=reason.value)
        self.clients({})
        if rounds_planned is not None:
            self.rounds_planned(rounds_planned)

    def rounds_planned(self, rounds: int) -> None:
        """Record how many rounds the job runs."""
        self._planned.labels(fljob=self.job).set(rounds)

    def round_started(self, number: int) -> None:
        """Round ``number`` (1-based) started; every round before it is complete (also after a resume)."""
        self._current.labels(fljob=self.job).set(number)
        self._set_last_done(number - 1)

    def resumed_after_last_round(self, number: int) -> None:
        """The server resumed after round ``number``, the job's last: no round starts, the job's progress shows."""
        self._current.labels(fljob=self.job).set(number)
        self._set_last_done(number)

    def round_completed(self, duration_s: float, *, number: int) -> None:
        """Round ``number`` was aggregated and its checkpoint handed to the background writer after ``duration_s`` s.

        The write itself is timed by ``fedkube_server_checkpoint_duration_seconds``.

        ``fedkube_server_rounds_completed_total`` counts rounds this process
        completed (a counter restarts with the process, which ``increase()``
        handles); ``fedkube_server_last_completed_round`` is the job's progress.
        """
        self._rounds.labels(fljob=self.job).inc()
        self._round_seconds.labels(fljob=self.job).observe(duration_s)
        self._set_last_done(number)

    def _set_last_done(self, number: int) -> None:
        # Only forward: a late or repeated call must not make progress go backwards.
        with self._last_done_lock:
            if number > self._last_done_value:
                self._last_done_value = number
                self._last_done.labels(fljob=self.job).set(number)

    def clients(self, counts: Mapping[str, int]) -> None:
        """Set the number of clients in each state; states missing from ``counts`` are set to 0."""
        for state in counts:
            one_of(state, CLIENT_STATES, "client state")
        for state in CLIENT_STATES:
            self._clients.labels(fljob=self.job, state=state).set(counts.get(state, 0))

    def client_failed(self, reason: str) -> None:
        """A client failed or was excluded, with a machine-readable ``reason`` (fedkube.status.Reason)."""
        self._failures.labels(fljob=self.job, reason=self._reasons.admit(reason)).inc()

    def transferred(self, direction: str, nbytes: int, seconds: float) -> None:
        """A transfer in ``direction`` finished: ``nbytes`` verified bytes in ``seconds`` of wall time."""
        one_of(direction, DIRECTIONS, "transfer direction")
        if nbytes < 0 or seconds < 0:
            raise ValueError(f"transferred() needs nbytes >= 0 and seconds >= 0, got {nbytes}, {seconds}")
        self._bytes.labels(fljob=self.job, direction=direction).inc(nbytes)
        self._seconds.labels(fljob=self.job, direction=direction).inc(seconds)

    def download_retry(self, reason: str) -> None:
        """A result fetch is retried; ``reason`` names the error kind (e.g. its class name)."""
        self._retries.labels(fljob=self.job, reason=self._retry_kinds.admit(reason)).inc()

    def stalled(self, direction: str) -> None:
        """A transfer in ``direction`` hit its idle timeout."""
        one_of(direction, DIRECTIONS, "transfer direction")
        self._stalls.labels(fljob=self.job, direction=direction).inc()

    def aggregated(self, seconds: float) -> None:
        """One round's aggregation took ``seconds``."""
        self._aggregation.labels(fljob=self.job).observe(seconds)

    def checkpointed(self, seconds: float) -> None:
        """One checkpoint write took ``seconds``."""
        self._checkpoint.labels(fljob=self.job).observe(seconds)

    @contextlib.contextmanager
    def timing_aggregation(self) -> Iterator[None]:
        """Observe the block's wall time as one aggregation (also when it raises)."""
        with self._aggregation.labels(fljob=self.job).time():
            yield

    @contextlib.contextmanager
    def timing_checkpoint(self) -> Iterator[None]:
        """Observe the block's wall time as one checkpoint write (also when it raises)."""
        with self._checkpoint.labels(fljob=self.job).time():
            yield

    def model_size(self, nbytes: int) -> None:
        """The global model's size in bytes."""
        self._model_bytes.labels(fljob=self.job).set(nbytes)

    def site_influence(self, site: str, *, claimed: float, weight: float, norm: float | None, capped: bool,
                       clipped: bool) -> None:  # fmt: skip
        """How much ``site``'s result counted in the round that just took it (fedkube.server.influence)."""
        label = self._sites.admit(site)
        self._site_claimed.labels(fljob=self.job, site=label).set(claimed)
        self._site_weight.labels(fljob=self.job, site=label).set(weight)
        if norm is not None:
            self._site_norm.labels(fljob=self.job, site=label).set(norm)
        for bound, hit in zip(BOUNDS, (capped, clipped, norm == 0.0), strict=True):
            if hit:
                self._bounded.labels(fljob=self.job, site=label, reason=bound).inc()

    def enrollment(self, outcome: str) -> None:
        """An enrollment-port request ended with ``outcome`` (a fixed set: fedkube.server.enrollment)."""
        self._enrollments.labels(fljob=self.job, reason=outcome).inc()

    def result_selected(self, site: str) -> None:
        """Krum used ``site``'s result in the round that just finished (fedkube.server.strategy_report)."""
        self._selected.labels(fljob=self.job, site=self._sites.admit(site)).inc()

    def privacy_spent(self, epsilon: float) -> None:
        """Central DP's spent epsilon after a round (fedkube.server.dp)."""
        self._epsilon.labels(fljob=self.job).set(epsilon)

    def round_metrics(self, kind: str, metrics: Mapping[str, float]) -> None:
        """The aggregated metrics of a training round or an evaluation (``kind`` one of :data:`METRIC_KINDS`)."""
        phase = one_of(kind, METRIC_KINDS, "kind")
        for name, value in metrics.items():
            label = self._metric_names.admit(name)
            if label != OVERFLOW:  # one series mixing unrelated metrics would mean nothing
                self._round_metric.labels(fljob=self.job, phase=phase, name=label).set(value)

    def evaluated(self, round_: int, sites: int) -> None:
        """An evaluation of the global model after training round ``round_`` averaged ``sites`` results."""
        self._evaluated.labels(fljob=self.job).set(round_)
        self._evaluation_sites.labels(fljob=self.job).set(sites)

    def connection_rejected(self, reason: str, plane: str = "grpc") -> None:
        """A call or connection was refused before any effect (``reason``: e.g. BadToken, ConnectionLimit,
        unknown_ca) on ``plane`` (one of :data:`PLANES`)."""
        self._rejected.labels(fljob=self.job, plane=one_of(plane, PLANES, "plane"),
                              reason=self._reject_reasons.admit(reason)).inc()
