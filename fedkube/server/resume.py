"""Where a job starts: after its last checkpoint, or at round 1 with the initial model (or none: firstClient)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from fedkube.errors import ConfigError
from fedkube.server import strategy_report
from fedkube.server.checkpoint import check_resume_rounds
from fedkube.server.config import JobSettings
from fedkube.server.jobs import CheckpointStore
from fedkube.server.progress import JobProgress
from fedkube.server.strategies import check_initial_model
from fedkube.server.strategy_api import Strategy

log = logging.getLogger(__name__)


def starting_point(
    s: JobSettings, checkpoints: CheckpointStore | None, strategy: Strategy, progress: JobProgress,
    initial_model: Callable[[], dict[str, np.ndarray]] | None,
) -> tuple[int, dict[str, np.ndarray] | None]:  # fmt: skip
    """The first round to run and its model (None: the first client's); a resume restores the strategy's state,
    the progress, the last round's metrics and the evaluation curve, and refuses a checkpoint that does not fit
    the job (ConfigError)."""
    if checkpoints is not None:
        loaded = checkpoints.load()
        if loaded is not None:
            done, model, state = loaded.round, loaded.model, loaded.state
            progress.evaluation.extend(loaded.evaluation)
            progress.metrics = dict(loaded.metrics)
            check_resume_rounds(s.job, done, s.rounds)
            check_initial_model(model)
            if state is not None:
                strategy.load_state(state)
                strategy_report.check_resume(strategy, model)
            progress.completed = progress.round = done
            log.info("job %s: resuming after the checkpoint of round %s", s.job, done)
            return done + 1, model
    if s.model_source == "file":
        if initial_model is None:
            raise ConfigError("spec.model.source is 'file' but spec.model.path is empty")
        model = initial_model()
        check_initial_model(model)
        return 1, model
    return 1, None
