"""Reading a site's identity back from its certificate, and refusing everything that is not one of this job."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fedkube.security import pki
from fedkube.security.identity import PeerIdentityError, SiteIdentity, parse_site_uri, site_identity

NOW = dt.datetime.now(dt.timezone.utc)
VALIDITY = pki.Validity(NOW - dt.timedelta(minutes=5), NOW + dt.timedelta(days=1))


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.make_job_ca("team-a", "mnist", VALIDITY)


def _with_uris(ca: pki.Issued, uris: list[str]) -> x509.Certificate:
    key = pki._new_key()
    builder = pki._leaf_builder(ca, x509.Name([]), key, VALIDITY)
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True
        )
    return builder.sign(ca.key, hashes.SHA256())


def test_happy_path_from_object_der_and_pem(ca: pki.Issued) -> None:
    cert = pki.issue_site_cert(ca, "team-a", "mnist", "site-1", VALIDITY).cert
    want = SiteIdentity("team-a", "mnist", "site-1")
    assert site_identity(cert, namespace="team-a", job="mnist") == want
    assert site_identity(cert.public_bytes(serialization.Encoding.DER), namespace="team-a", job="mnist") == want
    assert site_identity(cert.public_bytes(serialization.Encoding.PEM), namespace="team-a", job="mnist") == want


def test_another_sites_certificate_yields_that_site(ca: pki.Issued) -> None:
    cert = pki.issue_site_cert(ca, "team-a", "mnist", "site-2", VALIDITY).cert
    assert site_identity(cert, namespace="team-a", job="mnist").site == "site-2"


@pytest.mark.parametrize(("namespace", "job"), [("team-a", "other"), ("team-b", "mnist")])
def test_a_certificate_of_another_job_is_refused(ca: pki.Issued, namespace: str, job: str) -> None:
    # Same CA on purpose: a CA brought by the user may sign for several jobs, so the chain alone does not bind.
    cert = pki.issue_site_cert(ca, namespace, job, "site-1", VALIDITY).cert
    with pytest.raises(PeerIdentityError, match=f"site 'site-1' of job {namespace}/{job}") as err:
        site_identity(cert, namespace="team-a", job="mnist")
    assert err.value.reason == "other_job"


def test_a_server_certificate_is_not_a_site(ca: pki.Issued) -> None:
    cert = pki.issue_server_cert(ca, "team-a", "mnist", VALIDITY).cert
    with pytest.raises(PeerIdentityError, match="no SAN URI") as err:
        site_identity(cert, namespace="team-a", job="mnist")
    assert err.value.reason == "no_identity"


def test_a_certificate_without_any_san_is_refused(ca: pki.Issued) -> None:
    with pytest.raises(PeerIdentityError) as err:
        site_identity(_with_uris(ca, []), namespace="team-a", job="mnist")
    assert err.value.reason == "no_identity"


def test_two_identities_in_one_certificate_are_refused(ca: pki.Issued) -> None:
    cert = _with_uris(ca, [pki.site_uri("team-a", "mnist", "a"), pki.site_uri("team-a", "mnist", "b")])
    with pytest.raises(PeerIdentityError, match="2 SAN URIs") as err:
        site_identity(cert, namespace="team-a", job="mnist")
    assert err.value.reason == "several_identities"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://fedkube.dev/ns/team-a/job/mnist/site/a", "wrong_scheme"),
        ("spiffe://evil.example/ns/team-a/job/mnist/site/a", "wrong_trust_domain"),
        ("spiffe://fedkube.dev/ns/team-a/job/mnist/site/a/extra", "malformed_uri"),
        ("spiffe://fedkube.dev/ns/team-a/job/mnist/node/a", "malformed_uri"),
        ("spiffe://fedkube.dev/ns/team-a/job/mnist/site/A", "malformed_uri"),
        ("spiffe://fedkube.dev/ns/team-a/job/mnist/site/a?x=1", "malformed_uri"),
        ("spiffe://fedkube.dev/ns/team-a/job/mnist/site/", "malformed_uri"),
    ],
)
def test_uris_that_are_not_a_site_of_ours_are_refused(ca: pki.Issued, uri: str, reason: str) -> None:
    with pytest.raises(PeerIdentityError) as err:
        parse_site_uri(uri)
    assert err.value.reason == reason
    with pytest.raises(PeerIdentityError) as err:
        site_identity(_with_uris(ca, [uri]), namespace="team-a", job="mnist")
    assert err.value.reason == reason


def test_garbage_bytes_are_refused_not_crashed_on() -> None:
    with pytest.raises(PeerIdentityError) as err:
        site_identity(b"\x30\x03\x02\x01\x00", namespace="team-a", job="mnist")
    assert err.value.reason == "bad_certificate"
