"""Remote sites: `spec.server.expose` (how sites outside the cluster reach the server) and join-token settings.

A remote site is `spec.clients[].remote: true`, a bool rather than a `placement: {kind: ...}` field: the
operator either runs the site's pod or it does not, and everything else about a remote site (its image, its
volumes, its policy) is decided at the site, never in the FLJob. A richer placement (a node pool, another
cluster of the same owner) is already said with nodeSelector/tolerations, so a second enum would only repeat
it. Should a third kind appear, `remote: true` maps onto it without breaking stored jobs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from fedkube.spec.problems import Problem

if TYPE_CHECKING:
    from fedkube.spec.model import FLJobSpec

ServiceType = Literal["ClusterIP", "LoadBalancer", "NodePort"]

# A DNS name (RFC 1123 subdomain, lower case) or an IP literal: what goes into the server certificate's SANs.
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# Join tokens: long enough for a site admin to act on an e-mail, short enough that a leaked bundle goes stale.
DEFAULT_JOIN_TOKEN_SECONDS = 24 * 3600
MIN_JOIN_TOKEN_SECONDS = 600
MAX_JOIN_TOKEN_SECONDS = 7 * 24 * 3600
# The enrollment listener (fedkube.server.enrollment): TLS with server authentication only, its own port.
DEFAULT_ENROLL_PORT = 8472


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _DNS_NAME.match(value):
        raise ValueError(
            f"{value!r} is neither an IP address nor a lower-case DNS name; fix: give the name or address sites "
            "dial, e.g. fl.example.org or 203.0.113.7 (no port, no scheme)"
        )
    return value


ExternalAddress = Annotated[str, AfterValidator(_host)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)


class Expose(_Model):
    """How sites outside the cluster reach the server: the Service type and the addresses they dial."""

    type: ServiceType = Field(
        default="ClusterIP",
        description="LoadBalancer or NodePort: a Service {job}-remote of that type carries the gRPC, bulk and "
        "enroll ports (never status or metrics); ClusterIP: none, an ingress or gateway passes TLS through to "
        "{job}-server (docs/remote-sites.md).",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of the Service (e.g. a cloud load balancer's settings)."
    )
    external_addresses: list[ExternalAddress] = Field(
        default_factory=list,
        alias="externalAddresses",
        max_length=16,
        description="DNS names or IP addresses remote sites dial; they go into the server certificate's SANs "
        "and every join bundle (the first one is the name the sites check).",
    )
    join_token_seconds: int = Field(
        default=DEFAULT_JOIN_TOKEN_SECONDS,
        alias="joinTokenSeconds",
        ge=MIN_JOIN_TOKEN_SECONDS,
        le=MAX_JOIN_TOKEN_SECONDS,
        description="How long a remote site's one-time join token is valid after the job's certificates are "
        "made (created or resumed).",
    )

    @property
    def external(self) -> bool:
        """True when the server is meant to be reached from outside the cluster."""
        return self.type != "ClusterIP" or bool(self.external_addresses)

    def dns_names(self) -> list[str]:
        return [a for a in self.external_addresses if not _is_ip(a)]

    def ip_addresses(self) -> list[str]:
        return [a for a in self.external_addresses if _is_ip(a)]


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def remote_problems(spec: FLJobSpec) -> Iterator[Problem]:
    """Errors: a remote site enrolls against the operator's own job CA over TLS, so it needs both."""
    remote = [i for i, c in enumerate(spec.clients) if c.remote]
    if not remote:
        return
    path = f"spec.clients[{remote[0]}].remote"
    if spec.security.tls == "disabled":
        yield Problem(path, "a remote site enrolls and connects over mutual TLS, and spec.security.tls is disabled",
                      "enable TLS (remove spec.security.tls), or run the site in the cluster (remote: false)")
    elif spec.security.issuer_ref is not None:
        yield Problem(path, "remote sites are enrolled by the job's own CA, and spec.security.issuerRef hands the "
                      "certificates to cert-manager", "remove spec.security.issuerRef for a job with remote sites")


def remote_warnings(spec: FLJobSpec) -> Iterator[Problem]:
    if any(c.remote for c in spec.clients) and not spec.server.expose.external:
        yield Problem(
            "spec.server.expose",
            "the job has remote sites but its server Service is ClusterIP without externalAddresses: a site outside "
            "the cluster reaches it only through an ingress or gateway with TLS passthrough, and its join bundle "
            "names the in-cluster Service",
            "set spec.server.expose.type (LoadBalancer or NodePort) and externalAddresses",
        )
