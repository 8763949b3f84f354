"""TLS contexts and gRPC credentials for mutual TLS between a job's server and its sites.

Both planes trust the job CA and nothing else: never the system store (a public CA must not be able to vouch
for a job's server or sites), and both sides present a certificate.

* Bulk plane (plain TCP today): `server_ssl_context` / `client_ssl_context`, TLS 1.3 only; the server reads
  the site with `peer_site_identity`.
* gRPC plane: `grpc_server_credentials` / `grpc_channel_credentials`; the servicer reads the site with
  `grpc_peer_site_identity`. grpc's Python API (1.85) cannot raise the minimum TLS version (its BoringSSL
  accepts 1.2 and 1.3; grpc/grpc#37305, the Python options are in review in grpc/grpc#43045 and #43080), so on
  the gRPC plane a TLS 1.2 peer still needs a site certificate of this job, but is not refused for its version.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from fedkube.errors import ConfigError
from fedkube.security.identity import PeerIdentityError, SiteIdentity, load_certificate, site_identity
from fedkube.security.pki import TlsFiles

# The auth-context key under which gRPC puts the peer's verified leaf certificate (PEM).
GRPC_PEER_CERT_KEY = "x509_pem_cert"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS file {path}: {exc}; fix: provision the job's certificates") from exc


def _tls13(purpose: ssl._SSLMethod, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        # Only the job CA: PROTOCOL_TLS_* contexts load no default store unless asked, and we never ask.
        ctx.load_verify_locations(cafile=str(files.ca))
        ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS bundle (ca={files.ca}, cert={files.cert}, key={files.key}): {exc}; "
            "fix: provision the job's certificates again"
        ) from exc
    return ctx


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """The server side of the bulk plane: TLS 1.3 only, a client certificate from the job CA required."""
    return _tls13(ssl.PROTOCOL_TLS_SERVER, files)


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A site's side of the bulk plane: TLS 1.3 only, presents the site certificate, and verifies the server's
    certificate and name against the job CA. Wrap with `server_hostname=` one of the server certificate's names
    (`pki.server_dns_names`, or localhost in local mode)."""
    ctx = _tls13(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = True
    return ctx


def peer_site_identity(sock: ssl.SSLSocket, *, namespace: str, job: str) -> SiteIdentity:
    """The site at the other end of a server-side TLS socket whose handshake is done."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("no_client_certificate", "the peer presented no client certificate")
    return site_identity(der, namespace=namespace, job=job)


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """The gRPC server's credentials: its certificate, and a client certificate from the job CA required."""
    return grpc.ssl_server_credentials(
        [(_read(files.key), _read(files.cert))],
        root_certificates=_read(files.ca),
        require_client_auth=True,
    )


def grpc_channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """A site's gRPC channel credentials: the job CA as the only root, and the site's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca),
        private_key=_read(files.key),
        certificate_chain=_read(files.cert),
    )


def grpc_channel_options(server_name: str) -> list[tuple[str, str]]:
    """Channel options that check the server certificate for `server_name` whatever address is dialled (e.g.
    `<job>-server.<ns>.svc` while the channel goes to a port-forward on 127.0.0.1)."""
    return [("grpc.ssl_target_name_override", server_name)]


def grpc_peer_site_identity(context: grpc.ServicerContext, *, namespace: str, job: str) -> SiteIdentity:
    """The site calling a gRPC method, from the client certificate gRPC verified against the job CA."""
    certs = context.auth_context().get(GRPC_PEER_CERT_KEY, [])
    if not certs:
        raise PeerIdentityError(
            "no_client_certificate", f"the gRPC peer {context.peer()} presented no client certificate"
        )
    return site_identity(certs[0], namespace=namespace, job=job)


def peer_cert_not_after(context: grpc.ServicerContext) -> str:
    """When the gRPC peer's (verified) certificate expires, RFC 3339; "" without one (plaintext)."""
    certs = context.auth_context().get(GRPC_PEER_CERT_KEY, [])
    if not certs:
        return ""
    return load_certificate(certs[0]).not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- why a TLS connection was refused ---------------------------------------------------------------
#: Labels of `fedkube_server_rejected_connections_total{reason}` for refused handshakes, next to
#: `PeerIdentityError.reason` and the token check's: a fixed set, so the metric's series stay bounded.
NOT_TLS = "not_tls"  # plaintext (or garbage) on a TLS port
TLS_VERSION = "tls_version"  # a TLS 1.2 or older client
UNKNOWN_CA = "unknown_ca"  # a certificate not issued by this job's CA
CERT_EXPIRED = "cert_expired"
CERT_NOT_YET_VALID = "cert_not_yet_valid"
CERT_WRONG_PURPOSE = "cert_wrong_purpose"  # e.g. the server's certificate presented as a client's
CERT_INVALID = "cert_invalid"  # any other verification failure
NO_CLIENT_CERT = "no_client_certificate"  # the same label `grpc_peer_site_identity` uses
HANDSHAKE_FAILED = "tls_handshake"  # the peer hung up or broke the handshake otherwise
TOKEN_SITE_MISMATCH = "token_site_mismatch"  # the certificate's site and the token's (or request's) differ
SUPERSEDED = "superseded"  # a remote site's certificate replaced by a renewal (fedkube.server.supersede)
TLS_REFUSALS = (
    NOT_TLS, TLS_VERSION, UNKNOWN_CA, CERT_EXPIRED, CERT_NOT_YET_VALID, CERT_WRONG_PURPOSE, CERT_INVALID,
    NO_CLIENT_CERT, HANDSHAKE_FAILED, TOKEN_SITE_MISMATCH, SUPERSEDED, "no_identity", "several_identities", "other_job",
    "wrong_scheme", "wrong_trust_domain", "malformed_uri", "bad_certificate",
)  # fmt: skip

# OpenSSL's X509_V_ERR_* codes that have a label of their own.
_VERIFY_REASONS = {
    2: UNKNOWN_CA,  # unable to get issuer certificate
    9: CERT_NOT_YET_VALID,
    10: CERT_EXPIRED,
    18: UNKNOWN_CA,  # self-signed leaf
    19: UNKNOWN_CA,  # self-signed certificate in chain
    20: UNKNOWN_CA,  # unable to get local issuer certificate
    21: UNKNOWN_CA,  # unable to verify the first certificate
    26: CERT_WRONG_PURPOSE,  # unsuitable certificate purpose
}


def handshake_refusal(exc: BaseException) -> str:
    """The label of a failed server-side handshake (one of `TLS_REFUSALS`) from the exception `ssl` raised."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, CERT_INVALID)
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return NO_CLIENT_CERT
        if "UNSUPPORTED_PROTOCOL" in reason or "PROTOCOL_VERSION" in reason or "NO_PROTOCOLS_AVAILABLE" in reason:
            return TLS_VERSION
        if "HTTP_REQUEST" in reason or "WRONG_VERSION_NUMBER" in reason or "UNKNOWN_PROTOCOL" in reason:
            return NOT_TLS
        if "CERTIFICATE_VERIFY_FAILED" in reason:
            return CERT_INVALID
    return HANDSHAKE_FAILED
