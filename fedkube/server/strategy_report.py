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

from fedkube.metrics.server import ServerMetrics
from fedkube.server.dp import report_privacy

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


def task_config(strategy: object) -> dict[str, str]:
    """The ``Task.config`` entries ``strategy`` adds to every task (empty for most)."""
    return dict(strategy.task_settings) if isinstance(strategy, ConfiguresTasks) else {}


@dataclass(frozen=True)
class StrategyReport:
    privacy_epsilon: float | None = None
    """Central DP's spent budget; None without privacy."""
    selected: tuple[str, ...] = ()
    """Sites whose results a selecting strategy used (empty: every accepted result counted)."""


def report_strategy(strategy: object, telemetry: ServerMetrics, sites_by_key: Mapping[str, str]) -> StrategyReport:
    """After a round's finish: set the strategy's metrics and return what the status shows.

    ``sites_by_key`` maps each result's aggregator key to its site (a site that delivered twice has a new key).
    """
    selected: tuple[str, ...] = ()
    if isinstance(strategy, SelectsResults):
        selected = tuple(sorted(sites_by_key.get(key, key) for key in strategy.selected()))
        for site in selected:
            telemetry.result_selected(site)
    return StrategyReport(report_privacy(strategy, telemetry), selected)
