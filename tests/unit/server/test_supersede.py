"""The serial check of remote sites' certificates after a renewal (fedkube.server.supersede), on a fake clock."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from fedkube.security import pki
from fedkube.server.supersede import GRACE_S, SUPERSEDED, Supersession

NOW = dt.datetime.now(dt.timezone.utc)
VALID = pki.Validity(NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=2))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def certs() -> list[pki.Issued]:
    ca = pki.make_job_ca("ns", "job", VALID)
    return [pki.issue_site_cert(ca, "ns", "job", "remote", VALID) for _ in range(3)]


def _serial(issued: pki.Issued) -> str:
    return format(issued.cert.serial_number, "x")


def test_the_old_certificate_is_refused_after_the_grace_even_when_the_new_one_was_never_used(
    certs: list[pki.Issued],
) -> None:  # fmt: skip
    clock, current = Clock(), {"remote": _serial(certs[0])}
    sup = Supersession({"remote"}, clock=clock)
    sup.attach(current)
    assert sup.check("remote", certs[0].cert) is None
    sup.issued("remote", current["remote"], _serial(certs[1]))
    current["remote"] = _serial(certs[1])
    clock.now += GRACE_S - 1
    assert sup.check("remote", certs[0].cert) is None
    clock.now += 2
    refusal = sup.check("remote", certs[0].cert)
    assert refusal is not None and refusal[0] == SUPERSEDED and _serial(certs[1]) in refusal[1]
    # A certificate the ledger never named current (an enrollment before the last one) has no grace at all.
    assert sup.check("remote", certs[2].cert.public_bytes(serialization.Encoding.DER)) is not None


def test_sites_without_a_ledger_entry_are_not_checked(certs: list[pki.Issued]) -> None:
    sup = Supersession({"remote"})
    sup.attach({})
    assert sup.check("remote", certs[0].cert) is None  # a ledger lost with an emptyDir: nothing to compare
    sup.attach({"in-cluster": _serial(certs[1])})
    assert sup.check("in-cluster", certs[0].cert) is None  # not a remote site: the operator issued it
