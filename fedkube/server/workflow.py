"""The round loop: the server's workflow around the pure round logic.

One workflow thread owns the job. gRPC threads only *post* events (the
``ControlEvents`` methods enqueue and return at once) and download threads post
their outcome the same way, so every decision is taken on one thread, in
order, with no lock held while anything is called (LESSONS.md 10). Client
states live in the thread-safe :class:`~fedkube.server.registry.Registry`;
what to do next is asked of :mod:`fedkube.server.rounds` (pure functions).

:class:`RoundWorkflow` is the coordinator: the event queue, the loop over
rounds and the client lifecycle events. The rest is done by collaborators it
creates and that report back through callbacks:

* ``start.RoundStarter``: when a round starts and with whom;
* ``live_round``: the round in progress, a ``TrainRound`` or the init task's
  ``InitRound`` (``spec.model.source: firstClient``); ``side_rounds``:
  the init task's wait, and ``evaluation.Evaluator``'s evaluations after a
  training round (``spec.evaluation``);
* ``publisher.ModelPublisher``: the global model's transactions;
* ``results.ResultDesk`` and ``downloads.Downloader``: announced results,
  their downloads and the answers;
* ``checkpointing.Checkpointing``: background checkpoint writes;
* ``progress.JobProgress``: the status snapshots;
* ``outbox``: every message sent to a client.

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

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedkube.errors import ConfigError
from fedkube.metrics.core import new_registry
from fedkube.metrics.server import ServerMetrics
from fedkube.protocol import TRAIN_TASK
from fedkube.server import outbox, strategy_report
from fedkube.server.aggregate import weighted_metrics
from fedkube.server.checkpoint import completion_message
from fedkube.server.checkpointing import Checkpointing
from fedkube.server.config import JobSettings
from fedkube.server.control import ResultAnnounced, Session, SessionTable, TrainerReport
from fedkube.server.downloads import Downloader, fetch_settings, result_timeouts
from fedkube.server.evaluation import Evaluator, owed_on_resume
from fedkube.server.jobs import (
    CHECKPOINT_WAIT_S,
    TERMINATED,
    CheckpointStore,
    JobFailed,
    Outcome,
)
from fedkube.server.live_round import LiveRound, TrainRound
from fedkube.server.model import ModelSpec
from fedkube.server.pool import realigned
from fedkube.server.progress import JobProgress
from fedkube.server.publisher import ModelPublisher
from fedkube.server.registry import ClientState, LoopWatch, RegistrationRejected, Registry, leave_reason
from fedkube.server.results import ResultDesk
from fedkube.server.resume import starting_point
from fedkube.server.resumed_end import finish_resumed
from fedkube.server.reverse import UploadBroker
from fedkube.server.rounds import (
    Action,
    RoundPolicy,
    RoundState,
    Verdict,
    apply_stragglers,
    classify_trainer_report,
)
from fedkube.server.side_rounds import RoundHost, first_client_model
from fedkube.server.start import RoundStarter
from fedkube.server.strategy_api import Strategy
from fedkube.status import JobStatus, Phase, Reason
from fedkube.transfer.allocator import release_free_memory
from fedkube.transfer.service import DownloadService

# Outcome, JobFailed and CheckpointStore live in fedkube.server.jobs; app.py and tests import them from here too.
__all__ = ["CheckpointStore", "JobFailed", "Outcome", "RoundWorkflow"]

log = logging.getLogger(__name__)


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
        self._initial_model = initial_model
        self._checkpoints = checkpoints
        self._checkpointing = (
            Checkpointing(checkpoints, settings.job, on_settled=lambda: self._post(self._settle_checkpoints),
                          on_status=self._on_checkpoint_status, timing=self.telemetry.timing_checkpoint,
                          wait_s=checkpoint_wait_s)
            if checkpoints is not None else None
        )  # fmt: skip
        self._clock = clock
        self.registry = Registry(
            sorted(settings.clients), heartbeat_timeout_s=settings.heartbeat_timeout_s, clock=clock, job=settings.job
        )
        self._loop_watch = LoopWatch(settings.heartbeat_timeout_s, clock)
        self._progress = JobProgress(
            settings.job, settings.rounds, self.registry, self.telemetry, wall_clock=wall_clock
        )
        self.policy = RoundPolicy(
            rounds=settings.rounds,
            min_clients=settings.min_clients,
            round_timeout_s=settings.round_timeout_s,
            registration_timeout_s=settings.registration_timeout_s,
        )
        self._events: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.Queue()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._round: LiveRound | None = None
        self._trainers: dict[str, TrainerReport] = {}
        self._starter = RoundStarter(
            settings.job, self.registry, self.policy, self.telemetry, clock=clock, pump=self._pump_once,
            on_change=self._refresh,
        )  # fmt: skip
        self._final: Outcome | None = None
        # Task and transaction ids differ between server runs: a restarted server sends its
        # round again, and a sidecar ignores a task id it has already seen.
        self._run_id = uuid.uuid4().hex[:8]
        fetch = fetch_settings(settings)
        self._result_timeouts = strategy_report.task_settings(result_timeouts(settings, fetch), strategy)
        self._downloads = Downloader(
            settings.job, broker, sessions.send, fetch, clock=clock, on_retry=self._count_retry,
            on_stalled=lambda: self.telemetry.stalled("from_clients"),
        )  # fmt: skip
        self._publisher = ModelPublisher(download_service, self.telemetry, clock=clock)
        self._evaluator = Evaluator(settings, self._publisher, self.telemetry)
        self._results = ResultDesk(
            settings.job, self.registry, self._downloads, sessions.send, clock=clock, post=self._post, fail=self._fail,
            on_change=self._refresh,
        )  # fmt: skip

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

    def client_left(self, session: Session, reason: str, message: str) -> None:
        self._post(self._on_left, session, reason, message)

    def revoke(self, site: str, message: str) -> None:
        """``site`` was revoked (fedkube.server.revocation): it fails for the job and its stream closes."""
        self._post(self._on_revoked, site, message)

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
        return self._progress.status()

    @property
    def heartbeat_interval_ms(self) -> int:
        """What sidecars are told: three heartbeats fit in the timeout."""
        return max(100, int(self.settings.heartbeat_timeout_s * 1000 / 3))

    def run(self) -> Outcome:
        """Run the job to its end and return how it ended; job failures are outcomes, not exceptions."""
        s = self.settings
        try:
            start_round, model = starting_point(self.settings, self._checkpoints, self._strategy, self._progress,
                                                self._initial_model)
            if model is not None:
                model = realigned(dict(model))
            for number in range(start_round, s.rounds + 1):
                participants = self._starter.await_start(number)
                self._progress.phase = Phase.RUNNING
                if model is None:
                    model = realigned(first_client_model(s, participants, self._host()))  # handed over: no other holder
                    participants = self._starter.await_start(number)
                elif number == start_round and owed_on_resume(s.evaluation, self._progress.evaluation, number - 1,
                                                              s.rounds):
                    self._evaluate(number - 1, model)
                    participants = self._starter.await_start(number)  # who is still there after the evaluation
                started = self._clock()
                self.telemetry.round_started(number)
                model = self._run_round(number, participants, model)
                self._progress.completed = number
                if self._checkpointing is not None:
                    self._checkpointing.submit(number, model, self._strategy.state(), self._progress.metrics,
                                               tuple(self._progress.evaluation))
                    self._settle_checkpoints()
                duration = self._clock() - started
                self.telemetry.round_completed(duration, number=number)
                self._progress.round_seconds.append(duration)
                log.info("job %s round %s: completed in %.3f s", s.job, number, duration)
                self._evaluate(number, model)
                # The round's receive buffers and chunks are free now; without a trim glibc keeps
                # a varying part of them resident (bench/README.md, memory variance).
                release_free_memory()
                self._refresh()
            if model is not None and start_round > s.rounds:  # the checkpoint is the last round's
                finish_resumed(s, self._checkpoints, model, self._progress, self._strategy, self.telemetry,
                               self._host(), self._evaluate)
            outcome = Outcome(True, Phase.SUCCEEDED.value, completion_message(s.rounds, start_round),
                              self._progress.completed)
        except JobFailed as exc:
            log.error("job %s failed: %s", s.job, exc)
            outcome = Outcome(False, exc.reason, exc.message, self._progress.completed)
        except ConfigError as exc:
            log.error("job %s failed: %s", s.job, exc)
            outcome = Outcome(False, Reason.CONFIG_ERROR.value, str(exc), self._progress.completed)
        except Exception as exc:  # a bug must still end the job with a summary, never a hang
            log.exception("job %s: the workflow crashed", s.job)
            outcome = Outcome(False, Reason.INTERNAL.value, f"{type(exc).__name__}: {exc}", self._progress.completed)
        if self._checkpointing is not None:
            outcome = self._checkpointing.finish(outcome, self._progress.completed)
        self._end(outcome)
        return outcome

    # --- checkpoints ----------------------------------------------------------------------------

    def _settle_checkpoints(self) -> None:
        """Take the finished background writes into the status (workflow thread)."""
        if self._checkpointing is not None and self._checkpointing.settle():
            self._refresh()

    def _on_checkpoint_status(self, message: str, cleared: str) -> None:
        """A write failed (``message``), or a later one made the failure ``cleared`` stale."""
        if self._final is not None:
            return
        if message:
            self._progress.message = message
        elif cleared and self._progress.message == cleared:
            self._progress.message = ""

    # --- start -------------------------------------------------------------------------------

    def _evaluate(self, number: int, model: dict[str, np.ndarray]) -> None:
        point = self._evaluator.after_round(number, model, self._host())
        if point is not None:
            self._progress.evaluation.append(point)

    def _host(self) -> RoundHost:
        """This workflow's round machinery, for the init task and evaluations (fedkube.server.side_rounds)."""
        return RoundHost(self.registry, self._clock, self._run_id, self._task_ids, self._open_round,
                         self._close_round, self._pump_once)

    # --- a round -------------------------------------------------------------------------------

    def _run_round(
        self, number: int, participants: tuple[str, ...], model: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        s = self.settings
        rnd = self._open_train_round(number, participants, model)
        state = rnd.state
        try:
            while True:
                decision = state.decide(self.registry, self._clock())
                if decision.action is Action.FAIL:
                    apply_stragglers(self.registry, state, decision)
                    message = decision.message
                    if decision.reason is Reason.QUORUM_LOST and self._starter.not_in_round:
                        # Name every missing client, also those that were not in the round at all.
                        message += "; not in this round: " + "; ".join(str(e) for e in self._starter.not_in_round)
                    raise JobFailed(decision.reason.value if decision.reason else Reason.QUORUM_LOST.value, message)
                if decision.action is Action.CLOSE:
                    for site in apply_stragglers(self.registry, state, decision):
                        self.telemetry.client_failed(Reason.ROUND_TIMEOUT.value)
                        log.warning("job %s round %s: client %s excluded as a straggler (RoundTimeout)", s.job,
                                    number, site)
                    if not rnd.settling(self._clock(), self._downloads.fetch.chunk_timeout_s + 5.0):
                        break  # else: wait for downloads that must end and tensors being rebuilt
                for site in decision.needs_task:
                    self._send_task(rnd, site)
                wake = decision.wake_at if decision.wake_at is not None else self._clock() + 0.2
                self._pump_once(min(wake, self._clock() + 0.5))
        finally:
            self._close_round(rnd)
        rnd.check_rebuilt()
        done = [site for site in participants if site in rnd.results]
        if len(done) < self.policy.min_clients:  # e.g. a committed result lost its client meanwhile
            raise JobFailed(Reason.QUORUM_LOST.value, f"round {number}: only {done} delivered a result")
        if self._checkpointing is not None:
            self._checkpointing.before_strategy_update(number)
            self._settle_checkpoints()
        t0 = time.perf_counter()
        new_model = rnd.aggregator.finish()
        self.telemetry.aggregated(rnd.aggregation_s + time.perf_counter() - t0)
        self._progress.metrics = weighted_metrics({k: (float(n), m) for k, (n, m) in rnd.results.items()})
        strategy_report.after_round(self._strategy, self.telemetry, rnd, self._progress)
        self.telemetry.round_metrics(TRAIN_TASK, self._progress.metrics)
        log.info("job %s round %s: aggregated the results of %s; metrics %s", s.job, number, ",".join(done),
                 self._progress.metrics)
        self._refresh()
        return new_model

    def _task_ids(self, number: int, participants: tuple[str, ...], prefix: str = "r") -> dict[str, str]:
        return {site: f"{self.settings.job}-{prefix}{number}-{self._run_id}-{site}" for site in participants}

    def _open_round(self, rnd: LiveRound) -> None:
        """Make ``rnd`` the round in progress and send its tasks."""
        self._progress.round = rnd.number
        self._round = rnd
        for site in rnd.tasks:
            self._send_task(rnd, site)
        log.info("job %s round %s: %s task sent to %s", self.settings.job, rnd.number, rnd.kind, ",".join(rnd.tasks))
        self._refresh()

    def _open_train_round(
        self, number: int, participants: tuple[str, ...], model: dict[str, np.ndarray]
    ) -> TrainRound:
        s = self.settings
        now = self._clock()
        aggregator = self._strategy.begin_round(model)
        sent = strategy_report.published(self._strategy, model)  # the model, plus e.g. SCAFFOLD's c
        # Serialize once, serve many: one transaction per round for all its clients.
        transaction = self._publisher.publish(
            sent, participants, s.round_timeout_s, transaction_id=f"{s.job}-r{number}-{self._run_id}"
        )
        rnd = TrainRound(
            number=number, job=s.job, tasks=self._task_ids(number, participants), deadline=now + s.round_timeout_s,
            spec=ModelSpec.of(sent), aggregator=aggregator, state=RoundState(number, participants, now, self.policy),
            transaction=transaction, refs=transaction.refs, model=sent, telemetry=self.telemetry, clock=self._clock,
        )  # fmt: skip
        if self._checkpointing is not None:
            self._checkpointing.published(number, rnd.refs)
        self.telemetry.model_size(transaction.nbytes)
        self._open_round(rnd)
        return rnd

    def _send_task(self, rnd: LiveRound, site: str) -> None:
        """Give ``site`` the round's task (again, after a reconnect that did not resume it)."""
        task_id = rnd.tasks[site]
        rnd.assign(self.registry, site, task_id)
        refs = rnd.refs
        txn = rnd.transaction
        if txn is not None and rnd.model is not None and self._publisher.refetch_needed(txn, site):
            # The client fetched the model and then lost it (its sidecar restarted): publish the
            # same arrays again for it alone; the views cost no copy.
            again = self._publisher.publish(rnd.model, [site], max(1.0, rnd.deadline - self._clock()),
                                            f"{txn.id}-{site}-{len(rnd.republished) + 1}")
            rnd.republished.append(again)
            refs = again.refs
        msg = outbox.task(task_id, rnd.number, rnd.kind, refs, self.settings.rounds, self._result_timeouts)
        if not self._sessions.send(site, msg):
            log.info("job %s round %s: client %s has no live stream; its task goes out when it reconnects",
                     self.settings.job, rnd.number, site)

    def _close_round(self, rnd: LiveRound) -> None:
        """End the round's downloads (bounded), settle the aggregator, release the transaction."""
        rnd.closed = True
        for dl in [*rnd.downloads.values(), *rnd.rebuilds]:
            dl.abort.set()
        bound = self._clock() + self._downloads.fetch.chunk_timeout_s + 5.0
        for dl in [*rnd.downloads.values(), *rnd.superseded, *rnd.rebuilds]:
            if dl.thread is not None:
                dl.thread.join(timeout=max(0.0, bound - self._clock()))
                if dl.thread.is_alive():
                    log.error("job %s round %s: the download from %s did not stop in time", self.settings.job,
                              rnd.number, dl.site)
        self._drain()  # downloads that finished as the round closed
        for dl in list(rnd.downloads.values()):
            rnd.discard(dl)
        rnd.downloads.clear()
        self._publisher.release([rnd.transaction, *rnd.republished])
        rnd.model = None
        # Whoever announced a result that did not make it learns so now, so its send() returns.
        for site, task_id in rnd.tasks.items():
            if site in rnd.announced and site not in rnd.answered:
                rec = self.registry.get(site)
                if rec.state is ClientState.FAILED and rec.task_id == task_id and rec.reason is not None:
                    self._results.answer(rnd, site, False, rec.reason.value, rec.message)
        self._round = None
        self._refresh()

    # --- event handlers (workflow thread) -------------------------------------------------------

    def _on_connected(self, session: Session, resume_task_id: str) -> None:
        job = self.settings.job
        if self._final is not None:
            session.send(outbox.stop(self._final.success, self._final.reason, self._final.message))
            return
        try:
            reg = self.registry.register(session, resume_task_id, peer=session.peer, cert=session.cert_not_after)
        except RegistrationRejected as exc:
            rec = self.registry.get(session.site)
            log.warning("job %s: %s", job, exc)
            session.send(outbox.stop(False, rec.reason.value if rec.reason else Reason.REJECTED.value, str(exc)))
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
            elif rnd.resend_on_reconnect(site, resume_task_id):
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

    def _on_left(self, session: Session, reason: str, message: str) -> None:
        """The site withdrew (Leave): Withdrawn now, its in-flight result dropped, the round goes on without it."""
        rec = self.registry.withdraw(session, leave_reason(reason), message)
        if rec is None or rec.reason is None:
            return
        self.telemetry.client_failed(rec.reason.value)
        log.warning("job %s: client %s withdrew (%s): %s", self.settings.job, rec.name, rec.reason.value, rec.message)
        self._exclude(rec.name, rec.reason.value, rec.message)
        self._sessions.remove(session)
        self._refresh()

    def _on_revoked(self, site: str, message: str) -> None:
        # Like a failure for the job (its in-flight result excluded, quorum decides whether the job goes on),
        # but the stream is closed too: a thief's sidecar would ignore the Stop.
        if site in self.settings.clients and self._fail(site, Reason.REVOKED, message):
            self._exclude(site, Reason.REVOKED.value, message)
            self._sessions.send(site, outbox.stop(False, Reason.REVOKED.value, message))
        if (session := self._sessions.current(site)) is not None:
            self._sessions.remove(session)
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
            self._exclude(site, verdict.reason.value, verdict.message)
            self._sessions.send(site, outbox.stop(False, verdict.reason.value, verdict.message))
        self._refresh()

    def _on_result(self, session: Session, result: ResultAnnounced) -> None:
        self._results.on_result(self._round, session, result)

    def _fail(self, site: str, reason: Reason, message: str, *, task_id: str | None = None) -> bool:
        """registry.fail, counted by reason when it changed the client."""
        changed = self.registry.fail(site, reason, message, task_id=task_id)
        if changed:
            self.telemetry.client_failed(reason.value)
        return changed

    def _exclude(self, site: str, reason: str, message: str) -> None:
        """Exact exclusion: the site's in-flight transfer dropped, whatever it sent kept out of the round."""
        if (rnd := self._round) is not None:
            if site in rnd.downloads:
                rnd.downloads[site].abort.set()
            rnd.keep_failure(site, reason, message)

    def _count_retry(self, err: Exception) -> None:
        """A result fetch is tried again (runs on the download's thread; only counts)."""
        self.telemetry.download_retry(type(err).__name__)

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
            self._exclude(rec.name, Reason.LOST.value, rec.message)
            if (session := self._sessions.current(rec.name)) is not None:
                # End its stream: a live sidecar reconnects and registers again (Lost -> Registered).
                self._sessions.remove(session)
            self._refresh()

    def _end(self, outcome: Outcome) -> None:
        rnd = self._round
        if rnd is not None and not rnd.closed:
            try:
                self._close_round(rnd)
            except Exception:
                log.exception("job %s: closing round %s failed", self.settings.job, rnd.number)
        self._final = outcome
        self._progress.finish(outcome)
        for rec in self.registry.records():
            if not rec.failed_for_job:
                self._sessions.send(rec.name, outbox.stop(outcome.success, outcome.reason, outcome.message))
        self._refresh()

    def _refresh(self) -> None:
        self._progress.publish(self._round.downloads if self._round is not None else {})
