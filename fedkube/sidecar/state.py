"""The sidecar's bookkeeping, free of I/O: tasks, results in flight, the trainer's state.

The gRPC edges (upstream control stream, the trainer's local endpoint, the
reverse-path pushes) call into these objects and act on what they return; no
method here calls out while holding its lock (LESSONS.md 10), so any of them
may be used from any gRPC worker thread.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from fedkube.wire.v1 import control_pb2, tensor_pb2

Phase = control_pb2.TrainerPhase
Kind = control_pb2.FailureKind

_FINAL_PHASES = (control_pb2.TRAINER_PHASE_FINISHED, control_pb2.TRAINER_PHASE_FAILED, control_pb2.TRAINER_PHASE_EXITED)


def backoff_delay(attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before reconnect ``attempt`` (1-based): exponential, capped, with +-20 % jitter.

    Jitter keeps many sidecars that lost the server at the same moment from
    hammering it in lockstep when it comes back.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    nominal = min(max_s, base_s * (2 ** min(attempt - 1, 30)))
    r = (rng or random).uniform(0.8, 1.2)
    return float(min(max_s, nominal * r))


# --- tasks -------------------------------------------------------------------


@dataclass
class _Result:
    task_id: str
    bytes_total: int
    # ref_id -> highest byte end relayed so far (a resumed push restarts at an
    # offset, so summing chunk sizes would count bytes twice).
    ends: dict[str, int]
    sizes: dict[str, int]
    transactions: set[str]
    announcement: control_pb2.ResultAnnouncement
    finished: bool = False
    ok: bool = False
    reason: str = ""
    message: str = ""

    @property
    def bytes_done(self) -> int:
        return sum(min(self.ends.get(r, 0), n) for r, n in self.sizes.items())


@dataclass(frozen=True)
class Progress:
    """What ``WatchResult`` streams to the trainer about one result."""

    task_id: str
    bytes_done: int
    bytes_total: int
    finished: bool
    ok: bool
    reason: str
    message: str
    version: int


@dataclass
class TaskBook:
    """Tasks from the server and the results the trainer sent for them.

    * ``offer`` queues a task for the trainer unless its id was seen before
      (a re-sent task after a reconnect must not train twice).
    * ``take`` hands the trainer its next task, or the job's ``Stop``.
    * ``announce`` / ``relayed`` / ``received`` follow a result from the
      trainer's ``SubmitResult`` to the server's ``ResultReceived``.
    """

    _cond: threading.Condition = field(default_factory=threading.Condition)
    _seen: set[str] = field(default_factory=set)
    _queue: deque[control_pb2.Task] = field(default_factory=deque)
    _stop: control_pb2.Stop | None = None
    _current: str = ""
    _results: dict[str, _Result] = field(default_factory=dict)
    _by_transaction: dict[str, str] = field(default_factory=dict)
    _version: int = 0

    # tasks
    def offer(self, task: control_pb2.Task) -> bool:
        """Queue ``task``; False (and nothing queued) when its id was seen before."""
        with self._cond:
            if task.task_id in self._seen:
                return False
            self._seen.add(task.task_id)
            self._queue.append(task)
            self._current = task.task_id
            self._cond.notify_all()
            return True

    def stop(self, stop: control_pb2.Stop) -> None:
        """The job is over for this site: the trainer gets ``stop`` once its queue is empty."""
        with self._cond:
            if self._stop is None:
                self._stop = stop
            self._version += 1
            self._cond.notify_all()

    @property
    def stopped(self) -> control_pb2.Stop | None:
        with self._cond:
            return self._stop

    def take(self, timeout: float) -> control_pb2.Task | control_pb2.Stop | None:
        """The next task (or Stop once no task is left); None if nothing came within ``timeout``."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                if self._queue:
                    return self._queue.popleft()
                if self._stop is not None:
                    return self._stop
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def resume_task_id(self) -> str:
        """The task this site is working on (sent to the server on reconnect), or ""."""
        with self._cond:
            cur = self._results.get(self._current)
            if cur is not None and cur.finished:
                return ""
            return self._current

    # results
    def announce(self, ann: control_pb2.ResultAnnouncement) -> None:
        """Start tracking a result the trainer submitted (its tensors stay in the trainer)."""
        sizes = {r.ref_id: int(r.nbytes) for r in ann.refs}
        res = _Result(
            task_id=ann.task_id,
            bytes_total=sum(sizes.values()),
            ends={},
            sizes=sizes,
            transactions={r.transaction_id for r in ann.refs},
            announcement=ann,
        )
        with self._cond:
            # A sidecar restarted mid-task gets the task re-sent by the server while its trainer,
            # which took it from the previous sidecar, finishes it: never hand it out a second time.
            self._seen.add(ann.task_id)
            if any(t.task_id == ann.task_id for t in self._queue):
                self._queue = deque(t for t in self._queue if t.task_id != ann.task_id)
            self._results[ann.task_id] = res
            for tx in res.transactions:
                self._by_transaction[tx] = ann.task_id
            self._version += 1
            self._cond.notify_all()

    def relayed(self, ref: tensor_pb2.TensorRef, end: int) -> None:
        """Bytes of ``ref`` up to ``end`` went up a Push stream."""
        with self._cond:
            task_id = self._by_transaction.get(ref.transaction_id)
            res = self._results.get(task_id) if task_id is not None else None
            if res is None or res.finished:
                return
            if end > res.ends.get(ref.ref_id, 0):
                res.ends[ref.ref_id] = end
                self._version += 1
                self._cond.notify_all()

    def received(self, task_id: str, *, ok: bool, reason: str, message: str) -> set[str] | None:
        """The server is done with a result; returns its transaction ids (None if unknown or already done)."""
        with self._cond:
            res = self._results.get(task_id)
            if res is None or res.finished:
                return None
            res.finished, res.ok, res.reason, res.message = True, ok, reason, message
            for tx in res.transactions:
                self._by_transaction.pop(tx, None)
            self._version += 1
            self._cond.notify_all()
            return set(res.transactions)

    def pending_announcements(self) -> list[control_pb2.ResultAnnouncement]:
        """Results the server has not confirmed yet (re-announced after a reconnect)."""
        with self._cond:
            return [r.announcement for r in self._results.values() if not r.finished]

    def downloads_outstanding(self) -> list[str]:
        """Task ids of results with tensors that the server has not received yet."""
        with self._cond:
            return [t for t, r in self._results.items() if not r.finished and r.bytes_total > 0]

    def known(self, task_id: str) -> bool:
        with self._cond:
            return task_id in self._results

    def progress(
        self, task_id: str, *, after_version: int, timeout: float, finished_only: bool = False
    ) -> Progress | None:
        """Progress of ``task_id`` once it changed past ``after_version`` (or after ``timeout``).

        ``finished_only``: wake early only when the result is finished, not on every change.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                res = self._results.get(task_id)
                if res is None:
                    return None
                if res.finished or (self._version > after_version and not finished_only):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return Progress(
                task_id=task_id,
                bytes_done=res.bytes_done,
                bytes_total=res.bytes_total,
                finished=res.finished,
                ok=res.ok,
                reason=res.reason,
                message=res.message,
                version=self._version,
            )

    def forget(self, task_id: str) -> None:
        """Drop a finished result once its watcher saw the end."""
        with self._cond:
            res = self._results.get(task_id)
            if res is not None and res.finished:
                del self._results[task_id]


# --- the trainer ----------------------------------------------------------------

NEVER_ATTACHED = (
    "the trainer never attached to its sidecar: it exited or crashed before calling fk.init(), or never started; "
    "fix: check the trainer container's logs (and that the script calls fk.init())"
)


@dataclass(frozen=True)
class TrainerSnapshot:
    phase: int
    kind: int = control_pb2.FAILURE_KIND_UNSPECIFIED
    message: str = ""
    exit_code: int = 0

    def to_proto(self) -> control_pb2.TrainerState:
        return control_pb2.TrainerState(
            phase=self.phase,  # type: ignore[arg-type]
            kind=self.kind,  # type: ignore[arg-type]
            message=self.message,
            exit_code=self.exit_code,
        )

    @property
    def final(self) -> bool:
        return self.phase in _FINAL_PHASES


@dataclass
class TrainerTracker:
    """The trainer's lifecycle as the sidecar sees it.

    Every method returns the new snapshot when the state changed (the caller
    forwards it upstream at once) or None when nothing changed. Sessions are
    numbered so that a late "connection gone" of an old trainer connection
    cannot overwrite the state of a newer one (LESSONS.md 13).
    """

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _state: TrainerSnapshot = field(default_factory=lambda: TrainerSnapshot(control_pb2.TRAINER_PHASE_STARTING))
    _session: int = 0
    _changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    @property
    def state(self) -> TrainerSnapshot:
        with self._lock:
            return self._state

    def _set(self, new: TrainerSnapshot) -> TrainerSnapshot | None:
        if new == self._state:
            return None
        self._state = new
        self._changed.notify_all()
        return new

    def attached(self) -> tuple[int, TrainerSnapshot | None]:
        """A trainer opened its session; returns the session number and the state change."""
        with self._lock:
            self._session += 1
            return self._session, self._set(TrainerSnapshot(control_pb2.TRAINER_PHASE_RUNNING))

    def reported(self, state: control_pb2.TrainerState) -> TrainerSnapshot | None:
        """The trainer said how it ends (finished, or failed with a kind)."""
        snap = TrainerSnapshot(state.phase, state.kind, state.message, state.exit_code)
        with self._lock:
            return self._set(snap)

    def gone(
        self, session: int, *, downloads_outstanding: bool, job_stopped: bool = False, server_connected: bool = True
    ) -> TrainerSnapshot | None:
        """The trainer's session dropped (its process ended or lost the link).

        ``job_stopped``: the server already sent the job's Stop; ``server_connected``: the sidecar's
        control stream is up. They decide what an undownloaded result means: only while the job
        runs and the server is there was the server still downloading it.
        """
        with self._lock:
            if session != self._session:
                return None
            cur = self._state
            if downloads_outstanding and job_stopped and not cur.final:
                # The job is over (the server exited or is about to): nobody waits for that result any more,
                # and the trainer was most likely stopped from outside (fedkube run, the kubelet).
                return self._set(
                    TrainerSnapshot(
                        control_pb2.TRAINER_PHASE_EXITED,
                        message="the trainer process ended after the server had stopped the job; its last result "
                        "was never downloaded, and the job no longer needed it",
                    )
                )
            if downloads_outstanding and cur.kind != control_pb2.FAILURE_KIND_EXCEPTION and not job_stopped:
                return self._set(
                    TrainerSnapshot(
                        control_pb2.TRAINER_PHASE_FAILED,
                        control_pb2.FAILURE_KIND_EXITED_BEFORE_DOWNLOAD,
                        "the trainer exited while the server was still downloading its result; "
                        "fix: keep the script running until send() returns (it blocks until the server has the bytes)"
                        if server_connected
                        else "the trainer exited before the server downloaded its result, while the sidecar was not "
                        "connected to the server (it exited, or is unreachable); if the server comes back it will not "
                        "get that result",
                    )
                )
            if cur.final:
                return None
            return self._set(
                TrainerSnapshot(
                    control_pb2.TRAINER_PHASE_EXITED,
                    message="the trainer process ended without reporting finished or failed",
                )
            )

    def never_attached(self) -> TrainerSnapshot | None:
        """The sidecar stops and no trainer ever opened a session with it: the trainer is gone for good.

        Without this report the server would learn it only from the heartbeat
        timeout, under a vaguer reason. None when a trainer attached at some point.
        """
        with self._lock:
            if self._session or self._state.phase != control_pb2.TRAINER_PHASE_STARTING:
                return None
            return self._set(
                TrainerSnapshot(
                    control_pb2.TRAINER_PHASE_EXITED,
                    message=NEVER_ATTACHED,
                )
            )

    def wait_final(self, timeout: float) -> TrainerSnapshot | None:
        """Block until the trainer's state is final; None on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._state.final:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._state
