"""The FLSite document: a remote site's own participation in one FLJob, owned by the site's admin.

An FLSite lives in the *site's* cluster (the chart in site mode). It names the Secret holding the join bundle the
job owner handed over, the site's own trainer (image, command, data volumes, GPUs: the job owner cannot choose
any of them) and the site's policy: which job CAs it accepts (by SHA-256 fingerprint, checked before any token is
shown to a server), and optionally which strategies and how many rounds it accepts.

What is checkable when: the bundle names the job, the site, the server and the CA, so the CA fingerprint is
checked before enrolling. The strategy and the number of rounds are announced by the server when the site's
sidecar registers (``Registered.terms``), before any task: the sidecar refuses them there
(:func:`fedkube.terms.check_terms`), leaves the job with ``PolicyRefused`` and the FLSite reads Refused.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedkube.spec.model import API_GROUP, API_VERSION_NAME, DNS1035_LABEL, ObjectMeta, Sidecar
from fedkube.spec.model import TrainerTemplate as TrainerTemplate
from fedkube.spec.status import Condition
from fedkube.spec.strategy import StrategyName
from fedkube.terms import TermsPolicy

__all__ = [
    "API_GROUP",
    "API_VERSION_NAME",
    "BUNDLE_KEY",
    "KIND",
    "PLURAL",
    "SHORT_NAME",
    "FLSite",
    "FLSiteSpec",
    "FLSiteStatus",
    "SecretKeyRef",
    "SitePhase",
    "SitePolicy",
]

KIND = "FLSite"
PLURAL = "flsites"
SHORT_NAME = "fls"
#: The key of the job's ``<job>-join-<site>`` Secret that holds the bundle; the default of ``joinBundleSecretRef``.
BUNDLE_KEY = "bundle.json"
FINGERPRINT = r"^sha256:[0-9a-f]{64}$"

SitePhase = Literal["Enrolling", "Joined", "Running", "Succeeded", "Failed", "Withdrawn", "Refused"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SecretKeyRef(_Model):
    """A key of a Secret in the FLSite's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(default=BUNDLE_KEY, min_length=1, description="Key holding the join bundle.")


class SitePolicy(_Model):
    """What this site accepts. A bundle or a task outside it is refused (phase Refused) before it runs."""

    accepted_ca_fingerprints: list[str] = Field(
        min_length=1, alias="acceptedCaFingerprints",
        description="SHA-256 fingerprints (sha256:<64 hex>) of job CAs this site joins; the bundle's CA must be one. "
        "Get it from the job owner through a second channel.",
    )
    allowed_strategies: list[StrategyName] | None = Field(
        default=None, alias="allowedStrategies", description="Strategy kinds accepted; all when absent. Checked "
        "when the site's sidecar registers, before any task: another strategy leaves the job (PolicyRefused at the "
        "server) and the FLSite reads Refused.",
    )
    max_rounds: int | None = Field(
        default=None, alias="maxRounds", ge=1, le=1_000_000,
        description="The most rounds a job may ask of this site. Checked when the site's sidecar registers, "
        "before any task: a job asking more leaves (PolicyRefused at the server) and the FLSite reads Refused.",
    )

    def terms(self) -> TermsPolicy:
        """The part the site's sidecar checks against the job's announced terms."""
        return TermsPolicy.of(self.allowed_strategies, self.max_rounds)

    @field_validator("accepted_ca_fingerprints")
    @classmethod
    def _fingerprints(cls, value: list[str]) -> list[str]:
        out = [v.strip().lower() for v in value]
        bad = [v for v in out if not re.match(FINGERPRINT, v)]
        if bad:
            raise ValueError(f"not a CA fingerprint: {bad}; fix: use sha256:<64 hex> as the job owner's bundle shows")
        return out


class FLSiteSpec(_Model):
    """The site's side of one job: where the join bundle is, what runs here, and what the site accepts."""

    join_bundle_secret_ref: SecretKeyRef = Field(
        alias="joinBundleSecretRef", description="The Secret (this namespace) holding the job owner's join bundle."
    )
    trainer: TrainerTemplate = Field(description="The site's own trainer: image, command, data volumes, resources.")
    sidecar: Sidecar = Field(default_factory=Sidecar, description="Job-cell sidecar (image override, resources).")
    policy: SitePolicy = Field(description="Which jobs this site accepts.")


class SiteMeta(ObjectMeta):
    """Metadata; the name is the FLSite's own (any DNS label; the site name comes from the bundle)."""

    name: str = Field(min_length=1, max_length=52, pattern=DNS1035_LABEL, description="FLSite name.")


class FLSite(_Model):
    """A remote site's participation in one FLJob: enrolls with the join bundle and runs the site's own trainer."""

    api_version: Literal["fedkube.dev/v1alpha1"] = Field(default="fedkube.dev/v1alpha1", alias="apiVersion")
    kind: Literal["FLSite"] = "FLSite"
    metadata: SiteMeta
    spec: FLSiteSpec
    status: dict[str, Any] | None = Field(default=None, exclude=True)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


class ServerView(_Model):
    """This site as the server last reported it (via the sidecar)."""

    state: str | None = Field(default=None, description="The site's client state at the server.")
    reason: str | None = Field(default=None, description="The server's reason, e.g. Lost or a Stop reason.")


class FLSiteStatus(_Model):
    """What the site operator observed."""

    phase: SitePhase | None = Field(default=None, description="Enrolling, Joined, Running, Succeeded, Failed, "
                                    "Withdrawn or Refused.")
    job: str | None = Field(default=None, description="<namespace>/<job> at the server, from the bundle.")
    site: str | None = Field(default=None, description="This site's name in the job, from the bundle.")
    server: str | None = Field(default=None, description="The server address dialled.")
    ca_sha256: str | None = Field(default=None, alias="caSha256", description="The job CA's fingerprint.")
    cert_not_after: str | None = Field(default=None, alias="certNotAfter", description="Certificate expiry.")
    pod: str | None = Field(default=None, description="The client pod.")
    round: int | None = Field(default=None, description="The last round the site worked on.")
    server_view: ServerView | None = Field(default=None, alias="serverView", description="The server's view.")
    last_error: str | None = Field(default=None, alias="lastError", description="The last error and its fix.")
    conditions: list[Condition] = Field(default_factory=list, description="Enrolled, Ready, Refused, ...")
