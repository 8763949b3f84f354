"""The trainer's results: served from the user's arrays, announced to the sidecar, watched until the server has them.

Results are pulled from this process's own ``Download`` service, zero-copy
from the user's arrays, over gRPC and over the bulk protocol (and through a
handed-over connection where the sidecar supports it). ``send()`` returns
once the server downloaded the result or refused it; the watch is
progress-aware, with one timeout for a download that never starts and one for
a download that stalls (LESSONS.md 1-3).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import grpc

from fedkube import envvars, protocol
from fedkube.protocol import ResultTimeouts
from fedkube.status import Reason
from fedkube.trainer_sdk._link import Ids, SidecarLink, rpc_text
from fedkube.trainer_sdk._task import Task
from fedkube.trainer_sdk.errors import (
    JobStoppedError,
    ResultRejectedError,
    ResultTransferError,
    SidecarUnreachableError,
)
from fedkube.trainer_sdk.model import FLModel, params_to_numpy
from fedkube.transfer.bulk import BulkHandoffServer, BulkServer
from fedkube.transfer.route import handoff_enabled
from fedkube.transfer.service import DownloadService, serve
from fedkube.wire.v1 import control_pb2, trainer_pb2

log = logging.getLogger("fedkube.trainer_sdk")

RESUBMITS = 2  # times send() announces a result again to a restarted sidecar


class ResultServer:
    """This trainer's ``Download`` service and the servers it answers on (gRPC, bulk, bulk handoff)."""

    def __init__(self, site: str) -> None:
        self.service = DownloadService(site)
        self._download_server, port = serve(self.service, "127.0.0.1:0", max_workers=8)
        self.download_address = f"127.0.0.1:{port}"
        # The same results over the bulk protocol, for a sidecar that pushes them to the server's bulk
        # port; pod-local like the gRPC one, so no token (the trainer holds none).
        self._bulk_server = BulkServer(self.service, host="127.0.0.1", port=0, name=f"site {site} results").start()
        self.bulk_address = self._bulk_server.address
        # Where the sidecar hands over its connection to the server with the fetch to answer on it, so
        # result bytes go from here straight to the server (fedkube.transfer.handoff; Linux only).
        self.handoff_ok = handoff_enabled(
            os.environ.get(envvars.BULK_HANDOFF, "").strip().lower() not in ("0", "false")
        )
        self.handoff_server = BulkHandoffServer(self._bulk_server).start() if self.handoff_ok else None
        self.bulk_handoff = self.handoff_server.address if self.handoff_server is not None else ""

    def hello_request(self) -> trainer_pb2.HelloRequest:
        """What the sidecar must know to pull this trainer's results."""
        return trainer_pb2.HelloRequest(
            download_address=self.download_address, pid=os.getpid(), bulk_address=self.bulk_address,
            bulk_handoff=self.bulk_handoff,
        )  # fmt: skip

    def close(self) -> None:
        self._download_server.stop(0.5)
        self._bulk_server.stop()
        if self.handoff_server is not None:
            self.handoff_server.stop()
        self.service.close()


class ResultSender:
    """Publishes a task's result, announces it to the sidecar, and waits until the server has it."""

    def __init__(self, server: ResultServer, link: SidecarLink, ids: Ids) -> None:
        self.server = server
        self.link = link
        self.ids = ids
        self.waited = 0.0  # seconds the last send() waited for the server's download
        self._lock = threading.Lock()
        self._served: str | None = None  # the transaction of the last result the server took, still published

    def send(self, task: Task, model: FLModel, num_examples: int, defaults: ResultTimeouts) -> bool:
        """The result of ``task``; True when the server used it, False when it set it aside for this round."""
        self.waited = 0.0
        service = self.server.service
        arrays = params_to_numpy(model.params) if model.params is not None else {}
        timeouts = ResultTimeouts.from_config(task.config, defaults)
        idle, start, ttl = timeouts.idle_s, timeouts.start_s, timeouts.ttl_s
        metrics = {str(k): float(v) for k, v in (model.metrics or {}).items()}
        txn = None
        refs = []
        if arrays:
            # Task ids are the server's to choose; a fresh id is always a valid transaction id.
            txn = service.publish(
                arrays, receivers=[protocol.SERVER], ttl_s=ttl, transaction_id=f"r-{uuid.uuid4().hex}"
            )
            refs = [r.to_proto() for r in txn.refs]
        del arrays
        ann = control_pb2.ResultAnnouncement(
            task_id=task.id, round=task.round, num_examples=num_examples, metrics=metrics, refs=refs
        )
        try:
            self.submit(ann)
        except grpc.RpcError as exc:
            if txn is not None:
                service.release(txn.id)
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise JobStoppedError(
                    f"job {self.ids.job} site {self.ids.site} round {task.round}: {exc.details()}; fix: check "
                    "fk.is_running() before training on a task, and stop when it is False"
                ) from None
            raise SidecarUnreachableError(
                f"job {self.ids.job} site {self.ids.site} round {task.round}: the sidecar at {self.link.address} "
                f"did not take the result: {rpc_text(exc)}"
            ) from None
        if txn is None:
            log.info("job %s site %s round %d: result without tensors sent", self.ids.job, self.ids.site, task.round)
            return True
        total, tid = txn.nbytes, txn.id
        del txn
        waiting = time.monotonic()
        used = False
        try:
            used = self._wait_received_across_restarts(task, ann, total, idle_s=idle, start_s=start)
            return used
        finally:
            self.waited = time.monotonic() - waiting
            if used:
                # Still served until the next task or the job's end: if the server excludes another
                # client's result this round, it pulls tensors of this one again to rebuild the
                # aggregate exactly (fedkube.server.aggregate). The arrays are the caller's own.
                with self._lock:
                    self._served = tid
            else:
                service.release(tid)

    def release_served(self) -> None:
        """Stop serving the last result: a new task arrived (before its model is received into any array)
        or the job is over. The round the result belonged to is closed by then, so nobody pulls it again."""
        with self._lock:
            tid, self._served = self._served, None
        if tid is not None:
            self.server.service.release(tid)

    def _wait_received_across_restarts(
        self, task: Task, ann: control_pb2.ResultAnnouncement, total: int, *, idle_s: float, start_s: float
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
                if attempt == RESUBMITS or self.link.closed:
                    raise
                log.warning("%s; announcing the result again once the sidecar is back", exc)
                try:
                    self.submit(ann, timeout_s=self.link.connect_timeout_s)
                except grpc.RpcError:
                    raise exc from None
        raise AssertionError("unreachable")

    def submit(self, ann: control_pb2.ResultAnnouncement, timeout_s: float = 30.0) -> None:
        """SubmitResult; again if the sidecar died during the call (its restart takes the same announcement).

        A restarted sidecar refuses the result (UNAVAILABLE) until this trainer
        said Hello to it again, so before announcing again this waits for the
        session thread to attach again.
        """
        link = self.link
        generation = link.attach_gen
        for attempt in range(RESUBMITS + 1):
            try:
                link.stub.SubmitResult(trainer_pb2.SubmitResultRequest(result=ann), timeout=timeout_s,
                                       wait_for_ready=True)
                return
            except grpc.RpcError as exc:
                if attempt == RESUBMITS or link.closed or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("job %s site %s round %d task %s: the sidecar did not take the result (%s); "
                            "announcing it again once this trainer is attached to it again", self.ids.job,
                            self.ids.site, ann.round, ann.task_id, rpc_text(exc))
                timeout_s = max(timeout_s, link.connect_timeout_s)
                link.wait_attached_after(generation, link.connect_timeout_s)
                generation = link.attach_gen

    def _wait_received(self, task: Task, total: int, *, idle_s: float, start_s: float) -> bool:
        """Block until the server has the result or refused it; progress-aware (LESSONS.md 1-3)."""
        ids = f"job {self.ids.job} site {self.ids.site} round {task.round} task {task.id}"
        began = time.monotonic()
        last_change = began
        done = -1
        outcome: trainer_pb2.ResultProgress | None = None
        call = self.link.stub.WatchResult(trainer_pb2.ResultStatusRequest(task_id=task.id))
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
                f"{ids}: lost the sidecar at {self.link.address} while the server was downloading the result: "
                f"{rpc_text(exc)}"
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
