"""`spec.revokedSites`: sites thrown out of a running job now, without a new CA.

The one field of a live FLJob besides `suspend` and `ttlSecondsAfterFinished` that may change
(:data:`fedkube.spec.cel.MUTABLE_SPEC_FIELDS`): a site admin whose machine was stolen, or a job owner who must
remove one site, adds the site's name with ``kubectl patch``. The operator writes the list into the spec
ConfigMap the server already mounts, and the server re-reads it (:mod:`fedkube.server.revocation`): from then
on every connection of the site is refused (``Revoked``), its live stream is closed and the site fails for the
job with reason ``Revoked``.

Revocation is final for the FLJob. The operator keeps every name it has propagated in ``status.revokedSites``
and adds it back to what the server reads, so removing a name from the spec re-admits nobody, not even after a
suspend/resume: a thief holding the site's key would be let back in silently, and a remote site's certificate
(made at the site, from the same job CA) outlives a resume. A site is taken back with a new FLJob.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from fedkube.spec.problems import Problem

if TYPE_CHECKING:
    from fedkube.spec.model import FLJobSpec

FIELD = "revokedSites"
#: The status key where the operator keeps every name it propagated (revocation is final for the FLJob).
STATUS_KEY = "revokedSites"

SiteName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


def revocation_problems(spec: FLJobSpec) -> Iterator[Problem]:
    """A revoked name that is no site of the job, or one listed twice.

    Warnings, not errors: the list is edited while the job runs, and the operator stops a running job whose spec
    turns invalid (fedkube.operator.handlers.observe), so a typo would end the whole job instead of revoking
    nothing. A name of no site has no identity the server could accept in the first place.
    """
    sites = {c.name for c in spec.clients}
    seen: set[str] = set()
    for i, name in enumerate(spec.revoked_sites or ()):
        path = f"spec.{FIELD}[{i}]"
        if name not in sites:
            yield Problem(path, f"{name!r} is not a site of this job (its sites: {', '.join(sorted(sites))}), so "
                          "this entry revokes nothing", "name one of spec.clients[].name")
        elif name in seen:
            yield Problem(path, f"{name!r} is listed twice", "list each revoked site once")
        seen.add(name)


def revocation_warnings(spec: FLJobSpec) -> Iterator[Problem]:
    """What revoking these sites does to the job, and names that revoke nothing."""
    yield from revocation_problems(spec)
    revoked = set(spec.revoked_sites or ()) & {c.name for c in spec.clients}
    if not revoked:
        return
    left = len(spec.clients) - len(revoked)
    if left < spec.quorum:
        yield Problem(
            f"spec.{FIELD}",
            f"revoking {sorted(revoked)} leaves {left} site(s), fewer than minClients ({spec.quorum}): the job fails "
            "(QuorumLost) at the next round",
            "lower spec.minClients before revoking, or accept that the job ends",
        )
    yield Problem(
        f"spec.{FIELD}",
        f"sites {sorted(revoked)} are refused on every port (reason Revoked) and fail for the job; this is final for "
        "the FLJob: removing a name later re-admits nobody",
        "to take a site back, create a new FLJob (new CA, tokens and certificates)",
    )


def stored_names(value: object) -> list[str]:
    """The site names of a stored ``revokedSites`` list (the status', an accepted spec's): its strings, sorted,
    once each; nothing when it is not a list (a status is written by the operator, but read as found)."""
    return sorted({n for n in value if isinstance(n, str)}) if isinstance(value, list) else []
