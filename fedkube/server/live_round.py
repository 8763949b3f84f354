"""The round in progress: a training round or the init task, behind one small interface.

Client states live in the registry and what to do next is decided by
:mod:`fedkube.server.rounds`; a :class:`LiveRound` holds the transport side of
one round (tasks, the published model, downloads, results) and answers the
questions on which a training round and the init task (``spec.model.source:
firstClient``) differ, so the workflow asks instead of branching on a kind:

* which sink receives the results (:attr:`TrainRound.sink` is the strategy's
  aggregator, :attr:`InitRound.sink` an :class:`InitCollector`);
* whether a client is expected to deliver, and whether the registry must
  claim its result (:meth:`LiveRound.expects_result`, :meth:`LiveRound.claim`);
* what an announced result must satisfy (:meth:`LiveRound.check_result`);
* whether a downloaded result is taken (:meth:`LiveRound.accept`), and where a
  failure is kept (:meth:`LiveRound.keep_failure`: the init task keeps it
  for its own report; a training round leaves it to the registry);
* what a repeated attempt does to the sink (:meth:`LiveRound.continue_attempt`)
  and whether a reconnect re-sends the task (:meth:`LiveRound.resend_on_reconnect`).
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fedkube.errors import FedkubeError
from fedkube.metrics.server import ServerMetrics
from fedkube.protocol import INIT_TASK, TRAIN_TASK
from fedkube.server.control import ResultAnnounced
from fedkube.server.downloads import Download, ResultSink
from fedkube.server.influence import SiteInfluence
from fedkube.server.init_collector import InitCollector
from fedkube.server.jobs import REBUILD_FAILED, JobFailed
from fedkube.server.model import ModelSpec, check_init_result, check_result
from fedkube.server.registry import ClientRecord, ClientState, Registry, SessionLike
from fedkube.server.rounds import RoundState
from fedkube.server.strategy_api import BoundsInfluence, RoundAggregator
from fedkube.spec.model import DEFAULT_MAX_BYTES
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.service import Transaction

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LiveRound(ABC):
    """Transport-side state of the round in progress (client states are in the registry)."""

    kind: ClassVar[str]
    # Results carry metrics only (an evaluation): taken as announced, nothing is downloaded.
    metrics_only: ClassVar[bool] = False
    number: int
    job: str
    tasks: dict[str, str]  # site -> task id
    deadline: float
    transaction: Transaction | None = None
    refs: list[TensorRef] = field(default_factory=list)
    model: dict[str, np.ndarray] | None = None
    republished: list[Transaction] = field(default_factory=list)  # for clients that lost the model
    downloads: dict[str, Download] = field(default_factory=dict)
    superseded: list[Download] = field(default_factory=list)  # aborted for a re-sent task, still ending
    results: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)  # site -> (num_examples, metrics)
    answered: set[str] = field(default_factory=set)
    announced: set[str] = field(default_factory=set)
    attempts: int = 0
    keys: dict[str, str] = field(default_factory=dict)  # site -> sink key of its latest download
    sources: dict[str, Download] = field(default_factory=dict)  # sink key -> its download (refs, site), to pull again
    to_rebuild: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (key, tensors) to pull again
    rebuilds: list[Download] = field(default_factory=list)  # pulling tensors again that a discard emptied
    rebuild_failures: list[str] = field(default_factory=list)
    settle_until: float | None = None  # when the closing round stops waiting for downloads to end
    aggregation_s: float = 0.0
    closed: bool = False

    @property
    @abstractmethod
    def sink(self) -> ResultSink:
        """What receives this round's result tensors."""

    @property
    def tensor_order(self) -> dict[str, int]:
        """Tensor name -> position in the global model (empty when there is none yet)."""
        return {}

    def assign(self, registry: Registry, site: str, task_id: str) -> None:  # noqa: B027 (the init task tracks none)
        """``site`` is (again) given its task."""

    def expects_result(self, rec: ClientRecord) -> bool:
        """Whether a result from this client is considered at all."""
        return True

    def claim(self, registry: Registry, session: SessionLike, task_id: str) -> bool:
        """Take the announced result for download; False: the registry does not expect it."""
        return True

    def check_result(self, site: str, result: ResultAnnounced) -> str:
        """Why the announced result cannot be used, or "" (nothing is downloaded for a bad one)."""
        if result.problem:
            return result.problem
        problem = self._check_content(result)
        if problem:
            return problem
        foreign = [r.ref_id for r in result.refs if r.source != site]
        if foreign:
            return f"refs {foreign} name another source than {site!r}; a client can only offer its own tensors"
        return ""

    @abstractmethod
    def _check_content(self, result: ResultAnnounced) -> str:
        """The variant's own checks of an announced result ("" when it fits)."""

    def discard(self, dl: Download) -> str:
        """Take a client's result out of the round; returns a note on what that took, for its status message.

        The streaming aggregator cannot subtract what it already folded
        (floating point is not reversible), so each tensor of this client that
        was already folded is emptied and rebuilt from its other contributors:
        their tensors are pulled again (:attr:`to_rebuild`, started by the
        result desk) and the round waits for them. Nothing of the discarded
        result stays in the aggregate.
        """
        try:
            outcome = self.sink.discard(dl.key)
        except FedkubeError:
            log.exception("job %s round %s: could not discard the result of %s", self.job, self.number, dl.site)
            return ""
        if not outcome.rebuild:
            return ""
        names, shown, sites = self._queue_rebuild(outcome.rebuild)
        # Short: the status summary shows the first 160 characters of a client's message.
        note = (f"nothing of it kept: {shown} rebuilt from {len(sites)} other client(s) ({', '.join(sites)})"
                if sites else f"nothing of it kept: {shown} emptied (no other client had contributed yet)")
        log.warning("job %s round %s: result of %s excluded; nothing of it stays in the aggregate: the %d tensor(s) "
                    "of it already folded (%s) are emptied and rebuilt from the other clients' results (%s)",
                    self.job, self.number, dl.site, len(names), shown, ", ".join(sites))
        return note

    def _queue_rebuild(self, rebuild: Mapping[str, tuple[str, ...]]) -> tuple[tuple[str, ...], str, list[str]]:
        """Queue the tensors ``rebuild`` names to be pulled again; (their names, a short list of them, the sites)."""
        by_key: dict[str, list[str]] = {}
        for name, keys in rebuild.items():
            for key in keys:
                by_key.setdefault(key, []).append(name)
        self.to_rebuild += [(key, tuple(names)) for key, names in by_key.items()]
        names = tuple(rebuild)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return names, shown, sorted({self.sources[k].site if k in self.sources else k for k in by_key})

    def weight_of(self, site: str, claimed: int) -> int:
        """The weight ``site``'s accepted result counts with (its claim where nothing bounds it)."""
        return claimed

    def settling(self, now: float, bound_s: float) -> bool:
        """Whether the closing round must still wait: for downloads to end (``bound_s``) or tensors to be rebuilt.

        A download still listed belongs to a client that left the round (it
        is aborted here); its discard may empty tensors that must be rebuilt
        before the aggregate is final (:meth:`discard`).
        """
        if self.downloads:
            if self.settle_until is None:
                self.settle_until = now + bound_s
                for dl in self.downloads.values():
                    dl.abort.set()
            return now < self.settle_until or bool(self.rebuilds)
        return bool(self.rebuilds)

    def check_rebuilt(self) -> None:
        """Raise JobFailed(RebuildFailed) when a tensor an exclusion emptied could not be rebuilt exactly.

        The round fails rather than end with a tensor that is not the mean of
        exactly the results delivered; a retry of the round would need every
        client to train again, and a resumed job does just that.
        """
        for key, names in self.to_rebuild:  # emptied by the discard of a download that ended only at the close
            self.rebuild_failures.append(f"tensor(s) {', '.join(names)} of {key} were not pulled again before the "
                                         "round closed")
        self.to_rebuild.clear()
        if self.rebuild_failures:
            raise JobFailed(REBUILD_FAILED, (
                f"round {self.number}: a result excluded from the round had been folded into tensors that could not "
                "be rebuilt exactly from the other clients' results: " + "; ".join(self.rebuild_failures)
                + "; fix: see those clients' logs for why they stopped serving their result, then resume the job"))

    def continue_attempt(self, site: str, key: str) -> None:
        """Make ``key`` the site's new attempt without counting any of its tensors twice."""
        self.keys[site] = key

    @abstractmethod
    def accept(self, registry: Registry, dl: Download) -> bool:
        """A download ended well: whether its result becomes this round's (the sink then has it)."""

    def keep_failure(self, site: str, reason: str, message: str) -> bool:
        """A client of this round failed; True when the round keeps the failure (the registry need not)."""
        return False

    def resend_on_reconnect(self, site: str, resume_task_id: str) -> bool:
        """A client reconnected without losing its task: whether to send the task again now."""
        return False


@dataclass(kw_only=True)
class TrainRound(LiveRound):
    """A training round: results fold into the strategy's aggregator; the registry tracks each client."""

    kind: ClassVar[str] = TRAIN_TASK
    spec: ModelSpec
    aggregator: RoundAggregator
    state: RoundState
    telemetry: ServerMetrics
    clock: Callable[[], float]
    influence: dict[str, SiteInfluence] = field(default_factory=dict)  # site -> how much its result counted

    @property
    def sink(self) -> RoundAggregator:
        return self.aggregator

    @property
    def tensor_order(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.spec.names)}

    def assign(self, registry: Registry, site: str, task_id: str) -> None:
        rec = registry.get(site)
        if not (rec.state is ClientState.TRAINING and rec.task_id == task_id):
            self.state.assign(registry, site, task_id)

    def expects_result(self, rec: ClientRecord) -> bool:
        return rec.state is ClientState.TRAINING

    def claim(self, registry: Registry, session: SessionLike, task_id: str) -> bool:
        return registry.result_announced(session, task_id)

    def _check_content(self, result: ResultAnnounced) -> str:
        if result.num_examples <= 0:
            return f"num_examples is {result.num_examples}; a training result must say how many examples it used"
        return check_result(self.spec, result.refs) or ""

    def continue_attempt(self, site: str, key: str) -> None:
        """A site may deliver again within a round (its sidecar restarted and the task was re-sent).

        Its earlier download may have been cut short with some tensors verified
        and folded in. The earlier attempt is discarded (a no-op when it already
        was) and reopened under the new key, so the aggregator ignores the new
        copies of the tensors it kept.
        """
        prev = self.keys.get(site)
        self.keys[site] = key
        if prev is None:
            return
        try:
            # The same result again: what the earlier attempt verified stays, under the new key.
            self.aggregator.discard(prev, rebuild=False)
            kept = self.aggregator.reopen(prev, key)
        except FedkubeError as exc:  # the earlier attempt was committed: the workflow never pulls it again
            log.info("job %s round %s: %s delivers again after %s: %s", self.job, self.number, site, prev, exc)
            return
        if kept:
            log.info("job %s round %s: %s delivers again; %d tensor(s) of its earlier attempt stay and are not "
                     "added twice", self.job, self.number, site, len(kept))

    def accept(self, registry: Registry, dl: Download) -> bool:
        # Commit only while the registry still expects this very result (it may have been lost meanwhile).
        if not registry.result_done(dl.site, dl.task_id):
            return False
        self._bound(dl)
        self.aggregator.commit(dl.key)
        self.aggregation_s += dl.add_seconds
        self.telemetry.transferred("from_clients", dl.bytes_pulled, max(0.0, self.clock() - dl.started))
        log.info("job %s round %s: result of %s verified and aggregated", self.job, self.number, dl.site)
        return True

    def _bound(self, dl: Download) -> None:
        """Bound the influence of ``dl``'s complete result (fedkube.server.influence); queue what a clip re-pulls."""
        if not isinstance(self.aggregator, BoundsInfluence):
            return
        bounded = self.aggregator.bound(dl.key)
        site = dataclasses.replace(bounded.influence, site=dl.site)
        self.influence[dl.site] = site
        self.telemetry.site_influence(dl.site, claimed=site.claimed, weight=site.weight, norm=site.norm,
                                      capped=site.capped, clipped=site.clipped)
        if site.capped:
            log.warning("job %s round %s: %s claimed num_examples=%g, above spec.strategy.maxExamplesPerSite; its "
                        "result counts with weight %g", self.job, self.number, dl.site, site.claimed, site.weight)
        if site.clipped:
            _, shown, sites = self._queue_rebuild(bounded.rebuild) if bounded.rebuild else ((), "", [])
            log.warning("job %s round %s: the update of %s has L2 norm %.6g, above spec.strategy.clipNorm; it counts "
                        "scaled by %.6g (norm %.6g); tensors rebuilt for it: %s, from %s", self.job,
                        self.number, dl.site, site.norm, site.scale, (site.norm or 0.0) * site.scale,
                        shown or "none (measured before folding)", ", ".join(sites) or "nobody")

    def weight_of(self, site: str, claimed: int) -> int:
        bounded = self.influence.get(site)
        return claimed if bounded is None else round(bounded.weight)


@dataclass(kw_only=True)
class InitRound(LiveRound):
    """The init task (round 0): one client's tensors become the initial model; no global model is sent."""

    kind: ClassVar[str] = INIT_TASK
    collector: InitCollector = field(default_factory=InitCollector)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # site -> (reason, message)
    max_bytes: int = DEFAULT_MAX_BYTES  # spec.model.maxBytes: checked before the collector allocates anything

    @property
    def sink(self) -> InitCollector:
        return self.collector

    def _check_content(self, result: ResultAnnounced) -> str:
        if not result.refs:
            return "the initial model has no tensors"
        return check_init_result(result.refs, self.max_bytes) or ""

    def accept(self, registry: Registry, dl: Download) -> bool:
        return not self.closed

    def keep_failure(self, site: str, reason: str, message: str) -> bool:
        if site not in self.tasks:
            return False
        self.failed[site] = (reason, message)
        return True

    def resend_on_reconnect(self, site: str, resume_task_id: str) -> bool:
        return site not in self.results and resume_task_id != self.tasks[site]
