"""The ``Control`` gRPC servicer: proto <-> domain, authentication, sessions.

Thin by design (STYLE.md "thin servicers"): it authenticates each call
(:mod:`fedkube.server.auth`),
turns client messages into :class:`ControlEvents` calls carrying the identity
of the stream they came from, and writes the workflow's messages to the right
stream through a per-stream queue (a gRPC stream is not safe for concurrent
writes). Errors become ``context.abort`` here and only here.

Sessions: every accepted ``Connect`` stream gets a :class:`Session` with a
server-side ``conn_id``. A newer stream for the same site replaces the older
one, which is ended; events from a replaced stream still reach the workflow
with their old ``conn_id``, and the workflow ignores them (LESSONS.md 13).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from fedkube import envvars
from fedkube.protocol import PROTOCOL_VERSION
from fedkube.security.contexts import peer_cert_not_after
from fedkube.server import outbox
from fedkube.server.auth import Authenticator, AuthError
from fedkube.server.registry import LEAVE_MESSAGE_CHARS
from fedkube.server.reverse import ClaimRefused, UploadBroker, push_chunk, push_end, push_error
from fedkube.status import clip
from fedkube.terms import JobTerms
from fedkube.transfer.errors import InvalidRefError
from fedkube.transfer.refs import TensorRef
from fedkube.wire.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

REGISTER_TIMEOUT = "RegisterTimeout"  # connections_rejected reason: a stream that never registered

_PHASES = {
    control_pb2.TRAINER_PHASE_UNSPECIFIED: "Unknown",
    control_pb2.TRAINER_PHASE_STARTING: "Starting",
    control_pb2.TRAINER_PHASE_RUNNING: "Running",
    control_pb2.TRAINER_PHASE_FINISHED: "Finished",
    control_pb2.TRAINER_PHASE_FAILED: "Failed",
    control_pb2.TRAINER_PHASE_EXITED: "Exited",
}
_KINDS = {
    control_pb2.FAILURE_KIND_UNSPECIFIED: "",
    control_pb2.FAILURE_KIND_EXCEPTION: "Exception",
    control_pb2.FAILURE_KIND_CONFIG_ERROR: "ConfigError",
    control_pb2.FAILURE_KIND_ABORTED: "Aborted",
    control_pb2.FAILURE_KIND_EXITED_BEFORE_DOWNLOAD: "ExitedBeforeDownload",
}


@dataclass(frozen=True)
class TrainerReport:
    """What the sidecar says about its trainer. ``kind`` is a failure-reason name or ""."""

    phase: str
    kind: str = ""
    message: str = ""
    exit_code: int = 0


@dataclass(frozen=True)
class ResultAnnounced:
    """A client's result announcement; ``problem`` is set when its refs were malformed."""

    task_id: str
    round: int
    num_examples: int
    metrics: Mapping[str, float]
    refs: tuple[TensorRef, ...]
    problem: str = ""


_STOP = object()


@dataclass
class Session:
    """One accepted Connect stream of a site."""

    site: str
    session_id: str
    conn_id: int
    peer: str
    cert_not_after: str = ""  # the site certificate's notAfter (RFC 3339), "" without TLS
    outbox: queue.Queue[Any] = field(default_factory=queue.Queue, repr=False)
    closed: threading.Event = field(default_factory=threading.Event, repr=False)

    def send(self, msg: control_pb2.ServerMessage) -> bool:
        if self.closed.is_set():
            return False
        self.outbox.put(msg)
        return True

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.outbox.put(_STOP)


class ControlEvents(Protocol):
    """What the workflow learns from the control service. Calls come from gRPC threads: be quick, never block."""

    def client_connected(self, session: Session, resume_task_id: str) -> None: ...
    def heartbeat(self, session: Session, seq: int, trainer: TrainerReport | None) -> None: ...
    def task_acked(self, session: Session, task_id: str) -> None: ...
    def result_announced(self, session: Session, result: ResultAnnounced) -> None: ...
    def trainer_state(self, session: Session, report: TrainerReport) -> None: ...
    def metrics(self, session: Session, round: int, values: Mapping[str, float]) -> None: ...
    def client_disconnected(self, session: Session) -> None: ...
    def client_left(self, session: Session, reason: str, message: str) -> None: ...


class SessionTable:
    """The live session of each site; sending always goes to the current one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_site: dict[str, Session] = {}
        self._ids = itertools.count(1)

    def next_conn_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def install(self, session: Session) -> Session | None:
        """Make ``session`` current for its site; returns the session it replaced."""
        with self._lock:
            old = self._by_site.get(session.site)
            self._by_site[session.site] = session
        if old is not None:
            old.close()
        return old

    def remove(self, session: Session) -> bool:
        """Forget ``session`` if it is still current; False when a newer one replaced it."""
        with self._lock:
            current = self._by_site.get(session.site) is session
            if current:
                del self._by_site[session.site]
        session.close()
        return current

    def current(self, site: str) -> Session | None:
        with self._lock:
            return self._by_site.get(site)

    def send(self, site: str, msg: control_pb2.ServerMessage) -> bool:
        session = self.current(site)
        return session.send(msg) if session is not None else False

    def live(self) -> int:
        """How many sites have a live control stream."""
        with self._lock:
            return len(self._by_site)

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._by_site.values())
            self._by_site.clear()
        for s in sessions:
            s.close()


def _first_message(
    request_iterator: Iterator[control_pb2.ClientMessage], timeout_s: float, site: str
) -> tuple[control_pb2.ClientMessage | None, bool]:
    """(first message or None, timed out?): gRPC's request iterator has no timeout of its own.

    The helper thread ends with the call: when the stream is refused after the
    timeout, gRPC ends the iterator (or raises from it).
    """
    box: list[control_pb2.ClientMessage | None] = []
    done = threading.Event()

    def read() -> None:
        try:
            box.append(next(request_iterator, None))
        except Exception:  # the call ended (cancelled, refused): no Register came
            box.append(None)
        finally:
            done.set()

    threading.Thread(target=read, name=f"fedkube-register-{site}", daemon=True).start()
    if not done.wait(timeout_s):
        return None, True
    return box[0], False


class ControlServicer(control_pb2_grpc.ControlServicer):
    """Serves ``fedkube.v1.Control``: Connect (the control stream) and Push (result chunks)."""

    def __init__(
        self,
        job: str,
        auth: Authenticator,
        events: ControlEvents,
        sessions: SessionTable,
        broker: UploadBroker,
        *,
        heartbeat_interval_ms: int,
        register_timeout_s: float = 30.0,
        terms: JobTerms | None = None,
    ) -> None:
        self._terms = terms or JobTerms()
        self._register_timeout_s = register_timeout_s
        self._job = job
        self._auth = auth
        self._events = events
        self._sessions = sessions
        self._broker = broker
        self._heartbeat_interval_ms = heartbeat_interval_ms

    # --- refusals --------------------------------------------------------------

    def _refuse(
        self, context: grpc.ServicerContext, site: str, code: grpc.StatusCode, reason: str, message: str
    ) -> None:
        self._auth.refuse(AuthError(site, code, reason, message), "call", context.peer())

    def _identify(self, context: grpc.ServicerContext) -> tuple[str, AuthError | None]:
        """(site, None) for an authenticated call, (claimed site, refusal) otherwise (logged and counted)."""
        try:
            return self._auth.call_identity(context, what="call").site, None
        except AuthError as exc:
            return exc.site, exc

    # --- Connect --------------------------------------------------------------

    def Connect(
        self, request_iterator: Iterator[control_pb2.ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[control_pb2.ServerMessage]:
        site, refused = self._identify(context)
        code, reason, message = (refused.code, refused.reason, refused.message) if refused else (None, "", "")
        if refused is None:
            first, timed_out = _first_message(request_iterator, self._register_timeout_s, site)
            if timed_out:
                code, reason, message = grpc.StatusCode.DEADLINE_EXCEEDED, REGISTER_TIMEOUT, (
                    f"site {site!r} opened a control stream but sent no Register within "
                    f"{self._register_timeout_s:g} s; fix: send Register as the stream's first message "
                    f"(the fedkube sidecar does), or raise {envvars.REGISTER_TIMEOUT} on the server"
                )
            else:
                code, reason, message = self._check_register(site, first)
            if code is not None:
                self._refuse(context, site, code, reason, message)
        if code is not None:
            yield outbox.rejected(reason, message)
            context.abort(code, message)
            return
        assert first is not None
        reg = first.register
        conn_id = self._sessions.next_conn_id()
        session = Session(site=site, session_id=reg.session_id, conn_id=conn_id, peer=context.peer(),
                          cert_not_after=peer_cert_not_after(context))
        # Registered goes first on the stream: queue it before anyone can send a task.
        session.send(outbox.registered(self._job, self._heartbeat_interval_ms, self._terms))
        replaced = self._sessions.install(session)
        if replaced is not None:
            self._broker.site_gone(site, "the site opened a new control stream")
            log.info(
                "job %s: site %s reconnected (conn %s replaces conn %s, session %s)",
                self._job, site, session.conn_id, replaced.conn_id, reg.session_id,
            )
        else:
            log.info("job %s: site %s connected (conn %s, session %s, peer %s)",
                     self._job, site, session.conn_id, reg.session_id, session.peer)
        context.add_callback(session.close)
        self._events.client_connected(session, reg.resume_task_id)
        reader = threading.Thread(
            target=self._read, args=(session, request_iterator), name=f"fedkube-control-{site}", daemon=True
        )
        reader.start()
        while True:
            item = session.outbox.get()
            if item is _STOP:
                break
            yield item
        # Drain what was queued before the stop (e.g. a final Stop message).
        while True:
            try:
                item = session.outbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                yield item

    def _check_register(
        self, site: str, first: control_pb2.ClientMessage | None
    ) -> tuple[grpc.StatusCode | None, str, str]:
        if first is None or first.WhichOneof("msg") != "register":
            return grpc.StatusCode.INVALID_ARGUMENT, "NotRegistered", (
                "the first message of a Connect stream must be Register; fix: upgrade the sidecar"
            )
        reg = first.register
        if reg.protocol_version != PROTOCOL_VERSION:
            return grpc.StatusCode.FAILED_PRECONDITION, "ProtocolMismatch", (
                f"protocol version {reg.protocol_version} is not supported (server speaks {PROTOCOL_VERSION}); "
                "fix: run the same fedkube version on server and sidecar"
            )
        if reg.job != self._job:
            return grpc.StatusCode.FAILED_PRECONDITION, "WrongJob", (
                f"this server runs job {self._job!r}, not {reg.job!r}; fix: point the sidecar at its own job's server"
            )
        if reg.site != site:
            return grpc.StatusCode.PERMISSION_DENIED, "SiteMismatch", (
                f"Register names site {reg.site!r} but the call is authenticated as {site!r}"
            )
        return None, "", ""

    def _read(self, session: Session, request_iterator: Iterator[control_pb2.ClientMessage]) -> None:
        """Turn a stream's client messages into events until it ends."""
        try:
            for msg in request_iterator:
                self._dispatch(session, msg)
        except grpc.RpcError:
            pass  # the stream broke: treated like an end below
        except Exception:
            log.exception("job %s: site %s conn %s: control stream reader failed", self._job, session.site,
                          session.conn_id)
        finally:
            current = self._sessions.remove(session)
            if current:
                self._broker.site_gone(session.site, "the site's control stream ended")
            log.info("job %s: site %s conn %s disconnected", self._job, session.site, session.conn_id)
            self._events.client_disconnected(session)

    def _dispatch(self, session: Session, msg: control_pb2.ClientMessage) -> None:
        kind = msg.WhichOneof("msg")
        ev = self._events
        if kind == "heartbeat":
            hb = msg.heartbeat
            ev.heartbeat(session, hb.seq, _trainer_report(hb.trainer) if hb.HasField("trainer") else None)
        elif kind == "task_ack":
            ev.task_acked(session, msg.task_ack.task_id)
        elif kind == "result":
            ev.result_announced(session, _announcement(msg.result))
        elif kind == "trainer_state":
            ev.trainer_state(session, _trainer_report(msg.trainer_state))
        elif kind == "metrics":
            ev.metrics(session, msg.metrics.round, dict(msg.metrics.values))
        elif kind == "leave":
            # Only this stream's own site can leave by it: the identity is the authenticated session's, and the
            # site's words are bounded before they reach logs and status.
            reason, message = clip(msg.leave.reason, 64), clip(msg.leave.message, LEAVE_MESSAGE_CHARS)
            log.info("job %s: site %s conn %s leaves the job (%s): %s", self._job, session.site, session.conn_id,
                     reason or "-", message or "-")
            ev.client_left(session, reason, message)
        elif kind == "register":
            log.warning("job %s: site %s conn %s sent Register twice; ignored", self._job, session.site,
                        session.conn_id)

    # --- Push -----------------------------------------------------------------

    def Push(
        self, request_iterator: Iterator[control_pb2.PushedChunk], context: grpc.ServicerContext
    ) -> control_pb2.PushAck:
        site, refused = self._identify(context)
        if refused is not None:
            context.abort(refused.code, refused.message)
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty Push stream; the first chunk must name a request_id")
        assert first is not None
        try:
            upload = self._broker.claim(site, first.request_id)
        except ClaimRefused as exc:
            if exc.reason:
                self._refuse(context, site, exc.code, exc.reason, exc.message)
            context.abort(exc.code, exc.message)
        if first.error:
            push_error(upload, first.error)
            return control_pb2.PushAck()
        end_reason = "the push stream ended"
        try:
            if first.data and not push_chunk(upload, first.offset, first.data):
                context.abort(grpc.StatusCode.CANCELLED, f"upload {first.request_id} was cancelled by the server")
            for chunk in request_iterator:
                if chunk.error:
                    push_error(upload, chunk.error)
                    return control_pb2.PushAck()
                if not push_chunk(upload, chunk.offset, chunk.data):
                    context.abort(grpc.StatusCode.CANCELLED, f"upload {first.request_id} was cancelled by the server")
        except grpc.RpcError:
            end_reason = "the push stream broke"
        finally:
            push_end(upload, end_reason)
        return control_pb2.PushAck()


def _trainer_report(msg: control_pb2.TrainerState) -> TrainerReport:
    return TrainerReport(
        phase=_PHASES.get(msg.phase, "Unknown"),
        kind=_KINDS.get(msg.kind, ""),
        message=msg.message,
        exit_code=msg.exit_code,
    )


def _announcement(msg: control_pb2.ResultAnnouncement) -> ResultAnnounced:
    refs: list[TensorRef] = []
    problem = ""
    try:
        refs = [TensorRef.from_proto(r) for r in msg.refs]
    except InvalidRefError as exc:
        problem = str(exc)
    return ResultAnnounced(
        task_id=msg.task_id,
        round=msg.round,
        num_examples=msg.num_examples,
        metrics=dict(msg.metrics),
        refs=tuple(refs),
        problem=problem,
    )
