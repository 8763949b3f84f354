"""Enrollment of remote sites: join tokens, the join bundle, and signing a site's CSR (no I/O, no clock of its own).

The trust argument (docs/security.md, "Enrolling a remote site"):

* the site makes its key itself and sends only a CSR, so the key never leaves the site;
* the server proves itself first: the site pins the job CA from the join bundle (and its SHA-256 fingerprint),
  so a token is only ever shown to the job's real server;
* the token authorizes exactly one certificate for exactly one site of one job: it names them, the server holds
  only its SHA-256 (a stolen server Secret or checkpoint cannot enroll), it expires, and it is spent on use;
* what the CSR asks for beyond its public key is ignored: the certificate names the token's site
  (`pki.site_uri`) whatever the CSR's subject or SANs say.

Token format: ``fkj1.<namespace>.<job>.<site>.<secret>`` (labels cannot contain dots). The readable part lets the
server refuse a token of another job or site with a precise reason; the secret alone is what is hard to guess.
The operator derives the secret from the job CA's key and the server certificate's serial (an HMAC), so building
the job's Secrets stays a pure function and each certificate rotation (resume) issues fresh tokens.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedkube.errors import FedkubeError
from fedkube.security import pki

TOKEN_PREFIX = "fkj1"
BUNDLE_KIND = "FLJoinBundle"
BUNDLE_VERSION = 1
#: The most a CSR may weigh (PEM). A P-256 CSR is ~500 bytes; anything near this is not one of ours.
MAX_CSR_BYTES = 4096
#: How long a remote site's certificate lives (never past the CA); it renews when a third is left.
REMOTE_CERT_LIFETIME = dt.timedelta(days=7)
RENEW_WHEN_LEFT = 1 / 3
#: Curves a site key may use: P-256 like every other fedkube key, P-384 for sites whose policy demands it.
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class EnrollmentRefused(FedkubeError):
    """An enrollment or renewal request refused; ``reason`` is the metric label, the message says why and the fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Refusal labels of fedkube_server_enrollments_total{reason}: a fixed set, so the metric's series stay bounded.
NO_TOKEN = "no_token"
TOKEN_MALFORMED = "token_malformed"
TOKEN_OTHER_JOB = "token_other_job"
TOKEN_UNKNOWN_SITE = "token_unknown_site"
TOKEN_WRONG_SITE = "token_wrong_site"
TOKEN_INVALID = "token_invalid"
TOKEN_EXPIRED = "token_expired"
TOKEN_REPLAYED = "token_replayed"
CSR_INVALID = "csr_invalid"
CSR_TOO_LARGE = "csr_too_large"
CSR_KEY = "csr_key"
RENEW_NO_CERT = "renew_no_certificate"
RENEW_NOT_REMOTE = "renew_not_remote"
RENEW_REVOKED = "renew_revoked"
SITE_REVOKED = "site_revoked"  # the job's spec.revokedSites names the site (fedkube.server.revocation)
BAD_REQUEST = "bad_request"
REFUSALS = (
    NO_TOKEN, TOKEN_MALFORMED, TOKEN_OTHER_JOB, TOKEN_UNKNOWN_SITE, TOKEN_WRONG_SITE, TOKEN_INVALID, TOKEN_EXPIRED,
    TOKEN_REPLAYED, CSR_INVALID, CSR_TOO_LARGE, CSR_KEY, RENEW_NO_CERT, RENEW_NOT_REMOTE, RENEW_REVOKED, SITE_REVOKED,
    BAD_REQUEST,
)  # fmt: skip


# --- tokens ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRecord:
    """What the server knows of one site's join token: its SHA-256 and when it expires (never the token)."""

    sha256: str
    expires_at: float  # Unix seconds

    def to_dict(self) -> dict[str, object]:
        return {"sha256": self.sha256, "expiresAt": self.expires_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TokenRecord:
        sha, exp = data.get("sha256"), data.get("expiresAt")
        if not isinstance(sha, str) or len(sha) != 64 or not isinstance(exp, (int, float)):
            raise ValueError(f"a join token record needs sha256 (64 hex) and expiresAt (seconds), got {dict(data)}")
        return cls(sha256=sha, expires_at=float(exp))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def derive_token(ca: pki.Issued, namespace: str, job: str, site: str, salt: str) -> str:
    """The join token of ``site``: readable binding plus an HMAC under a key derived from the job CA's key.

    ``salt`` changes whenever new tokens are wanted (the operator passes the server certificate's serial).
    """
    key = hashlib.sha256(b"fedkube join token key\0" + ca.key_pem()).digest()
    msg = f"{namespace}/{job}/{site}/{salt}".encode()
    secret = base64.urlsafe_b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode().rstrip("=")
    return f"{TOKEN_PREFIX}.{pki.check_label('namespace', namespace)}.{pki.check_label('job', job)}." \
           f"{pki.check_label('site', site)}.{secret}"


@dataclass(frozen=True)
class TokenClaim:
    namespace: str
    job: str
    site: str


def parse_token(token: str) -> TokenClaim:
    if not token:
        raise EnrollmentRefused(NO_TOKEN, "the request carries no join token; fix: run `fedkube join` with the "
                                          "site's join bundle (it holds the token)")
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != TOKEN_PREFIX or not parts[4] or len(token) > 512:
        raise EnrollmentRefused(TOKEN_MALFORMED, f"the join token is not of the form {TOKEN_PREFIX}.<namespace>."
                                "<job>.<site>.<secret>; fix: copy the token from the job's join bundle unchanged")
    return TokenClaim(parts[1], parts[2], parts[3])


def check_token(
    token: str,
    *,
    namespace: str,
    job: str,
    site: str,
    records: Mapping[str, TokenRecord],
    consumed: set[str] | frozenset[str],
    now: float,
) -> str:
    """The token's hash if ``token`` may enroll ``site`` (the site the request names) now; EnrollmentRefused else.

    The order of checks gives the most useful reason: which job and site the token is for (readable), then
    whether it is the real one (hash), then whether it is still good (expiry, spent).
    """
    claim = parse_token(token)
    if (claim.namespace, claim.job) != (namespace, job):
        raise EnrollmentRefused(TOKEN_OTHER_JOB, f"the join token is for job {claim.namespace}/{claim.job}, this "
                                f"server runs {namespace}/{job}; fix: use this job's join bundle")
    if claim.site != site:
        raise EnrollmentRefused(TOKEN_WRONG_SITE, f"the join token is for site {claim.site!r}, the request enrolls "
                                f"site {site!r}; fix: use the join bundle {job}-join-{site}")
    record = records.get(site)
    if record is None:
        raise EnrollmentRefused(TOKEN_UNKNOWN_SITE, f"site {site!r} is not a remote site of job {namespace}/{job}; "
                                "fix: set remote: true on it in the FLJob's spec.clients")
    digest = token_hash(token)
    if not hmac.compare_digest(digest, record.sha256):
        raise EnrollmentRefused(TOKEN_INVALID, f"the join token for site {site!r} is not the one this job issued "
                                "(an old bundle from before a resume, or altered); fix: ask the job owner for the "
                                f"current {job}-join-{site} Secret")
    if digest in consumed:
        raise EnrollmentRefused(TOKEN_REPLAYED, f"the join token for site {site!r} was already used; a token "
                                "enrolls once; fix: renew with the site's certificate, or ask the job owner for a "
                                "new bundle (suspend and resume the job issues new tokens)")
    if now >= record.expires_at:
        stamp = dt.datetime.fromtimestamp(record.expires_at, dt.timezone.utc).isoformat()
        raise EnrollmentRefused(TOKEN_EXPIRED, f"the join token for site {site!r} expired at {stamp}; fix: ask the "
                                "job owner for a new bundle (suspend and resume the job issues new tokens)")
    return digest


# --- the join bundle ---------------------------------------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, as ``sha256:<hex>`` (what a site admin compares out of band)."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class JoinBundle:
    """What the job owner hands a remote site's admin: where the server is, how to know it, and the token."""

    namespace: str
    job: str
    site: str
    server_name: str  # the name the site checks on the server certificate
    addresses: tuple[str, ...]  # host:port of the gRPC, bulk and enrollment ports, per external address
    grpc_port: int
    bulk_port: int
    enroll_port: int
    ca_pem: str
    ca_sha256: str
    token: str
    expires_at: str  # RFC 3339

    def to_json(self) -> str:
        data = {"kind": BUNDLE_KIND, "version": BUNDLE_VERSION, **asdict(self)}
        data["addresses"] = list(self.addresses)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_text(cls, text: str) -> JoinBundle:
        """A bundle from its JSON (or YAML: JSON is YAML) text; ConfigError-like FedkubeError naming the field."""
        try:
            data = json.loads(text)
        except ValueError:
            import yaml  # a bundle a human re-saved as YAML

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise FedkubeError(f"the join bundle is neither JSON nor YAML: {exc}") from exc
        if not isinstance(data, dict) or data.get("kind") != BUNDLE_KIND or data.get("version") != BUNDLE_VERSION:
            raise FedkubeError(f"not a join bundle (kind {BUNDLE_KIND}, version {BUNDLE_VERSION}); fix: pass the "
                               "bundle.json of the job's {job}-join-{site} Secret")
        fields: dict[str, Any] = {f: data.get(f) for f in cls.__dataclass_fields__}
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise FedkubeError(f"the join bundle lacks {missing}; fix: take it again from the job's Secret")
        fields["addresses"] = tuple(str(a) for a in fields["addresses"])
        try:
            bundle = cls(**fields)
            ca = x509.load_pem_x509_certificate(str(bundle.ca_pem).encode())
        except (TypeError, ValueError) as exc:
            raise FedkubeError(f"the join bundle is malformed: {exc}; fix: take it again from its Secret") from exc
        if fingerprint(ca) != bundle.ca_sha256:
            raise FedkubeError(f"the join bundle's CA certificate has fingerprint {fingerprint(ca)}, the bundle says "
                               f"{bundle.ca_sha256}; the bundle was altered; fix: get it again from the job owner")
        return bundle

    @property
    def host(self) -> str:
        return self.addresses[0] if self.addresses else self.server_name


# --- signing ------------------------------------------------------------------------------------------------


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """A CSR within bounds whose self-signature holds and whose key is an allowed EC key."""
    raw = pem.encode() if isinstance(pem, str) else pem
    if len(raw) > MAX_CSR_BYTES:
        raise EnrollmentRefused(CSR_TOO_LARGE, f"the CSR has {len(raw)} bytes, at most {MAX_CSR_BYTES} are "
                                "accepted; fix: send a CSR of one ECDSA P-256 key without extra attributes")
    try:
        csr = x509.load_pem_x509_csr(raw)
    except ValueError as exc:
        raise EnrollmentRefused(CSR_INVALID, f"the CSR cannot be parsed: {exc}; fix: send a PEM CSR") from exc
    if not csr.is_signature_valid:
        raise EnrollmentRefused(CSR_INVALID, "the CSR's signature does not verify with its own key (the sender "
                                "does not hold the key); fix: sign the CSR with the site's key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ALLOWED_CURVES):
        raise EnrollmentRefused(CSR_KEY, f"the CSR's key is {type(key).__name__}, only ECDSA P-256 or P-384 keys "
                                "are signed; fix: make the site key with `fedkube join` (P-256)")
    return csr


def sign_site_csr(
    ca: pki.Issued, csr: x509.CertificateSigningRequest, namespace: str, job: str, site: str, now: dt.datetime
) -> x509.Certificate:
    """The site certificate for the CSR's key: SAN exactly ``pki.site_uri`` of the token's site, clientAuth only.

    Nothing of the CSR but its public key is used: a CSR asking for another site's URI, a server name or CA rights
    gets the same certificate as any other.
    """
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # load_csr checked it
    not_after = min(now + REMOTE_CERT_LIFETIME, ca.cert.not_valid_after_utc)
    validity = pki.Validity(now - pki.CLOCK_SKEW, not_after)
    subject = x509.Name([
        x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "fedkube"),
        x509.NameAttribute(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME, f"{namespace}/{job}"),
        x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"remote site {site}"[:64]),
    ])  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(pki.site_uri(namespace, job, site))]),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


def new_site_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, site: str) -> bytes:
    """The CSR a site sends: its public key and a subject for humans; the server decides the identity."""
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"remote site {site}"[:64])])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def needs_renewal(cert: x509.Certificate, now: dt.datetime) -> bool:
    """True when less than a third of the certificate's lifetime is left."""
    total = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < total * RENEW_WHEN_LEFT
