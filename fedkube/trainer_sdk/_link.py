"""The trainer's attachment to its sidecar: Hello, the ``Session`` stream, and attaching again after a restart.

A sidecar learns of a trainer from its Hello (where to pull results from) and
watches the ``Session`` stream to learn at once if the trainer dies. A kubelet
restarts a killed native sidecar, and the new process knows nothing of this
trainer, so the thread holding the stream says Hello again whenever the stream
ends mid-job, and counts each attach so that a ``send()`` waiting to announce
its result again can wait for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from fedkube import envvars
from fedkube.trainer_sdk.errors import SidecarUnreachableError
from fedkube.wire.v1 import trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("fedkube.trainer_sdk")


@dataclass
class Ids:
    """Who this trainer is; the sidecar's Hello answer corrects what the environment said."""

    site: str
    job: str


def rpc_text(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"


class SidecarLink:
    """Hello + ``Session`` stream to the sidecar at ``address``, held by a thread and renewed after a restart.

    ``hello`` builds the HelloRequest (where this trainer serves its results);
    ``on_hello`` sees every HelloResponse, the first and each after a restart
    (a restarted sidecar listens somewhere new); ``job_over`` tells the
    holding thread that a stream ending is the job's end, not a restart.
    """

    def __init__(
        self,
        address: str,
        stub: trainer_pb2_grpc.TrainerLinkStub,
        ids: Ids,
        *,
        connect_timeout_s: float,
        hello: Callable[[], trainer_pb2.HelloRequest],
        on_hello: Callable[[trainer_pb2.HelloResponse], None],
        job_over: Callable[[], bool],
    ) -> None:
        self.address = address
        self.stub = stub
        self.ids = ids
        self.connect_timeout_s = connect_timeout_s
        self._hello = hello
        self._on_hello = on_hello
        self._job_over = job_over
        self.closed = False
        self._attach_cond = threading.Condition()
        self.attach_gen = 0  # counts attaches to a sidecar (Hello + Session); send() waits on it after a restart
        self._session_call: Any = None

    def connect(self) -> None:
        """Say hello to the sidecar and open the session stream; raises SidecarUnreachableError."""
        try:
            hello = self.stub.Hello(self._hello(), timeout=self.connect_timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise SidecarUnreachableError(
                f"cannot reach the fedkube sidecar at {self.address} (from {envvars.SIDECAR_ADDRESS}) within "
                f"{self.connect_timeout_s:.0f} s: {rpc_text(exc)}; fix: start the script through "
                f"`fedkube run` or in a fedkube client pod, or point {envvars.SIDECAR_ADDRESS} at a running sidecar"
            ) from None
        ids = self.ids
        if hello.site and hello.site != ids.site:
            log.warning("job %s: %s says site %r but the sidecar serves %r; using the sidecar's",
                        ids.job, envvars.SITE, ids.site, hello.site)
            ids.site = hello.site
        ids.job = hello.job or ids.job
        self._on_hello(hello)
        self._session_call = self.stub.Session(trainer_pb2.SessionRequest(pid=os.getpid()))
        self._attached(fresh=True)
        threading.Thread(target=self._hold_session, name="fedkube-session", daemon=True).start()

    def _hold_session(self) -> None:
        while True:
            stopped = False
            try:
                for event in self._session_call:
                    if event.HasField("stop"):
                        stopped = True
                        log.info("job %s site %s: the job was stopped (%s)", self.ids.job, self.ids.site,
                                 event.stop.reason or "done")
                if stopped or self._job_over() or self.closed:
                    return  # the job is over: nothing to attach to
                # The sidecar ended the session without a Stop: it is shutting down mid-job, and its
                # restart must learn of this trainer (Hello) before it can pass a result on.
                log.info("job %s site %s: sidecar %s ended the session mid-job; attaching again", self.ids.job,
                         self.ids.site, self.address)
            except grpc.RpcError as exc:
                if self.closed or exc.code() == grpc.StatusCode.CANCELLED:
                    return
                log.warning("job %s site %s: lost the session with sidecar %s: %s; attaching again", self.ids.job,
                            self.ids.site, self.address, rpc_text(exc))
            if not self.reattach():
                return

    def reattach(self) -> bool:
        """Hello + Session again after the sidecar restarted (a kubelet restarts a killed native sidecar).

        A new sidecar process knows nothing of this trainer: without a new Hello
        it cannot serve the trainer's result to the server, and without a
        Session it cannot tell when the trainer dies. True when attached again.
        """
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                hello = self.stub.Hello(
                    self._hello(),
                    timeout=max(0.1, deadline - time.monotonic()),
                    wait_for_ready=True,
                )
                call = self.stub.Session(trainer_pb2.SessionRequest(pid=os.getpid()))
                break
            except grpc.RpcError as exc:
                # A call made while the dead sidecar's connection is still being torn down fails at once
                # ("Stream removed") instead of waiting for the restart: try again until the deadline.
                if not self.closed and exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                if not self.closed:
                    log.warning("job %s site %s: could not attach to sidecar %s again within %.0f s: %s",
                                self.ids.job, self.ids.site, self.address, self.connect_timeout_s, rpc_text(exc))
                return False
        self._session_call = call
        self._on_hello(hello)  # a restarted sidecar listens somewhere new
        if self.closed:  # close() ran meanwhile and cancelled the previous call, not this one
            call.cancel()
            return False
        log.info("job %s site %s: attached to sidecar %s again", self.ids.job, self.ids.site, self.address)
        self._attached()
        return True

    def _attached(self, fresh: bool = False) -> None:
        """Count a (re)attach and wake a send() waiting to announce its result to the new sidecar."""
        with self._attach_cond:
            self.attach_gen = 1 if fresh else self.attach_gen + 1
            self._attach_cond.notify_all()

    def wait_attached_after(self, generation: int, timeout_s: float) -> bool:
        """Wait (bounded) until the link was attached again since ``generation``; True when it was."""
        with self._attach_cond:
            return self._attach_cond.wait_for(lambda: self.attach_gen > generation or self.closed, timeout_s)

    def detach(self) -> None:
        """Stop attaching: end the session stream and wake a send() waiting for an attach."""
        self.closed = True
        with self._attach_cond:
            self._attach_cond.notify_all()  # a send() waiting to re-announce gives up now
        if self._session_call is not None:
            self._session_call.cancel()
