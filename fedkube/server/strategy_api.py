"""The interfaces of aggregation: what a strategy and one round's aggregator promise the server.

``fedkube.server.strategies`` implements them (FedAvg and the server optimizers), ``robust`` and ``scaffold`` too;
the round's downloads (``downloads``, ``live_round``) and the checkpoint code depend only on these, not on any
strategy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedkube.server.aggregate import DiscardOutcome, Intake
from fedkube.server.influence import Bounded
from fedkube.server.model import Model

JSONValue = Any


@dataclass
class StrategyState:
    """What a strategy must carry across rounds and restarts (saved in checkpoints)."""

    name: str
    meta: dict[str, JSONValue] = field(default_factory=dict)
    """JSON-serializable scalars (hyper-parameters, step count)."""
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    """Named arrays (e.g. FedAdam's ``m/<tensor>`` and ``v/<tensor>``)."""


@runtime_checkable
class RoundAggregator(Protocol):
    """One round's streaming aggregation."""

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        """Add one downloaded tensor; False when the client was already discarded (stale)."""
        ...

    def commit(self, client: str) -> None:
        """The client's whole result was added and verified."""
        ...

    def discard(self, client: str, *, rebuild: bool = True) -> DiscardOutcome:
        """The client's download failed or it was excluded; see ``WeightedMean.discard``."""
        ...

    def refold(self, client: str, name: str, array: np.ndarray, *, abort: threading.Event | None = None) -> bool:
        """Fold a tensor again that a discard emptied (``DiscardOutcome.rebuild``); see ``WeightedMean.refold``."""
        ...

    def owed(self) -> dict[str, tuple[str, ...]]:
        """Tensor -> clients whose emptied contribution is not refolded yet."""
        ...

    def reopen(self, client: str, new_key: str | None = None) -> tuple[str, ...]:
        """A discarded client delivers again (as ``new_key``); returns the tensors earlier attempts gave."""
        ...

    def finish(self) -> Model:
        """The new global model, in the global model's dtypes and order."""
        ...


@runtime_checkable
class StreamingAggregator(RoundAggregator, Protocol):
    """A RoundAggregator that folds each tensor as it arrives and can receive it in place.

    The optional capability the server's downloads look for (``isinstance``):
    such an aggregator copies a tensor into its accumulator before ``add``
    returns, so a download may reuse one receive buffer for every tensor, and
    :meth:`intake` may offer the accumulator itself as the receive target.
    A staged aggregator keeps the arrays it is given and must not offer it.
    """

    def intake(
        self, client: str, name: str, dtype: str, shape: tuple[int, ...], weight: float, *,
        abort: threading.Event | None = None,
    ) -> Intake:  # fmt: skip
        """Prepare to receive one tensor (see ``WeightedMean.intake``); always ``close()`` what it returns."""
        ...


@runtime_checkable
class BoundsInfluence(Protocol):
    """A RoundAggregator that bounds each result's influence (``fedkube.server.influence``).

    The round calls ``bound`` once per result, after its last tensor was
    added and before ``commit``; the tensors in ``Bounded.rebuild`` must then
    be pulled again and handed to ``refold``, as after a ``discard``.
    """

    def bound(self, client: str) -> Bounded: ...


@runtime_checkable
class Strategy(Protocol):
    """A federated optimization strategy."""

    name: str

    def begin_round(self, global_model: Mapping[str, np.ndarray]) -> RoundAggregator:
        """Start aggregating results computed from ``global_model``."""
        ...

    def state(self) -> StrategyState:
        """Everything needed to resume after a restart."""
        ...

    def load_state(self, state: StrategyState) -> None:
        """Restore what ``state()`` returned; raises ConfigError when it belongs to another strategy."""
        ...
