"""Which certificates of a remote site the gRPC (7070) and bulk (8471) ports still accept after a renewal.

TLS checks a site certificate's CA signature and dates; the identity check (:mod:`fedkube.security.identity`) its
site. A remote site's certificate is also in the enrollment ledger (``current``: the serial of its newest
certificate), and this is where that ledger is enforced on the job's ports: once a site renewed, its previous
certificate is *superseded*. A key stolen from a site that has renewed since is then worth nothing, without CRLs.

The previous serial is still accepted for a short grace, because the site's own connections switch over only as
they are made anew (a sidecar reads the renewed files for its next connection; a kubelet takes up to a minute or
two to swap a renewed Secret into the pod): until the new certificate was seen on either port, and at most
:data:`GRACE_S` after the renewal, whichever comes first. The first use of the new certificate proves the site
has it; after that only a copy of the old key would still present the old one. The bound keeps a site that never
switches (or an attacker holding the old key of a site that went quiet) from living on the old certificate.
Connections already open are not cut: a renewal is not a revocation of the site.

Refusals are counted as ``superseded`` in ``fedkube_server_rejected_connections_total{reason, plane}``.
Sites without a ledger entry (in-cluster sites, whose certificates the operator issues, or a remote site whose
ledger a new server pod lost with its emptyDir) are not checked here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from cryptography import x509

from fedkube.security.contexts import SUPERSEDED

log = logging.getLogger(__name__)

#: The longest the previous certificate is accepted after a renewal when the new one has not been seen yet.
GRACE_S = 600.0


@dataclass
class _Previous:
    serial: str
    until: float  # monotonic
    new_seen: bool = False


class Supersession:
    """The serial check of remote sites' certificates; ``issued`` is called by the enrollment port."""

    def __init__(self, remote_sites: Collection[str], *, grace_s: float = GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._remote = frozenset(remote_sites)
        self._grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._current: Mapping[str, str] = {}  # the ledger's site -> serial (hex), attached when enrollment starts
        self._previous: dict[str, _Previous] = {}

    def attach(self, current: Mapping[str, str]) -> None:
        """Read the current serials from the enrollment ledger's ``current`` (kept up to date by its owner)."""
        self._current = current

    def issued(self, site: str, old: str | None, new: str) -> None:
        """``site`` got certificate ``new``; ``old`` (its current one until now) enters its grace."""
        if old is None or old == new:
            return
        with self._lock:
            self._previous[site] = _Previous(old, self._clock() + self._grace_s)
        log.info("site %s: certificate %s supersedes %s; the old one is accepted until the new one is first used, "
                 "%.0f s at most", site, new, old, self._grace_s)

    def check(self, site: str, cert: bytes | x509.Certificate) -> tuple[str, str] | None:
        """None when ``site`` may connect with ``cert`` (DER, PEM or parsed); else (reason, message)."""
        if site not in self._remote:
            return None
        current = self._current.get(site)
        if current is None:
            return None
        serial = format(_load(cert).serial_number, "x")
        with self._lock:
            previous = self._previous.get(site)
            if serial == current:
                if previous is not None and not previous.new_seen:
                    previous.new_seen = True
                    log.info("site %s: renewed certificate %s in use; %s is refused from now on", site, serial,
                             previous.serial)
                return None
            if (previous is not None and previous.serial == serial and not previous.new_seen
                    and self._clock() < previous.until):  # fmt: skip
                return None
        return SUPERSEDED, (
            f"site {site!r} presented certificate {serial}, which certificate {current} superseded at a renewal; "
            "a site's old certificate is refused once its new one is in use; fix: give the site its newest "
            "certificate (a running sidecar uses it for its next connection), or enroll it again with a new bundle"
        )


def _load(cert: bytes | x509.Certificate) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if cert.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(cert)
    return x509.load_der_x509_certificate(cert)


__all__ = ["GRACE_S", "SUPERSEDED", "Supersession"]
