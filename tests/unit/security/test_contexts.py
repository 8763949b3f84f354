"""Building TLS contexts and gRPC credentials from a bundle that is missing or does not match."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from fedkube.errors import ConfigError
from fedkube.security import contexts, pki

NOW = dt.datetime.now(dt.timezone.utc)
VALIDITY = pki.Validity(NOW - dt.timedelta(minutes=5), NOW + dt.timedelta(days=1))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> pki.TlsFiles:
    ca = pki.make_job_ca("ns", "job", VALIDITY)
    site = pki.issue_site_cert(ca, "ns", "job", "s1", VALIDITY)
    return pki.write_bundle(tmp_path_factory.mktemp("tls"), "s1", ca.cert, site)


def test_a_missing_key_is_named(bundle: pki.TlsFiles) -> None:
    broken = pki.TlsFiles(ca=bundle.ca, cert=bundle.cert, key=Path("/nonexistent/s1.key"))
    with pytest.raises(ConfigError, match=r"/nonexistent/s1\.key"):
        contexts.server_ssl_context(broken)
    with pytest.raises(ConfigError, match=r"/nonexistent/s1\.key"):
        contexts.grpc_channel_credentials(broken)


def test_a_key_of_another_certificate_is_refused(bundle: pki.TlsFiles, tmp_path: Path) -> None:
    other = pki.make_job_ca("ns", "job", VALIDITY)
    files = pki.write_bundle(tmp_path / "other", "s1", other.cert, other)
    with pytest.raises(ConfigError, match="cannot load the TLS bundle"):
        contexts.client_ssl_context(pki.TlsFiles(ca=bundle.ca, cert=bundle.cert, key=files.key))

