"""Types the server's job modules share: how a job ends, why it fails, the checkpoint store.

Kept apart from the workflow so that its collaborators (``outbox``,
``downloads``, ``checkpointing``, ``live_round``) can name them without
importing the workflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedkube.errors import FedkubeError
from fedkube.status import EvaluationPoint

if TYPE_CHECKING:  # only annotations: strategies (fedkube.server.dp) imports JobFailed from here
    from fedkube.server.strategy_api import StrategyState

# Job-level reasons beyond fedkube.status.Reason (which names client failures).
TERMINATED = "Terminated"
NO_INITIAL_MODEL = "NoInitialModel"
CHECKPOINT_FAILED = "CheckpointFailed"
REBUILD_FAILED = "RebuildFailed"  # an excluded result's folded tensors could not be rebuilt from the others

CHECKPOINT_WAIT_S = 300.0
"""How long the job's end waits for the checkpoint still being written (a 4 GiB model takes ~12 s here)."""


@dataclass(frozen=True)
class Resumed:
    """What a job's newest usable checkpoint gives a restarted server."""

    round: int
    model: dict[str, np.ndarray]
    state: StrategyState | None
    evaluation: tuple[EvaluationPoint, ...] = ()
    """The evaluation curve the checkpoint kept (``status.evaluation`` goes on from it)."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """The checkpoint's round's aggregated metrics (the status shows them until the next round's)."""


class CheckpointStore(Protocol):
    """Where completed rounds are kept (fedkube.server.checkpoint behind an adapter in app.py)."""

    def load(self) -> Resumed | None: ...
    def save(
        self,
        round_: int,
        model: Mapping[str, np.ndarray],
        state: StrategyState,
        metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None,
        evaluation: Sequence[EvaluationPoint] = (),
    ) -> None: ...  # checksums: fedkube.server.checkpoint.save's, read after the tensors are written


@dataclass(frozen=True)
class Outcome:
    """How the job ended."""

    success: bool
    reason: str
    message: str
    rounds_completed: int


class JobFailed(FedkubeError):
    """The job cannot go on; ``reason`` is a machine-readable name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
