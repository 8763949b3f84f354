"""Checkpoints of completed rounds, written in the background while the next round runs.

:class:`CheckpointWriter` runs one write at a time on its own thread.
:class:`Checkpointing` is the workflow's collaborator around it: it hands a
round's model to the writer, knows which round is safely on disk, turns a
failed write into a status message through the ``on_status`` callback, and
bounds the job's final wait for the write in flight. It never reads or sets
the workflow's state.

Two contracts with the round loop are explicit methods instead of identity
checks on the model:

* :meth:`Checkpointing.published` — round N publishes the model that the
  checkpoint of round N-1 is writing, so the checksums the transfer layer
  computes for it are the checkpoint's (no second hash pass);
* :meth:`Checkpointing.before_strategy_update` — a write that holds strategy
  state arrays must end before ``finish()`` updates them in place.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedkube.errors import FedkubeError
from fedkube.server.jobs import CHECKPOINT_FAILED, CHECKPOINT_WAIT_S, CheckpointStore, Outcome
from fedkube.server.strategy_api import StrategyState
from fedkube.status import EvaluationPoint
from fedkube.transfer.refs import TensorRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointResult:
    """How one background checkpoint write ended; ``error`` is "" when it was written."""

    round: int
    seconds: float
    error: str = ""


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, so the next round need not wait.

    What it is handed must not change while it writes. The global model does
    not: every round aggregates into accumulators nothing else refers to and
    only reads the global model it started from (``strategies.FedAvg``/``FedAdam``,
    ``aggregate.WeightedMean``; a superseded model's arrays are recycled as
    accumulators only once their reference count shows no other holder, such
    as this writer's thread, ``fedkube.server.pool``), and the transfer service
    only reads the arrays it publishes, so the model is written without a copy. Strategy
    state tensors may be updated in place by the next round's ``finish()``
    (FedAdam's m and v are), so the workflow waits for a write that holds
    any before calling it (:meth:`holds_strategy_tensors`) instead of copying
    them: a copy would cost 2xS more for as long as the write runs, and the
    wait costs nothing unless the write outlasts a whole round's transfers.

    Results are kept until :meth:`take_results`; ``on_settled`` is called
    (on the writer's thread) after each write so the owner can take them.
    """

    def __init__(
        self,
        store: CheckpointStore,
        job: str,
        *,
        on_settled: Callable[[], None] = lambda: None,
        timing: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self._store = store
        self._job = job
        self._on_settled = on_settled
        self._timing = timing
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._holds_state = False
        self._results: list[CheckpointResult] = []

    def submit(
        self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None, evaluation: Sequence[EvaluationPoint] = (),
    ) -> float:
        """Start writing the checkpoint of ``round_``; returns the seconds spent waiting for the previous write.

        ``checksums`` (model tensor name -> checksum of that array) may be filled in while the write runs.
        """
        t0 = time.perf_counter()
        self.wait(None)  # one write at a time: also keeps the checkpoints in round order
        waited = time.perf_counter() - t0
        self._holds_state = bool(state.tensors)
        self._thread = threading.Thread(
            target=self._write, args=(round_, model, state, dict(metrics), checksums, tuple(evaluation)),
            name=f"fedkube-checkpoint-r{round_}",
            daemon=True,  # a hung disk must not keep a stopped server alive; the write is atomic either way
        )  # fmt: skip
        self._thread.start()
        return waited

    def busy(self) -> bool:
        """A write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def holds_strategy_tensors(self) -> bool:
        """The write in flight includes strategy state arrays, which the next ``finish()`` may update in place."""
        return self.busy() and self._holds_state

    def wait(self, timeout: float | None) -> bool:
        """Wait for the write in flight (``None``: without bound); True when none is left."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        return True

    def take_results(self) -> list[CheckpointResult]:
        """The writes that ended since the last call, oldest first."""
        with self._lock:
            results, self._results = self._results, []
        return results

    def _write(self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: dict[str, float],
               checksums: Mapping[str, str] | None, evaluation: tuple[EvaluationPoint, ...]) -> None:  # fmt: skip
        t0 = time.perf_counter()
        error = ""
        try:
            with self._timing():
                self._store.save(round_, model, state, metrics, checksums, evaluation)
        except Exception as exc:  # reported to the workflow (status, outcome), never swallowed
            error = str(exc) if isinstance(exc, FedkubeError) else f"{type(exc).__name__}: {exc}"
            log.error("job %s round %s: writing the checkpoint failed: %s", self._job, round_, error)
        seconds = time.perf_counter() - t0
        if not error:
            log.info("job %s round %s: checkpoint written (%.2f s, in the background)", self._job, round_, seconds)
        with self._lock:
            self._results.append(CheckpointResult(round_, seconds, error))
        self._on_settled()


# (message, cleared): a write failed and ``message`` says so, or a later write succeeded and the
# earlier failure ``cleared`` no longer holds ("" when there was none). Called on the workflow thread.
StatusFn = Callable[[str, str], None]


class Checkpointing:
    """The workflow's checkpoint collaborator: submits, settles and awaits background writes."""

    def __init__(
        self,
        store: CheckpointStore,
        job: str,
        *,
        on_settled: Callable[[], None],
        on_status: StatusFn,
        timing: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        wait_s: float = CHECKPOINT_WAIT_S,
    ) -> None:
        self._job = job
        self._writer = CheckpointWriter(store, job, on_settled=on_settled, timing=timing)
        self._on_status = on_status
        self.wait_s = wait_s
        self.written_round = 0
        self._error = ""
        # round -> checksums of its model by tensor name, filled when round + 1 publishes that model.
        self._checksums: tuple[int, dict[str, str]] | None = None

    def submit(self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState,
               metrics: Mapping[str, float], evaluation: Sequence[EvaluationPoint] = ()) -> None:  # fmt: skip
        """Write round ``round_``'s checkpoint in the background (waits for the write before it first).

        ``evaluation`` is the evaluation curve so far, kept in the checkpoint for a resumed job's status.

        Call :meth:`settle` afterwards: the wait may have ended writes.
        """
        checksums: dict[str, str] = {}
        self._checksums = (round_, checksums)
        waited = self._writer.submit(round_, model, state, metrics, checksums, evaluation)
        if waited > 0.05:
            log.info("job %s round %s: waited %.2f s for the previous checkpoint write", self._job, round_, waited)

    def published(self, round_: int, refs: Iterable[TensorRef]) -> None:
        """Round ``round_`` published the model the last round's checkpoint holds: its checksums serve the write.

        The next round publishes these arrays and hashes them anyway; the write
        reads the checksums only after writing the tensors, so it need not hash
        them again.
        """
        if self._checksums is not None and self._checksums[0] == round_ - 1:
            self._checksums[1].update({r.name: r.checksum for r in refs})

    def before_strategy_update(self, round_: int) -> None:
        """Wait for a write holding strategy arrays that ``finish()`` updates in place (FedAdam's m, v).

        Call :meth:`settle` afterwards: the wait may have ended writes.
        """
        if not self._writer.holds_strategy_tensors():
            return
        t_wait = time.perf_counter()
        self._writer.wait(None)
        log.info("job %s round %s: waited %.2f s for the previous checkpoint before updating the strategy state",
                 self._job, round_, time.perf_counter() - t_wait)

    def settle(self) -> bool:
        """Take the writer's finished writes (workflow thread); True when any ended."""
        results = self._writer.take_results()
        for r in results:
            if r.error:
                self._error = f"the checkpoint of round {r.round} was not written: {r.error}"
                self._on_status(self._error, "")
            else:
                self.written_round = max(self.written_round, r.round)
                if self._error:
                    self._on_status("", self._error)  # a later round's checkpoint is in place; resuming works again
                self._error = ""
        return bool(results)

    def finish(self, outcome: Outcome, rounds_completed: int) -> Outcome:
        """The job's end waits (bounded) for the write in flight; a lost last checkpoint fails the job."""
        writer = self._writer
        if writer.busy():
            log.info("job %s: waiting up to %g s for the checkpoint being written", self._job, self.wait_s)
        problem = ""
        if not writer.wait(self.wait_s):
            problem = (f"the checkpoint of round {rounds_completed} was still being written after "
                       f"{self.wait_s:g} s; a restart resumes from round {self.written_round}")
            log.error("job %s: %s", self._job, problem)
        self.settle()
        if not problem and self._error and self.written_round < rounds_completed:
            problem = self._error
        if not problem:
            return outcome
        if outcome.success:
            return Outcome(False, CHECKPOINT_FAILED, f"{outcome.message}, but {problem}", outcome.rounds_completed)
        return Outcome(False, outcome.reason, f"{outcome.message}; also, {problem}", outcome.rounds_completed)
