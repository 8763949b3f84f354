"""The job CA and the certificates it issues: extensions, names, validity and how they are written to disk."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedkube.errors import ConfigError
from fedkube.security import pki

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
VALIDITY = pki.Validity(NOW - dt.timedelta(minutes=5), NOW + dt.timedelta(days=1))


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.make_job_ca("team-a", "mnist", VALIDITY)


def test_job_ca_may_sign_leaves_only_and_names_the_job(ca: pki.Issued) -> None:
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ca.cert.issuer == ca.cert.subject
    ca.cert.verify_directly_issued_by(ca.cert)
    cn = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert "team-a" in str(cn) and "mnist" in str(cn)
    assert ca.cert.not_valid_before_utc == VALIDITY.not_before
    assert ca.cert.not_valid_after_utc == VALIDITY.not_after


def test_server_cert_covers_the_service_names_and_extras(ca: pki.Issued) -> None:
    srv = pki.issue_server_cert(
        ca, "team-a", "mnist", VALIDITY, extra_dns=["localhost"], extra_ips=["127.0.0.1", "::1"]
    )
    srv.cert.verify_directly_issued_by(ca.cert)
    san = srv.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "mnist-server", "mnist-server.team-a", "mnist-server.team-a.svc", "localhost",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []  # can never pass as a site
    eku = srv.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not srv.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_site_cert_carries_exactly_one_identity_uri(ca: pki.Issued) -> None:
    site = pki.issue_site_cert(ca, "team-a", "mnist", "hospital-1", VALIDITY)
    site.cert.verify_directly_issued_by(ca.cert)
    san = site.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fedkube.dev/ns/team-a/job/mnist/site/hospital-1"
    ]
    eku = site.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    again = pki.issue_site_cert(ca, "team-a", "mnist", "hospital-1", VALIDITY)
    assert again.cert.serial_number != site.cert.serial_number


@pytest.mark.parametrize(
    ("namespace", "job", "site"),
    [("team-a", "mnist", "a/b"), ("team-a", "mnist", "Site"), ("team/a", "mnist", "s"), ("team-a", "", "s"),
     ("team-a", "mnist", "x" * 64)],
)
def test_names_that_would_make_an_ambiguous_identity_are_refused(namespace: str, job: str, site: str) -> None:
    with pytest.raises(ConfigError, match="DNS-1123 label"):
        pki.site_uri(namespace, job, site)


def test_a_job_name_whose_server_service_name_is_too_long_is_refused(ca: pki.Issued) -> None:
    with pytest.raises(ConfigError, match="server Service name"):
        pki.issue_server_cert(ca, "team-a", "j" * 60, VALIDITY)


def test_validity_follows_the_job() -> None:
    v = pki.job_validity(rounds=30, round_seconds=3600, ttl_seconds_after_finished=600, now=NOW)
    assert v.not_before == NOW - pki.CLOCK_SKEW
    assert v.not_after == NOW + pki.DEFAULT_REGISTRATION_MARGIN + dt.timedelta(hours=30, seconds=600)


def test_validity_is_bounded() -> None:
    short = pki.job_validity(rounds=1, round_seconds=60, ttl_seconds_after_finished=None, now=NOW)
    assert short.not_after == NOW + pki.MIN_VALIDITY
    huge = pki.job_validity(rounds=1_000_000, round_seconds=1e9, ttl_seconds_after_finished=10**9, now=NOW)
    assert huge.not_after == NOW + pki.MAX_VALIDITY


def test_validity_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match="rounds >= 1"):
        pki.job_validity(rounds=0, round_seconds=60, ttl_seconds_after_finished=None, now=NOW)
    with pytest.raises(ConfigError, match="before it starts"):
        pki.Validity(NOW, NOW)
    with pytest.raises(ConfigError, match="timezone-aware"):
        pki.Validity(dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2))


def test_bundle_dir_and_key_are_private(tmp_path: Path, ca: pki.Issued) -> None:
    site = pki.issue_site_cert(ca, "team-a", "mnist", "s1", VALIDITY)
    target = tmp_path / "tls"
    target.mkdir(mode=0o755)
    (target / "s1.key").write_bytes(b"old")
    (target / "s1.key").chmod(0o644)  # a leftover readable key must not keep its mode
    files = pki.write_bundle(target, "s1", ca.cert, site)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.cert.stat().st_mode) == 0o644
    back = pki.load_issued(files.cert.read_bytes(), files.key.read_bytes())
    assert back.cert == site.cert
    assert x509.load_pem_x509_certificate(files.ca.read_bytes()) == ca.cert
    assert sorted(p.name for p in target.iterdir()) == ["ca.crt", "s1.crt", "s1.key"]


def test_load_issued_refuses_a_key_of_another_certificate(ca: pki.Issued) -> None:
    site = pki.issue_site_cert(ca, "team-a", "mnist", "s1", VALIDITY)
    with pytest.raises(ConfigError, match="does not belong"):
        pki.load_issued(site.cert_pem(), ca.key_pem())
