"""A site's policy over what it joins: pure checks, each returning a refusal (reason, message) or None.

Checkable before enrolling (the bundle): the job CA's fingerprint, so no token is ever shown to a server the site
did not accept. Checkable only after connecting (the server's first task): the number of rounds
(``Task.total_rounds``). The strategy kind is not announced to sites by the protocol today; ``allowedStrategies``
is checked by :func:`check_task` when a caller has it (the task config's ``strategy`` key, when a server sends it).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedkube.security.enroll import JoinBundle
from fedkube.spec.site import SitePolicy

CA_NOT_ACCEPTED = "CANotAccepted"
ROUNDS_NOT_ACCEPTED = "RoundsNotAccepted"
STRATEGY_NOT_ACCEPTED = "StrategyNotAccepted"


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def check_bundle(policy: SitePolicy, bundle: JoinBundle) -> Refusal | None:
    """Refuse a bundle whose job CA is not one the site admin accepted."""
    if bundle.ca_sha256.lower() in policy.accepted_ca_fingerprints:
        return None
    return Refusal(CA_NOT_ACCEPTED, f"the join bundle of job {bundle.namespace}/{bundle.job} (site {bundle.site}) "
                   f"has CA {bundle.ca_sha256}, not one of spec.policy.acceptedCaFingerprints; the site never "
                   "enrolls with it; fix: check the fingerprint with the job owner through a second channel and add "
                   "it, or replace the bundle Secret")


def check_task(policy: SitePolicy, *, total_rounds: int | None, strategy: str | None) -> Refusal | None:
    """Refuse a job asking more rounds, or another strategy, than the site accepts (None: not known yet)."""
    if policy.max_rounds is not None and total_rounds is not None and total_rounds > policy.max_rounds:
        return Refusal(ROUNDS_NOT_ACCEPTED, f"the job asks {total_rounds} rounds, spec.policy.maxRounds is "
                       f"{policy.max_rounds}; fix: raise maxRounds or ask the job owner for fewer rounds")
    if policy.allowed_strategies is not None and strategy is not None and strategy not in policy.allowed_strategies:
        return Refusal(STRATEGY_NOT_ACCEPTED, f"the job aggregates with {strategy!r}, spec.policy.allowedStrategies "
                       f"is {list(policy.allowed_strategies)}; fix: allow it or leave the job")
    return None
