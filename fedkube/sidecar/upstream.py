"""The sidecar's one control stream to the server, kept alive across outages."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fedkube import envvars
from fedkube.protocol import AUTH_METADATA, BEARER, PROTOCOL_VERSION, SITE_METADATA
from fedkube.sidecar.state import backoff_delay
from fedkube.transfer import endpoints
from fedkube.transfer.wire import relay_channel_options
from fedkube.wire.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)


class _Auth(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the site's token and name to every call, so the relayed Download calls carry them too."""

    def __init__(self, site: str, token: str) -> None:
        self._md = ((AUTH_METADATA, BEARER + token), (SITE_METADATA, site))

    def _details(self, details: Any) -> Any:
        md = list(details.metadata or ()) + list(self._md)
        return _CallDetails(details.method, details.timeout, md, details.credentials, details.wait_for_ready,
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any



def server_channel(
    address: str, site: str, token: str, tls: endpoints.ClientTls | None = None
) -> tuple[grpc.Channel, grpc.Channel]:
    """(raw channel, authenticated channel) to the server; close the raw one when done.

    With ``tls`` the channel is mutual TLS: the site's certificate, and the server's verified against the job
    CA for ``tls.server_name``; the token still rides along as the second factor.
    """
    # A fixed per-stream read-ahead keeps the relay's memory bounded (LESSONS.md 4).
    raw = endpoints.channel(address, relay_channel_options(), tls)
    return raw, grpc.intercept_channel(raw, _Auth(site, token))


def _tls_failure(details: str) -> bool:
    """Whether gRPC's error text says the TLS handshake failed (what gRPC's core reports, not a status code)."""
    text = details.lower()
    return any(w in text for w in ("handshake", "certificate", "ssl_error", "tls"))


class RegistrationRejected(Exception):
    """The server refused this site's registration; fatal."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"server rejected the registration ({reason}): {message}")
        self.reason = reason
        self.message = message


_CLOSE = object()


class Upstream:
    """Holds the ``Control.Connect`` stream: register, heartbeats, reconnect with backoff.

    ``on_message`` gets every server message after ``Registered`` (on the
    stream's reader thread: it must not block); ``on_connected`` runs after
    each successful registration (to re-announce pending results).
    ``on_state`` is told each state of the stream (connecting, connected,
    backoff, stopped), ``on_heartbeat`` each heartbeat handed to gRPC and
    ``on_reconnected`` each registration after the first; they feed metrics
    and must be quick.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        job: str,
        site: str,
        address: str,
        on_message: Callable[[control_pb2.ServerMessage], None],
        trainer_state: Callable[[], control_pb2.TrainerState],
        resume_task_id: Callable[[], str],
        on_connected: Callable[[], None] = lambda: None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 15.0,
        on_state: Callable[[str], None] = lambda state: None,
        on_heartbeat: Callable[[], None] = lambda: None,
        on_reconnected: Callable[[], None] = lambda: None,
        check_registered: Callable[[control_pb2.Registered], control_pb2.Leave | None] = lambda reg: None,
    ) -> None:
        """``check_registered(registered)`` runs on the stream's reader before any later message: a Leave it
        returns is sent, the stream half-closed and nothing after it handed on (the site refused the job)."""
        self._stub = control_pb2_grpc.ControlStub(channel)
        self._job, self._site, self._address = job, site, address
        self._on_message, self._trainer_state = on_message, trainer_state
        self._resume_task_id, self._on_connected = resume_task_id, on_connected
        self._base, self._max = backoff_base_s, backoff_max_s
        self._on_state, self._on_heartbeat, self._on_reconnected = on_state, on_heartbeat, on_reconnected
        self._check_registered = check_registered
        self._registrations = 0
        self.session_id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._out: queue.Queue[object] | None = None
        self._call: Any = None
        self._closing = threading.Event()
        self.connected = threading.Event()
        self.rejected: RegistrationRejected | None = None
        self.left: control_pb2.Leave | None = None  # set when this site refused the job on Registered
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"upstream-{site}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, msg: control_pb2.ClientMessage) -> bool:
        """Queue ``msg`` on the live stream; False when disconnected (the caller decides what to redo)."""
        with self._lock:
            out = self._out if self.connected.is_set() else None
        if out is None:
            return False
        out.put(msg)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Half-close the stream (flushing queued messages), then stop reconnecting."""
        self._closing.set()
        with self._lock:
            out, call = self._out, self._call
        if out is not None:
            out.put(_CLOSE)
        if not self.done.wait(timeout) and call is not None:
            call.cancel()
        self.done.wait(timeout)

    def _requests(self, out: queue.Queue[object], interval: list[float]) -> Iterator[control_pb2.ClientMessage]:
        seq = 0
        while True:
            try:
                item = out.get(timeout=interval[0])
            except queue.Empty:
                if not self.connected.is_set():
                    continue
                seq += 1
                self._on_heartbeat()
                yield control_pb2.ClientMessage(
                    heartbeat=control_pb2.Heartbeat(seq=seq, trainer=self._trainer_state())
                )
                continue
            if item is _CLOSE:
                return
            assert isinstance(item, control_pb2.ClientMessage)
            yield item

    def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing.is_set():
                self._on_state("connecting")
                reached = self._connect_once()
                if self.rejected is not None or self._closing.is_set():
                    return
                attempt = 1 if reached else attempt + 1
                delay = backoff_delay(attempt, base_s=self._base, max_s=self._max)
                if reached:
                    log.warning("site %s: control stream to %s ended, reconnecting in %.1f s (attempt %d)",
                                self._site, self._address, delay, attempt)
                else:
                    log.warning("site %s: server %s not reachable, retrying in %.1f s (attempt %d)",
                                self._site, self._address, delay, attempt)
                self._on_state("backoff")
                self._closing.wait(delay)
        finally:
            self._on_state("stopped")
            self.done.set()

    def _connect_once(self) -> bool:
        """One stream's life; True if the server answered the registration."""
        out: queue.Queue[object] = queue.Queue()
        interval = [3600.0]  # heartbeats start once Registered says how often
        out.put(
            control_pb2.ClientMessage(
                register=control_pb2.Register(
                    job=self._job,
                    site=self._site,
                    session_id=self.session_id,
                    resume_task_id=self._resume_task_id(),
                    protocol_version=PROTOCOL_VERSION,
                )
            )
        )
        call = self._stub.Connect(self._requests(out, interval), wait_for_ready=False)
        with self._lock:
            self._out, self._call = out, call
        registered = False
        try:
            for msg in call:
                kind = msg.WhichOneof("msg")
                if self.left is not None:
                    continue  # refused: nothing of this job reaches the trainer; the server ends the stream
                if kind == "registered":
                    registered = True
                    leave = self._check_registered(msg.registered)
                    if leave is not None:
                        self.left = leave
                        self._closing.set()  # no reconnect: the site's policy refuses this job
                        out.put(control_pb2.ClientMessage(leave=leave))
                        out.put(_CLOSE)
                        log.error("site %s: leaving job %s: %s (%s)", self._site, self._job, leave.message,
                                  leave.reason)
                        continue
                    ms = msg.registered.heartbeat_interval_ms or 5000
                    interval[0] = ms / 1000.0
                    with self._lock:
                        self.connected.set()
                    self._registrations += 1
                    self._on_state("connected")
                    if self._registrations > 1:
                        self._on_reconnected()
                    log.info("site %s: registered with server %s for job %s (session %s, heartbeat every %d ms)",
                             self._site, self._address, msg.registered.job or self._job, self.session_id, ms)
                    # Tell the server the trainer's state right away instead of at the first heartbeat.
                    out.put(control_pb2.ClientMessage(trainer_state=self._trainer_state()))
                    self._on_connected()
                elif kind == "rejected":
                    self.rejected = RegistrationRejected(msg.rejected.reason, msg.rejected.message)
                    log.error("site %s: %s", self._site, self.rejected)
                    return True
                elif registered:
                    self._on_message(msg)
                else:
                    log.warning("site %s: ignoring %s before Registered", self._site, kind)
            return registered or True
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if self._closing.is_set() and code == grpc.StatusCode.CANCELLED:
                return registered
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) and not registered:
                details = exc.details() if hasattr(exc, "details") else str(exc)
                self.rejected = RegistrationRejected(code.name, details or "no details")
                log.error("site %s: %s", self._site, self.rejected)
                return True
            if code == grpc.StatusCode.UNAVAILABLE and not registered:
                details = (exc.details() if hasattr(exc, "details") else "") or ""
                if _tls_failure(details):
                    # Not an outage: retrying reaches the same certificate (until it is fixed or rotated).
                    log.error("site %s: the server at %s failed TLS verification (%s); fix: point %s at this job's "
                              "server, give the sidecar this job's CA (ca.crt in %s) and check that the server "
                              "certificate carries the name in %s", self._site, self._address, details.strip(),
                              envvars.SERVER_ADDRESS, envvars.TLS_DIR, envvars.TLS_SERVER_NAME)
                return False
            details = exc.details() if hasattr(exc, "details") else str(exc)
            log.warning("site %s: control stream to %s broke: %s (%s)", self._site, self._address,
                        code.name if code else "?", details)
            return registered
        finally:
            with self._lock:
                self.connected.clear()
                self._out, self._call = None, None
            out.put(_CLOSE)
