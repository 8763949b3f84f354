"""Fetching the global model of a task into the arrays ``receive()`` hands the script.

The model comes through the sidecar's bulk relay when the sidecar names one in
``HelloResponse.bulk_address`` (frames land straight in the arrays handed to
the user), else through its gRPC ``Download`` relay. If the bulk path fails
(say the server's bulk port is unreachable) this logs it once and fetches over
gRPC from then on.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import grpc
import numpy as np

from fedkube.trainer_sdk._link import Ids
from fedkube.trainer_sdk._task import Task
from fedkube.trainer_sdk.model import ReceiveTarget, overlapping, receive_target
from fedkube.transfer.bulk import BulkChunkSource
from fedkube.transfer.errors import (
    ChecksumMismatchError,
    InvalidRefError,
    RefNotFoundError,
    StreamBrokenError,
    TransactionExpiredError,
    TransferAbortedError,
    TransferError,
    TransferStalledError,
)
from fedkube.transfer.fetch import Fetcher, FetchSettings, GrpcChunkSource
from fedkube.transfer.parallel import run_bounded
from fedkube.transfer.refs import TensorRef, numpy_dtype
from fedkube.transfer.route import choose_route
from fedkube.wire.v1 import trainer_pb2

_SWITCH_LOCK = threading.Lock()

log = logging.getLogger("fedkube.trainer_sdk")

# Bulk fetch failures that falling back to gRPC cannot fix.
_SAME_ON_GRPC = (
    TransferAbortedError, ChecksumMismatchError, InvalidRefError, RefNotFoundError, TransactionExpiredError,
)

# Attempts on the bulk path before the session falls back to gRPC: a relay that cannot reach the
# server answers at once, so a few quick tries tell a dead bulk port from a passing break.
BULK_MAX_ATTEMPTS = 3
# Fetch failures after which a task is dropped (the site sits out the round), not raised to the script.
UNREACHABLE_MODEL = (RefNotFoundError, TransactionExpiredError, StreamBrokenError, TransferStalledError)


class ModelFetch:
    """Fetches a task's tensors over the sidecar's bulk route when it has one, else (and after a failure) gRPC."""

    def __init__(self, channel: grpc.Channel, ids: Ids, settings: FetchSettings, *, handoff_ok: bool) -> None:
        self.ids = ids
        self.settings = settings
        self.handoff_ok = handoff_ok
        self.fetcher = Fetcher(GrpcChunkSource(channel, ids.site, chunk_timeout_s=settings.chunk_timeout_s), settings)
        self.bulk_fetcher: Fetcher | None = None  # set by use_route() when the sidecar has a bulk relay
        self.bulk_via = ""  # the sidecar's handoff or relay that bulk_fetcher fetches through

    def use_route(self, hello: trainer_pb2.HelloResponse) -> None:
        """Fetch the global model through the sidecar's bulk handoff or relay, as ``hello`` names them (or gRPC)."""
        relay_address = choose_route(
            bulk=hello.bulk_address, handoff=hello.bulk_handoff, handoff_ok=self.handoff_ok
        ).address
        self.bulk_via = relay_address
        if not relay_address:
            self.bulk_fetcher = None
            return
        fs = self.settings
        self.bulk_fetcher = Fetcher(
            BulkChunkSource(relay_address, self.ids.site, chunk_timeout_s=fs.chunk_timeout_s),
            replace(fs, max_attempts=min(fs.max_attempts, BULK_MAX_ATTEMPTS)),
        )

    def _targets(self, task: Task, into: Mapping[str, Any] | None) -> dict[str, ReceiveTarget]:
        """The caller's buffers (``receive(into=...)``) that each global tensor can be written into."""
        if not into:
            return {}
        targets: dict[str, ReceiveTarget] = {}
        fresh: list[str] = []
        for ref in task.refs:
            value = into.get(ref.name)
            if value is None:
                fresh.append(f"{ref.name} (not in into)")
                continue
            target, why = receive_target(value, tuple(ref.shape), numpy_dtype(ref.dtype))
            if target is None:
                fresh.append(f"{ref.name} ({why})")
            else:
                targets[ref.name] = target
        for name in overlapping(targets):
            del targets[name]
            fresh.append(f"{name} (its memory overlaps another tensor's in into)")
        if fresh:
            shown = "; ".join(fresh[:5]) + (f"; and {len(fresh) - 5} more" if len(fresh) > 5 else "")
            log.info("job %s site %s round %d: %d of %d tensors arrive in fresh arrays instead of into: %s",
                     self.ids.job, self.ids.site, task.round, len(fresh), len(task.refs), shown)
        return targets

    def fetch(self, task: Task, into: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Fetch each global tensor into a buffer that becomes the user's array (no second copy).

        The buffer is the caller's own where ``into`` has a fitting one (no
        allocation, no page faults), else a fresh array.
        """
        targets = self._targets(task, into)
        out: dict[str, Any] = {}
        by_tx: dict[str, list[TensorRef]] = {}
        for ref in task.refs:
            by_tx.setdefault(ref.transaction_id, []).append(ref)
        for tid, refs in by_tx.items():
            try:
                # Several tensors at once: each fetch waits a round trip or two before its first byte, and a
                # remote site's link may be 100 ms long (fedkube.transfer.parallel).
                jobs = [functools.partial(self._fetch_into, task, ref, targets.get(ref.name)) for ref in refs]
                for ref, value in zip(refs, run_bounded(jobs, name=f"fetch-{self.ids.site}"), strict=True):
                    out[ref.name] = value
            except BaseException as exc:
                try:
                    (self.bulk_fetcher or self.fetcher).source.complete(tid, False, str(exc))
                except Exception:
                    log.info("transaction %s: could not report the failed fetch", tid)
                raise
            try:
                self._complete(self.bulk_fetcher or self.fetcher, tid)
            except TransferError as exc:
                # A courtesy to the publisher (which also releases on its TTL): the model is already here.
                log.info("transaction %s: fetched, but could not say so to the source: %s", tid, exc)
        return out

    def _fetch_into(self, task: Task, ref: TensorRef, target: ReceiveTarget | None) -> Any:
        """``ref`` in the caller's target (staged on the host only while it is fetched), else a fresh array."""
        if target is None:
            return self._fetch_one(task, ref, np.empty(ref.shape, dtype=numpy_dtype(ref.dtype)))
        self._fetch_one(task, ref, target.buffer())
        target.done()
        return target.result

    def _fetch_one(self, task: Task, ref: TensorRef, arr: np.ndarray) -> np.ndarray:
        fetcher = self.bulk_fetcher or self.fetcher  # read per tensor: a failed bulk fetch turns the rest to gRPC
        if fetcher is self.fetcher:
            return fetcher.fetch_array(ref, arr)
        try:
            return fetcher.fetch_array(ref, arr)
        except _SAME_ON_GRPC:
            raise  # gRPC would fail the same way (a model that is gone is gone there too)
        except TransferError as exc:
            self._bulk_failed(task, fetcher, exc)
            return self.fetcher.fetch_array(ref, arr)

    def _complete(self, fetcher: Fetcher, tid: str) -> None:
        if fetcher is self.fetcher:
            self.fetcher.source.complete(tid, True)
            return
        try:
            fetcher.source.complete(tid, True)
        except TransferError as exc:
            # The server releases the transaction at its TTL anyway; gRPC can still tell it now.
            log.info("job %s site %s: transaction %s: completion over bulk failed (%s); reporting it over gRPC",
                     self.ids.job, self.ids.site, tid, exc)
            self.fetcher.source.complete(tid, True)

    def _bulk_failed(self, task: Task, failed: Fetcher, exc: TransferError) -> None:
        """The bulk path failed: fetch over gRPC from now on (the transfer is the same, only slower).

        Tensors are fetched several at a time, so the fetches running on the bulk path all fail together: the
        first to get here switches and says so, once."""
        with _SWITCH_LOCK:
            if self.bulk_fetcher is not failed:
                return
            self.bulk_fetcher = None
        log.warning("job %s site %s round %d: fetching the global model over the bulk relay failed (%s); "
                    "fetching over gRPC from now on", self.ids.job, self.ids.site, task.round, exc)
