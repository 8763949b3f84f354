"""The job's progress as the status document shows it, published as immutable snapshots.

The workflow thread updates :class:`JobProgress` and calls :meth:`JobProgress.publish`
after each change; readers on other threads (the status endpoint, the
termination summary) get the latest snapshot from :meth:`JobProgress.status`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping

from fedkube.metrics.server import ServerMetrics
from fedkube.server.downloads import Download
from fedkube.server.influence import SiteInfluence
from fedkube.server.jobs import Outcome
from fedkube.server.registry import ClientState, Registry
from fedkube.status import ROUND_HISTORY, EvaluationPoint, JobStatus, Phase, utc_timestamp


class JobProgress:
    """Phase, rounds, metrics and timings of one job; written by the workflow thread only."""

    def __init__(
        self, job: str, rounds: int, registry: Registry, telemetry: ServerMetrics, *, wall_clock: Callable[[], float]
    ) -> None:
        self._job = job
        self._rounds = rounds
        self._registry = registry
        self._telemetry = telemetry
        self._wall = wall_clock
        self.phase = Phase.PENDING
        self.reason = ""
        self.message = ""
        self.round = 0  # the round in progress (or last begun)
        self.completed = 0
        self.metrics: dict[str, float] = {}
        self.influence: dict[str, SiteInfluence] = {}  # site -> how much its result counted in its last round
        self.privacy_epsilon: float | None = None  # central DP's spent budget (fedkube.server.dp)
        self.round_seconds: deque[float] = deque(maxlen=ROUND_HISTORY)
        self.evaluation: deque[EvaluationPoint] = deque(maxlen=ROUND_HISTORY)  # spec.evaluation's recent outcomes
        self.started_at = wall_clock()
        self.finished_at: float | None = None
        self._lock = threading.Lock()
        self._status = self.snapshot({})

    def finish(self, outcome: Outcome) -> None:
        """The job ended as ``outcome`` says."""
        self.phase = Phase.SUCCEEDED if outcome.success else Phase.FAILED
        self.reason, self.message = ("" if outcome.success else outcome.reason), outcome.message
        self.finished_at = self._wall()

    def snapshot(self, downloads: Mapping[str, Download]) -> JobStatus:
        """The status now; ``downloads`` (site -> result being pulled) adds upload progress to client messages."""
        clients = self._registry.statuses()
        for c in clients:
            dl = downloads.get(c.name)
            if dl is not None:
                c.message = f"uploading its result: {dl.bytes_done} of {dl.bytes_total} bytes received"
            bounded = self.influence.get(c.name)
            if bounded is not None:
                c.weight, c.update_norm, c.bounded = bounded.weight, bounded.norm, bounded.note()
        return JobStatus(
            job=self._job,
            phase=self.phase,
            round=self.round,
            rounds=self._rounds,
            clients=clients,
            metrics=dict(self.metrics),
            completed_rounds=self.completed,
            reason=self.reason,
            message=self.message,
            start_time=utc_timestamp(self.started_at),
            finish_time=utc_timestamp(self.finished_at) if self.finished_at is not None else None,
            last_round_seconds=self.round_seconds[-1] if self.round_seconds else None,
            round_seconds=list(self.round_seconds),
            privacy_epsilon=self.privacy_epsilon,
            evaluation=list(self.evaluation),
        )

    def publish(self, downloads: Mapping[str, Download]) -> None:
        """Make the current state the one readers see, and count clients by state for the metrics."""
        snap = self.snapshot(downloads)
        counts = dict.fromkeys((st.value for st in ClientState), 0)
        for c in snap.clients:
            counts[c.state] = counts.get(c.state, 0) + 1
        self._telemetry.clients(counts)
        with self._lock:
            self._status = snap

    def status(self) -> JobStatus:
        """The latest published snapshot (thread-safe)."""
        with self._lock:
            return self._status
