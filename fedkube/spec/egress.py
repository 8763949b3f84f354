"""The FLJob's `spec.trainer.egress`: where a client pod may connect beyond the job's server and DNS.

The operator's NetworkPolicy (fedkube.operator.netpol) lets a client pod reach
only its job's server and the cluster DNS. The trainer and the sidecar share
the pod's network namespace, so a NetworkPolicy cannot tell them apart: every
rule listed here opens the destination to both containers. That is why the
list is explicit (no "allow everything" shorthand: write ``cidr: 0.0.0.0/0``
to mean it) and each peer names exactly one kind of destination.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_EGRESS_RULES = 16
MAX_PEERS = 16
MAX_PORTS = 16
# The same label key/value syntax as fedkube.spec.model (a namespace's or pod's labels).
LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"


class _Model(BaseModel):
    # The same strictness as every spec model (fedkube.spec.model._Model).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR block ({exc}); fix: write it like 10.0.0.0/8 or 2001:db8::/32") \
            from None
    return value


Cidr = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_cidr)]
_LABEL_KEY_RE = re.compile(LABEL_KEY)
_LABEL_VALUE_RE = re.compile(LABEL_VALUE)


def _labels(value: dict[str, str]) -> dict[str, str]:
    # Checked here rather than as schema patterns: a CRD's structural schema has no propertyNames.
    for key, val in value.items():
        if not _LABEL_KEY_RE.match(key):
            raise ValueError(f"{key!r} is not a label key; fix: e.g. kubernetes.io/metadata.name or app")
        if len(val) > 63 or not _LABEL_VALUE_RE.match(val):
            raise ValueError(f"{val!r} (label {key!r}) is not a label value; fix: at most 63 of [A-Za-z0-9._-]")
    return value


Labels = Annotated[dict[str, str], Field(max_length=MAX_PEERS), AfterValidator(_labels)]


class EgressPeer(_Model):
    """One destination: an IP block, or pods chosen by labels (in namespaces chosen by labels)."""

    cidr: Cidr | None = Field(default=None, description="An IP block, e.g. 10.20.0.0/16 (NetworkPolicy ipBlock).")
    except_: list[Cidr] = Field(
        default_factory=list, alias="except", max_length=MAX_PEERS, description="Blocks inside cidr left out."
    )
    namespace_selector: Labels | None = Field(
        default=None, alias="namespaceSelector",
        description="Namespaces by label (matchLabels); {} is every namespace. With podSelector: its pods there.",
    )
    pod_selector: Labels | None = Field(
        default=None, alias="podSelector",
        description="Pods by label (matchLabels), in the job's namespace unless namespaceSelector is given.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> EgressPeer:
        selectors = self.namespace_selector is not None or self.pod_selector is not None
        if (self.cidr is not None) == selectors:
            raise ValueError("an egress peer needs either cidr or namespaceSelector/podSelector, not both and not "
                             "neither; fix: give one (cidr: 0.0.0.0/0 means anywhere)")
        if self.except_ and self.cidr is None:
            raise ValueError("except needs a cidr it narrows; fix: add cidr or remove except")
        return self

    def manifest(self) -> dict[str, object]:
        """The NetworkPolicyPeer object."""
        if self.cidr is not None:
            block: dict[str, object] = {"cidr": self.cidr}
            if self.except_:
                block["except"] = list(self.except_)
            return {"ipBlock": block}
        out: dict[str, object] = {}
        if self.namespace_selector is not None:
            out["namespaceSelector"] = {"matchLabels": dict(self.namespace_selector)}
        if self.pod_selector is not None:
            out["podSelector"] = {"matchLabels": dict(self.pod_selector)}
        return out


class EgressPort(_Model):
    """A destination port."""

    port: int = Field(ge=1, le=65535, description="Port number.")
    protocol: Literal["TCP", "UDP", "SCTP"] = Field(default="TCP", description="TCP (default), UDP or SCTP.")


class EgressRule(_Model):
    """Connections a client pod (its trainer and sidecar alike) may open to `to`, on `ports`."""

    to: list[EgressPeer] = Field(min_length=1, max_length=MAX_PEERS, description="Destinations (at least one).")
    ports: list[EgressPort] = Field(
        default_factory=list, max_length=MAX_PORTS, description="Ports; empty means every port of `to`."
    )

    def manifest(self) -> dict[str, object]:
        """The NetworkPolicyEgressRule object."""
        out: dict[str, object] = {"to": [peer.manifest() for peer in self.to]}
        if self.ports:
            out["ports"] = [{"port": p.port, "protocol": p.protocol} for p in self.ports]
        return out


Egress = Annotated[
    list[EgressRule],
    Field(
        max_length=MAX_EGRESS_RULES,
        description="Extra destinations of the client pods beyond the job's server and DNS (with the operator's "
        "NetworkPolicies on). The sidecar shares the pod's network, so these open to it too.",
    ),
]
