"""A certificate authority per FLJob, and the certificates it issues.

Every FLJob gets its own CA, so a certificate of one job is worthless on another job's server even before the
identity check, and throwing the job away throws its trust away with it. Keys are ECDSA P-256: fast to make
(a job with hundreds of sites is provisioned in milliseconds), supported by every TLS 1.3 stack, including
gRPC's BoringSSL and Python's OpenSSL.

Identity: a site certificate carries exactly one SAN URI,

    spiffe://fedkube.dev/ns/<namespace>/job/<job>/site/<site>

* a SAN URI rather than the subject CN, because using the CN for identity is deprecated (RFC 6125 §6.4.4,
  RFC 9525 drops it) and a CN is one free-form string, while a URI carries namespace, job and site as separate,
  unambiguous path segments (every segment is a DNS-1123 label, so it never contains '/');
* the SPIFFE ID shape (trust domain, then a path) so that a SPIRE- or cert-manager-issued identity of the same
  form can replace ours later without touching the verifier (`fedkube.security.identity`);
* the namespace and the job are in it, not only the site, so that the identity is bound to one job even when
  two jobs share a CA brought by the user.

The server certificate is for DNS names only (`<job>-server`, `<job>-server.<ns>`, `<job>-server.<ns>.svc`,
plus extra names or IPs, e.g. localhost/127.0.0.1 in local mode); it carries no URI, so it can never pass as a
site.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedkube.errors import ConfigError

TRUST_DOMAIN = "fedkube.dev"
SPIFFE_SCHEME = "spiffe"

# Same rule as fedkube.spec.model.DNS1123_LABEL (not imported: this module stays free of pydantic and the spec).
_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# Validity bounds. The minimum leaves a short job room for a restart or a slow registration; the maximum keeps a
# leaked key from staying useful for long (a longer job gets new certificates when it is resumed).
MIN_VALIDITY = dt.timedelta(hours=24)
MAX_VALIDITY = dt.timedelta(days=90)
# Clocks of the operator's node and the sites' nodes are not in sync; a certificate made "now" must already be
# valid on a node whose clock is a few minutes behind.
CLOCK_SKEW = dt.timedelta(minutes=5)
# Time before round 1 starts: pods are scheduled and images pulled (deploySeconds), then clients register
# (registrationSeconds); defaults of the FLJob spec.
DEFAULT_REGISTRATION_MARGIN = dt.timedelta(seconds=600 + 600)


@dataclass(frozen=True)
class Validity:
    """The validity window of a certificate, in UTC."""

    not_before: dt.datetime
    not_after: dt.datetime

    def __post_init__(self) -> None:
        if self.not_before.tzinfo is None or self.not_after.tzinfo is None:
            raise ConfigError("certificate validity needs timezone-aware datetimes; fix: pass tzinfo=datetime.UTC")
        if self.not_after <= self.not_before:
            raise ConfigError(
                f"certificate validity ends ({self.not_after.isoformat()}) before it starts "
                f"({self.not_before.isoformat()}); fix: pass a not_after later than not_before"
            )


def job_validity(
    *,
    rounds: int,
    round_seconds: float,
    ttl_seconds_after_finished: int | None,
    registration_margin: dt.timedelta = DEFAULT_REGISTRATION_MARGIN,
    now: dt.datetime | None = None,
    minimum: dt.timedelta = MIN_VALIDITY,
    maximum: dt.timedelta = MAX_VALIDITY,
    clock_skew: dt.timedelta = CLOCK_SKEW,
) -> Validity:
    """How long a job's certificates live: the whole job at its deadlines, then its time after finishing.

    not_after = now + registration_margin + rounds * round_seconds + ttl_seconds_after_finished, clamped to
    [now + minimum, now + maximum]; not_before = now - clock_skew. `ttl_seconds_after_finished` None (pods kept
    until the job is deleted) counts as 0: the certificates protect traffic, and a finished job has none.
    """
    if rounds < 1 or round_seconds <= 0:
        raise ConfigError(f"job validity needs rounds >= 1 and round_seconds > 0, got {rounds} and {round_seconds}")
    if minimum > maximum:
        raise ConfigError(f"certificate validity minimum ({minimum}) is above the maximum ({maximum})")
    start = now if now is not None else dt.datetime.now(dt.timezone.utc)
    ttl = dt.timedelta(seconds=ttl_seconds_after_finished or 0)
    # Seconds, not a timedelta product, so that 1e6 rounds of a long deadline cannot overflow timedelta.
    job_seconds = registration_margin.total_seconds() + rounds * round_seconds + ttl.total_seconds()
    lifetime = dt.timedelta(seconds=min(max(job_seconds, minimum.total_seconds()), maximum.total_seconds()))
    return Validity(not_before=start - clock_skew, not_after=start + lifetime)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key, PKCS#8 PEM, unencrypted: it is protected by file mode or a Secret, not a passphrase."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def check_label(what: str, value: str) -> str:
    """`value` if it is a DNS-1123 label, else a ConfigError naming `what`."""
    if not _LABEL_RE.match(value) or len(value) > 63:
        raise ConfigError(
            f"{what} {value!r} is not a DNS-1123 label; it goes into certificate names and identities; "
            "fix: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
        )
    return value


def site_uri(namespace: str, job: str, site: str) -> str:
    """The SAN URI that identifies `site` of `job` in `namespace` (see the module docstring for why)."""
    ns, j, s = check_label("namespace", namespace), check_label("job", job), check_label("site", site)
    return f"{SPIFFE_SCHEME}://{TRUST_DOMAIN}/ns/{ns}/job/{j}/site/{s}"


def server_dns_names(namespace: str, job: str) -> list[str]:
    """The names under which sites reach the job's server Service inside the cluster."""
    svc = f"{check_label('job', job)}-server"
    check_label("server Service name", svc)
    ns = check_label("namespace", namespace)
    return [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc"]


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, namespace: str, job: str) -> x509.Name:
    # The subject is for humans reading logs and `openssl x509`; identity is only ever taken from the SAN.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedkube"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{namespace}/{job}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _leaf_builder(
    ca: Issued, subject: x509.Name, key: ec.EllipticCurvePrivateKey, validity: Validity
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs) only; a leaf signs handshakes only (ECDSA: no key encipherment)."""
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )


def make_job_ca(namespace: str, job: str, validity: Validity) -> Issued:
    """A self-signed CA for one job: it may sign leaf certificates only (path length 0)."""
    check_label("namespace", namespace)
    check_label("job", job)
    key = _new_key()
    name = _name(f"fedkube job CA {namespace}/{job}", namespace, job)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def issue_server_cert(
    ca: Issued,
    namespace: str,
    job: str,
    validity: Validity,
    *,
    extra_dns: Iterable[str] = (),
    extra_ips: Iterable[str] = (),
) -> Issued:
    """The job server's certificate: the in-cluster Service names plus `extra_dns`/`extra_ips`, serverAuth only."""
    names = server_dns_names(namespace, job) + [d for d in extra_dns if d]
    try:
        ips = [ipaddress.ip_address(ip) for ip in extra_ips]
    except ValueError as exc:
        raise ConfigError(f"server certificate of job {namespace}/{job}: {exc}; fix: pass IP literals") from exc
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(names)]
    san += [x509.IPAddress(ip) for ip in dict.fromkeys(ips)]
    key = _new_key()
    cert = (
        _leaf_builder(ca, _name(names[0], namespace, job), key, validity)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def issue_site_cert(ca: Issued, namespace: str, job: str, site: str, validity: Validity) -> Issued:
    """A site's client certificate: one SAN URI (`site_uri`) and clientAuth only."""
    uri = site_uri(namespace, job, site)
    key = _new_key()
    cert = (
        _leaf_builder(ca, _name(f"site {site}", namespace, job), key, validity)
        # Critical: the subject is not the identity, so a verifier that does not read the SAN must refuse it.
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def load_issued(cert_pem: bytes, key_pem: bytes) -> Issued:
    """The inverse of `Issued.cert_pem`/`key_pem` (e.g. the job CA read back from its Secret)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"expected an ECDSA private key, got {type(key).__name__}; fix: use a P-256 key")
    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.public_key() != key.public_key():
        raise ConfigError("the private key does not belong to the certificate; fix: pass the matching pair")
    return Issued(cert=cert, key=key)


@dataclass(frozen=True)
class TlsFiles:
    """Where one party's TLS material lies on disk: the job CA certificate, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with file ``mode``, atomically (a private-mode temporary file, fsynced, renamed)."""
    # Write a temporary file created with the final mode, then rename: the key is never readable by others, not
    # even for an instant, and a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask and ignored for an existing file
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_bundle(directory: Path, name: str, ca_cert: x509.Certificate, issued: Issued) -> TlsFiles:
    """Write `ca.crt`, `<name>.crt` and `<name>.key` into `directory` (made 0700; the key 0600, certs 0644)."""
    check_label("bundle name", name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    files = TlsFiles(ca=directory / "ca.crt", cert=directory / f"{name}.crt", key=directory / f"{name}.key")
    write_file(files.key, issued.key_pem(), 0o600)
    write_file(files.cert, issued.cert_pem(), 0o644)
    write_file(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files
