"""A server that resumes after the last round's checkpoint finishes the job as an uninterrupted one would.

A server can die after the checkpoint of round ``spec.rounds`` was written
and before the job ended: during the final evaluation (a round's checkpoint
is submitted before its evaluation runs), before the final model reached
``spec.output`` (``fedkube.server.output`` writes it after the checkpoint),
or before its termination summary reached the operator. The restarted server
finds a checkpoint with nothing left to train. Reporting "nothing ran" there
would end the job without its final evaluation and, when the output write
was lost, without a delivered model. Instead the server runs no round again
(the checkpoint's model is the final model, bit for bit) and does what the
job still owes, from the checkpoint:

* the final model is delivered again when the job has an output
  (:class:`DeliversModel`): the checkpoint's model and metrics give the very
  bytes an uninterrupted server writes, and the summary names its sha256;
* the final evaluation runs when ``spec.evaluation`` is due after the last
  round and the checkpoint's curve lacks it (``evaluation.owed_on_resume``),
  once the evaluating sites reconnected (up to ``registrationSeconds``; a site
  that does not come back is left out, and an evaluation never fails the job);
* the status and metrics show the job's real progress: every round completed,
  the last round's metrics and central DP's spent epsilon from the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from fedkube.metrics.server import ServerMetrics
from fedkube.server.config import JobSettings
from fedkube.server.dp import report_privacy
from fedkube.server.evaluation import owed_on_resume
from fedkube.server.jobs import CHECKPOINT_FAILED, CheckpointStore, JobFailed
from fedkube.server.output import OutputError
from fedkube.server.progress import JobProgress
from fedkube.server.registry import ClientState
from fedkube.server.side_rounds import RoundHost
from fedkube.status import Phase

log = logging.getLogger(__name__)


@runtime_checkable
class DeliversModel(Protocol):
    """A checkpoint store that also delivers the trained model (``fedkube.server.output.ModelOutput``)."""

    def deliver(self, round_: int, model: Mapping[str, np.ndarray], metrics: Mapping[str, float]) -> None: ...


def finish_resumed(
    settings: JobSettings, store: CheckpointStore | None, model: dict[str, np.ndarray], progress: JobProgress,
    strategy: object, telemetry: ServerMetrics, host: RoundHost,
    evaluate: Callable[[int, dict[str, np.ndarray]], None],
) -> None:  # fmt: skip
    """End a job resumed from the checkpoint of its last round: deliver the model, run the owed final evaluation.

    ``evaluate(round, model)`` is the workflow's evaluation (it adds the point to the curve).
    Raises JobFailed (CheckpointFailed) when the final model cannot be written to the output.
    """
    s = settings
    log.info("job %s: resumed after the checkpoint of round %s, the last one: no round runs again; finishing the "
             "job from that checkpoint", s.job, s.rounds)  # fmt: skip
    telemetry.resumed_after_last_round(s.rounds)
    progress.privacy_epsilon = report_privacy(strategy, telemetry)
    if isinstance(store, DeliversModel):
        try:
            store.deliver(s.rounds, model, progress.metrics)
        except OutputError as exc:
            raise JobFailed(CHECKPOINT_FAILED, f"all {s.rounds} round(s) were completed, but {exc}") from exc
    if owed_on_resume(s.evaluation, progress.evaluation, s.rounds, s.rounds):
        progress.phase = Phase.RUNNING
        await_evaluators(s, host)
        evaluate(s.rounds, model)


def await_evaluators(settings: JobSettings, host: RoundHost) -> None:
    """Wait (up to registrationSeconds) until every site that may evaluate has reconnected to this server."""
    evaluation = settings.evaluation
    chosen = set(evaluation.sites) if evaluation is not None and evaluation.sites else set(settings.clients)
    deadline = host.clock() + settings.registration_timeout_s
    while host.clock() < deadline and any(
        r.state is ClientState.PENDING and r.name in chosen for r in host.registry.records()
    ):
        host.pump(deadline)
