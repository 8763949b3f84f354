"""The trainer's session with its sidecar: the machinery behind ``fedkube.trainer_sdk``.

One ``Session`` per process. It keeps the task bookkeeping (the task received
and not yet answered, the job's Stop) and puts together the parts that do the
work: :class:`~fedkube.trainer_sdk._link.SidecarLink` holds the ``TrainerLink``
channel and the attach to the sidecar (so the sidecar learns at once if this
process dies, and a restarted sidecar learns of this trainer again),
:class:`~fedkube.trainer_sdk._receive.ModelFetch` fetches each task's global
model, and :class:`~fedkube.trainer_sdk._results.ResultSender` serves and
announces results. It also reports the trainer's outcome: finished at exit, or
failed with a kind from ``sys.excepthook`` (``_hooks``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import grpc

from fedkube import protocol
from fedkube.protocol import (
    DOWNLOAD_WAIT_SECONDS,
    RECEIVE_SECONDS,
    RESERVED_METRIC_PREFIX,
    SEND_SECONDS,
)
from fedkube.trainer_sdk._link import Ids, SidecarLink, rpc_text
from fedkube.trainer_sdk._receive import UNREACHABLE_MODEL, ModelFetch
from fedkube.trainer_sdk._results import ResultSender, ResultServer
from fedkube.trainer_sdk._settings import SessionSettings
from fedkube.trainer_sdk._task import Task
from fedkube.trainer_sdk.errors import (
    InvalidParamsError,
    JobStoppedError,
    ReceiveWithoutSendError,
    SendWithoutReceiveError,
    SidecarUnreachableError,
)
from fedkube.trainer_sdk.model import FLModel, check_num_examples, into_params
from fedkube.transfer.allocator import release_free_memory
from fedkube.transfer.wire import relay_channel_options
from fedkube.wire.v1 import control_pb2, trainer_pb2, trainer_pb2_grpc

__all__ = ["Session", "SessionSettings"]

log = logging.getLogger("fedkube.trainer_sdk")


class Session:
    """A trainer's link to its sidecar; created by ``fk.init()``."""

    def __init__(self, sidecar_address: str, *, site: str, job: str, settings: SessionSettings) -> None:
        self.address = sidecar_address
        self.ids = Ids(site=site, job=job)
        self.settings = settings
        self._lock = threading.Lock()
        self._pending: control_pb2.Task | control_pb2.Stop | None = None
        self._stopped: control_pb2.Stop | None = None
        self._task: Task | None = None  # received, not yet answered
        self._round = 0
        self._final_reported = False
        self.results = ResultServer(site)
        self.service = self.results.service
        # A fixed per-stream read-ahead instead of gRPC's BDP-grown window: the bytes
        # in flight would otherwise pile up here on top of the model (LESSONS.md 8).
        self.channel = grpc.insecure_channel(sidecar_address, options=relay_channel_options())
        self.link = trainer_pb2_grpc.TrainerLinkStub(self.channel)
        self.model = ModelFetch(self.channel, self.ids, settings.fetch, handoff_ok=self.results.handoff_ok)
        self.sidecar = SidecarLink(
            sidecar_address, self.link, self.ids, connect_timeout_s=settings.connect_timeout_s,
            hello=self.results.hello_request, on_hello=self.model.use_route, job_over=lambda: self.job_over,
        )  # fmt: skip
        self.sender = ResultSender(self.results, self.sidecar, self.ids)

    @property
    def site(self) -> str:
        return self.ids.site

    @property
    def job(self) -> str:
        return self.ids.job

    def connect(self) -> None:
        """Say hello to the sidecar and open the session stream; raises SidecarUnreachableError."""
        try:
            self.sidecar.connect()
        except SidecarUnreachableError:
            self.close()
            raise
        log.info("job %s site %s: connected to sidecar %s; global model over %s; results served at %s and %s (bulk)",
                 self.job, self.site, self.address,
                 f"bulk via {self.model.bulk_via}" if self.model.bulk_fetcher is not None else "gRPC",
                 self.results.download_address, self.results.bulk_address)

    # --- tasks ---------------------------------------------------------------------
    def _poll(self, block: bool) -> control_pb2.Task | control_pb2.Stop | None:
        """The next task or Stop (cached until consumed)."""
        with self._lock:
            if self._pending is not None:
                return self._pending
            if self._stopped is not None:
                return self._stopped
        lost_since: float | None = None
        while True:
            try:
                resp = self.link.NextTask(
                    trainer_pb2.NextTaskRequest(wait_ms=self.settings.poll_ms),
                    timeout=self.settings.poll_ms / 1000.0 + 30.0,
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                # A long poll in flight when the sidecar dies fails at once (wait_for_ready covers only calls not
                # yet started); a kubelet restarts a killed native sidecar, so ask again for up to connect_timeout_s.
                now = time.monotonic()
                lost_since = now if lost_since is None else lost_since
                if (exc.code() != grpc.StatusCode.UNAVAILABLE or self.sidecar.closed
                        or now - lost_since > self.settings.connect_timeout_s):
                    raise SidecarUnreachableError(
                        f"job {self.job} site {self.site}: the sidecar at {self.address} stopped answering: "
                        f"{rpc_text(exc)}"
                    ) from None
                time.sleep(0.2)
                continue
            lost_since = None
            which = resp.WhichOneof("outcome")
            if which is not None:
                got: control_pb2.Task | control_pb2.Stop = resp.task if which == "task" else resp.stop
                # The server is done with the round of the last result (LESSONS.md 8: drop it before the
                # next model is received, perhaps into the very same arrays).
                self.sender.release_served()
                with self._lock:
                    if which == "stop":
                        self._stopped = resp.stop
                    else:
                        self._pending = resp.task
                return got
            if not block:
                return None

    def is_evaluate(self) -> bool:
        with self._lock:
            return self._task is not None and self._task.is_evaluate

    def is_running(self) -> bool:
        self._check_answered("is_running")
        return isinstance(self._poll(block=True), control_pb2.Task)

    def receive(self, into: Any = None) -> FLModel:
        self._check_answered("receive")
        buffers = into_params(into)
        while True:
            model = self._receive_one(buffers)
            if model is not None:
                return model

    def _check_answered(self, call: str) -> None:
        """Raise ReceiveWithoutSendError while the task last received waits for its send() (unless the job is over).

        The server sends a site its next task only after the result of this
        one (or the round's deadline), so waiting for it here would block until
        that deadline and get the site dropped as a straggler.
        """
        with self._lock:
            task = self._task if self._stopped is None else None
        if task is not None:
            raise ReceiveWithoutSendError(
                f"job {self.job} site {self.site} round {task.round}: {call}() was called while task {task.id} "
                f"of round {task.round} is still unanswered; the server waits for its result until the round's "
                "deadline; fix: call fk.send() exactly once for each task fk.receive() returned, before asking "
                "for the next one"
            )

    def _receive_one(self, into: Mapping[str, Any] | None = None) -> FLModel | None:
        """The next task's model; None when its model is gone at the source (the task is dropped)."""
        got = self._poll(block=True)
        if isinstance(got, control_pb2.Stop):
            raise JobStoppedError(
                f"job {self.job} site {self.site}: the job is over ({got.reason or 'stopped'}); "
                "fix: loop with `while fk.is_running():` before calling receive()"
            )
        assert got is not None
        with self._lock:
            self._pending = None
        started = time.monotonic()
        task = Task(got)
        self._round = task.round
        log.info("job %s site %s round %d: task %s received (%d tensors)", self.job, self.site, task.round,
                 task.id, len(task.refs))
        # An init task asks for the script's initial weights: there is nothing to fetch.
        try:
            params = None if task.kind == protocol.TASK_INIT else self.model.fetch(task, into)
        except UNREACHABLE_MODEL as exc:
            # The server restarted (it publishes under new ids and sends its own task for the round)
            # or stayed out of reach past every retry: this copy can never be done. The site sits out
            # the round, as for a failed result transfer (DESIGN.md §5), instead of failing the job.
            log.warning("job %s site %s round %d: dropping task %s, its model cannot be fetched (%s); "
                        "waiting for the server's next task", self.job, self.site, task.round, task.id, exc)
            return None
        with self._lock:
            self._task = task
        self._timing(RECEIVE_SECONDS, time.monotonic() - started)
        return FLModel(
            params=params, round=task.round, total_rounds=task.total_rounds, config=task.script_config()
        )

    # --- results -------------------------------------------------------------------
    def send(self, model: FLModel) -> bool:
        with self._lock:
            task, self._task = self._task, None
            if task is not None:
                try:
                    # An evaluation's metrics are weighted by num_examples like a training result.
                    num_examples = check_num_examples(model.num_examples, training=task.kind != protocol.TASK_INIT)
                except InvalidParamsError:
                    self._task = task  # nothing was sent: a corrected send() can still answer the task
                    raise
        if task is None:
            raise SendWithoutReceiveError(
                f"job {self.job} site {self.site}: send() without a task to answer; fix: call fk.receive() "
                "first, and send() exactly once per received task"
            )
        if task.is_evaluate and model.params is not None:
            # A script that ignores the task's kind trains and sends its weights: the server would refuse
            # tensors on an evaluate task, so its metrics go alone and the script keeps working.
            log.info("job %s site %s round %d: evaluate task: the params sent are dropped, only num_examples and "
                     "metrics go to the server (answer an evaluate task with FLModel(num_examples=..., "
                     "metrics=...))", self.job, self.site, task.round)
            model = FLModel(num_examples=num_examples, metrics=dict(model.metrics or {}))
        started = time.monotonic()
        try:
            return self.sender.send(task, model, num_examples, self.settings.result_timeouts())
        finally:
            self._timing(SEND_SECONDS, time.monotonic() - started)
            self._timing(DOWNLOAD_WAIT_SECONDS, self.sender.waited)
            # Drop everything of this round (LESSONS.md 8): the caller may still hold its own arrays.
            del task, model
            # The round's chunk buffers are freed now; glibc would keep them resident (bench/README.md).
            release_free_memory()

    # --- metrics and state -------------------------------------------------------------
    def _timing(self, name: str, seconds: float) -> None:
        """Report one of the SDK's own timings (reserved names) to the sidecar's histograms; best effort."""
        report = control_pb2.MetricReport(round=self._round, values={name: seconds},
                                          timestamp_ms=int(time.time() * 1000))
        try:
            self.link.LogMetric(report, timeout=5.0)
        except grpc.RpcError as exc:
            log.debug("job %s site %s: timing %s not delivered: %s", self.job, self.site, name, rpc_text(exc))

    def log_metric(self, name: str, value: float, round: int | None = None) -> None:
        if str(name).startswith(RESERVED_METRIC_PREFIX):
            raise InvalidParamsError(
                f"metric name {name!r} starts with {RESERVED_METRIC_PREFIX!r}, which is reserved for fedkube's own "
                "timings; fix: choose another name"
            )
        report = control_pb2.MetricReport(
            round=self._round if round is None else int(round),
            values={str(name): float(value)},
            timestamp_ms=int(time.time() * 1000),
        )
        try:
            self.link.LogMetric(report, timeout=10.0)
        except grpc.RpcError as exc:
            log.warning("job %s site %s: metric %s not delivered: %s", self.job, self.site, name, rpc_text(exc))

    def report(self, phase: int, kind: int = control_pb2.FAILURE_KIND_UNSPECIFIED, message: str = "",
               exit_code: int = 0) -> None:
        """Tell the sidecar how this trainer ends (only the first final report counts)."""
        with self._lock:
            if self._final_reported:
                return
            self._final_reported = True
        try:
            self.link.ReportState(
                control_pb2.TrainerState(
                    phase=phase,  # type: ignore[arg-type]
                    kind=kind,  # type: ignore[arg-type]
                    message=message[:4000],
                    exit_code=exit_code,
                ),
                timeout=10.0,
            )
        except grpc.RpcError as exc:
            log.warning("job %s site %s: could not report the trainer's state to the sidecar: %s", self.job,
                        self.site, rpc_text(exc))

    @property
    def job_over(self) -> bool:
        """True once the server's Stop reached this trainer (the script's loop ran to its end)."""
        with self._lock:
            return self._stopped is not None

    @property
    def final_reported(self) -> bool:
        with self._lock:
            return self._final_reported

    def close(self) -> None:
        self.sender.release_served()
        self.sidecar.detach()
        self.results.close()
        self.channel.close()
