"""Federated evaluation (``spec.evaluation``): the evaluate task, its metrics-only results and their average.

After every ``every``-th training round and after the last one, the
workflow publishes the new global model to the evaluating sites and sends
each an evaluate task (:class:`EvalRound`). A site answers with
``num_examples`` and ``metrics`` only; the result desk takes such a result
as it is announced (there is nothing to download) and the round's metrics
are the mean weighted by ``num_examples``, bounded like a training result's
weight (``spec.strategy.weighting`` and ``maxExamplesPerSite``).

An evaluation never fails the job nor a site (fedkube/spec/evaluation.py):
a result carrying tensors, or claiming no examples, is refused with
InvalidResult and left out of the average, and a site that does not answer
by the deadline is left out too. What fails a site during an evaluation is
what fails it during training: its heartbeats stopping or its trainer
reporting a failure; the next training round's quorum then counts it out.

:class:`Evaluator` runs one evaluation for the workflow, on the workflow's
thread, as a round without a quorum (fedkube.server.side_rounds).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fedkube.errors import FedkubeError
from fedkube.metrics.server import ServerMetrics
from fedkube.protocol import EVALUATE_TASK
from fedkube.server.aggregate import DiscardOutcome, weighted_metrics
from fedkube.server.config import JobSettings
from fedkube.server.control import ResultAnnounced
from fedkube.server.downloads import Download
from fedkube.server.influence import Influence
from fedkube.server.live_round import LiveRound
from fedkube.server.publisher import ModelPublisher
from fedkube.server.registry import Registry
from fedkube.server.side_rounds import AVAILABLE, RoundHost, await_results
from fedkube.spec.evaluation import Evaluation
from fedkube.status import EvaluationPoint

log = logging.getLogger(__name__)


class NoTensors:
    """The sink of a round whose results carry no tensors: a result offering any was refused before download."""

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        raise FedkubeError(f"evaluate result of {client} offered tensor {name!r}; it was to be refused (a bug)")

    def discard(self, client: str) -> DiscardOutcome:
        return DiscardOutcome(client)


@dataclass(kw_only=True)
class EvalRound(LiveRound):
    """An evaluation of the global model after training round ``number``: metrics only, nothing aggregated."""

    kind: ClassVar[str] = EVALUATE_TASK
    metrics_only: ClassVar[bool] = True
    influence: Influence
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # site -> (reason, message)
    _sink: NoTensors = field(default_factory=NoTensors)

    @property
    def sink(self) -> NoTensors:
        return self._sink

    def _check_content(self, result: ResultAnnounced) -> str:
        if result.refs:
            return (f"an evaluate result carries metrics only, and this one offers {len(result.refs)} tensor(s); "
                    "nothing of it is used; fix: answer an evaluate task with num_examples and metrics only "
                    "(the trainer SDK drops the params of an evaluate task's result)")
        if result.num_examples <= 0:
            return (f"num_examples is {result.num_examples}; an evaluate result must say on how many examples it "
                    "measured its metrics, which are weighted by it")
        return ""

    def accept(self, registry: Registry, dl: Download) -> bool:
        return False  # never downloads: a result with tensors is refused when announced

    def weight_of(self, site: str, claimed: int) -> int:
        return round(self.influence.weight(claimed))

    def keep_failure(self, site: str, reason: str, message: str) -> bool:
        # An evaluation never fails a site for the job: its failure only leaves it out of the average.
        if site not in self.tasks:
            return False
        self.failed[site] = (reason, message)
        return True

    def resend_on_reconnect(self, site: str, resume_task_id: str) -> bool:
        return site not in self.results and resume_task_id != self.tasks[site]

    def point(self) -> EvaluationPoint:
        """The evaluation's outcome: metrics weighted by num_examples, and who answered."""
        metrics = weighted_metrics({site: (float(n), m) for site, (n, m) in self.results.items()})
        return EvaluationPoint(round=self.number, metrics=metrics, sites=len(self.results),
                               examples=sum(n for n, _ in self.results.values()))


def evaluation_sites(evaluation: Evaluation | None, registry: Registry, round_: int, rounds: int) -> tuple[str, ...]:
    """The sites that evaluate after training round ``round_``: none when no evaluation is due.

    Only connected sites between tasks are asked (a failed or lost site has
    no trainer to answer); ``evaluation.sites`` narrows them, else every site evaluates.
    """
    if evaluation is None or not evaluation.due(round_, rounds):
        return ()
    chosen = set(evaluation.sites)
    return tuple(rec.name for rec in registry.records()
                 if rec.state in AVAILABLE and (not chosen or rec.name in chosen))


def owed_on_resume(evaluation: Evaluation | None, curve: Iterable[EvaluationPoint], done: int, rounds: int) -> bool:
    """Whether a server resuming after round ``done`` owes that round's evaluation before training goes on.

    A round's checkpoint is submitted before its evaluation runs, so the curve
    it keeps (fedkube.server.checkpoint) never holds that evaluation: without
    it the resumed job's curve would skip round ``done``.
    """
    if done < 1 or evaluation is None or not evaluation.due(done, rounds):
        return False
    return all(p.round != done for p in curve)


class Evaluator:
    """Runs the evaluations ``spec.evaluation`` asks for; each returns its outcome for the status."""

    def __init__(self, settings: JobSettings, publisher: ModelPublisher, telemetry: ServerMetrics) -> None:
        self._settings = settings
        self._publisher = publisher
        self._telemetry = telemetry

    def after_round(self, number: int, model: dict[str, np.ndarray], host: RoundHost) -> EvaluationPoint | None:
        """Evaluate ``model``, the global model after training round ``number``, if an evaluation is due then."""
        s = self._settings
        sites = evaluation_sites(s.evaluation, host.registry, number, s.rounds)
        if not sites:
            if s.evaluation is not None and s.evaluation.due(number, s.rounds):
                log.warning("job %s round %s: no registered site to evaluate the global model on", s.job, number)
            return None
        # The same arrays the next round publishes: views, no copy.
        txn = self._publisher.publish(model, sites, s.round_timeout_s,
                                      transaction_id=f"{s.job}-e{number}-{host.run_id}")
        rnd = EvalRound(number=number, job=s.job, tasks=host.task_ids(number, sites, "e"), transaction=txn,
                        refs=txn.refs, model=model, deadline=host.clock() + s.round_timeout_s, influence=s.influence)
        host.open_round(rnd)
        try:
            await_results(rnd, rnd.failed, host, s.round_timeout_s)
        finally:
            host.close_round(rnd)
        for site, (reason, message) in sorted(rnd.failed.items()):
            log.warning("job %s round %s: %s left out of the evaluation: %s (%s)", s.job, number, site, reason,
                        message)
        point = rnd.point()
        self._telemetry.round_metrics(EVALUATE_TASK, point.metrics)
        self._telemetry.evaluated(number, point.sites)
        log.info("job %s round %s: evaluated on %d site(s), %d examples; metrics %s", s.job, number, point.sites,
                 point.examples, point.metrics)
        return point
