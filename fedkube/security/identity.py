"""The site identity a peer certificate carries, read back and checked against the job.

TLS has already verified that the certificate chains to the job CA (`fedkube.security.contexts`); this module
answers the next question: which site is this, and is it a site of this job? The server binds every request
to the answer (a site may only act as itself).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

from cryptography import x509

from fedkube.errors import FedkubeError
from fedkube.security.pki import SPIFFE_SCHEME, TRUST_DOMAIN, check_label


class SiteIdentity(NamedTuple):
    namespace: str
    job: str
    site: str


class PeerIdentityError(FedkubeError):
    """A peer certificate does not name a site of this job. `reason` is a short, stable label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_certificate(cert: x509.Certificate | bytes) -> x509.Certificate:
    """A certificate from DER (what `SSLSocket.getpeercert(binary_form=True)` gives) or PEM (what gRPC gives)."""
    if isinstance(cert, x509.Certificate):
        return cert
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise PeerIdentityError("bad_certificate", f"the peer certificate cannot be parsed: {exc}") from exc


def parse_site_uri(uri: str) -> SiteIdentity:
    """`spiffe://fedkube.dev/ns/<ns>/job/<job>/site/<site>` -> SiteIdentity, or PeerIdentityError."""
    parts = urlsplit(uri)
    if parts.scheme != SPIFFE_SCHEME:
        raise PeerIdentityError(
            "wrong_scheme", f"the certificate's URI {uri!r} is not a {SPIFFE_SCHEME}:// identity"
        )
    if parts.netloc != TRUST_DOMAIN:
        raise PeerIdentityError(
            "wrong_trust_domain",
            f"the certificate's URI {uri!r} is in trust domain {parts.netloc!r}, not {TRUST_DOMAIN!r}",
        )
    segments = parts.path.split("/")
    if parts.query or parts.fragment or len(segments) != 7 or segments[0] or segments[1::2] != ["ns", "job", "site"]:
        raise PeerIdentityError(
            "malformed_uri", f"the certificate's URI {uri!r} is not of the form {SPIFFE_SCHEME}://{TRUST_DOMAIN}"
            "/ns/<namespace>/job/<job>/site/<site>"
        )
    _, _, ns, _, job, _, site = segments
    try:
        for what, value in (("namespace", ns), ("job", job), ("site", site)):
            check_label(what, value)
    except FedkubeError as exc:
        raise PeerIdentityError("malformed_uri", f"the certificate's URI {uri!r}: {exc}") from exc
    return SiteIdentity(ns, job, site)


def site_identity(cert: x509.Certificate | bytes, *, namespace: str, job: str) -> SiteIdentity:
    """The site a (chain-verified) peer certificate identifies, which must belong to `namespace`/`job`.

    Raises PeerIdentityError when the certificate has no SAN URI, several, a URI of another scheme or trust
    domain, or names a site of another job or namespace.
    """
    c = load_certificate(cert)
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    subject = c.subject.rfc4514_string()
    if not uris:
        raise PeerIdentityError(
            "no_identity", f"the peer certificate ({subject}) has no SAN URI naming a site; "
            "fix: use a site certificate issued for this job (server certificates cannot act as sites)"
        )
    if len(uris) > 1:
        raise PeerIdentityError(
            "several_identities", f"the peer certificate ({subject}) has {len(uris)} SAN URIs {uris}; "
            "a site certificate must name exactly one site"
        )
    ident = parse_site_uri(uris[0])
    if (ident.namespace, ident.job) != (namespace, job):
        raise PeerIdentityError(
            "other_job", f"the peer certificate names site {ident.site!r} of job {ident.namespace}/{ident.job}, "
            f"not of this job {namespace}/{job}; fix: give the site the certificate issued for this job"
        )
    return ident
