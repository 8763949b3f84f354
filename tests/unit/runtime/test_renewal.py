"""When `fedkube join` renews a running site's certificate, and how it backs off after a failure."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from fedkube.runtime.renewal import JITTER_SHARE, RETRY_BASE_S, RETRY_MAX_S, renewal_delay, retry_delay
from fedkube.security import pki

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
LIFETIME = dt.timedelta(days=9)


@pytest.fixture(scope="module")
def cert() -> pki.Issued:
    valid = pki.Validity(T0, T0 + LIFETIME)
    return pki.issue_site_cert(pki.make_job_ca("ns", "job", valid), "ns", "job", "site-a", valid)


def test_renewal_is_due_when_a_third_is_left_minus_a_bounded_jitter(cert: pki.Issued) -> None:
    rng = random.Random(7)
    delays = [renewal_delay(cert.cert, T0, rng) for _ in range(200)]
    latest = (LIFETIME * 2 / 3).total_seconds()
    earliest = latest - (LIFETIME * JITTER_SHARE).total_seconds()
    assert all(earliest <= d <= latest for d in delays)
    assert max(delays) - min(delays) > (LIFETIME * JITTER_SHARE).total_seconds() / 2  # sites spread out
    assert renewal_delay(cert.cert, T0 + LIFETIME * 0.9, rng) == 0.0  # overdue (a restart late): at once


def test_retries_back_off_within_bounds_and_never_past_half_the_time_left(cert: pki.Issued) -> None:
    rng = random.Random(1)
    early = T0 + LIFETIME * 0.7
    first, tenth = retry_delay(1, cert.cert, early, rng), retry_delay(10, cert.cert, early, rng)
    assert RETRY_BASE_S / 2 <= first <= RETRY_BASE_S
    assert RETRY_MAX_S / 2 <= tenth <= RETRY_MAX_S
    near_end = T0 + LIFETIME - dt.timedelta(seconds=600)
    assert retry_delay(10, cert.cert, near_end, rng) <= 300.0
