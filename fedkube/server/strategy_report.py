"""What a strategy tells the trainers (task settings) and, after a round, the status and the metrics.

Each strategy capability is a small optional interface (``isinstance`` on a
``runtime_checkable`` Protocol): central DP's spent epsilon
(``fedkube.server.dp``), Krum's selection (``fedkube.server.robust``) and FedProx's mu.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedkube.metrics.server import ServerMetrics
from fedkube.protocol import ResultTimeouts
from fedkube.server.dp import report_privacy
from fedkube.server.live_round import TrainRound
from fedkube.server.progress import JobProgress

log = logging.getLogger(__name__)


@runtime_checkable
class SelectsResults(Protocol):
    """A strategy that averages only some of the round's results (Krum / multi-Krum)."""

    def selected(self) -> tuple[str, ...]:
        """The keys of the results the last finished round used."""
        ...


@runtime_checkable
class ConfiguresTasks(Protocol):
    """A strategy that tells each trainer something in its task (``Task.config``), e.g. FedProx's mu."""

    task_settings: dict[str, str]


@runtime_checkable
class SendsTensors(Protocol):
    """A strategy whose train tasks carry tensors besides the model (SCAFFOLD's server control variate c).

    The round publishes them with the model and checks each result against both (``check_result``), so a
    result must return one tensor per published tensor; ``check_resume`` refuses a checkpoint whose state does
    not fit its model, before any round.
    """

    def task_tensors(self, model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def check_resume(self, model: Mapping[str, np.ndarray]) -> None: ...


def published(strategy: object, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a train round publishes: the model, plus the strategy's task tensors (``SendsTensors``)."""
    return {**model, **strategy.task_tensors(model)} if isinstance(strategy, SendsTensors) else model


def check_resume(strategy: object, model: dict[str, np.ndarray]) -> None:
    """Refuse (ConfigError) a resumed strategy state that does not fit the checkpoint's model."""
    if isinstance(strategy, SendsTensors):
        strategy.check_resume(model)


def task_config(strategy: object) -> dict[str, str]:
    """The ``Task.config`` entries ``strategy`` adds to every task (empty for most)."""
    return dict(strategy.task_settings) if isinstance(strategy, ConfiguresTasks) else {}


@dataclass(frozen=True)
class StrategyReport:
    privacy_epsilon: float | None = None
    """Central DP's spent budget; None without privacy."""
    selected: tuple[str, ...] = ()
    """Sites whose results a selecting strategy used (empty: every accepted result counted)."""


def report_strategy(strategy: object, telemetry: ServerMetrics, keys: Mapping[str, str]) -> StrategyReport:
    """After a round's finish: set the strategy's metrics and return what the status shows.

    ``keys`` maps each site to its result's aggregator key (a site that delivered twice has a new key).
    """
    selected: tuple[str, ...] = ()
    if isinstance(strategy, SelectsResults):
        sites = {key: site for site, key in keys.items()}
        selected = tuple(sorted(sites.get(key, key) for key in strategy.selected()))
        for site in selected:
            telemetry.result_selected(site)
    return StrategyReport(report_privacy(strategy, telemetry), selected)


def after_round(strategy: object, telemetry: ServerMetrics, rnd: TrainRound, progress: JobProgress) -> None:
    """A round's aggregate is done: what each site's result counted, and the strategy's report, into the status."""
    progress.influence.update(rnd.influence)
    progress.privacy_epsilon = report_strategy(strategy, telemetry, rnd.keys).privacy_epsilon


@dataclass(frozen=True)
class TaskSettings:
    """Every task's config: the result timeouts plus what the strategy tells the trainers (outbox.TaskSettings)."""

    timeouts: ResultTimeouts
    strategy: Mapping[str, str]

    def to_config(self) -> dict[str, str]:
        return {**self.strategy, **self.timeouts.to_config()}


def task_settings(timeouts: ResultTimeouts, strategy: object) -> TaskSettings:
    """The task settings of a job run by ``strategy``."""
    return TaskSettings(timeouts, task_config(strategy))
