"""Metrics of the operator: FLJobs by phase, reconcile errors and latency, pending/deploy timeouts fired.

The operator sees one FLJob per handler call, so :meth:`OperatorMetrics.job_phase`
remembers each job's phase and recomputes the per-phase counts; a deleted job
is dropped with :meth:`OperatorMetrics.job_deleted`. Job names never become
labels (the number of FLJobs in a cluster is unbounded over time).

``fedkube_operator_fljobs`` counts by the FLJob's namespace (``fljob_namespace``)
and phase: Prometheus scrapes it from the operator pod, so the target's own
``namespace`` label is the operator's, and a label of ours named ``namespace``
would be renamed ``exported_namespace`` or override the target's, depending on
the scrape's honorLabels. Only namespaces holding FLJobs now have series
(namespaces x 6 phases); a namespace's series go when its last FLJob does.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedkube.metrics.core import CappedValues, add_process_collectors, check_labels, component_info, one_of

#: FLJob phases (DESIGN.md section 6).
PHASES = ("Pending", "Deploying", "Running", "Succeeded", "Failed", "Suspended")
#: Startup timeouts the operator decides (DESIGN.md section 5).
TIMEOUTS = ("PendingTimeout", "DeployTimeout")
EXTRA_ERROR_REASONS = 16
#: The kopf handlers of fedkube.operator.handlers (their ids), the label of the reconcile latency.
HANDLERS = ("reconcile", "suspend", "spec", "observe")
#: Seconds: a look at a job polls the server for up to a few seconds; a create makes a dozen API calls.
RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class OperatorMetrics:
    """The operator's metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        add_process_collectors(registry)
        component_info(registry, "operator", "")
        self._phases = Gauge("fedkube_operator_fljobs", "FLJobs the operator manages, by namespace and phase.",
                             check_labels(["fljob_namespace", "phase"]), registry=registry)
        self._errors = Counter("fedkube_operator_reconcile_errors_total",
                               "Reconcile handler calls that failed, by reason (error kind).",
                               check_labels(["reason"]), registry=registry)
        self._timeouts = Counter("fedkube_operator_timeouts_total",
                                 "Clients failed by a startup timeout, by reason.",
                                 check_labels(["reason"]), registry=registry)
        self._latency = Histogram("fedkube_operator_reconcile_seconds",
                                  "Time one handler call took (a create, a look at a running job...), by handler.",
                                  check_labels(["handler"]), buckets=RECONCILE_BUCKETS, registry=registry)
        self._error_reasons = CappedValues("reconcile error reason", EXTRA_ERROR_REASONS)
        self._jobs: dict[tuple[str, str], str] = {}
        self._namespaces: set[str] = set()  # those with published series
        self._lock = threading.Lock()
        for t in TIMEOUTS:
            self._timeouts.labels(reason=t)
        for h in HANDLERS:
            self._latency.labels(handler=h)

    def job_phase(self, namespace: str, name: str, phase: str) -> None:
        """FLJob ``namespace/name`` is now in ``phase``."""
        one_of(phase, PHASES, "FLJob phase")
        with self._lock:
            self._jobs[(namespace, name)] = phase
            self._publish(self._counts())

    def job_deleted(self, namespace: str, name: str) -> None:
        """FLJob ``namespace/name`` is gone; it no longer counts in any phase."""
        with self._lock:
            self._jobs.pop((namespace, name), None)
            self._publish(self._counts())

    def reconcile_error(self, reason: str) -> None:
        """A handler call failed; ``reason`` names the kind (e.g. the exception class or an API status reason)."""
        self._errors.labels(reason=self._error_reasons.admit(reason)).inc()

    def reconcile_seconds(self, handler: str, seconds: float) -> None:
        """A call of ``handler`` (one of HANDLERS) took ``seconds``, whether it succeeded or failed."""
        self._latency.labels(handler=one_of(handler, HANDLERS, "operator handler")).observe(max(0.0, seconds))

    def timeout_fired(self, reason: str) -> None:
        """A client was failed by ``reason`` (PendingTimeout or DeployTimeout)."""
        self._timeouts.labels(reason=one_of(reason, TIMEOUTS, "timeout reason")).inc()

    def _counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for (namespace, _), phase in self._jobs.items():
            counts[namespace, phase] = counts.get((namespace, phase), 0) + 1
        return counts

    def _publish(self, counts: dict[tuple[str, str], int]) -> None:
        # Called under self._lock so two handlers cannot publish snapshots out of order (a stale one
        # last). Gauge.set only takes the library's own leaf lock: no call-out happens here.
        namespaces = {namespace for namespace, _ in counts}
        for namespace in self._namespaces - namespaces:
            for p in PHASES:
                self._phases.remove(namespace, p)
        for namespace in namespaces:
            for p in PHASES:  # every phase, 0 included: the alert's delta needs the Failed series before a failure
                self._phases.labels(fljob_namespace=namespace, phase=p).set(counts.get((namespace, p), 0))
        self._namespaces = namespaces
