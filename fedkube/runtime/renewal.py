"""``fedkube join``'s renewal while the site runs: a new certificate when a third of the lifetime is left.

A remote site's certificate lives 7 days (:data:`fedkube.security.enroll.REMOTE_CERT_LIFETIME`); a job may run
longer. :class:`RenewalLoop` sleeps until a third of the current certificate's lifetime is left (minus a random
share of up to :data:`JITTER_SHARE` of the lifetime, so that sites enrolled together do not all renew in the same
second), renews over the site's current mutual-TLS identity and writes the state directory atomically, where the
running sidecar reads it for its next connection (:mod:`fedkube.transfer.reload`). A failed renewal keeps the
still valid certificate and tries again with exponential backoff and jitter, never sleeping past the expiry.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from fedkube.errors import FedkubeError
from fedkube.security import enroll
from fedkube.security.enroll_wire import EnrollmentError
from fedkube.security.material import files_in

log = logging.getLogger(__name__)

JITTER_SHARE = 0.05
RETRY_BASE_S = 30.0
RETRY_MAX_S = 3600.0

Renew = Callable[[], str]
Clock = Callable[[], dt.datetime]
Delay = Callable[[x509.Certificate, dt.datetime, random.Random], float]


def renewal_delay(cert: x509.Certificate, now: dt.datetime, rng: random.Random) -> float:
    """Seconds from ``now`` until ``cert`` should be renewed (0 when it is already due)."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    due = cert.not_valid_after_utc - lifetime * enroll.RENEW_WHEN_LEFT - lifetime * JITTER_SHARE * rng.random()
    return max(0.0, (due - now).total_seconds())


def retry_delay(failures: int, cert: x509.Certificate, now: dt.datetime, rng: random.Random) -> float:
    """Backoff after the ``failures``-th failed renewal in a row: doubling from RETRY_BASE_S up to RETRY_MAX_S,
    with full jitter on its upper half, and at most half the time the certificate has left."""
    ceiling = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(failures - 1, 20))
    jittered = ceiling * (0.5 + 0.5 * rng.random())
    left = (cert.not_valid_after_utc - now).total_seconds()
    return max(1.0, min(jittered, left / 2)) if left > 2.0 else jittered  # expired: only re-enrolment helps now


class RenewalLoop:
    """Renews the certificate in ``state`` while the site runs; ``renew()`` does one renewal and writes the files."""

    def __init__(self, site: str, state: Path, renew: Renew, *, clock: Clock | None = None,
                 delay: Delay = renewal_delay, retry: Callable[[int, x509.Certificate, dt.datetime, random.Random],
                 float] = retry_delay, rng: random.Random | None = None) -> None:  # fmt: skip
        self.site = site
        self._cert_file = files_in(state).cert
        self._renew = renew
        self._clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self._delay = delay
        self._retry = retry
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renewal-{site}", daemon=True)
        self.renewals = 0  # done while running (tests and logs)

    def start(self) -> RenewalLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self._cert_file.read_bytes())

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                cert = self._cert()
            except (OSError, ValueError) as exc:
                log.error("site %s: cannot read the certificate %s (%s); renewal stops, the site runs until it "
                          "expires; fix: restart fedkube join", self.site, self._cert_file, exc)
                return
            now = self._clock()
            wait = self._delay(cert, now, self._rng) if failures == 0 else self._retry(failures, cert, now, self._rng)
            if failures == 0:
                log.info("site %s: certificate %x (until %s) renews in %.0f s", self.site, cert.serial_number,
                         cert.not_valid_after_utc.isoformat(), wait)
            if self._stop.wait(wait):
                return
            try:
                self._renew()
            except (EnrollmentError, FedkubeError, OSError) as exc:
                failures += 1
                reason = exc.reason if isinstance(exc, EnrollmentError) else type(exc).__name__
                log.warning("site %s: renewing certificate %x failed (attempt %d, reason %s): %s; it stays in use "
                            "until %s and renewal is tried again", self.site, cert.serial_number, failures, reason,
                            exc, cert.not_valid_after_utc.isoformat())
                continue
            failures = 0
            self.renewals += 1
            try:
                new = self._cert()
                log.info("site %s: renewed: certificate %x (until %s) replaces %x; the sidecar uses it for its next "
                         "connections", self.site, new.serial_number, new.not_valid_after_utc.isoformat(),
                         cert.serial_number)
            except (OSError, ValueError):
                pass  # the next iteration reports it


__all__ = ["RenewalLoop", "renewal_delay", "retry_delay"]
