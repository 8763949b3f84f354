"""A site's policy over what it joins: pure checks, each returning a refusal (reason, message) or None.

Checkable before enrolling (the bundle): the job CA's fingerprint, so no token is ever shown to a server the site
did not accept. Checkable only after connecting: the job's terms (strategy, rounds), which the server announces
in ``Registered`` before any task; the site's sidecar checks them (:func:`fedkube.terms.check_terms`, the one
comparison, also behind :func:`check_task`) and leaves with ``PolicyRefused`` before its trainer gets a task.
"""

from __future__ import annotations

from fedkube.security.enroll import JoinBundle
from fedkube.spec.site import SitePolicy
from fedkube.terms import ROUNDS_NOT_ACCEPTED, STRATEGY_NOT_ACCEPTED, JobTerms, Refusal, check_terms

__all__ = ["CA_NOT_ACCEPTED", "ROUNDS_NOT_ACCEPTED", "STRATEGY_NOT_ACCEPTED", "Refusal", "check_bundle", "check_task"]

CA_NOT_ACCEPTED = "CANotAccepted"


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
    return check_terms(policy.terms(), JobTerms(strategy=strategy, total_rounds=total_rounds))
