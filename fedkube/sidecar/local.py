"""The trainer's local endpoint: the ``TrainerLink`` servicer.

Thin: it translates TrainerLink calls into the sidecar's bookkeeping
(``TaskBook``, ``TrainerTracker``) and hands upstream messages to the
``Sidecar`` through the callbacks it was given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from fedkube.sidecar.state import TaskBook, TrainerSnapshot, TrainerTracker
from fedkube.wire.v1 import control_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)

# WatchResult sends a progress message at least this often, so the trainer's
# idle timer sees a live sidecar even while the server is not pulling.
WATCH_KEEPALIVE_S = 1.0
# At most this often a WatchResult stream reports bytes moved (the end is reported at once): the SDK only
# needs them for its idle timer, and a message per 4 MiB frame cost the sidecar and trainer CPU in gRPC.
WATCH_MIN_INTERVAL_S = 0.2
NEXT_TASK_MAX_WAIT_S = 30.0
# Seconds a sidecar waits, after its trainer went without a word, for its own stop (the pod is being deleted)
# before it reports the trainer gone; the kubelet stops a native sidecar right after the pod's main containers.
POD_STOP_GRACE = 2.0


class TrainerLinkServicer(trainer_pb2_grpc.TrainerLinkServicer):
    """Serves one trainer (one pod has one trainer; a restarted trainer replaces the old session)."""

    def __init__(
        self,
        *,
        job: str,
        site: str,
        tasks: TaskBook,
        trainer: TrainerTracker,
        on_hello: Callable[[trainer_pb2.HelloRequest], None],
        on_state: Callable[[TrainerSnapshot], None],
        on_result: Callable[[control_pb2.ResultAnnouncement], None],
        on_metric: Callable[[control_pb2.MetricReport], None],
        closing: threading.Event,
        bulk_address: Callable[[], str] = lambda: "",
        bulk_handoff: Callable[[], str] = lambda: "",
        server_connected: Callable[[], bool] = lambda: True,
    ) -> None:
        """``on_hello(request)`` gets the trainer's endpoints; ``bulk_address()`` and ``bulk_handoff()`` are
        the sidecar's bulk relay and handoff, told to the trainer in ``HelloResponse`` ("" when none)."""
        self._job, self._site = job, site
        self._tasks, self._trainer = tasks, trainer
        self._on_hello, self._on_state = on_hello, on_state
        self._on_result, self._on_metric = on_result, on_metric
        self._closing = closing
        self._bulk_address = bulk_address
        self._bulk_handoff = bulk_handoff
        self._server_connected = server_connected
        # A restarted sidecar knows no trainer until it says Hello again; a result announced before
        # that could not be served to the server (the sidecar does not know where the trainer serves).
        self._hello_seen = threading.Event()

    def Hello(self, request: trainer_pb2.HelloRequest, context: Any) -> trainer_pb2.HelloResponse:
        if not request.download_address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "Hello.download_address is empty; the trainer SDK must start its Download service first")
        relay, handing = self._bulk_address(), self._bulk_handoff()
        log.info("site %s: trainer (pid %d) says hello; its results are served at %s (bulk %s%s); global model "
                 "over %s", self._site, request.pid, request.download_address, request.bulk_address or "none",
                 f", handoff {request.bulk_handoff}" if request.bulk_handoff else "",
                 f"the bulk relay at {relay}" + (f" (handoff {handing})" if handing else "") if relay else "gRPC")
        self._on_hello(request)
        self._hello_seen.set()
        return trainer_pb2.HelloResponse(job=self._job, site=self._site, bulk_address=relay, bulk_handoff=handing)

    def Session(
        self, request: trainer_pb2.SessionRequest, context: Any
    ) -> Iterator[trainer_pb2.SessionEvent]:
        session, change = self._trainer.attached()
        if change is not None:
            self._on_state(change)
        gone = threading.Event()

        def on_done() -> None:
            # Runs when the RPC ends for any reason: the trainer process ended or dropped the link.
            gone.set()
            if (self._tasks.stopped is None and not self._trainer.state.final
                    and not self._tasks.downloads_outstanding()):
                # Deleting or evicting a pod stops its trainer first and this sidecar next: a trainer that went
                # with its pod did not fail, and the operator creates the pod again (spec.clientRestartLimit), whose
                # sidecar takes the site's task up again. Told apart by this sidecar's own stop coming soon after.
                # Not while a result of its is being downloaded: that result is lost either way, and the server
                # must hear ExitedBeforeDownload now, before its own retries give up with a vaguer reason.
                threading.Thread(target=settle, name=f"trainer-gone-{self._site}", daemon=True).start()
                return
            report()

        def settle() -> None:
            if self._closing.wait(POD_STOP_GRACE):
                log.info("site %s: trainer (pid %d) stopped with its pod; not reported as a failure", self._site,
                         request.pid)
                return
            report()

        def report() -> None:
            change = self._trainer.gone(
                session,
                downloads_outstanding=bool(self._tasks.downloads_outstanding()),
                job_stopped=self._tasks.stopped is not None,
                server_connected=self._server_connected(),
            )
            if change is not None:
                log.warning("site %s: trainer (pid %d) is gone: %s", self._site, request.pid, change.message)
                self._on_state(change)
            else:
                log.info("site %s: trainer (pid %d) disconnected", self._site, request.pid)

        if not context.add_callback(on_done):
            on_done()
            return
        stop_sent = False
        while not gone.is_set() and not self._closing.is_set():
            stop = self._tasks.stopped
            if stop is not None and not stop_sent:
                stop_sent = True
                yield trainer_pb2.SessionEvent(stop=stop)
            gone.wait(0.5)

    def NextTask(
        self, request: trainer_pb2.NextTaskRequest, context: Any
    ) -> trainer_pb2.NextTaskResponse:
        wait = min(request.wait_ms / 1000.0, NEXT_TASK_MAX_WAIT_S)
        got = self._tasks.take(wait)
        if isinstance(got, control_pb2.Task):
            log.info("site %s: task %s (round %d) handed to the trainer", self._site, got.task_id, got.round)
            return trainer_pb2.NextTaskResponse(task=got)
        if isinstance(got, control_pb2.Stop):
            return trainer_pb2.NextTaskResponse(stop=got)
        return trainer_pb2.NextTaskResponse()

    def SubmitResult(
        self, request: trainer_pb2.SubmitResultRequest, context: Any
    ) -> trainer_pb2.SubmitResultResponse:
        ann = request.result
        if not ann.task_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SubmitResult without a task_id; send() answers a task")
        wrong = [r.name for r in ann.refs if r.source != self._site]
        if wrong:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"result refs {wrong} name a source other than this site {self._site!r}")
        if not self._hello_seen.is_set():
            # Retryable: the SDK attaches again (Hello) when its link to a restarted sidecar broke, then
            # announces the result again.
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"site {self._site}: no trainer has said Hello to this sidecar yet (it restarted?), so it "
                          f"cannot serve task {ann.task_id}'s result; the trainer SDK attaches again and re-announces")
        stop = self._tasks.stopped
        if stop is not None:  # the server takes no more results: say so now instead of letting send() wait
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the job is over ({stop.reason or 'stopped'}); task {ann.task_id}'s result was not sent")
        self._tasks.announce(ann)
        log.info("site %s: result of task %s (round %d): %d tensors, %d bytes, %d examples",
                 self._site, ann.task_id, ann.round, len(ann.refs), sum(r.nbytes for r in ann.refs),
                 ann.num_examples)
        self._on_result(ann)
        return trainer_pb2.SubmitResultResponse()

    def WatchResult(
        self, request: trainer_pb2.ResultStatusRequest, context: Any
    ) -> Iterator[trainer_pb2.ResultProgress]:
        if not self._tasks.known(request.task_id):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no result was submitted for task {request.task_id!r}")
        version = -1
        sent_at: float | None = None
        while context.is_active():
            p = self._tasks.progress(request.task_id, after_version=version, timeout=WATCH_KEEPALIVE_S)
            if p is None:
                return
            hold = 0.0 if p.finished or sent_at is None else sent_at + WATCH_MIN_INTERVAL_S - time.monotonic()
            if hold > 0:  # coalesce the changes of the next moment into one message; an end cuts it short
                p = self._tasks.progress(request.task_id, after_version=p.version, timeout=hold, finished_only=True)
                if p is None:
                    return
            version = p.version
            sent_at = time.monotonic()
            yield trainer_pb2.ResultProgress(
                bytes_done=p.bytes_done, bytes_total=p.bytes_total, finished=p.finished,
                ok=p.ok, reason=p.reason, message=p.message,
            )
            if p.finished:
                self._tasks.forget(request.task_id)
                return

    def ReportState(self, request: control_pb2.TrainerState, context: Any) -> trainer_pb2.Empty:
        change = self._trainer.reported(request)
        if change is not None:
            phase = control_pb2.TrainerPhase.Name(change.phase).removeprefix("TRAINER_PHASE_").lower()
            kind = control_pb2.FailureKind.Name(change.kind).removeprefix("FAILURE_KIND_").lower()
            log.info("site %s: trainer reports %s%s: %s", self._site, phase,
                     f" ({kind})" if change.kind else "", change.message or "-")
            self._on_state(change)
        return trainer_pb2.Empty()

    def LogMetric(self, request: control_pb2.MetricReport, context: Any) -> trainer_pb2.Empty:
        self._on_metric(request)
        return trainer_pb2.Empty()
