"""A scripted "fake sidecar" for driving the real server over real gRPC.

It speaks the v1 protocol with the generated stubs: registers with its token,
heartbeats, acknowledges tasks, fetches the global model from the server's
Download service with the transfer layer's Fetcher, computes a result with a
behaviour the test supplies, publishes it in its own DownloadService and
serves the server's UploadRequests over Push streams, chunk by chunk.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from fedkube.transfer import endpoints
from fedkube.transfer.endpoints import ClientTls
from fedkube.transfer.fetch import Fetcher, FetchSettings, GrpcChunkSource
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.service import DownloadService
from fedkube.wire.v1 import control_pb2, control_pb2_grpc


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds the site's credentials to every Download call."""

    def __init__(self, md: tuple[tuple[str, str], ...]) -> None:
        self._md = md

    def _details(self, details: Any) -> Any:
        return _Details(
            details.method,
            details.timeout,
            tuple(details.metadata or ()) + self._md,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


@dataclass
class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


@dataclass
class Reply:
    """What a behaviour returns for a task: tensors to send (None: never answer), weight, metrics."""

    params: dict[str, np.ndarray] | None
    num_examples: int = 1
    metrics: dict[str, float] = field(default_factory=dict)
    delay_s: float = 0.0
    trainer_state: control_pb2.TrainerState | None = None  # sent instead of a result when set


Behaviour = Callable[[control_pb2.Task, dict[str, np.ndarray]], Reply]


def add_value(value: float, num_examples: int = 1, **kw: Any) -> Behaviour:
    """A trainer that returns global + value for every float tensor."""

    def behave(task: control_pb2.Task, params: dict[str, np.ndarray]) -> Reply:
        out = {
            k: (v + np.asarray(value, dtype=v.dtype)) if v.dtype.kind == "f" else v.copy() for k, v in params.items()
        }
        return Reply(out, num_examples, **kw)

    return behave


class FakeSidecar:
    """One client site, speaking the control protocol to a real server."""

    def __init__(
        self,
        address: str,
        job: str,
        site: str,
        token: str,
        behaviour: Behaviour,
        *,
        heartbeat_s: float = 0.2,
        session_id: str | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        """``tls``: the site's mutual TLS towards the server (None: plaintext, for a server without TLS)."""
        self.address = address
        self.job = job
        self.site = site
        self.token = token
        self.behaviour = behaviour
        self.heartbeat_s = heartbeat_s
        self.session_id = session_id or uuid.uuid4().hex
        self.md = (("authorization", f"Bearer {token}"), ("x-fedkube-site", site))
        self.tls = tls
        self.channel = endpoints.channel(address, [], tls)
        self.stub = control_pb2_grpc.ControlStub(self.channel)
        self.download_channel = grpc.intercept_channel(endpoints.channel(address, [], tls), _Metadata(self.md))
        self.service = DownloadService(site)
        self.messages: list[control_pb2.ServerMessage] = []
        self.tasks: list[control_pb2.Task] = []
        self.globals: dict[int, dict[str, np.ndarray]] = {}  # round -> global model fetched
        self.received: dict[str, control_pb2.ResultReceived] = {}
        self.stop_msg: control_pb2.Stop | None = None
        self.rejected: control_pb2.Rejected | None = None
        self.error: grpc.RpcError | None = None
        self.uploads_served = 0
        self.train_errors: list[Exception] = []
        self.upload_requests: list[control_pb2.UploadRequest] = []
        self.finished = False
        self.fetch_globals = True  # False: never fetch the global model (its transaction stays unfinished)
        self.task_hook: Callable[[control_pb2.Task], None] | None = None  # runs as a task arrives
        self.hang_up_on_stop = True  # like a sidecar with FEDKUBE_SIDECAR_EXIT_ON_STOP=1
        # Decides how each UploadRequest is answered: "ok", "corrupt" (first chunk flipped), "corrupt_nan"
        # (first 4 bytes turned into a float32 NaN), "error", "stall", "trickle" (1 MiB, then stall).
        self.push_mode: Callable[[control_pb2.UploadRequest], str] | None = None
        self.changed = threading.Condition()
        self._out: queue.Queue[control_pb2.ClientMessage | None] = queue.Queue()
        self._closed = threading.Event()
        self._seen_tasks: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._call: Any = None

    # --- lifecycle -----------------------------------------------------------

    def start(self, resume_task_id: str = "") -> FakeSidecar:
        self._out.put(
            control_pb2.ClientMessage(
                register=control_pb2.Register(
                    job=self.job,
                    site=self.site,
                    session_id=self.session_id,
                    resume_task_id=resume_task_id,
                    protocol_version=1,
                )
            )
        )
        self._call = self.stub.Connect(self._requests(), metadata=self.md)
        self._spawn(self._read, "reader")
        self._spawn(self._heartbeat, "heartbeat")
        return self

    def disconnect(self) -> None:
        """Drop the control stream (like a broken network), keep the trainer's state."""
        self._closed.set()
        self._out.put(None)
        if self._call is not None:
            self._call.cancel()

    def close(self) -> None:
        self.disconnect()
        self.service.close()
        self.channel.close()
        self.download_channel.close()

    def _spawn(self, fn: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name=f"fake-{self.site}-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def send(self, msg: control_pb2.ClientMessage) -> None:
        self._out.put(msg)

    def _requests(self) -> Iterator[control_pb2.ClientMessage]:
        while True:
            msg = self._out.get()
            if msg is None:
                return
            yield msg

    def _heartbeat(self) -> None:
        seq = 0
        while not self._closed.wait(self.heartbeat_s):
            seq += 1
            self._out.put(control_pb2.ClientMessage(heartbeat=control_pb2.Heartbeat(seq=seq)))

    # --- server messages -------------------------------------------------------

    def _read(self) -> None:
        try:
            for msg in self._call:
                kind = msg.WhichOneof("msg")
                with self.changed:
                    self.messages.append(msg)
                    if kind == "rejected":
                        self.rejected = msg.rejected
                    elif kind == "result_received":
                        self.received[msg.result_received.task_id] = msg.result_received
                    elif kind == "stop":
                        self.stop_msg = msg.stop
                    self.changed.notify_all()
                if kind == "stop" and self.hang_up_on_stop:
                    self.disconnect()
                    return
                if kind == "task":
                    self._on_task(msg.task)
                elif kind == "upload":
                    self._spawn(self._push, "push", msg.upload)
        except grpc.RpcError as exc:
            with self.changed:
                self.error = exc
                self.changed.notify_all()
            return
        with self.changed:
            self.finished = True  # the server ended the stream
            self.changed.notify_all()

    def _on_task(self, task: control_pb2.Task) -> None:
        self.send(control_pb2.ClientMessage(task_ack=control_pb2.TaskAck(task_id=task.task_id)))
        if task.task_id in self._seen_tasks:
            return  # a re-sent task is never trained twice
        self._seen_tasks.add(task.task_id)
        if self.task_hook is not None:
            self.task_hook(task)
        with self.changed:
            self.tasks.append(task)
            self.changed.notify_all()
        self._spawn(self._train, "train", task)

    def _train(self, task: control_pb2.Task) -> None:
        try:
            self._train_once(task)
        except Exception as exc:  # e.g. the server went away at the end of a test
            with self.changed:
                self.train_errors.append(exc)
                self.changed.notify_all()

    def _train_once(self, task: control_pb2.Task) -> None:
        refs = [TensorRef.from_proto(r) for r in task.refs]
        params: dict[str, np.ndarray] = {}
        if refs and self.fetch_globals:
            source = GrpcChunkSource(self.download_channel, self.site, chunk_timeout_s=5.0)
            settings = FetchSettings(chunk_timeout_s=5.0, idle_timeout_s=10.0, backoff_max_s=2.0)
            params = Fetcher(source, settings).fetch_transaction(refs)
        with self.changed:
            self.globals[task.round] = params
            self.changed.notify_all()
        reply = self.behaviour(task, params)
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.trainer_state is not None:
            self.send(control_pb2.ClientMessage(trainer_state=reply.trainer_state))
            return
        if reply.params is None:
            return
        self.announce(task, reply)

    def announce(self, task: control_pb2.Task, reply: Reply) -> None:
        assert reply.params is not None
        # An empty params is a metrics-only result (an evaluate task's): nothing to publish.
        txn = self.service.publish(reply.params, receivers=["server"], ttl_s=60.0) if reply.params else None
        self.send(
            control_pb2.ClientMessage(
                result=control_pb2.ResultAnnouncement(
                    task_id=task.task_id,
                    round=task.round,
                    num_examples=reply.num_examples,
                    metrics=reply.metrics,
                    refs=[r.to_proto() for r in txn.refs] if txn is not None else [],
                )
            )
        )

    def _push(self, req: control_pb2.UploadRequest) -> None:
        with self.changed:
            self.upload_requests.append(req)
            mode = self.push_mode(req) if self.push_mode is not None else "ok"

        def chunks() -> Iterator[control_pb2.PushedChunk]:
            if mode == "error":
                yield control_pb2.PushedChunk(request_id=req.request_id, error="trainer's download service is gone")
                return
            if mode == "stall":
                yield control_pb2.PushedChunk(request_id=req.request_id)
                self._closed.wait(30)  # keeps the stream open, sends nothing
                return
            if mode == "trickle":  # the first MiB of whatever was announced, then nothing more
                step = req.max_chunk_bytes or 1 << 16
                for pos in range(0, 1 << 20, step):
                    yield control_pb2.PushedChunk(request_id=req.request_id if pos == 0 else "",
                                                  offset=req.offset + pos, data=bytes(step))
                self._closed.wait(30)
                return
            try:
                stream = self.service.open_stream(
                    req.ref.transaction_id, req.ref.ref_id, "server", req.offset, req.max_chunk_bytes
                )
            except Exception as exc:
                yield control_pb2.PushedChunk(request_id=req.request_id, error=str(exc))
                return
            first = True
            for pos, piece in stream:
                data = bytes(piece)
                if mode == "corrupt" and first:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                elif mode == "corrupt_nan" and first:
                    data = b"\x00\x00\xc0\x7f" + data[4:]  # a float32 NaN that only the corruption put there
                yield control_pb2.PushedChunk(request_id=req.request_id if first else "", offset=pos, data=data)
                first = False

        try:
            self.stub.Push(chunks(), metadata=self.md, timeout=30)
            self.uploads_served += 1
        except grpc.RpcError:
            pass

    # --- waiting (bounded) -------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.site}: timed out after {timeout}s waiting for {what}; "
                        f"messages: {[m.WhichOneof('msg') for m in self.messages]}"
                    )
                self.changed.wait(remaining)

    def wait_stop(self, timeout: float = 15.0) -> control_pb2.Stop:
        self.wait_for(lambda: self.stop_msg is not None, timeout, "Stop")
        assert self.stop_msg is not None
        return self.stop_msg
