"""The trainer's connection to its sidecar: the machinery behind ``fedkube.trainer_sdk``.

One ``Session`` per process. It serves the trainer's own ``Download`` service
(results are pulled from it, zero-copy from the user's arrays) over gRPC and
over the bulk protocol, holds the ``TrainerLink`` channel and a ``Session``
stream to the sidecar (so the sidecar learns at once if this process dies),
and reports the trainer's outcome: finished at exit, or failed with a kind
from ``sys.excepthook``.

The global model is fetched through the sidecar's bulk relay when the sidecar
names one in ``HelloResponse.bulk_address`` (frames land straight in the
arrays handed to the user), else through its gRPC ``Download`` relay. If the
bulk path fails (say the server's bulk port is unreachable) the session logs
it once and fetches over gRPC from then on.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from fedkube import envvars, protocol
from fedkube.errors import ConfigError
from fedkube.protocol import (
    DOWNLOAD_WAIT_SECONDS,
    RECEIVE_SECONDS,
    RESERVED_METRIC_PREFIX,
    SEND_SECONDS,
    ResultTimeouts,
)
from fedkube.status import Reason
from fedkube.trainer_sdk.errors import (
    InvalidParamsError,
    JobStoppedError,
    ReceiveWithoutSendError,
    ResultRejectedError,
    ResultTransferError,
    SendWithoutReceiveError,
    SidecarUnreachableError,
)
from fedkube.trainer_sdk.model import (
    FLModel,
    ReceiveTarget,
    check_num_examples,
    into_params,
    overlapping,
    params_to_numpy,
    receive_target,
)
from fedkube.transfer.allocator import release_free_memory
from fedkube.transfer.bulk import BulkChunkSource, BulkHandoffServer, BulkServer
from fedkube.transfer.errors import (
    ChecksumMismatchError,
    InvalidRefError,
    RefNotFoundError,
    StreamBrokenError,
    TransactionExpiredError,
    TransferAbortedError,
    TransferError,
    TransferStalledError,
)
from fedkube.transfer.fetch import Fetcher, FetchSettings, GrpcChunkSource
from fedkube.transfer.refs import TensorRef, numpy_dtype
from fedkube.transfer.route import choose_route, handoff_enabled
from fedkube.transfer.service import DownloadService, serve
from fedkube.transfer.wire import relay_channel_options
from fedkube.wire.v1 import control_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("fedkube.trainer_sdk")

# Bulk fetch failures that falling back to gRPC cannot fix.
_SAME_ON_GRPC = (
    TransferAbortedError, ChecksumMismatchError, InvalidRefError, RefNotFoundError, TransactionExpiredError,
)

# Attempts on the bulk path before the session falls back to gRPC: a relay that cannot reach the
# server answers at once, so a few quick tries tell a dead bulk port from a passing break.
BULK_MAX_ATTEMPTS = 3
RESUBMITS = 2  # times send() announces a result again to a restarted sidecar
# Fetch failures after which a task is dropped (the site sits out the round), not raised to the script.
_UNREACHABLE_MODEL = (RefNotFoundError, TransactionExpiredError, StreamBrokenError, TransferStalledError)


@dataclass(frozen=True)
class SessionSettings:
    """Timeouts of the trainer side.

    * ``connect_timeout_s``: how long ``init()`` waits for the sidecar to answer, and how long a trainer waits
      for a restarted sidecar when the one it was talking to went away.
    * ``poll_ms``: long-poll length of each NextTask call.
    * ``result_idle_timeout_s``: ``send()`` fails when the server's download of
      the result made no progress for this long (LESSONS.md 3).
    * ``result_start_timeout_s``: ``send()`` fails when the download did not
      start within this long (the server pulls results as they arrive).
    * ``result_ttl_s``: the result's transaction is dropped after this long even
      if the server never completed it.

    The three ``result_*`` values are defaults: the server sends its job's own
    with every task (:class:`fedkube.protocol.ResultTimeouts`), and those win.
    """

    connect_timeout_s: float = 60.0
    poll_ms: int = 1000
    result_idle_timeout_s: float = 300.0
    result_start_timeout_s: float = 900.0
    result_ttl_s: float = 3 * 3600.0
    fetch: FetchSettings = field(default_factory=FetchSettings)

    def result_timeouts(self) -> ResultTimeouts:
        """The ``result_*`` defaults, for a task whose config does not set them."""
        return ResultTimeouts(self.result_idle_timeout_s, self.result_start_timeout_s, self.result_ttl_s)


class _Task:
    def __init__(self, task: control_pb2.Task) -> None:
        self.id = task.task_id
        self.round = int(task.round)
        self.total_rounds = int(task.total_rounds)
        self.kind = task.kind
        self.config = dict(task.config)
        self.refs = [TensorRef.from_proto(r) for r in task.refs]

    def script_config(self) -> dict[str, str]:
        """The config a script sees: the task's settings plus its kind by name (``fedkube.task``)."""
        return {**self.config, protocol.TASK_KIND_KEY: protocol.task_kind_name(self.kind)}


class Session:
    """A trainer's link to its sidecar; created by ``fk.init()``."""

    def __init__(self, sidecar_address: str, *, site: str, job: str, settings: SessionSettings) -> None:
        self.address = sidecar_address
        self.site = site
        self.job = job
        self.settings = settings
        self._lock = threading.Lock()
        self._pending: control_pb2.Task | control_pb2.Stop | None = None
        self._stopped: control_pb2.Stop | None = None
        self._task: _Task | None = None  # received, not yet answered
        self._round = 0
        self._waited = 0.0  # seconds the last send() waited for the server's download
        self._final_reported = False
        self._closed = False
        self._attach_cond = threading.Condition()
        self._attach_gen = 0  # counts attaches to a sidecar (Hello + Session); send() waits on it after a restart
        self.service = DownloadService(site)
        self._download_server, port = serve(self.service, "127.0.0.1:0", max_workers=8)
        self.download_address = f"127.0.0.1:{port}"
        # The same results over the bulk protocol, for a sidecar that pushes them to the server's bulk
        # port; pod-local like the gRPC one, so no token (the trainer holds none).
        self._bulk_server = BulkServer(self.service, host="127.0.0.1", port=0, name=f"site {site} results").start()
        self.bulk_address = self._bulk_server.address
        # Where the sidecar hands over its connection to the server with the fetch to answer on it, so
        # result bytes go from here straight to the server (fedkube.transfer.handoff; Linux only).
        self._handoff_ok = handoff_enabled(
            os.environ.get(envvars.BULK_HANDOFF, "").strip().lower() not in ("0", "false")
        )
        self._handoff_server = BulkHandoffServer(self._bulk_server).start() if self._handoff_ok else None
        self.bulk_handoff = self._handoff_server.address if self._handoff_server is not None else ""
        self.bulk_fetcher: Fetcher | None = None  # set by connect() when the sidecar has a bulk relay
        self.bulk_via = ""  # the sidecar's handoff or relay that bulk_fetcher fetches through
        # A fixed per-stream read-ahead instead of gRPC's BDP-grown window: the bytes
        # in flight would otherwise pile up here on top of the model (LESSONS.md 8).
        self.channel = grpc.insecure_channel(sidecar_address, options=relay_channel_options())
        self.link = trainer_pb2_grpc.TrainerLinkStub(self.channel)
        self.fetcher = Fetcher(
            GrpcChunkSource(self.channel, site, chunk_timeout_s=settings.fetch.chunk_timeout_s), settings.fetch
        )
        self._session_call: Any = None

    # --- setup ---------------------------------------------------------------------
    def connect(self) -> None:
        """Say hello to the sidecar and open the session stream; raises SidecarUnreachableError."""
        try:
            hello = self.link.Hello(
                self._hello_request(),
                timeout=self.settings.connect_timeout_s,
                wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            self.close()
            raise SidecarUnreachableError(
                f"cannot reach the fedkube sidecar at {self.address} (from {envvars.SIDECAR_ADDRESS}) within "
                f"{self.settings.connect_timeout_s:.0f} s: {_rpc_text(exc)}; fix: start the script through "
                f"`fedkube run` or in a fedkube client pod, or point {envvars.SIDECAR_ADDRESS} at a running sidecar"
            ) from None
        if hello.site and hello.site != self.site:
            log.warning("job %s: %s says site %r but the sidecar serves %r; using the sidecar's",
                        self.job, envvars.SITE, self.site, hello.site)
            self.site = hello.site
        self.job = hello.job or self.job
        self._use_bulk(hello)
        self._session_call = self.link.Session(trainer_pb2.SessionRequest(pid=os.getpid()))
        self._attached(fresh=True)
        threading.Thread(target=self._hold_session, name="fedkube-session", daemon=True).start()
        log.info("job %s site %s: connected to sidecar %s; global model over %s; results served at %s and %s (bulk)",
                 self.job, self.site, self.address,
                 f"bulk via {self.bulk_via}" if self.bulk_fetcher is not None else "gRPC",
                 self.download_address, self.bulk_address)

    def _hello_request(self) -> trainer_pb2.HelloRequest:
        return trainer_pb2.HelloRequest(
            download_address=self.download_address, pid=os.getpid(), bulk_address=self.bulk_address,
            bulk_handoff=self.bulk_handoff,
        )  # fmt: skip

    def _hold_session(self) -> None:
        while True:
            stopped = False
            try:
                for event in self._session_call:
                    if event.HasField("stop"):
                        stopped = True
                        log.info("job %s site %s: the job was stopped (%s)", self.job, self.site,
                                 event.stop.reason or "done")
                with self._lock:
                    over = stopped or self._stopped is not None
                if over or self._closed:
                    return  # the job is over: nothing to attach to
                # The sidecar ended the session without a Stop: it is shutting down mid-job, and its
                # restart must learn of this trainer (Hello) before it can pass a result on.
                log.info("job %s site %s: sidecar %s ended the session mid-job; attaching again", self.job,
                         self.site, self.address)
            except grpc.RpcError as exc:
                if self._closed or exc.code() == grpc.StatusCode.CANCELLED:
                    return
                log.warning("job %s site %s: lost the session with sidecar %s: %s; attaching again", self.job,
                            self.site, self.address, _rpc_text(exc))
            if not self._reattach():
                return

    def _use_bulk(self, hello: trainer_pb2.HelloResponse) -> None:
        """Fetch the global model through the sidecar's bulk handoff or relay, as ``hello`` names them (or gRPC)."""
        relay_address = choose_route(
            bulk=hello.bulk_address, handoff=hello.bulk_handoff, handoff_ok=self._handoff_ok
        ).address
        self.bulk_via = relay_address
        if not relay_address:
            self.bulk_fetcher = None
            return
        fs = self.settings.fetch
        self.bulk_fetcher = Fetcher(
            BulkChunkSource(relay_address, self.site, chunk_timeout_s=fs.chunk_timeout_s),
            replace(fs, max_attempts=min(fs.max_attempts, BULK_MAX_ATTEMPTS)),
        )

    def _reattach(self) -> bool:
        """Hello + Session again after the sidecar restarted (a kubelet restarts a killed native sidecar).

        A new sidecar process knows nothing of this trainer: without a new Hello
        it cannot serve the trainer's result to the server, and without a
        Session it cannot tell when the trainer dies. True when attached again.
        """
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while True:
            try:
                hello = self.link.Hello(
                    self._hello_request(),
                    timeout=max(0.1, deadline - time.monotonic()),
                    wait_for_ready=True,
                )
                call = self.link.Session(trainer_pb2.SessionRequest(pid=os.getpid()))
                break
            except grpc.RpcError as exc:
                # A call made while the dead sidecar's connection is still being torn down fails at once
                # ("Stream removed") instead of waiting for the restart: try again until the deadline.
                if not self._closed and exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                if not self._closed:
                    log.warning("job %s site %s: could not attach to sidecar %s again within %.0f s: %s", self.job,
                                self.site, self.address, self.settings.connect_timeout_s, _rpc_text(exc))
                return False
        self._session_call = call
        self._use_bulk(hello)  # a restarted sidecar listens somewhere new
        if self._closed:  # close() ran meanwhile and cancelled the previous call, not this one
            call.cancel()
            return False
        log.info("job %s site %s: attached to sidecar %s again", self.job, self.site, self.address)
        self._attached()
        return True

    def _attached(self, fresh: bool = False) -> None:
        """Count a (re)attach and wake a send() waiting to announce its result to the new sidecar."""
        with self._attach_cond:
            self._attach_gen = 1 if fresh else self._attach_gen + 1
            self._attach_cond.notify_all()

    def _wait_attached_after(self, generation: int, timeout_s: float) -> bool:
        """Wait (bounded) until the link was attached again since ``generation``; True when it was."""
        with self._attach_cond:
            return self._attach_cond.wait_for(lambda: self._attach_gen > generation or self._closed, timeout_s)

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
                if (exc.code() != grpc.StatusCode.UNAVAILABLE or self._closed
                        or now - lost_since > self.settings.connect_timeout_s):
                    raise SidecarUnreachableError(
                        f"job {self.job} site {self.site}: the sidecar at {self.address} stopped answering: "
                        f"{_rpc_text(exc)}"
                    ) from None
                time.sleep(0.2)
                continue
            lost_since = None
            which = resp.WhichOneof("outcome")
            if which is not None:
                got: control_pb2.Task | control_pb2.Stop = resp.task if which == "task" else resp.stop
                with self._lock:
                    if which == "stop":
                        self._stopped = resp.stop
                    else:
                        self._pending = resp.task
                return got
            if not block:
                return None

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
        task = _Task(got)
        self._round = task.round
        log.info("job %s site %s round %d: task %s received (%d tensors)", self.job, self.site, task.round,
                 task.id, len(task.refs))
        # An init task asks for the script's initial weights: there is nothing to fetch.
        try:
            params = None if task.kind == protocol.TASK_INIT else self._fetch(task, into)
        except _UNREACHABLE_MODEL as exc:
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

    def _targets(self, task: _Task, into: Mapping[str, Any] | None) -> dict[str, ReceiveTarget]:
        """The caller's buffers (``receive(into=...)``) that each global tensor can be written into."""
        if not into:
            return {}
        targets: dict[str, ReceiveTarget] = {}
        fresh: list[str] = []
        for ref in task.refs:
            value = into.get(ref.name)
            if value is None:
                fresh.append(f"{ref.name} (not in into)")
                continue
            target, why = receive_target(value, tuple(ref.shape), numpy_dtype(ref.dtype))
            if target is None:
                fresh.append(f"{ref.name} ({why})")
            else:
                targets[ref.name] = target
        for name in overlapping(targets):
            del targets[name]
            fresh.append(f"{name} (its memory overlaps another tensor's in into)")
        if fresh:
            shown = "; ".join(fresh[:5]) + (f"; and {len(fresh) - 5} more" if len(fresh) > 5 else "")
            log.info("job %s site %s round %d: %d of %d tensors arrive in fresh arrays instead of into: %s",
                     self.job, self.site, task.round, len(fresh), len(task.refs), shown)
        return targets

    def _fetch(self, task: _Task, into: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Fetch each global tensor into a buffer that becomes the user's array (no second copy).

        The buffer is the caller's own where ``into`` has a fitting one (no
        allocation, no page faults), else a fresh array.
        """
        targets = self._targets(task, into)
        out: dict[str, Any] = {}
        by_tx: dict[str, list[TensorRef]] = {}
        for ref in task.refs:
            by_tx.setdefault(ref.transaction_id, []).append(ref)
        for tid, refs in by_tx.items():
            try:
                for ref in refs:
                    target = targets.get(ref.name)
                    if target is None:
                        arr = np.empty(ref.shape, dtype=numpy_dtype(ref.dtype))
                        out[ref.name] = self._fetch_one(task, self.bulk_fetcher or self.fetcher, ref, arr)
                        continue
                    self._fetch_one(task, self.bulk_fetcher or self.fetcher, ref, target.buffer())
                    target.done()
                    out[ref.name] = target.result
            except BaseException as exc:
                try:
                    (self.bulk_fetcher or self.fetcher).source.complete(tid, False, str(exc))
                except Exception:
                    log.info("transaction %s: could not report the failed fetch", tid)
                raise
            try:
                self._complete(self.bulk_fetcher or self.fetcher, tid)
            except TransferError as exc:
                # A courtesy to the publisher (which also releases on its TTL): the model is already here.
                log.info("transaction %s: fetched, but could not say so to the source: %s", tid, exc)
        return out

    def _fetch_one(self, task: _Task, fetcher: Fetcher, ref: TensorRef, arr: np.ndarray) -> np.ndarray:
        if fetcher is self.fetcher:
            return fetcher.fetch_array(ref, arr)
        try:
            return fetcher.fetch_array(ref, arr)
        except _SAME_ON_GRPC:
            raise  # gRPC would fail the same way (a model that is gone is gone there too)
        except TransferError as exc:
            self._bulk_failed(task, exc)
            return self.fetcher.fetch_array(ref, arr)

    def _complete(self, fetcher: Fetcher, tid: str) -> None:
        if fetcher is self.fetcher:
            self.fetcher.source.complete(tid, True)
            return
        try:
            fetcher.source.complete(tid, True)
        except TransferError as exc:
            # The server releases the transaction at its TTL anyway; gRPC can still tell it now.
            log.info("job %s site %s: transaction %s: completion over bulk failed (%s); reporting it over gRPC",
                     self.job, self.site, tid, exc)
            self.fetcher.source.complete(tid, True)

    def _bulk_failed(self, task: _Task, exc: TransferError) -> None:
        """The bulk path failed: fetch over gRPC from now on (the transfer is the same, only slower)."""
        log.warning("job %s site %s round %d: fetching the global model over the bulk relay failed (%s); "
                    "fetching over gRPC from now on", self.job, self.site, task.round, exc)
        self.bulk_fetcher = None

    # --- results -------------------------------------------------------------------
    def send(self, model: FLModel) -> bool:
        with self._lock:
            task, self._task = self._task, None
            if task is not None:
                try:
                    num_examples = check_num_examples(model.num_examples, training=task.kind == protocol.TASK_TRAIN)
                except InvalidParamsError:
                    self._task = task  # nothing was sent: a corrected send() can still answer the task
                    raise
        if task is None:
            raise SendWithoutReceiveError(
                f"job {self.job} site {self.site}: send() without a task to answer; fix: call fk.receive() "
                "first, and send() exactly once per received task"
            )
        started = time.monotonic()
        self._waited = 0.0
        try:
            return self._send(task, model, num_examples)
        finally:
            self._timing(SEND_SECONDS, time.monotonic() - started)
            self._timing(DOWNLOAD_WAIT_SECONDS, self._waited)
            # Drop everything of this round (LESSONS.md 8): the caller may still hold its own arrays.
            del task, model
            # The round's chunk buffers are freed now; glibc would keep them resident (bench/README.md).
            release_free_memory()

    def _send(self, task: _Task, model: FLModel, num_examples: int) -> bool:
        arrays = params_to_numpy(model.params) if model.params is not None else {}
        timeouts = ResultTimeouts.from_config(task.config, self.settings.result_timeouts())
        idle, start, ttl = timeouts.idle_s, timeouts.start_s, timeouts.ttl_s
        metrics = {str(k): float(v) for k, v in (model.metrics or {}).items()}
        txn = None
        refs = []
        if arrays:
            # Task ids are the server's to choose; a fresh id is always a valid transaction id.
            txn = self.service.publish(
                arrays, receivers=[protocol.SERVER], ttl_s=ttl, transaction_id=f"r-{uuid.uuid4().hex}"
            )
            refs = [r.to_proto() for r in txn.refs]
        del arrays
        ann = control_pb2.ResultAnnouncement(
            task_id=task.id, round=task.round, num_examples=num_examples, metrics=metrics, refs=refs
        )
        try:
            self._submit(ann)
        except grpc.RpcError as exc:
            if txn is not None:
                self.service.release(txn.id)
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise JobStoppedError(
                    f"job {self.job} site {self.site} round {task.round}: {exc.details()}; fix: check "
                    "fk.is_running() before training on a task, and stop when it is False"
                ) from None
            raise SidecarUnreachableError(
                f"job {self.job} site {self.site} round {task.round}: the sidecar at {self.address} did not take "
                f"the result: {_rpc_text(exc)}"
            ) from None
        if txn is None:
            log.info("job %s site %s round %d: result without tensors sent", self.job, self.site, task.round)
            return True
        total, tid = txn.nbytes, txn.id
        del txn
        waiting = time.monotonic()
        try:
            return self._wait_received_across_restarts(task, ann, total, idle_s=idle, start_s=start)
        finally:
            self._waited = time.monotonic() - waiting
            self.service.release(tid)

    def _wait_received_across_restarts(
        self, task: _Task, ann: control_pb2.ResultAnnouncement, total: int, *, idle_s: float, start_s: float
    ) -> bool:
        """``_wait_received``; if the sidecar dies meanwhile, announce the result again to its restart.

        A kubelet restarts a killed sidecar; the result's bytes are still served
        here under the same transaction (LESSONS.md 6), so the new sidecar can
        relay them, or learn from the server that the round went on without them.
        """
        for attempt in range(RESUBMITS + 1):
            try:
                return self._wait_received(task, total, idle_s=idle_s, start_s=start_s)
            except SidecarUnreachableError as exc:
                if attempt == RESUBMITS or self._closed:
                    raise
                log.warning("%s; announcing the result again once the sidecar is back", exc)
                try:
                    self._submit(ann, timeout_s=self.settings.connect_timeout_s)
                except grpc.RpcError:
                    raise exc from None
        raise AssertionError("unreachable")

    def _submit(self, ann: control_pb2.ResultAnnouncement, timeout_s: float = 30.0) -> None:
        """SubmitResult; again if the sidecar died during the call (its restart takes the same announcement).

        A restarted sidecar refuses the result (UNAVAILABLE) until this trainer
        said Hello to it again, so before announcing again this waits for the
        session thread to attach again.
        """
        generation = self._attach_gen
        for attempt in range(RESUBMITS + 1):
            try:
                self.link.SubmitResult(trainer_pb2.SubmitResultRequest(result=ann), timeout=timeout_s,
                                       wait_for_ready=True)
                return
            except grpc.RpcError as exc:
                if attempt == RESUBMITS or self._closed or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("job %s site %s round %d task %s: the sidecar did not take the result (%s); "
                            "announcing it again once this trainer is attached to it again", self.job, self.site,
                            ann.round, ann.task_id, _rpc_text(exc))
                timeout_s = max(timeout_s, self.settings.connect_timeout_s)
                self._wait_attached_after(generation, self.settings.connect_timeout_s)
                generation = self._attach_gen

    def _wait_received(self, task: _Task, total: int, *, idle_s: float, start_s: float) -> bool:
        """Block until the server has the result or refused it; progress-aware (LESSONS.md 1-3)."""
        ids = f"job {self.job} site {self.site} round {task.round} task {task.id}"
        began = time.monotonic()
        last_change = began
        done = -1
        outcome: trainer_pb2.ResultProgress | None = None
        call = self.link.WatchResult(trainer_pb2.ResultStatusRequest(task_id=task.id))
        watchdog_fired = threading.Event()
        # Wakes the guard at once when the watch ended: a plain sleep here held every send() up to 0.2 s.
        watch_over = threading.Event()

        def check() -> None:
            nonlocal last_change
            while outcome is None and not watchdog_fired.is_set():
                if watch_over.wait(0.2):
                    return
                now = time.monotonic()
                limit = start_s if done <= 0 else idle_s
                if now - (began if done <= 0 else last_change) > limit:
                    watchdog_fired.set()
                    call.cancel()

        guard = threading.Thread(target=check, name="fedkube-send-watch", daemon=True)
        guard.start()
        try:
            for p in call:
                if p.bytes_done != done:
                    done = p.bytes_done
                    last_change = time.monotonic()
                if p.finished:
                    outcome = p
                    break
        except grpc.RpcError as exc:
            if watchdog_fired.is_set():
                if done <= 0:
                    raise ResultTransferError(
                        f"{ids}: the server did not start downloading the result ({total} bytes) within "
                        f"{start_s:.0f} s; check the server's logs (is it still running, is the round closed?)"
                    ) from None
                raise ResultTransferError(
                    f"{ids}: the server's download of the result stalled at {done} of {total} bytes for "
                    f"{idle_s:.0f} s (idle timeout); check the server's logs and the network"
                ) from None
            raise SidecarUnreachableError(
                f"{ids}: lost the sidecar at {self.address} while the server was downloading the result: "
                f"{_rpc_text(exc)}"
            ) from None
        finally:
            watch_over.set()
            guard.join(1.0)
        if outcome is None:
            raise SidecarUnreachableError(f"{ids}: the sidecar ended the result watch without an outcome")
        if not outcome.ok:
            if outcome.reason == Reason.INVALID_RESULT.value:
                # A wrong name/dtype/shape repeats every round: a bug in the script, so it stops here.
                raise ResultRejectedError(
                    f"{ids}: the server refused the result ({outcome.reason}): {outcome.message}; "
                    "fix: send exactly the tensor names, dtypes and shapes of the model you received",
                    reason=outcome.reason,
                )
            # Round-scoped (a straggler past the deadline, a failed transfer): the site sits out this
            # round only and takes the next task (LESSONS.md 16), so the script's loop goes on.
            log.warning("%s: the server did not use this result (%s): %s; continuing with the next task", ids,
                        outcome.reason, outcome.message)
            return False
        log.info("%s: the server received the result (%d bytes) in %.2f s", ids, total, time.monotonic() - began)
        return True

    # --- metrics and state -------------------------------------------------------------
    def _timing(self, name: str, seconds: float) -> None:
        """Report one of the SDK's own timings (reserved names) to the sidecar's histograms; best effort."""
        report = control_pb2.MetricReport(round=self._round, values={name: seconds},
                                          timestamp_ms=int(time.time() * 1000))
        try:
            self.link.LogMetric(report, timeout=5.0)
        except grpc.RpcError as exc:
            log.debug("job %s site %s: timing %s not delivered: %s", self.job, self.site, name, _rpc_text(exc))

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
            log.warning("job %s site %s: metric %s not delivered: %s", self.job, self.site, name, _rpc_text(exc))

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
                        self.site, _rpc_text(exc))

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
        self._closed = True
        with self._attach_cond:
            self._attach_cond.notify_all()  # a send() waiting to re-announce gives up now
        if self._session_call is not None:
            self._session_call.cancel()
        self._download_server.stop(0.5)
        self._bulk_server.stop()
        if self._handoff_server is not None:
            self._handoff_server.stop()
        self.service.close()
        self.channel.close()


def _rpc_text(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"


# --- process-wide hooks ---------------------------------------------------------------

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def failure_kind(exc: BaseException) -> int:
    """The FailureKind an unhandled exception maps to."""
    if isinstance(exc, ConfigError):
        return control_pb2.FAILURE_KIND_CONFIG_ERROR
    if isinstance(exc, KeyboardInterrupt):
        return control_pb2.FAILURE_KIND_ABORTED
    return control_pb2.FAILURE_KIND_EXCEPTION


def install_hooks(get: Callable[[], Session | None]) -> ExceptHook:
    """Wrap ``sys.excepthook`` so an unhandled exception is reported before the process dies."""
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> Any:
        session = get()
        if session is not None:
            kind = failure_kind(exc)
            session.report(
                control_pb2.TRAINER_PHASE_FAILED, kind, f"{exc_type.__name__}: {exc}", exit_code=1
            )
        return previous(exc_type, exc, tb)

    sys.excepthook = hook
    return previous
