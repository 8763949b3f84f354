"""The server's registry of expected clients: state per client, sessions, heartbeats.

States and the only transitions allowed (anything else is a bug and raises
``InvalidTransition``)::

    Pending    -> Registered | Failed
    Registered -> Training | Failed | Lost
    Training   -> Uploading | Registered (task lost with its connection) | Failed | Lost
    Uploading  -> Done | Registered (task lost with its connection) | Failed | Lost
    Done       -> Training (next round) | Failed | Lost
    Failed     -> Training | Lost (only after a round-scoped failure)
    Lost       -> Registered (the sidecar connected again)
    Registered | Training | Uploading | Done | Failed (round) -> Withdrawn (the site sent Leave)
    Withdrawn  -> Registered (the site came back, e.g. after its admin changed its policy)

Identity (LESSONS.md 13). Every connection has a server-assigned ``conn_id``
that grows; an event carries the (site, session_id, conn_id) of the stream it
came from (the control servicer's ``Session`` has exactly these attributes)
and, where it concerns a task, the task id. An event from a connection that is
not the site's current one, or for a task that is not the site's current one,
is stale: it is ignored and the method returns False. Nothing stale can move
a client's state.

Heartbeats (LESSONS.md 17). The clock is injected. Only a client that was seen
(registered at least once) can become Lost, when its last sign of life is older
than ``heartbeat_timeout_s``; a client never seen stays Pending, which the
round logic reports as NotRegistered. A disconnect alone changes nothing: the
sidecar reconnects with backoff, and only silence past the timeout counts.

The server's own stalls (issue 11 §2.2). Heartbeats are read by the server's
loop; while that loop does not run (the process stopped, a VM paused, a long
GC pause, a handler that blocked) they queue up unread, and the silence it
measures afterwards is its own. The loop ticks a :class:`LoopWatch` on every
pass; a gap longer than its limit is reported with :meth:`Registry.server_stalled`,
and from then on every client's silence counts from the resume, not from its
last heartbeat read before the stall: each gets one full heartbeat timeout,
judged on what arrives after the server runs again.

Thread safety: every method takes the registry's lock and returns data; none
calls out (LESSONS.md 10), so gRPC threads may call it directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from fedkube.errors import FedkubeError

# ClientState is defined once, with the status documents that carry it; importing it from here keeps working.
from fedkube.status import ClientState as ClientState
from fedkube.status import ClientStatus, Reason, Scope, clip

log = logging.getLogger(__name__)


S = ClientState
_ALLOWED: dict[ClientState, frozenset[ClientState]] = {
    S.PENDING: frozenset({S.REGISTERED, S.FAILED}),
    S.REGISTERED: frozenset({S.TRAINING, S.FAILED, S.LOST, S.WITHDRAWN}),
    S.TRAINING: frozenset({S.UPLOADING, S.REGISTERED, S.FAILED, S.LOST, S.WITHDRAWN}),
    S.UPLOADING: frozenset({S.DONE, S.REGISTERED, S.FAILED, S.LOST, S.WITHDRAWN}),
    S.DONE: frozenset({S.TRAINING, S.FAILED, S.LOST, S.WITHDRAWN}),
    S.FAILED: frozenset({S.TRAINING, S.LOST, S.WITHDRAWN}),
    S.LOST: frozenset({S.REGISTERED}),
    S.WITHDRAWN: frozenset({S.REGISTERED}),
}
#: The reasons a site may give for leaving (control.proto ``Leave.reason``); anything else reads as Withdrawn.
LEAVE_REASONS = frozenset({Reason.WITHDRAWN, Reason.POLICY_REFUSED})
#: The most characters of a Leave's message the server keeps (it comes from the site, into status and logs).
LEAVE_MESSAGE_CHARS = 512


def leave_reason(value: str) -> Reason:
    """The reason of a Leave as the site spelled it: PolicyRefused, else Withdrawn (the site's word is untrusted)."""
    return Reason.POLICY_REFUSED if value == Reason.POLICY_REFUSED.value else Reason.WITHDRAWN
_ALIVE = frozenset({S.REGISTERED, S.TRAINING, S.UPLOADING, S.DONE})


class InvalidTransition(FedkubeError):
    """A state change that the lifecycle does not allow: a bug in the caller."""


class RegistrationRejected(FedkubeError):
    """A registration the server refuses; ``reason`` is Reason.REJECTED."""

    reason = Reason.REJECTED


class SessionLike(Protocol):
    """The identity of one control stream (fedkube.server.control.Session satisfies it)."""

    @property
    def site(self) -> str: ...

    @property
    def session_id(self) -> str: ...

    @property
    def conn_id(self) -> int: ...


@dataclass(frozen=True)
class SessionKey:
    """A plain SessionLike, for callers and tests without a gRPC stream."""

    site: str
    session_id: str
    conn_id: int


@dataclass(frozen=True)
class ClientRecord:
    """A snapshot of one client (records are immutable; the registry swaps them)."""

    name: str
    state: ClientState = ClientState.PENDING
    reason: Reason | None = None
    message: str = ""
    session_id: str = ""
    conn_id: int = 0
    connected: bool = False
    seen: bool = False
    last_seen: float | None = None
    task_id: str = ""
    round: int = 0
    """Round of the client's current/last task (0: none yet)."""
    failed_round: int = 0
    """Round of the last round-scoped failure."""
    rounds_completed: int = 0
    delivered_task_id: str = ""
    """The last task whose result the server downloaded in full (kept when the client later fails or is lost)."""
    peer: str = ""
    """Where its current connection comes from, as the server sees it (a NAT or load balancer shows itself)."""
    cert_not_after: str = ""
    """When the certificate of its current connection expires (RFC 3339)."""

    @property
    def failed_for_job(self) -> bool:
        """Failed with a reason that keeps it out for the rest of the job."""
        return self.state is S.FAILED and self.reason is not None and self.reason.scope is not Scope.ROUND

    def status(self) -> ClientStatus:
        return ClientStatus(
            self.name,
            self.state,
            self.reason.value if self.reason else "",
            self.message,
            self.rounds_completed,
            peer=self.peer,
            cert_not_after=self.cert_not_after,
        )


@dataclass(frozen=True)
class Registration:
    """What a successful registration means for the server."""

    record: ClientRecord
    resumed: bool
    """The sidecar resumed the task it was on; nothing needs re-sending."""
    task_lost: bool
    """The client was on a task that its new connection does not resume: re-send the round's task."""


class Registry:
    """States of the job's expected clients."""

    def __init__(
        self,
        clients: Iterable[str],
        *,
        heartbeat_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        job: str = "",
    ) -> None:
        names = list(clients)
        if not names:
            raise FedkubeError("a job needs at least one client; the registry got none")
        if len(set(names)) != len(names):
            raise FedkubeError(f"client names must be unique, got {names}")
        if not heartbeat_timeout_s > 0:
            raise FedkubeError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        self._job = job
        self._clock = clock
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self._lock = threading.Lock()
        self._records: dict[str, ClientRecord] = {n: ClientRecord(n) for n in names}
        # When the server last ran again after a stall of its own: no silence counts from before it.
        self._resumed_at: float | None = None

    # -- reading -----------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._records)

    def get(self, site: str) -> ClientRecord:
        with self._lock:
            return self._record(site)

    def records(self) -> list[ClientRecord]:
        with self._lock:
            return list(self._records.values())

    def statuses(self) -> list[ClientStatus]:
        """Each client's state, reason and message, for the status document."""
        return [r.status() for r in self.records()]

    def is_current(self, session: SessionLike) -> bool:
        with self._lock:
            return self._current(session)

    # -- internals (lock held) -----------------------------------------------------

    def _record(self, site: str) -> ClientRecord:
        try:
            return self._records[site]
        except KeyError:
            raise KeyError(f"{site!r} is not a client of job {self._job!r}; clients: {list(self._records)}") from None

    def _current(self, session: SessionLike) -> bool:
        rec = self._records.get(session.site)
        return rec is not None and rec.connected and rec.conn_id == session.conn_id

    def _move(self, rec: ClientRecord, state: ClientState, **changes: object) -> ClientRecord:
        if state is not rec.state and state not in _ALLOWED[rec.state]:
            raise InvalidTransition(
                f"client {rec.name!r}: {rec.state.value} -> {state.value} is not a valid transition"
            )
        if rec.state is S.FAILED and state is not S.FAILED and rec.failed_for_job:
            raise InvalidTransition(
                f"client {rec.name!r} failed for the job ({rec.reason.value if rec.reason else ''}); "
                f"it cannot become {state.value}"
            )
        new = replace(rec, state=state, **changes)  # type: ignore[arg-type]
        self._records[rec.name] = new
        if state is not rec.state:
            log.info(
                "job %s client %s: %s -> %s%s", self._job, rec.name, rec.state.value, state.value,
                f" ({new.reason.value}: {new.message})" if state.unhealthy and new.reason else "",
            )
        return new

    # -- events ------------------------------------------------------------------

    def register(
        self, session: SessionLike, resume_task_id: str = "", *, peer: str = "", cert: str = ""
    ) -> Registration | None:
        """A Connect stream was accepted for ``session.site``.

        Returns None when a newer connection of the site already registered
        (this one is stale). Raises RegistrationRejected for an unknown site
        or a client that failed for the job.
        """
        now = self._clock()
        with self._lock:
            rec = self._records.get(session.site)
            if rec is None:
                raise RegistrationRejected(
                    f"site {session.site!r} is not a client of job {self._job!r}; clients: {list(self._records)}"
                )
            if session.conn_id < rec.conn_id or (session.conn_id == rec.conn_id and rec.seen):
                return None
            if rec.failed_for_job:
                raise RegistrationRejected(
                    f"site {session.site!r} failed for job {self._job!r} "
                    f"({rec.reason.value if rec.reason else ''}: {rec.message}); it cannot rejoin"
                )
            ident = {
                "session_id": session.session_id, "conn_id": session.conn_id,
                "connected": True, "seen": True, "last_seen": now, "peer": peer, "cert_not_after": cert,
            }
            resumed = bool(resume_task_id) and resume_task_id == rec.task_id and rec.state in (S.TRAINING, S.UPLOADING)
            task_lost = rec.state in (S.TRAINING, S.UPLOADING) and not resumed
            if rec.state in (S.PENDING, S.LOST, S.WITHDRAWN) or task_lost:
                new = self._move(rec, S.REGISTERED, reason=None, message="", **ident)
            else:
                # Registered/Done/Failed(round)/resumed Training|Uploading keep their state under a new connection.
                new = self._move(rec, rec.state, **ident)
        if task_lost:
            log.warning(
                "job %s client %s reconnected (session %s) without resuming task %s; it must be sent again",
                self._job, rec.name, session.session_id, rec.task_id,
            )
        return Registration(new, resumed, task_lost)

    def heartbeat(self, session: SessionLike) -> bool:
        """A sign of life on ``session``; False when stale."""
        now = self._clock()
        with self._lock:
            if not self._current(session):
                return False
            rec = self._records[session.site]
            self._records[rec.name] = replace(rec, last_seen=now)
            return True

    def disconnected(self, session: SessionLike) -> bool:
        """The stream ended. The state stays: only silence past the heartbeat timeout makes a client Lost."""
        with self._lock:
            if not self._current(session):
                return False
            rec = self._records[session.site]
            self._records[rec.name] = replace(rec, connected=False)
            return True

    def task_sent(self, site: str, task_id: str, round: int) -> ClientRecord:
        """The server handed ``task_id`` of ``round`` to the client (Registered/Done/Failed(round) -> Training)."""
        if not task_id or round < 1:
            raise ValueError(f"task_sent needs a task id and a round >= 1, got {task_id!r}, {round}")
        with self._lock:
            rec = self._record(site)
            if rec.state not in (S.REGISTERED, S.DONE, S.FAILED) or not rec.seen:
                raise InvalidTransition(f"client {site!r} is {rec.state.value}; it cannot be given task {task_id!r}")
            return self._move(rec, S.TRAINING, task_id=task_id, round=round, reason=None, message="")

    def result_announced(self, session: SessionLike, task_id: str) -> bool:
        """The client announced its result for ``task_id`` (Training -> Uploading); False when stale."""
        now = self._clock()
        with self._lock:
            if not self._current(session):
                return False
            rec = self._records[session.site]
            if task_id != rec.task_id or rec.state not in (S.TRAINING, S.UPLOADING):
                log.info(
                    "job %s client %s: ignoring stale result for task %s (current task %s, state %s)",
                    self._job, rec.name, task_id, rec.task_id, rec.state.value,
                )
                return False
            self._move(rec, S.UPLOADING, last_seen=now)
            return True

    def result_done(self, site: str, task_id: str) -> bool:
        """The server downloaded and verified the whole result of ``task_id`` (Uploading -> Done)."""
        with self._lock:
            rec = self._record(site)
            if task_id != rec.task_id or rec.state is not S.UPLOADING:
                return False
            self._move(rec, S.DONE, rounds_completed=rec.rounds_completed + 1, delivered_task_id=task_id)
            return True

    def fail(
        self,
        site: str,
        reason: Reason,
        message: str = "",
        *,
        session: SessionLike | None = None,
        task_id: str | None = None,
    ) -> bool:
        """Mark a client Failed with ``reason``.

        Stale (returns False) when ``session`` is not current, or ``task_id``
        is not the client's current task. The first failure wins: a client
        already Failed or Lost keeps its reason, except that a client-scoped
        failure replaces a round-scoped one. A round-scoped reason for a
        client that never connected is a no-op (see ``note``).
        """
        if reason is Reason.LOST:
            raise ValueError("Lost is decided by check_heartbeats, not reported with fail()")
        with self._lock:
            rec = self._record(site)
            if session is not None and not self._current(session):
                return False
            if task_id is not None and task_id != rec.task_id:
                return False
            if rec.state in (S.LOST, S.WITHDRAWN) or rec.failed_for_job:
                return False
            if rec.state is S.FAILED and reason.scope is Scope.ROUND:
                return False
            if rec.state is S.PENDING and reason.scope is Scope.ROUND:
                # A client that never connected has no round to fail; its exclusion is a note().
                return False
            extra: dict[str, object] = {"reason": reason, "message": message or reason.sentence}
            if reason.scope is Scope.ROUND:
                extra["failed_round"] = rec.round
            self._move(rec, S.FAILED, **extra)
            return True

    def withdraw(self, session: SessionLike, reason: Reason, message: str) -> ClientRecord | None:
        """The site said it leaves (a Leave on ``session``): Withdrawn at once, no heartbeat timeout.

        None when stale (not the site's current stream) or when the client already ended for the job (failed for
        it, Lost or Withdrawn): the first word stands. ``reason`` outside :data:`LEAVE_REASONS` reads as
        Withdrawn; ``message`` is clipped to :data:`LEAVE_MESSAGE_CHARS`.
        """
        if reason not in LEAVE_REASONS:
            reason = Reason.WITHDRAWN
        text = clip(message.strip(), LEAVE_MESSAGE_CHARS) or reason.sentence
        with self._lock:
            if not self._current(session):
                return None
            rec = self._records[session.site]
            if rec.state in (S.PENDING, S.LOST, S.WITHDRAWN) or rec.failed_for_job:
                return None
            return self._move(rec, S.WITHDRAWN, reason=reason, message=text, connected=False)

    def note(self, site: str, reason: Reason, message: str) -> bool:
        """Attach a reason to a Pending client without changing its state (e.g. NotRegistered at round start)."""
        with self._lock:
            rec = self._record(site)
            if rec.state is not S.PENDING:
                return False
            self._records[site] = replace(rec, reason=reason, message=message)
            return True

    def server_stalled(self, seconds: float) -> None:
        """The server's loop did not run for ``seconds``, up to now: blame no client for that silence.

        Heartbeats that arrived meanwhile were not read (they may still be
        queued), so every client's silence counts from now: each gets one full
        heartbeat timeout from the resume (see the module doc).
        """
        now = self._clock()
        with self._lock:
            self._resumed_at = now
        log.warning(
            "job %s: the server itself did not run for %.1f s (process stopped, VM paused, long GC pause or a "
            "blocked loop); it read no heartbeats meanwhile, so every client gets a fresh heartbeat timeout "
            "(%g s) from now", self._job, seconds, self.heartbeat_timeout_s,
        )

    def check_heartbeats(self, *, final_round: int | None = None) -> list[ClientRecord]:
        """Declare Lost every seen client silent for longer than the heartbeat timeout; returns them.

        The server should end a Lost client's stream; the sidecar then
        reconnects and registers again (Lost -> Registered). A client that
        delivered its result of ``final_round`` (the job's last) has nothing
        left to do: its pod may wind down while others still train, and that
        silence is teardown, not a loss (LESSONS.md 19).
        """
        now = self._clock()
        lost: list[ClientRecord] = []
        with self._lock:
            for rec in list(self._records.values()):
                if not rec.seen or rec.last_seen is None or rec.state not in _ALIVE | {S.FAILED}:
                    continue
                if rec.failed_for_job:
                    continue
                if (final_round is not None and rec.state is S.DONE and rec.round >= final_round
                        and rec.delivered_task_id == rec.task_id):
                    continue
                since = rec.last_seen
                if self._resumed_at is not None and self._resumed_at > since:
                    since = self._resumed_at
                silent = now - since
                if silent > self.heartbeat_timeout_s:
                    after = " since the server resumed from a stall of its own" if since != rec.last_seen else ""
                    msg = (
                        f"no heartbeat for {silent:.1f} s{after} (heartbeatSeconds={self.heartbeat_timeout_s:g}); "
                        "check the client's network and its sidecar's logs"
                    )
                    lost.append(self._move(rec, S.LOST, reason=Reason.LOST, message=msg, connected=False))
        return lost


STALL_FLOOR_S = 1.0
"""The shortest gap a :class:`LoopWatch` reports: well above the server loop's own waits (at most 0.2 s)."""


class LoopWatch:
    """Notices that a loop which calls :meth:`tick` on every pass did not run for a while.

    The limit is a third of the heartbeat timeout (the sidecars' heartbeat
    interval), at least :data:`STALL_FLOOR_S`: a shorter gap cannot make a
    healthy client look silent for a whole timeout, and a gap near the loop's
    normal pace must not count, or a dead client would get a fresh grace on
    every pass and never be Lost. Pure: the clock is injected.
    """

    def __init__(self, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = max(STALL_FLOOR_S, heartbeat_timeout_s / 3)
        self._clock = clock
        self._last: float | None = None

    def tick(self) -> float:
        """One pass of the loop; the length of the gap since the previous pass when it exceeds the limit, else 0."""
        now = self._clock()
        last, self._last = self._last, now
        if last is None:
            return 0.0
        gap = now - last
        return gap if gap > self.limit_s else 0.0
