"""Who is calling: the one identity check of every server entry point.

The Control service (Connect, Push), the Download service (an interceptor)
and the bulk port all call :meth:`Authenticator.authenticate` with the site
name and token the caller presented; what comes back is the identity the
handler uses from then on, never a name the request carries elsewhere.

With mutual TLS the site is the one the client certificate names
(``cert_site``, read by :meth:`Authenticator.call_identity` on gRPC and by the
bulk listener after its handshake); the token stays as a second factor and
must be that same site's (a certificate of A with the token of B is refused,
``token_site_mismatch``), and a remote site's certificate must not be one a
renewal superseded (:mod:`fedkube.server.supersede`, ``superseded``). Without
TLS the token is the only factor.

On the gRPC port a failed handshake (another CA, expired, no certificate,
plaintext, the server's certificate as a client's) ends inside gRPC's core:
no servicer or interceptor runs, so it is neither logged here nor counted
(gRPC's own log has the line). Certificates that chain to the job CA but name
no site of this job, and token mismatches, are counted with their reason.
The bulk port counts every refusal (:class:`fedkube.transfer.bulk.BulkServer`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from fedkube.metrics.server import ServerMetrics
from fedkube.protocol import AUTH_METADATA, BEARER, RECEIVER_MISMATCH, SITE_METADATA
from fedkube.security.contexts import GRPC_PEER_CERT_KEY, TOKEN_SITE_MISMATCH, grpc_peer_site_identity
from fedkube.security.identity import PeerIdentityError
from fedkube.server.revocation import REVOKED, RevokedSites
from fedkube.server.supersede import Supersession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """A caller whose token matched: the job's client ``site``."""

    site: str


class AuthError(Exception):
    """A refused caller: the status to end the call with, and the ``reason`` it is counted under."""

    def __init__(self, site: str, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.site = site
        self.code = code
        self.reason = reason
        self.message = message


def credentials_from_metadata(metadata: Sequence[tuple[str, Any]] | None) -> tuple[str, bytes]:
    """(site, token) as a gRPC call presents them (``x-fedkube-site``, ``authorization: Bearer ...``)."""
    md = dict(metadata or ())
    auth = str(md.get(AUTH_METADATA, ""))
    token = auth[len(BEARER) :].encode() if auth.startswith(BEARER) else b""
    return str(md.get(SITE_METADATA, "")), token


class Authenticator:
    """Checks a site's token against the job's; refusals are logged and counted (``connections_rejected``)."""

    def __init__(
        self, job: str, tokens: Mapping[str, bytes], metrics: ServerMetrics | None = None, *,
        tls_namespace: str | None = None, supersession: Supersession | None = None,
        revoked: Container[str] = frozenset(),
    ) -> None:  # fmt: skip
        """``tls_namespace``: the job's namespace when gRPC calls come over mutual TLS (None: plaintext);
        ``supersession``: refuses remote sites' certificates replaced by a renewal (with TLS only);
        ``revoked``: sites refused whatever they present (:mod:`fedkube.server.revocation`), read on every call."""
        self._job = job
        self._tokens = dict(tokens)
        self._metrics = metrics
        self._tls_namespace = tls_namespace
        self._supersession = supersession
        self._revoked = revoked

    @property
    def tls(self) -> bool:
        """Whether calls come over mutual TLS (their certificate names the site)."""
        return self._tls_namespace is not None

    def call_identity(self, context: grpc.ServicerContext, *, what: str) -> Identity:
        """The identity of a gRPC call: its certificate's site (with TLS) bound to its token; or AuthError."""
        site, token = credentials_from_metadata(context.invocation_metadata())
        return self.authenticate(site, token, what=what, peer=context.peer(), cert_site=self.cert_site(
            context, what=what, claimed=site))  # fmt: skip

    def verified_site(self, metadata: Sequence[tuple[str, Any]] | None, context: grpc.ServicerContext) -> str | None:
        """The site a call's credentials prove (token, and certificate with TLS), or None; never logs or counts.

        For limits kept per site (:mod:`fedkube.server.admission`): a caller it returns None for is
        refused by the entry point's own check, which logs and counts the reason.
        """
        site, token = credentials_from_metadata(metadata)
        expected = self._tokens.get(site)
        if expected is None or not hmac.compare_digest(token, expected) or site in self._revoked:
            return None
        if self._tls_namespace is not None:
            try:
                peer = grpc_peer_site_identity(context, namespace=self._tls_namespace, job=self._job)
            except PeerIdentityError:
                return None
            if peer.site != site:
                return None
        return site

    def cert_site(self, context: grpc.ServicerContext, *, what: str, claimed: str = "") -> str | None:
        """The site the call's client certificate names (None without TLS); AuthError when it names none of
        this job's (the handshake already checked the CA and the dates)."""
        if self._tls_namespace is None:
            return None
        try:
            site = grpc_peer_site_identity(context, namespace=self._tls_namespace, job=self._job).site
        except PeerIdentityError as exc:
            raise self.refuse(AuthError(claimed, grpc.StatusCode.PERMISSION_DENIED, exc.reason, str(exc)),
                              what, context.peer()) from None
        if self._supersession is not None:
            refusal = self._supersession.check(site, context.auth_context()[GRPC_PEER_CERT_KEY][0])
            if refusal is not None:
                raise self.refuse(AuthError(site, grpc.StatusCode.PERMISSION_DENIED, *refusal), what, context.peer())
        return site

    def authenticate(
        self, site: str, token: bytes | str, *, what: str, peer: str = "", cert_site: str | None = None,
        plane: str = "grpc",
    ) -> Identity:  # fmt: skip
        """The identity of a caller presenting ``site`` and ``token``; raises :class:`AuthError` otherwise.

        ``what`` names the entry point for the log ("call", "a bulk request"); ``cert_site`` is the site its
        TLS certificate names (None without TLS), which ``site`` and the token must both be.
        """
        given = token.encode() if isinstance(token, str) else token
        if cert_site is not None and site != cert_site:
            raise self.refuse(AuthError(site, grpc.StatusCode.PERMISSION_DENIED, TOKEN_SITE_MISMATCH, (
                f"the client certificate is site {cert_site!r}'s but the caller names site {site!r}; a site acts "
                "only as itself; fix: give each sidecar its own site's certificate and token"
            )), what, peer, plane)  # fmt: skip
        expected = self._tokens.get(site)
        if expected is None:
            raise self.refuse(AuthError(site, grpc.StatusCode.PERMISSION_DENIED, "UnknownSite", (
                f"site {site!r} is not a client of job {self._job!r}; fix: name one of the job's clients "
                f"(the {SITE_METADATA} metadata on gRPC, BulkRequest.site on the bulk port)"
            )), what, peer, plane)  # fmt: skip
        # Constant time, so the comparison does not leak how much of a guess was right.
        if not hmac.compare_digest(given, expected):
            if cert_site is not None and any(hmac.compare_digest(given, t) for t in self._tokens.values()):
                raise self.refuse(AuthError(site, grpc.StatusCode.PERMISSION_DENIED, TOKEN_SITE_MISMATCH, (
                    f"site {site!r} (by its certificate) presented another site's token; fix: give each "
                    "sidecar the token of its own site"
                )), what, peer, plane)  # fmt: skip
            raise self.refuse(AuthError(site, grpc.StatusCode.UNAUTHENTICATED, "BadToken", (
                f"missing or wrong token for site {site!r}; fix: send 'authorization: Bearer <token>' "
                "(BulkRequest.token on the bulk port) with the token from the site's secret"
            )), what, peer, plane)  # fmt: skip
        if site in self._revoked:  # after the token: a stranger guessing names learns nothing of revocations
            raise self.refuse(AuthError(site, grpc.StatusCode.PERMISSION_DENIED, REVOKED, RevokedSites.message(site)),
                              what, peer, plane)
        return Identity(site)

    def check_receiver(
        self, identity: Identity, receiver: str, *, what: str, peer: str = "", plane: str = "grpc"
    ) -> None:
        """Refuse a request whose ``receiver`` is not the authenticated site (raises :class:`AuthError`).

        Without it one site could fetch another's copy and report it complete, which releases the
        round's model before the real receiver has it.
        """
        if receiver != identity.site:
            raise self.refuse(AuthError(identity.site, grpc.StatusCode.PERMISSION_DENIED, RECEIVER_MISMATCH, (
                f"site {identity.site!r} asked as receiver {receiver!r}; a site fetches and completes only its "
                "own transfers; fix: set the request's receiver to the site the token belongs to"
            )), what, peer, plane)  # fmt: skip

    def refuse(self, error: AuthError, what: str, peer: str = "", plane: str = "grpc") -> AuthError:
        """Log and count ``error`` (also for refusals decided after authentication); returns it, to raise."""
        if self._metrics is not None:
            self._metrics.connection_rejected(error.reason, plane)
        log.warning("job %s: refused %s from site %r: %s (reason %s%s)", self._job, what, error.site, error.message,
                    error.reason, f", peer {peer}" if peer else "")
        return error

    def authorize_bulk(
        self, site: str, token: str, receiver: str | None = None, cert_site: str | None = None, peer: str = ""
    ) -> tuple[grpc.StatusCode | None, str]:
        """The bulk port's ``authorize`` callback (:class:`fedkube.transfer.bulk.BulkServer`).

        ``receiver`` is the fetch's or completion's receiver (None for an upload): it must be ``site``.
        ``cert_site`` is the site of the connection's client certificate (None without TLS).
        """
        what = "a bulk request"
        try:
            identity = self.authenticate(site, token, what=what, peer=peer, cert_site=cert_site, plane="bulk")
            if receiver is not None:
                self.check_receiver(identity, receiver, what=what, peer=peer, plane="bulk")
        except AuthError as exc:
            return exc.code, exc.message
        return None, ""


__all__ = ["AuthError", "Authenticator", "Identity", "credentials_from_metadata"]
