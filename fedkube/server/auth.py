"""Who is calling: the one token check of every server entry point.

The Control service (Connect, Push), the Download service (an interceptor)
and the bulk port all call :meth:`Authenticator.authenticate` with the site
name and token the caller presented; what comes back is the identity the
handler uses from then on, never a name the request carries elsewhere.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from fedkube.metrics.server import ServerMetrics
from fedkube.protocol import AUTH_METADATA, BEARER, RECEIVER_MISMATCH, SITE_METADATA

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

    def __init__(self, job: str, tokens: Mapping[str, bytes], metrics: ServerMetrics | None = None) -> None:
        self._job = job
        self._tokens = dict(tokens)
        self._metrics = metrics

    def authenticate(self, site: str, token: bytes | str, *, what: str, peer: str = "") -> Identity:
        """The identity of a caller presenting ``site`` and ``token``; raises :class:`AuthError` otherwise.

        ``what`` names the entry point for the log ("call", "a bulk request").
        """
        given = token.encode() if isinstance(token, str) else token
        expected = self._tokens.get(site)
        if expected is None:
            raise self.refuse(AuthError(site, grpc.StatusCode.PERMISSION_DENIED, "UnknownSite", (
                f"site {site!r} is not a client of job {self._job!r}; fix: name one of the job's clients "
                f"(the {SITE_METADATA} metadata on gRPC, BulkRequest.site on the bulk port)"
            )), what, peer)  # fmt: skip
        # Constant time, so the comparison does not leak how much of a guess was right.
        if not hmac.compare_digest(given, expected):
            raise self.refuse(AuthError(site, grpc.StatusCode.UNAUTHENTICATED, "BadToken", (
                f"missing or wrong token for site {site!r}; fix: send 'authorization: Bearer <token>' "
                "(BulkRequest.token on the bulk port) with the token from the site's secret"
            )), what, peer)  # fmt: skip
        return Identity(site)

    def check_receiver(self, identity: Identity, receiver: str, *, what: str, peer: str = "") -> None:
        """Refuse a request whose ``receiver`` is not the authenticated site (raises :class:`AuthError`).

        Without it one site could fetch another's copy and report it complete, which releases the
        round's model before the real receiver has it.
        """
        if receiver != identity.site:
            raise self.refuse(AuthError(identity.site, grpc.StatusCode.PERMISSION_DENIED, RECEIVER_MISMATCH, (
                f"site {identity.site!r} asked as receiver {receiver!r}; a site fetches and completes only its "
                "own transfers; fix: set the request's receiver to the site the token belongs to"
            )), what, peer)  # fmt: skip

    def refuse(self, error: AuthError, what: str, peer: str = "") -> AuthError:
        """Log and count ``error`` (also for refusals decided after authentication); returns it, to raise."""
        if self._metrics is not None:
            self._metrics.connection_rejected(error.reason)
        log.warning("job %s: refused %s from site %r: %s%s", self._job, what, error.site, error.message,
                    f" (peer {peer})" if peer else "")
        return error

    def authorize_bulk(self, site: str, token: str, receiver: str | None = None) -> tuple[grpc.StatusCode | None, str]:
        """The bulk port's ``authorize`` callback (:class:`fedkube.transfer.bulk.BulkServer`).

        ``receiver`` is the fetch's or completion's receiver (None for an upload): it must be ``site``.
        """
        try:
            identity = self.authenticate(site, token, what="a bulk request")
            if receiver is not None:
                self.check_receiver(identity, receiver, what="a bulk request")
        except AuthError as exc:
            return exc.code, exc.message
        return None, ""


__all__ = ["AuthError", "Authenticator", "Identity", "credentials_from_metadata"]
