"""Starting a round: waiting for registrations, then who takes part (or why the job cannot go on).

The decisions are :func:`fedkube.server.rounds.decide_start`'s; :class:`RoundStarter`
waits for them by pumping the workflow's events (``pump``) and reports
changes through ``on_change``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedkube.metrics.server import ServerMetrics
from fedkube.server.jobs import JobFailed
from fedkube.server.registry import ClientState, Registry
from fedkube.server.rounds import Action, Exclusion, RoundPolicy, apply_start, decide_start
from fedkube.status import Reason

log = logging.getLogger(__name__)


class RoundStarter:
    """Decides when each round starts and with whom; remembers who was left out."""

    def __init__(
        self,
        job: str,
        registry: Registry,
        policy: RoundPolicy,
        telemetry: ServerMetrics,
        *,
        clock: Callable[[], float],
        pump: Callable[[float], None],
        on_change: Callable[[], None],
    ) -> None:
        self._job = job
        self._registry = registry
        self._policy = policy
        self._telemetry = telemetry
        self._clock = clock
        self._pump = pump
        self._on_change = on_change
        self._since = clock()
        self._waited = False
        self._counted: set[tuple[int, str]] = set()
        self.not_in_round: tuple[Exclusion, ...] = ()
        """The clients the round being started leaves out, and why (named when quorum is lost)."""

    def await_start(self, number: int) -> tuple[str, ...]:
        """Wait until round ``number`` may start; its participants.

        The first round this server runs waits for registrations (up to
        registrationSeconds, or until every client is in), also when it resumes
        from a checkpoint at a later round: its clients must reconnect first.
        """
        if number > 1 and not self._waited:
            deadline = self._since + self._policy.registration_timeout_s
            while self._clock() < deadline and any(
                r.state is ClientState.PENDING for r in self._registry.records()
            ):
                self._pump(deadline)
        self._waited = True
        while True:
            now = self._clock()
            start = decide_start(self._registry, self._policy, number, waiting_since=self._since, now=now)
            if start.action is Action.START:
                apply_start(self._registry, start)
                self._count_not_registered(number, start.excluded)
                self.not_in_round = tuple(start.excluded)
                for e in start.excluded:
                    log.warning("job %s round %s: client %s excluded: %s (%s)", self._job, number,
                                e.client, e.reason.value, e.message)
                self._on_change()
                return start.participants
            if start.action is Action.FAIL:
                apply_start(self._registry, start)
                self._count_not_registered(number, start.excluded)
                raise JobFailed(start.reason.value if start.reason else Reason.QUORUM_LOST.value, start.message)
            self._pump(start.wake_at if start.wake_at is not None else now + 0.2)

    def _count_not_registered(self, number: int, excluded: tuple[Exclusion, ...]) -> None:
        """Count each NotRegistered exclusion once per round (round 1 is decided twice around the init task).

        Other exclusions at the start repeat a failure that was counted when it happened.
        """
        for e in excluded:
            if e.reason is Reason.NOT_REGISTERED and (number, e.client) not in self._counted:
                self._counted.add((number, e.client))
                self._telemetry.client_failed(e.reason.value)
