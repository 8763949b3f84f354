"""Rounds without a quorum, run on the workflow's thread: the init task and an evaluation.

A training round (``RoundWorkflow._run_round``) ends by its quorum rules
(fedkube.server.rounds). The init task (``spec.model.source:
firstClient``) and an evaluation (fedkube.server.evaluation) have none:
they end when every tasked site answered or left, or at the deadline, and
their failures are their own (``failed``), never a site's for the job.
They use the workflow's round machinery through :class:`RoundHost`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedkube.server.config import JobSettings
from fedkube.server.jobs import NO_INITIAL_MODEL, JobFailed
from fedkube.server.live_round import InitRound, LiveRound
from fedkube.server.registry import ClientState, Registry
from fedkube.server.strategies import check_initial_model
from fedkube.status import Reason

log = logging.getLogger(__name__)

#: States in which a site takes a task of a round without a quorum: connected, no task of its own in flight
#: (Done: it delivered the training round that just ended).
AVAILABLE = (ClientState.REGISTERED, ClientState.DONE)


@dataclass(frozen=True)
class RoundHost:
    """The workflow's handles for a round it does not run itself."""

    registry: Registry
    clock: Callable[[], float]
    run_id: str
    # (round, sites, prefix) -> site -> task id; the prefix tells a round's kinds apart ("r", "e").
    task_ids: Callable[[int, tuple[str, ...], str], dict[str, str]]
    open_round: Callable[[LiveRound], None]  # make it the round in progress and send its tasks
    close_round: Callable[[LiveRound], None]
    pump: Callable[[float], None]  # handle events until the given time


def await_results(rnd: LiveRound, failed: dict[str, tuple[str, str]], host: RoundHost, timeout_s: float) -> None:
    """Handle events until every site of ``rnd`` answered or left (into ``failed``), or the deadline passed."""
    while True:
        pending = [site for site in rnd.tasks if site not in rnd.results and site not in failed]
        if not pending:
            return
        if host.clock() >= rnd.deadline:
            for site in pending:
                failed[site] = (Reason.ROUND_TIMEOUT.value, f"no {rnd.kind} result within roundSeconds={timeout_s:g}")
            return
        for site in pending:
            rec = host.registry.get(site)
            if rec.state not in AVAILABLE:
                failed[site] = (rec.reason.value if rec.reason else rec.state.value, rec.message)
        host.pump(rnd.deadline)


def first_client_model(settings: JobSettings, candidates: tuple[str, ...], host: RoundHost) -> dict[str, np.ndarray]:
    """spec.model.source firstClient: ask one client (first by name) for its initial weights."""
    tried: list[str] = []
    for site in sorted(candidates):
        if host.registry.get(site).state is not ClientState.REGISTERED:
            continue
        rnd = InitRound(number=0, job=settings.job, max_bytes=settings.model_max_bytes,
                        tasks=host.task_ids(0, (site,), "r"), deadline=host.clock() + settings.round_timeout_s)
        host.open_round(rnd)
        await_results(rnd, rnd.failed, host, settings.round_timeout_s)
        host.close_round(rnd)
        if site in rnd.results:
            model = rnd.collector.finish()
            check_initial_model(model)
            log.info("job %s: initial model from client %s (%d tensors)", settings.job, site, len(model))
            return model
        reason, message = rnd.failed.get(site, ("Unknown", "no result"))
        tried.append(f"{site}: {reason} ({message})")
    raise JobFailed(
        NO_INITIAL_MODEL,
        "no client delivered the initial model (spec.model.source firstClient); tried: "
        + ("; ".join(tried) or "no registered client"),
    )
