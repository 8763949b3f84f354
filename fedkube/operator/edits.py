"""Edits of a live FLJob's spec: the job keeps the spec it started with, except ``suspend`` and the TTL.

Pods cannot change in place, and a different model, strategy or site list
mid-job would mix two jobs in one status ("Succeeded 6/12") or freeze it
(``minClients: 5`` on a 2-site job). The CRD's CEL transition rules
(:mod:`fedkube.spec.cel`) refuse such edits at the API server; an API server
that does not run them (an old one, the emulated one) still gets an operator
that refuses them: the spec it admitted is kept in ``status.acceptedSpec``,
every later decision reads it (:func:`effective_spec`), and a rejected edit
shows as the ``SpecChangeRejected`` condition and a Warning Event, while
``status.observedGeneration`` stays at the last generation the job runs on.

Pure functions: the handlers read and write, this module decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedkube.operator.status import Cond, Event, format_time, get_condition, is_invalid, set_condition
from fedkube.spec import revocation
from fedkube.spec.cel import MUTABLE_SPEC_FIELDS, changed_immutable_fields

ACCEPTED_SPEC = "acceptedSpec"  # status key of the spec the job's pods were created from
REASON_REJECTED = "ImmutableFieldChanged"
REASON_RESTORED = "SpecRestored"


def accepted_spec(status: Mapping[str, Any]) -> dict[str, Any] | None:
    """The spec the job was admitted with; None before it ran and while it is Invalid (its pods are gone, so an
    edit that fixes it starts the job anew, as the Invalid condition's fix says)."""
    if is_invalid(status):
        return None
    accepted = status.get(ACCEPTED_SPEC)
    return dict(accepted) if isinstance(accepted, Mapping) else None


def effective_spec(spec: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """The spec the job runs on: the accepted one, with the fields a live job may change taken from ``spec``."""
    accepted = accepted_spec(status)
    if accepted is None:
        return dict(spec)
    out = {k: v for k, v in accepted.items() if k not in MUTABLE_SPEC_FIELDS}
    out.update({k: v for k, v in spec.items() if k in MUTABLE_SPEC_FIELDS})
    # A revocation once propagated stays (fedkube.operator.revoking): dropping the name re-admits nobody.
    kept = revocation.stored_names(status.get(revocation.STATUS_KEY))
    if kept:
        out[revocation.FIELD] = sorted({*(out.get(revocation.FIELD) or []), *kept})
    return out


def rejected_fields(spec: Mapping[str, Any], status: Mapping[str, Any]) -> list[str]:
    """Top-level spec fields (manifest names) that differ from the accepted spec and cannot change; sorted."""
    accepted = accepted_spec(status)
    return [] if accepted is None else changed_immutable_fields(accepted, dict(spec))


def spec_edit(
    previous: Mapping[str, Any], rejected: list[str], generation: int | None, now: float
) -> tuple[dict[str, Any], list[Event]]:
    """Status fields and Events after an edit: SpecChangeRejected naming ``rejected``, or cleared when none is.

    ``observedGeneration`` moves to ``generation`` only when the job runs on it, i.e. nothing is rejected.
    """
    stamp = format_time(now)
    before = get_condition(previous.get("conditions"), Cond.SPEC_CHANGE_REJECTED)
    if rejected:
        named = ", ".join(f"spec.{f}" for f in rejected)
        message = (f"generation {generation} changed {named}, which a running FLJob cannot take: it keeps running "
                   f"on the spec of generation {previous.get('observedGeneration', 1)} (only "
                   f"{' and '.join('spec.' + f for f in MUTABLE_SPEC_FIELDS)} can change). Fix: revert the edit, or "
                   "delete the FLJob and create it again with the new spec")
        conds = set_condition(previous.get("conditions"), Cond.SPEC_CHANGE_REJECTED, "True", REASON_REJECTED,
                              message, stamp)
        same = before is not None and before.get("status") == "True" and before.get("message") == message
        return {"conditions": conds}, [] if same else [Event("Warning", Cond.SPEC_CHANGE_REJECTED, message)]
    fields: dict[str, Any] = {}
    if isinstance(generation, int):
        fields["observedGeneration"] = generation
    if before is not None and before.get("status") == "True":
        fields["conditions"] = set_condition(previous.get("conditions"), Cond.SPEC_CHANGE_REJECTED, "False",
                                             REASON_RESTORED, "the spec is the one the job runs on again", stamp)
        return fields, [Event("Normal", REASON_RESTORED, "the rejected spec change was reverted")]
    return fields, []
