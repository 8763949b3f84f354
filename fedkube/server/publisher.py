"""Publishing the global model to a round's clients, and metering what they fetched.

One transaction per round serves every participant (serialize once, serve
many); a client that fetched the model and then lost it (its sidecar
restarted) gets the same arrays again in a transaction of its own, the views
costing no copy. The download service reports each finished receiver on its
executor; :class:`ModelPublisher` turns that into the "to_clients" transfer
metric without involving the workflow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from fedkube.metrics.server import ServerMetrics
from fedkube.transfer.service import (
    RECEIVER_FINISHED,
    TRANSACTION_RELEASED,
    DownloadService,
    Transaction,
    TransferEvent,
)


class ModelPublisher:
    """Publishes global models through the download service and releases them when their round ends."""

    def __init__(self, service: DownloadService, telemetry: ServerMetrics, *, clock: Callable[[], float]) -> None:
        self._service = service
        self._telemetry = telemetry
        self._clock = clock
        self._lock = threading.Lock()
        # Global-model transactions -> (published at, bytes), read on the service's executor.
        self._published: dict[str, tuple[float, int]] = {}
        service.add_listener(self._on_transfer_event)

    def publish(self, model: Mapping[str, np.ndarray], receivers: Sequence[str], ttl_s: float,
                transaction_id: str) -> Transaction:  # fmt: skip
        """Offer ``model`` to ``receivers`` for ``ttl_s`` seconds under ``transaction_id``."""
        txn = self._service.publish(model, receivers=list(receivers), ttl_s=ttl_s, transaction_id=transaction_id)
        with self._lock:
            self._published[txn.id] = (self._clock(), txn.nbytes)
        return txn

    def refetch_needed(self, txn: Transaction, site: str) -> bool:
        """``site`` fetched ``txn`` already (or it is gone): a task sent again must bring a new transaction."""
        return txn.released or site in txn.done_receivers

    def release(self, transactions: Iterable[Transaction | None]) -> None:
        """End the transactions still open (a round's end: LESSONS.md 14)."""
        for txn in transactions:
            if txn is not None and not txn.released:
                self._service.release(txn.id)

    def _on_transfer_event(self, event: TransferEvent) -> None:
        """A receiver finished fetching the global model (runs on the download service's executor)."""
        if event.kind == RECEIVER_FINISHED and event.ok:
            with self._lock:
                published = self._published.get(event.transaction_id)
            if published is not None:
                start, nbytes = published
                self._telemetry.transferred("to_clients", nbytes, max(0.0, self._clock() - start))
        elif event.kind == TRANSACTION_RELEASED:
            with self._lock:
                self._published.pop(event.transaction_id, None)
