"""A small, scripted server that implements ``Control`` per docs/protocol.md, for sidecar tests.

The real server process is another component; this one is driven by the test:
it authenticates, registers, records every client message, sends tasks,
serves the global model with the transfer layer's DownloadService, and pulls
results over the reverse path with the real ``Fetcher`` (through a
``ChunkSource`` that sends UploadRequests down the control stream and reads
the matching Push streams).
"""

from __future__ import annotations

import hmac
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from fedkube.transfer import endpoints
from fedkube.transfer.fetch import Fetcher, FetchSettings
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.service import DownloadService
from fedkube.transfer.wire import server_options
from fedkube.wire.v1 import control_pb2, control_pb2_grpc
from tests.support.tls import session_pki


class _Stream:
    def __init__(self, site: str, session_id: str, resume: str) -> None:
        self.site = site
        self.session_id = session_id
        self.resume = resume
        self.out: queue.Queue[control_pb2.ServerMessage | None] = queue.Queue()


class FakeServer(control_pb2_grpc.ControlServicer):
    """Control servicer + global-model DownloadService on one real gRPC server."""

    def __init__(
        self, job: str, tokens: dict[str, str], *, heartbeat_ms: int = 200, port: int = 0, tls: bool = True
    ) -> None:
        """``tls``: serve mutual TLS with the session PKI's server certificate of ``job`` (as the real server)."""
        self.job = job
        self.tokens = tokens
        self.heartbeat_ms = heartbeat_ms
        self.terms: control_pb2.JobTerms | None = None  # announced in Registered when set
        self.cond = threading.Condition()
        self.messages: list[tuple[str, control_pb2.ClientMessage]] = []
        self.registrations: list[control_pb2.Register] = []
        self.streams: dict[str, _Stream] = {}
        self.pushes: dict[str, queue.Queue[control_pb2.PushedChunk | None]] = {}
        self.push_lock = threading.Lock()
        self.downloads = DownloadService("server")
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            # Push streams carry chunks: accept chunk-sized messages (grpc keeps the first of duplicate options).
            options=[("grpc.max_receive_message_length", 32 << 20)]
            + [o for o in server_options() if o[0] != "grpc.max_receive_message_length"],
        )
        control_pb2_grpc.add_ControlServicer_to_server(self, self.grpc)
        self.downloads.add_to_server(self.grpc)
        self.port = endpoints.add_port(self.grpc, f"127.0.0.1:{port}", session_pki(job).server_tls() if tls else None)
        assert self.port, "could not bind the fake server"
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self.grpc.start()
        return self

    def stop(self) -> None:
        with self.cond:
            streams = list(self.streams.values())
        for s in streams:
            s.out.put(None)
        self.grpc.stop(0.5).wait(2)
        self.downloads.close()

    # --- Control ---------------------------------------------------------------
    def _auth(self, context: Any) -> str | None:
        md = dict(context.invocation_metadata())
        site = md.get("x-fedkube-site", "")
        token = md.get("authorization", "").removeprefix("Bearer ")
        want = self.tokens.get(site)
        if want is None or not hmac.compare_digest(want, token):
            return None
        return site

    def Connect(self, request_iterator: Iterator[control_pb2.ClientMessage], context: Any) -> Any:
        site = self._auth(context)
        if site is None:
            yield control_pb2.ServerMessage(
                rejected=control_pb2.Rejected(reason="Unauthenticated", message="bad token for this site")
            )
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token for this site")
        first = next(request_iterator)
        reg = first.register
        if reg.job != self.job:
            yield control_pb2.ServerMessage(rejected=control_pb2.Rejected(reason="WrongJob", message="wrong job"))
            return
        stream = _Stream(site, reg.session_id, reg.resume_task_id)
        with self.cond:
            self.registrations.append(reg)
            self.streams[site] = stream
            self.cond.notify_all()
        threading.Thread(target=self._read, args=(site, stream, request_iterator), daemon=True).start()
        yield control_pb2.ServerMessage(
            registered=control_pb2.Registered(job=self.job, heartbeat_interval_ms=self.heartbeat_ms, terms=self.terms)
        )
        while True:
            msg = stream.out.get()
            if msg is None:
                return
            yield msg

    def _read(self, site: str, stream: _Stream, it: Iterator[control_pb2.ClientMessage]) -> None:
        try:
            for msg in it:
                with self.cond:
                    self.messages.append((site, msg))
                    self.cond.notify_all()
        except grpc.RpcError:
            pass
        finally:
            stream.out.put(None)

    def Push(self, request_iterator: Iterator[control_pb2.PushedChunk], context: Any) -> control_pb2.PushAck:
        if self._auth(context) is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        first = True
        q: queue.Queue[control_pb2.PushedChunk | None] | None = None
        try:
            for chunk in request_iterator:
                if first:
                    with self.push_lock:
                        q = self.pushes.get(chunk.request_id)
                    first = False
                if q is not None:
                    q.put(chunk)
        finally:
            if q is not None:
                q.put(None)
        return control_pb2.PushAck()

    # --- test helpers ------------------------------------------------------------
    def send(self, site: str, msg: control_pb2.ServerMessage) -> None:
        with self.cond:
            stream = self.streams[site]
        stream.out.put(msg)

    def wait_for(self, pred: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = pred()
                if got:
                    return got
                left = deadline - time.monotonic()
                assert left > 0, "condition not met in time"
                self.cond.wait(min(left, 0.1))

    def wait_registered(self, site: str, n: int = 1, timeout: float = 10.0) -> control_pb2.Register:
        regs = self.wait_for(lambda: [r for r in self.registrations if r.site == site][n - 1 :], timeout)
        return regs[-1]  # type: ignore[no-any-return]

    def of_kind(self, kind: str, site: str | None = None) -> list[Any]:
        with self.cond:
            return [
                getattr(m, kind)
                for s, m in self.messages
                if m.WhichOneof("msg") == kind and (site is None or s == site)
            ]

    def wait_message(self, kind: str, pred: Callable[[Any], bool] = lambda m: True, timeout: float = 10.0) -> Any:
        def find() -> Any:
            for _s, m in self.messages:
                if m.WhichOneof("msg") == kind and pred(getattr(m, kind)):
                    return getattr(m, kind)
            return None

        return self.wait_for(find, timeout)

    def publish_task(
        self,
        site: str,
        params: dict[str, np.ndarray],
        *,
        task_id: str,
        round: int = 1,
        total_rounds: int = 1,
        config: dict[str, str] | None = None,
        kind: control_pb2.TaskKind = control_pb2.TASK_KIND_TRAIN,
    ) -> control_pb2.Task:
        refs: list[Any] = []
        if params:
            txn = self.downloads.publish(params, receivers=[site], ttl_s=120, transaction_id=f"g-{task_id}")
            refs = [r.to_proto() for r in txn.refs]
        task = control_pb2.Task(
            task_id=task_id, round=round, refs=refs, config=config or {}, total_rounds=total_rounds, kind=kind
        )
        self.send(site, control_pb2.ServerMessage(task=task))
        return task

    def pull(
        self, site: str, ann: control_pb2.ResultAnnouncement, settings: FetchSettings | None = None
    ) -> dict[str, np.ndarray]:
        """Download every tensor of a result over the reverse path, with the real Fetcher."""
        fetcher = Fetcher(ReverseSource(self, site), settings or FetchSettings(max_chunk_bytes=256 << 10))
        return {r.name: fetcher.fetch_array(TensorRef.from_proto(r)) for r in ann.refs}

    def result_received(self, site: str, task_id: str, ok: bool = True, reason: str = "", message: str = "") -> None:
        self.send(
            site,
            control_pb2.ServerMessage(
                result_received=control_pb2.ResultReceived(task_id=task_id, ok=ok, reason=reason, message=message)
            ),
        )


class ReverseSource:
    """ChunkSource over the control stream: UploadRequest down, Push stream up."""

    receiver = "server"

    def __init__(self, server: FakeServer, site: str, chunk_timeout_s: float = 10.0) -> None:
        self.server, self.site, self.timeout = server, site, chunk_timeout_s

    def stream(self, ref: TensorRef, offset: int, max_chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
        rid = uuid.uuid4().hex
        q: queue.Queue[control_pb2.PushedChunk | None] = queue.Queue()
        with self.server.push_lock:
            self.server.pushes[rid] = q
        self.server.send(
            self.site,
            control_pb2.ServerMessage(
                upload=control_pb2.UploadRequest(
                    request_id=rid, ref=ref.to_proto(), offset=offset, max_chunk_bytes=max_chunk_bytes
                )
            ),
        )
        try:
            while True:
                chunk = q.get(timeout=self.timeout)
                if chunk is None:
                    return
                if chunk.error:
                    raise RuntimeError(chunk.error)
                if chunk.data:
                    yield chunk.offset, chunk.data
        finally:
            with self.server.push_lock:
                self.server.pushes.pop(rid, None)

    def complete(self, transaction_id: str, ok: bool, error: str = "") -> None:
        """Completion travels as ResultReceived; the sidecar completes the trainer's transaction."""
