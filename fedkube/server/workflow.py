"""The round loop: the server's workflow around the pure round logic.

One workflow thread owns the job. gRPC threads only *post* events (the
``ControlEvents`` methods enqueue and return at once) and download threads post
their outcome the same way, so every decision is taken on one thread, in
order, with no lock held while anything is called (LESSONS.md 10). Client
states live in the thread-safe :class:`~fedkube.server.registry.Registry`;
what to do next is asked of :mod:`fedkube.server.rounds` (pure functions).

A round (DESIGN.md §4-§5)::

    decide_start: who takes part (round 1 waits up to registrationSeconds; never-registered
      clients are excluded by name), or QuorumLost
    publish the global model once (receivers = the round's clients, TTL = round timeout)
    send each participant its Task
    as each result is announced: check it against the global model, then pull its
      tensors one at a time over the reverse path and fold each into the streaming
      aggregator; ResultReceived{ok} only after every tensor verified and committed
    RoundState.decide: close when all delivered or failed, or at the deadline (stragglers
      excluded by name with RoundTimeout) with >= minClients results, else QuorumLost
    finish the aggregate; release the round's transaction and end its downloads before
      the next round starts (LESSONS.md 14); hand the checkpoint to the background
      writer and start the next round while it is written

Events carry the connection (``conn_id``) and the task they belong to; the
registry ignores one from a replaced connection or an old task (LESSONS.md 13).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedkube.errors import ConfigError, FedkubeError
from fedkube.metrics.core import new_registry
from fedkube.metrics.server import ServerMetrics
from fedkube.protocol import INIT_TASK, TRAIN_TASK, ResultTimeouts, task_kind
from fedkube.server.aggregate import (
    FoldAbortedError,
    InvalidResultError,
    WeightedMean,
    weighted_metrics,
)
from fedkube.server.checkpoint import check_resume_rounds, completion_message
from fedkube.server.config import JobSettings
from fedkube.server.control import ResultAnnounced, Session, SessionTable, TrainerReport
from fedkube.server.init_collector import InitCollector
from fedkube.server.model import ModelSpec, check_result
from fedkube.server.pool import realigned
from fedkube.server.registry import ClientState, LoopWatch, RegistrationRejected, Registry
from fedkube.server.reverse import ReverseChunkSource, UploadBroker
from fedkube.server.rounds import (
    Action,
    Exclusion,
    RoundPolicy,
    RoundState,
    Verdict,
    apply_start,
    apply_stragglers,
    classify_trainer_report,
    decide_start,
)
from fedkube.server.strategies import RoundAggregator, Strategy, StrategyState, check_initial_model
from fedkube.status import ROUND_HISTORY, JobStatus, Phase, Reason, utc_timestamp
from fedkube.transfer.allocator import release_free_memory
from fedkube.transfer.errors import TransferAbortedError, TransferError, TransferStalledError
from fedkube.transfer.fetch import Fetcher, FetchSettings
from fedkube.transfer.refs import TensorRef, array_from_buffer
from fedkube.transfer.service import (
    RECEIVER_FINISHED,
    TRANSACTION_RELEASED,
    DownloadService,
    Transaction,
    TransferEvent,
)
from fedkube.wire.v1 import control_pb2

log = logging.getLogger(__name__)

# Job-level reasons beyond fedkube.status.Reason (which names client failures).
TERMINATED = "Terminated"
NO_INITIAL_MODEL = "NoInitialModel"
CHECKPOINT_FAILED = "CheckpointFailed"

CHECKPOINT_WAIT_S = 300.0
"""How long the job's end waits for the checkpoint still being written (a 4 GiB model takes ~12 s here)."""


class CheckpointStore(Protocol):
    """Where completed rounds are kept (fedkube.server.checkpoint behind an adapter in app.py)."""

    def load(self) -> tuple[int, dict[str, np.ndarray], StrategyState | None] | None: ...
    def save(
        self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None,
    ) -> None: ...  # checksums: fedkube.server.checkpoint.save's, read after the tensors are written


@dataclass(frozen=True)
class CheckpointResult:
    """How one background checkpoint write ended; ``error`` is "" when it was written."""

    round: int
    seconds: float
    error: str = ""


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, so the next round need not wait.

    What it is handed must not change while it writes. The global model does
    not: every round aggregates into accumulators nothing else refers to and
    only reads the global model it started from (``strategies.FedAvg``/``FedAdam``,
    ``aggregate.WeightedMean``; a superseded model's arrays are recycled as
    accumulators only once their reference count shows no other holder, such
    as this writer's thread, ``fedkube.server.pool``), and the transfer service
    only reads the arrays it publishes, so the model is written without a copy. Strategy
    state tensors may be updated in place by the next round's ``finish()``
    (FedAdam's m and v are), so the workflow waits for a write that holds
    any before calling it (:meth:`holds_strategy_tensors`) instead of copying
    them: a copy would cost 2xS more for as long as the write runs, and the
    wait costs nothing unless the write outlasts a whole round's transfers.

    Results are kept until :meth:`take_results`; ``on_settled`` is called
    (on the writer's thread) after each write so the owner can take them.
    """

    def __init__(
        self,
        store: CheckpointStore,
        job: str,
        *,
        on_settled: Callable[[], None] = lambda: None,
        timing: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self._store = store
        self._job = job
        self._on_settled = on_settled
        self._timing = timing
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._holds_state = False
        self._results: list[CheckpointResult] = []

    def submit(
        self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None,
    ) -> float:
        """Start writing the checkpoint of ``round_``; returns the seconds spent waiting for the previous write.

        ``checksums`` (model tensor name -> checksum of that array) may be filled in while the write runs.
        """
        t0 = time.perf_counter()
        self.wait(None)  # one write at a time: also keeps the checkpoints in round order
        waited = time.perf_counter() - t0
        self._holds_state = bool(state.tensors)
        self._thread = threading.Thread(
            target=self._write, args=(round_, model, state, dict(metrics), checksums),
            name=f"fedkube-checkpoint-r{round_}",
            daemon=True,  # a hung disk must not keep a stopped server alive; the write is atomic either way
        )  # fmt: skip
        self._thread.start()
        return waited

    def busy(self) -> bool:
        """A write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def holds_strategy_tensors(self) -> bool:
        """The write in flight includes strategy state arrays, which the next ``finish()`` may update in place."""
        return self.busy() and self._holds_state

    def wait(self, timeout: float | None) -> bool:
        """Wait for the write in flight (``None``: without bound); True when none is left."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        return True

    def take_results(self) -> list[CheckpointResult]:
        """The writes that ended since the last call, oldest first."""
        with self._lock:
            results, self._results = self._results, []
        return results

    def _write(self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState,
               metrics: dict[str, float], checksums: Mapping[str, str] | None) -> None:  # fmt: skip
        t0 = time.perf_counter()
        error = ""
        try:
            with self._timing():
                self._store.save(round_, model, state, metrics, checksums)
        except Exception as exc:  # reported to the workflow (status, outcome), never swallowed
            error = str(exc) if isinstance(exc, FedkubeError) else f"{type(exc).__name__}: {exc}"
            log.error("job %s round %s: writing the checkpoint failed: %s", self._job, round_, error)
        seconds = time.perf_counter() - t0
        if not error:
            log.info("job %s round %s: checkpoint written (%.2f s, in the background)", self._job, round_, seconds)
        with self._lock:
            self._results.append(CheckpointResult(round_, seconds, error))
        self._on_settled()


@dataclass(frozen=True)
class Outcome:
    """How the job ended."""

    success: bool
    reason: str
    message: str
    rounds_completed: int


class JobFailed(FedkubeError):
    """The job cannot go on; ``reason`` is a machine-readable name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class _Download:
    """One client's result being pulled; ``key`` names this attempt in the aggregator."""

    site: str
    task_id: str
    key: str
    num_examples: int
    metrics: dict[str, float]
    abort: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    started: float = 0.0
    add_seconds: float = 0.0  # time spent folding this result into the aggregate


def _rotated(refs: list[TensorRef], site: str, sites: Mapping[str, object]) -> list[TensorRef]:
    """``refs`` starting at this site's share: each participant pulls its tensors in a different order.

    The first download to reach a tensor receives it straight into the
    accumulator; later ones must fold theirs in. Pulled in the same order,
    one client would be first for nearly every tensor and the other would
    fold them all, finishing last while a core idles. Starting each site at
    its own offset spreads the claims (and the folding) evenly, so the
    downloads end together. The averages do not depend on the order.
    """
    order = sorted(sites)
    if site not in order or len(order) < 2 or not refs:
        return refs
    start = order.index(site) * len(refs) // len(order)
    return refs[start:] + refs[:start]


@dataclass
class _Round:
    """Transport-side state of the round in progress (client states are in the registry)."""

    number: int
    kind: str
    spec: ModelSpec | None
    sink: RoundAggregator | InitCollector
    tasks: dict[str, str]  # site -> task id
    deadline: float
    state: RoundState | None = None
    transaction: Transaction | None = None
    refs: list[TensorRef] = field(default_factory=list)
    model: dict[str, np.ndarray] | None = None
    republished: list[Transaction] = field(default_factory=list)  # for clients that lost the model
    downloads: dict[str, _Download] = field(default_factory=dict)
    superseded: list[_Download] = field(default_factory=list)  # aborted for a re-sent task, still ending
    results: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)  # site -> (num_examples, metrics)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # init task only: site -> (reason, message)
    answered: set[str] = field(default_factory=set)
    announced: set[str] = field(default_factory=set)
    attempts: int = 0
    keys: dict[str, str] = field(default_factory=dict)  # site -> aggregator key of its latest download
    aggregation_s: float = 0.0
    closed: bool = False


def _fetch_settings(settings: JobSettings) -> FetchSettings:
    """The server's fetch policy for result downloads, from spec.transfer.

    The spec checks these relationships at submission; an inconsistent pair is
    widened here (idle above the chunk timeout) with a warning rather than
    failing a running job.
    """
    t = settings.transfer
    idle = t.idle_timeout_s
    if idle <= t.chunk_timeout_s:
        idle = 2 * t.chunk_timeout_s
        log.warning(
            "job %s: spec.transfer.idleTimeoutSeconds=%g is not above chunkTimeoutSeconds=%g; using %g",
            settings.job, t.idle_timeout_s, t.chunk_timeout_s, idle,
        )  # fmt: skip
    return FetchSettings(
        chunk_timeout_s=t.chunk_timeout_s,
        idle_timeout_s=idle,
        max_attempts=t.max_attempts,
        max_chunk_bytes=t.chunk_bytes,
        backoff_base_s=min(0.2, idle / 8),
        backoff_max_s=min(10.0, idle / 4),
    )


class RoundWorkflow:
    """Runs a job's rounds; implements ``ControlEvents`` for the control servicer."""

    def __init__(
        self,
        settings: JobSettings,
        strategy: Strategy,
        sessions: SessionTable,
        broker: UploadBroker,
        download_service: DownloadService,
        *,
        initial_model: Callable[[], dict[str, np.ndarray]] | None = None,
        checkpoints: CheckpointStore | None = None,
        metrics: ServerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        checkpoint_wait_s: float = CHECKPOINT_WAIT_S,
    ) -> None:
        self.settings = settings
        self.telemetry = metrics if metrics is not None else ServerMetrics(new_registry(), settings.job)
        self._strategy = strategy
        self._sessions = sessions
        self._broker = broker
        self._service = download_service
        self._initial_model = initial_model
        self._checkpoints = checkpoints
        self._writer = (
            CheckpointWriter(checkpoints, settings.job, on_settled=lambda: self._post(self._settle_checkpoints),
                             timing=self.telemetry.timing_checkpoint)
            if checkpoints is not None else None
        )  # fmt: skip
        self._checkpoint_wait_s = checkpoint_wait_s
        self._checkpointed_round = 0
        self._checkpoint_error = ""
        self._round_seconds: deque[float] = deque(maxlen=ROUND_HISTORY)
        self._clock = clock
        self._wall = wall_clock
        self.registry = Registry(
            sorted(settings.clients), heartbeat_timeout_s=settings.heartbeat_timeout_s, clock=clock, job=settings.job
        )
        self._loop_watch = LoopWatch(settings.heartbeat_timeout_s, clock)
        self.policy = RoundPolicy(
            rounds=settings.rounds,
            min_clients=settings.min_clients,
            round_timeout_s=settings.round_timeout_s,
            registration_timeout_s=settings.registration_timeout_s,
        )
        self._events: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.Queue()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._round: _Round | None = None
        self._round_number = 0
        self._rounds_completed = 0
        self._last_metrics: dict[str, float] = {}
        self._trainers: dict[str, TrainerReport] = {}
        self._not_in_round: tuple[Exclusion, ...] = ()
        self._counted_exclusions: set[tuple[int, str]] = set()
        self._waited_for_registration = False
        self._phase = Phase.PENDING
        self._reason = ""
        self._message = ""
        self._started_at = self._wall()
        self._start_mono = self._clock()
        self._finished_at: float | None = None
        self._final: Outcome | None = None
        # Task and transaction ids differ between server runs: a restarted server sends its
        # round again, and a sidecar ignores a task id it has already seen.
        self._run_id = uuid.uuid4().hex[:8]
        self._fetch = _fetch_settings(settings)
        # Global-model transactions, for the "to_clients" transfer metric (read on the service's executor).
        self._published: dict[str, tuple[float, int]] = {}
        # The model last handed to the checkpoint writer and the checksums its write may use.
        self._checkpoint_checksums: tuple[Mapping[str, np.ndarray] | None, dict[str, str]] = (None, {})
        download_service.add_listener(self._on_transfer_event)
        self._status_lock = threading.Lock()
        self._status = self._snapshot()

    # --- ControlEvents: called on gRPC threads, only enqueue ------------------------------

    def client_connected(self, session: Session, resume_task_id: str) -> None:
        self._post(self._on_connected, session, resume_task_id)

    def heartbeat(self, session: Session, seq: int, trainer: TrainerReport | None) -> None:
        self._post(self._on_heartbeat, session, trainer)

    def task_acked(self, session: Session, task_id: str) -> None:
        self._post(self._on_heartbeat, session, None)

    def result_announced(self, session: Session, result: ResultAnnounced) -> None:
        self._post(self._on_result, session, result)

    def trainer_state(self, session: Session, report: TrainerReport) -> None:
        self._post(self._on_heartbeat, session, report)

    def metrics(self, session: Session, round: int, values: Mapping[str, float]) -> None:
        self._post(self._on_heartbeat, session, None)

    def client_disconnected(self, session: Session) -> None:
        self._post(self._on_disconnected, session)

    def _post(self, handler: Callable[..., None], *args: Any) -> None:
        self._events.put((handler, args))

    # --- public ----------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop the job at the next event (e.g. on SIGTERM); thread-safe."""
        self._stop_reason = reason
        self._stop.set()
        self._post(lambda: None)

    def status(self) -> JobStatus:
        """The latest status snapshot (thread-safe; rebuilt by the workflow thread)."""
        with self._status_lock:
            return self._status

    @property
    def heartbeat_interval_ms(self) -> int:
        """What sidecars are told: three heartbeats fit in the timeout."""
        return max(100, int(self.settings.heartbeat_timeout_s * 1000 / 3))

    def run(self) -> Outcome:
        """Run the job to its end and return how it ended; job failures are outcomes, not exceptions."""
        s = self.settings
        try:
            start_round, model = self._initial_state()
            if model is not None:
                model = realigned(dict(model))
            for number in range(start_round, s.rounds + 1):
                participants = self._await_start(number)
                self._phase = Phase.RUNNING
                if model is None:
                    model = realigned(dict(self._init_from_first_client(participants)))
                    participants = self._await_start(number)
                started = self._clock()
                self.telemetry.round_started(number)
                model = self._run_round(number, participants, model)
                self._rounds_completed = number
                if self._writer is not None:
                    # The next round publishes these arrays and hashes them anyway; the write reads
                    # the checksums only after writing the tensors, so it need not hash them again.
                    self._checkpoint_checksums = (model, {})
                    waited = self._writer.submit(number, model, self._strategy.state(), self._last_metrics,
                                                 self._checkpoint_checksums[1])
                    if waited > 0.05:
                        log.info("job %s round %s: waited %.2f s for the previous checkpoint write", s.job, number,
                                 waited)
                    self._settle_checkpoints()
                duration = self._clock() - started
                self.telemetry.round_completed(duration, number=number)
                self._round_seconds.append(duration)
                log.info("job %s round %s: completed in %.3f s", s.job, number, duration)
                # The round's receive buffers and chunks are free now; without a trim glibc keeps
                # a varying part of them resident (bench/README.md, memory variance).
                release_free_memory()
                self._refresh()
            outcome = Outcome(True, Phase.SUCCEEDED.value, completion_message(s.rounds, start_round),
                              self._rounds_completed)
        except JobFailed as exc:
            log.error("job %s failed: %s", s.job, exc)
            outcome = Outcome(False, exc.reason, exc.message, self._rounds_completed)
        except ConfigError as exc:
            log.error("job %s failed: %s", s.job, exc)
            outcome = Outcome(False, Reason.CONFIG_ERROR.value, str(exc), self._rounds_completed)
        except Exception as exc:  # a bug must still end the job with a summary, never a hang
            log.exception("job %s: the workflow crashed", s.job)
            outcome = Outcome(False, Reason.INTERNAL.value, f"{type(exc).__name__}: {exc}", self._rounds_completed)
        outcome = self._await_checkpoint(outcome)
        self._end(outcome)
        return outcome

    # --- checkpoints ----------------------------------------------------------------------------

    def _settle_checkpoints(self) -> None:
        """Take the writer's finished writes into the status (workflow thread)."""
        if self._writer is None:
            return
        results = self._writer.take_results()
        for r in results:
            if r.error:
                self._checkpoint_error = f"the checkpoint of round {r.round} was not written: {r.error}"
                if self._final is None:
                    self._message = self._checkpoint_error
            else:
                self._checkpointed_round = max(self._checkpointed_round, r.round)
                if self._checkpoint_error and self._final is None and self._message == self._checkpoint_error:
                    self._message = ""  # a later round's checkpoint is in place; resuming works again
                self._checkpoint_error = ""
        if results:
            self._refresh()

    def _await_checkpoint(self, outcome: Outcome) -> Outcome:
        """The job's end waits (bounded) for the write in flight; a lost last checkpoint fails the job."""
        writer = self._writer
        if writer is None:
            return outcome
        job = self.settings.job
        if writer.busy():
            log.info("job %s: waiting up to %g s for the checkpoint being written", job, self._checkpoint_wait_s)
        problem = ""
        if not writer.wait(self._checkpoint_wait_s):
            problem = (f"the checkpoint of round {self._rounds_completed} was still being written after "
                       f"{self._checkpoint_wait_s:g} s; a restart resumes from round {self._checkpointed_round}")
            log.error("job %s: %s", job, problem)
        self._settle_checkpoints()
        if not problem and self._checkpoint_error and self._checkpointed_round < self._rounds_completed:
            problem = self._checkpoint_error
        if not problem:
            return outcome
        if outcome.success:
            return Outcome(False, CHECKPOINT_FAILED, f"{outcome.message}, but {problem}", outcome.rounds_completed)
        return Outcome(False, outcome.reason, f"{outcome.message}; also, {problem}", outcome.rounds_completed)

    # --- start -------------------------------------------------------------------------------

    def _initial_state(self) -> tuple[int, dict[str, np.ndarray] | None]:
        s = self.settings
        if self._checkpoints is not None:
            loaded = self._checkpoints.load()
            if loaded is not None:
                done, model, state = loaded
                check_resume_rounds(s.job, done, s.rounds)
                check_initial_model(model)
                if state is not None:
                    self._strategy.load_state(state)
                self._rounds_completed = self._round_number = done
                log.info("job %s: resuming after the checkpoint of round %s", s.job, done)
                return done + 1, model
        if s.model_source == "file":
            if self._initial_model is None:
                raise ConfigError("spec.model.source is 'file' but spec.model.path is empty")
            model = self._initial_model()
            check_initial_model(model)
            return 1, model
        return 1, None

    def _await_start(self, number: int) -> tuple[str, ...]:
        """Wait until round ``number`` may start; its participants.

        The first round this server runs waits for registrations (up to
        registrationSeconds, or until every client is in), also when it resumes
        from a checkpoint at a later round: its clients must reconnect first.
        """
        if number > 1 and not self._waited_for_registration:
            deadline = self._start_mono + self.policy.registration_timeout_s
            while self._clock() < deadline and any(
                r.state is ClientState.PENDING for r in self.registry.records()
            ):
                self._pump_once(deadline)
        self._waited_for_registration = True
        while True:
            now = self._clock()
            start = decide_start(self.registry, self.policy, number, waiting_since=self._start_mono, now=now)
            if start.action is Action.START:
                apply_start(self.registry, start)
                self._count_not_registered(number, start.excluded)
                self._not_in_round = tuple(start.excluded)
                for e in start.excluded:
                    log.warning("job %s round %s: client %s excluded: %s (%s)", self.settings.job, number,
                                e.client, e.reason.value, e.message)
                self._refresh()
                return start.participants
            if start.action is Action.FAIL:
                apply_start(self.registry, start)
                self._count_not_registered(number, start.excluded)
                raise JobFailed(start.reason.value if start.reason else Reason.QUORUM_LOST.value, start.message)
            self._pump_once(start.wake_at if start.wake_at is not None else now + 0.2)

    def _count_not_registered(self, number: int, excluded: tuple[Exclusion, ...]) -> None:
        """Count each NotRegistered exclusion once per round (round 1 is decided twice around the init task).

        Other exclusions at the start repeat a failure that was counted when it happened.
        """
        for e in excluded:
            if e.reason is Reason.NOT_REGISTERED and (number, e.client) not in self._counted_exclusions:
                self._counted_exclusions.add((number, e.client))
                self.telemetry.client_failed(e.reason.value)

    def _init_from_first_client(self, candidates: tuple[str, ...]) -> dict[str, np.ndarray]:
        """spec.model.source firstClient: ask one client (first by name) for its initial weights."""
        tried: list[str] = []
        for site in sorted(candidates):
            rec = self.registry.get(site)
            if rec.state is not ClientState.REGISTERED:
                continue
            rnd = self._open_round(0, INIT_TASK, (site,), None)
            while site not in rnd.results and site not in rnd.failed:
                if self._clock() >= rnd.deadline:
                    rnd.failed[site] = (Reason.ROUND_TIMEOUT.value,
                                        f"no initial model within roundSeconds={self.settings.round_timeout_s:g}")
                    break
                if self.registry.get(site).state is not ClientState.REGISTERED:
                    rec = self.registry.get(site)
                    rnd.failed[site] = (rec.reason.value if rec.reason else rec.state.value, rec.message)
                    break
                self._pump_once(rnd.deadline)
            self._close_round(rnd)
            if site in rnd.results:
                assert isinstance(rnd.sink, InitCollector)
                model = rnd.sink.finish()
                check_initial_model(model)
                log.info("job %s: initial model from client %s (%d tensors)", self.settings.job, site, len(model))
                return model
            reason, message = rnd.failed.get(site, ("Unknown", "no result"))
            tried.append(f"{site}: {reason} ({message})")
        raise JobFailed(
            NO_INITIAL_MODEL,
            "no client delivered the initial model (spec.model.source firstClient); tried: "
            + ("; ".join(tried) or "no registered client"),
        )

    # --- a round -------------------------------------------------------------------------------

    def _run_round(
        self, number: int, participants: tuple[str, ...], model: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        s = self.settings
        rnd = self._open_round(number, TRAIN_TASK, participants, model)
        state = rnd.state
        assert state is not None
        try:
            while True:
                decision = state.decide(self.registry, self._clock())
                if decision.action is Action.FAIL:
                    apply_stragglers(self.registry, state, decision)
                    message = decision.message
                    if decision.reason is Reason.QUORUM_LOST and self._not_in_round:
                        # Name every missing client, also those that were not in the round at all.
                        message += "; not in this round: " + "; ".join(str(e) for e in self._not_in_round)
                    raise JobFailed(decision.reason.value if decision.reason else Reason.QUORUM_LOST.value, message)
                if decision.action is Action.CLOSE:
                    for site in apply_stragglers(self.registry, state, decision):
                        self.telemetry.client_failed(Reason.ROUND_TIMEOUT.value)
                        log.warning("job %s round %s: client %s excluded as a straggler (RoundTimeout)", s.job,
                                    number, site)
                    break
                for site in decision.needs_task:
                    self._send_task(rnd, site)
                wake = decision.wake_at if decision.wake_at is not None else self._clock() + 0.2
                self._pump_once(min(wake, self._clock() + 0.5))
        finally:
            self._close_round(rnd)
        done = [site for site in participants if site in rnd.results]
        if len(done) < self.policy.min_clients:  # e.g. a committed result lost its client meanwhile
            raise JobFailed(Reason.QUORUM_LOST.value, f"round {number}: only {done} delivered a result")
        if self._writer is not None and self._writer.holds_strategy_tensors():
            # The write in flight holds strategy arrays that finish() updates in place (FedAdam's m, v).
            t_wait = time.perf_counter()
            self._writer.wait(None)
            log.info("job %s round %s: waited %.2f s for the previous checkpoint before updating the strategy state",
                     s.job, number, time.perf_counter() - t_wait)
            self._settle_checkpoints()
        t0 = time.perf_counter()
        new_model = rnd.sink.finish()
        self.telemetry.aggregated(rnd.aggregation_s + time.perf_counter() - t0)
        self._last_metrics = weighted_metrics({k: (float(n), m) for k, (n, m) in rnd.results.items()})
        log.info("job %s round %s: aggregated the results of %s; metrics %s", s.job, number, ",".join(done),
                 self._last_metrics)
        self._refresh()
        return new_model

    def _open_round(
        self, number: int, kind: str, participants: tuple[str, ...], model: dict[str, np.ndarray] | None
    ) -> _Round:
        s = self.settings
        self._round_number = number
        now = self._clock()
        rnd = _Round(
            number=number,
            kind=kind,
            spec=ModelSpec.of(model) if model is not None else None,
            sink=self._strategy.begin_round(model) if model is not None else InitCollector(),
            tasks={site: f"{s.job}-r{number}-{self._run_id}-{site}" for site in participants},
            deadline=now + s.round_timeout_s,
        )
        if model is not None:
            # Serialize once, serve many: one transaction per round for all its clients.
            rnd.transaction = self._service.publish(
                model, receivers=participants, ttl_s=s.round_timeout_s,
                transaction_id=f"{s.job}-r{number}-{self._run_id}",
            )  # fmt: skip
            rnd.refs = rnd.transaction.refs
            rnd.model = model
            if self._checkpoint_checksums[0] is model:
                self._checkpoint_checksums[1].update({r.name: r.checksum for r in rnd.refs})
            self.telemetry.model_size(rnd.transaction.nbytes)
            self._published[rnd.transaction.id] = (self._clock(), rnd.transaction.nbytes)
            rnd.state = RoundState(number, participants, now, self.policy)
        self._round = rnd
        for site in participants:
            self._send_task(rnd, site)
        log.info("job %s round %s: %s task sent to %s", s.job, number, kind, ",".join(participants))
        self._refresh()
        return rnd

    def _send_task(self, rnd: _Round, site: str) -> None:
        """Give ``site`` the round's task (again, after a reconnect that did not resume it)."""
        task_id = rnd.tasks[site]
        if rnd.state is not None:
            rec = self.registry.get(site)
            if not (rec.state is ClientState.TRAINING and rec.task_id == task_id):
                rnd.state.assign(self.registry, site, task_id)
        refs = rnd.refs
        txn = rnd.transaction
        if txn is not None and rnd.model is not None and (txn.released or site in txn.done_receivers):
            # The client fetched the model and then lost it (its sidecar restarted): publish the
            # same arrays again for it alone; the views cost no copy.
            again = self._service.publish(
                rnd.model, receivers=[site], ttl_s=max(1.0, rnd.deadline - self._clock()),
                transaction_id=f"{txn.id}-{site}-{len(rnd.republished) + 1}",
            )  # fmt: skip
            rnd.republished.append(again)
            self._published[again.id] = (self._clock(), again.nbytes)
            refs = again.refs
        msg = control_pb2.ServerMessage(
            task=control_pb2.Task(
                task_id=task_id,
                round=rnd.number,
                refs=[r.to_proto() for r in refs],
                kind=task_kind(rnd.kind),
                # How long the trainer's send() waits for this server's download of its result.
                config=ResultTimeouts.for_job(
                    idle_timeout_s=self._fetch.idle_timeout_s, chunk_timeout_s=self._fetch.chunk_timeout_s,
                    round_timeout_s=self.settings.round_timeout_s,
                ).to_config(),
                total_rounds=self.settings.rounds,
            )
        )
        if not self._sessions.send(site, msg):
            log.info("job %s round %s: client %s has no live stream; its task goes out when it reconnects",
                     self.settings.job, rnd.number, site)

    def _close_round(self, rnd: _Round) -> None:
        """End the round's downloads (bounded), settle the aggregator, release the transaction."""
        rnd.closed = True
        for dl in rnd.downloads.values():
            dl.abort.set()
        bound = self._clock() + self._fetch.chunk_timeout_s + 5.0
        for dl in [*rnd.downloads.values(), *rnd.superseded]:
            if dl.thread is not None:
                dl.thread.join(timeout=max(0.0, bound - self._clock()))
                if dl.thread.is_alive():
                    log.error("job %s round %s: the download from %s did not stop in time", self.settings.job,
                              rnd.number, dl.site)
        self._drain()  # downloads that finished as the round closed
        for dl in list(rnd.downloads.values()):
            self._discard(rnd, dl)
        rnd.downloads.clear()
        for txn in [rnd.transaction, *rnd.republished]:
            if txn is not None and not txn.released:
                self._service.release(txn.id)
        rnd.model = None
        # Whoever announced a result that did not make it learns so now, so its send() returns.
        for site, task_id in rnd.tasks.items():
            if site in rnd.announced and site not in rnd.answered:
                rec = self.registry.get(site)
                if rec.state is ClientState.FAILED and rec.task_id == task_id and rec.reason is not None:
                    self._answer(rnd, site, False, rec.reason.value, rec.message)
        self._round = None
        self._refresh()

    # --- event handlers (workflow thread) -------------------------------------------------------

    def _on_connected(self, session: Session, resume_task_id: str) -> None:
        job = self.settings.job
        if self._final is not None:
            session.send(_stop_msg(self._final.success, self._final.reason, self._final.message))
            return
        try:
            reg = self.registry.register(session, resume_task_id)
        except RegistrationRejected as exc:
            rec = self.registry.get(session.site)
            log.warning("job %s: %s", job, exc)
            session.send(_stop_msg(False, rec.reason.value if rec.reason else Reason.REJECTED.value, str(exc)))
            return
        if reg is None:
            return  # an older stream's registration, processed after a newer one
        rnd = self._round
        site = session.site
        if rnd is not None and not rnd.closed and site in rnd.tasks:
            if reg.task_lost:
                dl = rnd.downloads.pop(site, None)
                if dl is not None:
                    # The new sidecar lost the result being pulled; the re-sent task brings a new one.
                    dl.abort.set()
                    rnd.superseded.append(dl)
                # RoundState.decide lists the site in needs_task and the round loop re-sends its task.
            elif rnd.kind == INIT_TASK and site not in rnd.results and resume_task_id != rnd.tasks[site]:
                self._send_task(rnd, site)
        self._refresh()

    def _on_heartbeat(self, session: Session, trainer: TrainerReport | None) -> None:
        if not self.registry.heartbeat(session):
            return
        if trainer is not None and self._trainers.get(session.site) != trainer:
            self._trainers[session.site] = trainer
            self._on_trainer(session.site, trainer)

    def _on_disconnected(self, session: Session) -> None:
        if self.registry.disconnected(session):
            self._refresh()

    def _on_trainer(self, site: str, report: TrainerReport) -> None:
        """Explicit failure kinds only (LESSONS.md 19)."""
        job = self.settings.job
        rec = self.registry.get(site)
        verdict = classify_trainer_report(report, rec, self.policy, job_done=self._final is not None)
        if verdict.verdict is Verdict.HEALTHY:
            return
        if verdict.verdict is Verdict.TEARDOWN:
            log.info("job %s: client %s: %s (teardown noise)", job, site, verdict.message)
            return
        assert verdict.reason is not None
        if verdict.verdict is Verdict.FAIL_JOB:
            self._fail(site, verdict.reason, verdict.message)
            raise JobFailed(verdict.reason.value, f"client {site}: {verdict.message} (fix the job's configuration)")
        if self._fail(site, verdict.reason, verdict.message):
            log.warning("job %s: client %s failed for the job: %s (%s)", job, site, verdict.reason.value,
                        verdict.message)
            self._abort_download(site)
            if self._round is not None and self._round.kind == INIT_TASK and site in self._round.tasks:
                self._round.failed[site] = (verdict.reason.value, verdict.message)
            self._sessions.send(site, _stop_msg(False, verdict.reason.value, verdict.message))
        self._refresh()

    def _on_result(self, session: Session, result: ResultAnnounced) -> None:
        if not self.registry.heartbeat(session):
            return  # from a replaced connection
        site = session.site
        job = self.settings.job
        rnd = self._round
        rec = self.registry.get(site)
        if rnd is None or rnd.tasks.get(site) != result.task_id or rnd.closed:
            # An old task's result (e.g. a straggler's): answer so its send() returns; never count it.
            log.info("job %s: result for task %s from %s is not for the current round; ignored", job,
                     result.task_id, site)
            self._result_received(site, result.task_id, False, Reason.ROUND_TIMEOUT.value,
                                  "the round this result belongs to is over")
            return
        if site in rnd.results:
            self._answer(rnd, site, True, "", "already received", again=True)
            return
        if site in rnd.downloads:
            log.info("job %s round %s: duplicate result announcement from %s ignored", job, rnd.number, site)
            return
        if rnd.kind == TRAIN_TASK and rec.state is not ClientState.TRAINING:
            log.info("job %s round %s: result from %s in state %s ignored", job, rnd.number, site, rec.state.value)
            return
        rnd.announced.add(site)
        problem = self._check_result(rnd, site, result)
        if problem:
            if rnd.kind == INIT_TASK:
                rnd.failed[site] = (Reason.INVALID_RESULT.value, problem)
            else:
                self._fail(site, Reason.INVALID_RESULT, problem, task_id=result.task_id)
            log.warning("job %s round %s: invalid result from %s: %s", job, rnd.number, site, problem)
            self._answer(rnd, site, False, Reason.INVALID_RESULT.value, problem)
            self._refresh()
            return
        if rnd.kind == TRAIN_TASK and not self.registry.result_announced(session, result.task_id):
            return
        self._start_download(rnd, site, result)

    def _check_result(self, rnd: _Round, site: str, result: ResultAnnounced) -> str:
        """Why the announced result cannot be used, or "" (nothing is downloaded for a bad one)."""
        if result.problem:
            return result.problem
        if rnd.kind == INIT_TASK:
            if not result.refs:
                return "the initial model has no tensors"
        else:
            if result.num_examples <= 0:
                return f"num_examples is {result.num_examples}; a training result must say how many examples it used"
            assert rnd.spec is not None
            mismatch = check_result(rnd.spec, result.refs)
            if mismatch:
                return mismatch
        foreign = [r.ref_id for r in result.refs if r.source != site]
        if foreign:
            return f"refs {foreign} name another source than {site!r}; a client can only offer its own tensors"
        return ""

    def _start_download(self, rnd: _Round, site: str, result: ResultAnnounced) -> None:
        order = {name: i for i, name in enumerate(rnd.spec.names)} if rnd.spec is not None else {}
        refs = sorted(result.refs, key=lambda r: order.get(r.name, 0))
        rnd.attempts += 1
        dl = _Download(
            site=site, task_id=result.task_id, key=f"{site}#{rnd.attempts}", num_examples=result.num_examples,
            metrics=dict(result.metrics), bytes_total=sum(r.nbytes for r in refs), started=self._clock(),
        )  # fmt: skip
        self._continue_attempt(rnd, site, dl.key)
        dl.thread = threading.Thread(
            target=self._download, args=(rnd, dl, refs), name=f"fedkube-pull-{site}-r{rnd.number}", daemon=True
        )
        rnd.downloads[site] = dl
        dl.thread.start()
        log.info("job %s round %s: pulling %d tensor(s), %d bytes, from %s", self.settings.job, rnd.number, len(refs),
                 dl.bytes_total, site)
        self._refresh()

    def _continue_attempt(self, rnd: _Round, site: str, key: str) -> None:
        """Make ``key`` the site's new attempt without counting any of its tensors twice.

        A site may deliver again within a round (its sidecar restarted and the
        task was re-sent) after an earlier download was cut short with some
        tensors verified and folded in. The earlier attempt is discarded (a
        no-op when it already was) and reopened under the new key, so the
        aggregator ignores the new copies of the tensors it kept.
        """
        prev = rnd.keys.get(site)
        rnd.keys[site] = key
        if prev is None or isinstance(rnd.sink, InitCollector):
            return
        try:
            rnd.sink.discard(prev)
            kept = rnd.sink.reopen(prev, key)
        except FedkubeError as exc:  # the earlier attempt was committed: the workflow never pulls it again
            log.info("job %s round %s: %s delivers again after %s: %s", self.settings.job, rnd.number, site,
                     prev, exc)
            return
        if kept:
            log.info("job %s round %s: %s delivers again; %d tensor(s) of its earlier attempt stay and are not "
                     "added twice", self.settings.job, rnd.number, site, len(kept))

    def _on_download_finished(self, rnd: _Round, dl: _Download, ok: bool, reason: str, message: str) -> None:
        if rnd.downloads.get(dl.site) is not dl:
            self._discard(rnd, dl)  # superseded by a re-sent task's download
            return
        del rnd.downloads[dl.site]
        job = self.settings.job
        if ok and rnd.kind == INIT_TASK and not rnd.closed:
            rnd.results[dl.site] = (dl.num_examples, dl.metrics)
            self._answer(rnd, dl.site, True, "", "")
            return
        # Commit only while the registry still expects this very result (it may have been lost meanwhile).
        if ok and rnd.kind == TRAIN_TASK and self.registry.result_done(dl.site, dl.task_id):
            rnd.sink.commit(dl.key)
            rnd.aggregation_s += dl.add_seconds
            self.telemetry.transferred("from_clients", dl.bytes_total, max(0.0, self._clock() - dl.started))
            rnd.results[dl.site] = (dl.num_examples, dl.metrics)
            self._answer(rnd, dl.site, True, "", "")
            log.info("job %s round %s: result of %s verified and aggregated", job, rnd.number, dl.site)
            self._refresh()
            return
        note = self._discard(rnd, dl)
        if ok:
            return  # the client left the round while its bytes arrived; already answered or failed
        if note:
            message = f"{message}; {note}" if message else note
        if rnd.kind == INIT_TASK:
            rnd.failed[dl.site] = (reason, message)
        elif reason != Reason.ABORTED.value:
            self._fail(dl.site, Reason(reason), message, task_id=dl.task_id)
        log.warning("job %s round %s: result of %s not used: %s (%s)", job, rnd.number, dl.site, reason, message)
        rec = self.registry.get(dl.site)
        if reason != Reason.ABORTED.value or rec.state is ClientState.FAILED:
            shown = rec.reason.value if rec.reason is not None and reason == Reason.ABORTED.value else reason
            self._answer(rnd, dl.site, False, shown, message if reason != Reason.ABORTED.value else rec.message)
        self._refresh()

    def _fail(self, site: str, reason: Reason, message: str, *, task_id: str | None = None) -> bool:
        """registry.fail, counted by reason when it changed the client."""
        changed = self.registry.fail(site, reason, message, task_id=task_id)
        if changed:
            self.telemetry.client_failed(reason.value)
        return changed

    def _discard(self, rnd: _Round, dl: _Download) -> str:
        """Take a client's result out of the round; returns a note when part of it had to stay.

        The streaming aggregator cannot subtract what it already folded (the
        arrays are gone), so tensors of this client that were fully downloaded
        and verified before the failure stay in their averages. That is said in
        the log and in the client's failure message, never hidden.
        """
        try:
            outcome = rnd.sink.discard(dl.key)
        except FedkubeError:
            log.exception("job %s round %s: could not discard the result of %s", self.settings.job, rnd.number,
                          dl.site)
            return ""
        if outcome.exact:
            return ""
        kept = outcome.kept_tensors
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        note = (f"{len(kept)} of its tensors ({shown}) were already verified and stay in this round's average; "
                f"set strategy param staged: true for all-or-nothing exclusion")
        log.warning("job %s round %s: result of %s partly used: %s", self.settings.job, rnd.number, dl.site, note)
        return note

    def _abort_download(self, site: str) -> None:
        rnd = self._round
        if rnd is not None and site in rnd.downloads:
            rnd.downloads[site].abort.set()

    # --- downloads (own threads) ------------------------------------------------------------------

    def _download(self, rnd: _Round, dl: _Download, refs: list[TensorRef]) -> None:
        """Pull one client's result tensor by tensor into the aggregator, then post the outcome."""
        source = ReverseChunkSource(
            dl.site, self._broker, self._sessions.send, chunk_timeout_s=self.settings.transfer.chunk_timeout_s,
            max_chunk_bytes=self._fetch.max_chunk_bytes,
        )  # fmt: skip
        fetcher = Fetcher(source, self._fetch, abort=dl.abort, on_retry=self._count_retry)
        ok, reason, message = False, "", ""
        base = 0
        weight = float(max(dl.num_examples, 1))
        # A streaming aggregator folds each tensor into its accumulator (copying) before add()
        # returns, so one receive buffer per download can serve every tensor of the same size:
        # no fresh allocation and page faults per tensor. Staged aggregation keeps the arrays.
        reuse = rnd.kind == TRAIN_TASK and getattr(self._strategy, "staged", True) is False
        buffers: dict[int, bytearray] = {}
        # The engine's intake checks float tensors for NaN/Inf while each frame is hot (right after it was
        # hashed) and receives a tensor nobody contributed to yet straight into its accumulator, no copy.
        engine = getattr(rnd.sink, "engine", None) if reuse else None
        if not isinstance(engine, WeightedMean):
            engine = None
        # The init task's tensors become the global model: received into the aligned arrays it keeps.
        init = rnd.sink if isinstance(rnd.sink, InitCollector) else None
        try:
            for ref in _rotated(refs, dl.site, rnd.tasks):
                def progress(done: int, base: int = base) -> None:
                    dl.bytes_done = base + done

                intake = (
                    engine.intake(dl.key, ref.name, ref.dtype, ref.shape, weight, abort=dl.abort)
                    if engine is not None else None
                )  # fmt: skip
                try:
                    out: Any = intake.target if intake is not None and intake.target is not None else None
                    if init is not None:
                        out = init.target(ref.name, ref.dtype, ref.shape)
                    if out is None and reuse:
                        out = buffers.get(ref.nbytes)
                        if out is None:
                            buffers.clear()  # at most one buffer: memory stays one tensor per download
                            out = buffers[ref.nbytes] = bytearray(ref.nbytes)
                    data = fetcher.fetch_into(
                        ref, out, progress=progress, inspect=intake.check if intake is not None else None
                    )
                    array = array_from_buffer(data, ref.dtype, ref.shape)
                    t0 = time.perf_counter()
                    if intake is not None:
                        intake.add(array)
                    else:
                        rnd.sink.add(dl.key, ref.name, array, weight)
                    dl.add_seconds += time.perf_counter() - t0
                    del array, data, out  # one tensor in flight per download, never a whole result
                finally:
                    if intake is not None:
                        intake.close()  # a claim that did not make it in is given back
                base += ref.nbytes
            ok = True
            log.info("job %s round %s: pulled %d bytes from %s in %.2f s, %.2f s of it folding into the aggregate "
                     "(%d on the bulk port, %d pushed over gRPC)", self.settings.job, rnd.number, base, dl.site,
                     self._clock() - dl.started, dl.add_seconds, source.bulk_bytes, source.pushed_bytes)
        except (TransferAbortedError, FoldAbortedError) as exc:
            reason, message = Reason.ABORTED.value, str(exc)
        except TransferError as exc:
            if isinstance(exc, TransferStalledError):
                self.telemetry.stalled("from_clients")
            reason, message = Reason.TRANSFER_FAILED.value, str(exc)
        except InvalidResultError as exc:
            reason, message = Reason.INVALID_RESULT.value, exc.detail
        except Exception as exc:
            log.exception("job %s round %s: the download from %s failed", self.settings.job, rnd.number, dl.site)
            reason, message = Reason.TRANSFER_FAILED.value, f"{type(exc).__name__}: {exc}"
        self._post(self._on_download_finished, rnd, dl, ok, reason, message)

    def _count_retry(self, err: Exception) -> None:
        """A result fetch is tried again (runs on the download's thread; only counts)."""
        self.telemetry.download_retry(type(err).__name__)

    def _on_transfer_event(self, event: TransferEvent) -> None:
        """A receiver finished fetching the global model (runs on the download service's executor)."""
        if event.kind == RECEIVER_FINISHED and event.ok:
            published = self._published.get(event.transaction_id)
            if published is not None:
                start, nbytes = published
                self.telemetry.transferred("to_clients", nbytes, max(0.0, self._clock() - start))
        elif event.kind == TRANSACTION_RELEASED:
            self._published.pop(event.transaction_id, None)

    # --- plumbing -----------------------------------------------------------------------------------

    def _pump_once(self, until: float) -> None:
        """Handle the events that arrive before ``until`` (at least one wait), watching heartbeats and stops."""
        self._check_stop()
        self._check_heartbeats()
        remaining = until - self._clock()
        try:
            handler, args = self._events.get(timeout=max(0.0, min(remaining, 0.2)))
        except queue.Empty:
            return
        handler(*args)
        self._drain()

    def _drain(self) -> None:
        """Handle what is already queued."""
        while True:
            self._check_stop()
            try:
                handler, args = self._events.get_nowait()
            except queue.Empty:
                return
            handler(*args)

    def _check_stop(self) -> None:
        if self._stop.is_set() and self._final is None:
            raise JobFailed(TERMINATED, self._stop_reason or "the server was asked to stop")

    def _check_heartbeats(self) -> None:
        """Seen-then-silent clients become Lost (the registry never loses a client it has not seen)."""
        stalled = self._loop_watch.tick()
        if stalled:
            self.registry.server_stalled(stalled)
        for rec in self.registry.check_heartbeats(final_round=self.settings.rounds):
            self.telemetry.client_failed(Reason.LOST.value)
            log.warning("job %s: client %s lost: %s", self.settings.job, rec.name, rec.message)
            self._abort_download(rec.name)
            rnd = self._round
            if rnd is not None and rnd.kind == INIT_TASK and rec.name in rnd.tasks:
                rnd.failed[rec.name] = (Reason.LOST.value, rec.message)
            session = self._sessions.current(rec.name)
            if session is not None:
                # End its stream: a live sidecar reconnects and registers again (Lost -> Registered).
                self._sessions.remove(session)
            self._refresh()

    def _answer(self, rnd: _Round, site: str, ok: bool, reason: str, message: str, *, again: bool = False) -> None:
        """ResultReceived for ``site``'s task of ``rnd``, once (``again`` repeats a positive answer)."""
        if site in rnd.answered and not again:
            return
        rnd.answered.add(site)
        self._result_received(site, rnd.tasks[site], ok, reason, message)

    def _result_received(self, site: str, task_id: str, ok: bool, reason: str, message: str) -> None:
        self._sessions.send(
            site,
            control_pb2.ServerMessage(
                result_received=control_pb2.ResultReceived(task_id=task_id, ok=ok, reason=reason, message=message)
            ),
        )

    def _end(self, outcome: Outcome) -> None:
        rnd = self._round
        if rnd is not None and not rnd.closed:
            try:
                self._close_round(rnd)
            except Exception:
                log.exception("job %s: closing round %s failed", self.settings.job, rnd.number)
        self._final = outcome
        self._phase = Phase.SUCCEEDED if outcome.success else Phase.FAILED
        self._reason, self._message = ("" if outcome.success else outcome.reason), outcome.message
        self._finished_at = self._wall()
        for rec in self.registry.records():
            if not rec.failed_for_job:
                self._sessions.send(rec.name, _stop_msg(outcome.success, outcome.reason, outcome.message))
        self._refresh()

    def _snapshot(self) -> JobStatus:
        rnd = self._round
        clients = self.registry.statuses()
        if rnd is not None:
            for c in clients:
                dl = rnd.downloads.get(c.name)
                if dl is not None:
                    c.message = f"uploading its result: {dl.bytes_done} of {dl.bytes_total} bytes received"
        return JobStatus(
            job=self.settings.job,
            phase=self._phase,
            round=self._round_number,
            rounds=self.settings.rounds,
            clients=clients,
            metrics=dict(self._last_metrics),
            completed_rounds=self._rounds_completed,
            reason=self._reason,
            message=self._message,
            start_time=utc_timestamp(self._started_at),
            finish_time=utc_timestamp(self._finished_at) if self._finished_at is not None else None,
            last_round_seconds=self._round_seconds[-1] if self._round_seconds else None,
            round_seconds=list(self._round_seconds),
        )

    def _refresh(self) -> None:
        snap = self._snapshot()
        counts = dict.fromkeys((st.value for st in ClientState), 0)
        for c in snap.clients:
            counts[c.state] = counts.get(c.state, 0) + 1
        self.telemetry.clients(counts)
        with self._status_lock:
            self._status = snap


def _stop_msg(success: bool, reason: str, message: str) -> control_pb2.ServerMessage:
    return control_pb2.ServerMessage(stop=control_pb2.Stop(success=success, reason=reason, message=message))
