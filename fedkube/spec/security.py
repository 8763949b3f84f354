"""The FLJob's `spec.security`: whether its connections use mutual TLS, and who issues the certificates."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TlsMode = Literal["enabled", "disabled"]
IssuerKind = Literal["Issuer", "ClusterIssuer"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)


class IssuerRef(_Model):
    """A cert-manager issuer that signs the job's certificates instead of the operator's own job CA."""

    name: str = Field(min_length=1, max_length=253, description="Issuer or ClusterIssuer name.")
    kind: IssuerKind = Field(default="Issuer", description="Issuer (in the FLJob's namespace) or ClusterIssuer.")
    group: str = Field(default="cert-manager.io", min_length=1, description="API group of the issuer.")


class Security(_Model):
    """Transport security of the job's server and sites."""

    tls: TlsMode = Field(
        default="enabled",
        description=(
            "enabled: every connection between the server and its sites is mutual TLS 1.3 with certificates of "
            "the job's own CA. disabled: plaintext, for trusted test clusters only (validate warns, status says so)."
        ),
    )
    issuer_ref: IssuerRef | None = Field(
        default=None,
        alias="issuerRef",
        description="Let this cert-manager issuer sign the job's certificates; default: a CA the operator makes.",
    )
