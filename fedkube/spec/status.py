"""The FLJob status the operator writes: the shape it has in the CRD, shared by the operator and the docs.

The operator owns the values (phase transitions, conditions, per-site
states); this module fixes their names and types so that `kubectl get flj`,
the CRD schema (generated from :class:`FLJobStatus`) and what is written
agree. ``Phase`` and ``ClientState`` are the ones of :mod:`fedkube.status`,
the server's status document, so a state means the same in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from fedkube.status import ClientState, Phase

__all__ = [
    "CertificatesStatus", "ClientState", "Condition", "ConditionStatus", "FLJobStatus", "Phase", "RoundMetrics",
    "SiteStatus",
]

ConditionStatus = Literal["True", "False", "Unknown"]

# Documented, not enforced in the CRD: a status patch the API server rejects would hide the very state it reports.
_State = Annotated[ClientState, WithJsonSchema({"type": "string"})]


class _Status(BaseModel):
    # Reading a status written by an older or newer operator must not fail.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class SiteStatus(_Status):
    """One client site's state and, when it is not healthy, why."""

    state: _State = Field(description="Pending, Registered, Training, Uploading, Done, Failed, Lost or "
                        "Withdrawn (the site left by its own decision: reason Withdrawn or PolicyRefused).")
    reason: str | None = Field(default=None, description="Machine-readable reason, e.g. PendingTimeout.")
    message: str | None = Field(default=None, description="What happened and what to do about it.")
    pod: str | None = Field(default=None, description="The client's pod.")
    restarts: int | None = Field(default=None, description="Times the operator created the site's pod again.")
    peer: str | None = Field(default=None, description="Where its connection comes from, as the server sees it.")
    cert_not_after: str | None = Field(default=None, alias="certNotAfter",
                                       description="When its connection's certificate expires.")

    def to_dict(self) -> dict[str, Any]:
        """The entry as written: empty fields left out (the status merge patch nulls the ones that went away)."""
        out: dict[str, Any] = {"state": ClientState(self.state).value}
        for attr, key in (("reason", "reason"), ("message", "message"), ("pod", "pod"), ("restarts", "restarts"),
                          ("peer", "peer"), ("cert_not_after", "certNotAfter")):
            value = getattr(self, attr)
            if value:
                out[key] = value
        return out

    @classmethod
    def read(cls, doc: Any) -> SiteStatus | None:
        """The entry of a stored status, or None when it is not one (hand-edited, or from an unknown version)."""
        if not isinstance(doc, Mapping):
            return None
        try:
            return cls.model_validate(doc)
        except ValidationError:
            return None


class Condition(_Status):
    """A Kubernetes-style condition (Ready, Invalid, Succeeded, Failed, ...)."""

    type: str = Field(description="Condition type.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str | None = Field(default=None, description="Machine-readable reason in CamelCase.")
    message: str | None = Field(default=None, description="Human-readable explanation.")
    last_transition_time: str | None = Field(
        default=None, alias="lastTransitionTime", description="When status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(default=None, alias="observedGeneration", description="Spec generation.")


class CertificatesStatus(_Status):
    """The job's TLS certificates as the operator provisioned them."""

    not_after: str | None = Field(
        default=None, alias="notAfter",
        description="When the first of the job's certificates expires (RFC 3339); resuming the job renews them.",
    )
    issuer: str | None = Field(
        default=None, description="job-ca (the operator's own CA per job) or the cert-manager issuer, Kind/name.",
    )


ROUND_METRICS_KEPT = 5  # rounds of metrics the status keeps: enough to see a trend, bounded for etcd


class RoundMetrics(_Status):
    """The server's aggregated metrics of one completed round."""

    round: int = Field(description="The round.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Weighted mean of the clients' metrics.")
    seconds: float | None = Field(default=None, description="How long the round took.")


class EvaluationStatus(_Status):
    """One federated evaluation of the global model (fedkube.status.EvaluationPoint)."""

    round: int = Field(description="The training round after which the global model was evaluated.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Metrics weighted by num_examples.")
    sites: int = Field(default=0, description="Sites whose results the metrics average.")
    examples: int = Field(default=0, description="Examples they were measured on (after maxExamplesPerSite).")


class FLJobStatus(_Status):
    """What the operator reports about an FLJob."""

    # kopf and future operator versions add fields of their own.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    phase: Phase | None = Field(default=None, description="Pending, Deploying, Running, Succeeded, Failed, Suspended.")
    round: int | None = Field(default=None, description="Current (or last completed) round.")
    rounds: int | None = Field(default=None, description="Total rounds.")
    round_display: str | None = Field(default=None, alias="roundDisplay", description="round/rounds, e.g. 3/20.")
    clients: dict[str, SiteStatus] = Field(default_factory=dict, description="Per-site state, keyed by site name.")
    clients_ready: int | None = Field(default=None, alias="clientsReady", description="Healthy client sites.")
    clients_total: int | None = Field(default=None, alias="clientsTotal", description="Client sites in the spec.")
    clients_display: str | None = Field(
        default=None, alias="clientsDisplay", description="clientsReady/clientsTotal, e.g. 2/3."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Conditions, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    start_time: str | None = Field(default=None, alias="startTime", description="When the job started (RFC 3339).")
    completion_time: str | None = Field(
        default=None, alias="completionTime", description="When the job finished (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, alias="observedGeneration", description="The spec generation this status describes."
    )
    round_metrics: list[RoundMetrics] = Field(
        default_factory=list, alias="roundMetrics", max_length=ROUND_METRICS_KEPT,
        description="The last completed rounds' aggregated metrics the operator saw, oldest first (at most "
        f"{ROUND_METRICS_KEPT}).",
    )  # fmt: skip
    evaluation: list[EvaluationStatus] = Field(
        default_factory=list, description="The newest federated evaluations (spec.evaluation), oldest first."
    )
    certificates: CertificatesStatus | None = Field(
        default=None, description="The job's mutual-TLS certificates; absent when spec.security.tls is disabled."
    )
    revoked_sites: list[str] | None = Field(
        default=None, alias="revokedSites",
        description="Every site of spec.revokedSites the operator has passed to the server; kept when the name "
        "leaves the spec: revocation is final for the FLJob.",
    )
