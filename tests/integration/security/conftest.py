"""A job's PKI on disk, plus the attacker's material: another CA, expired and not-yet-valid certificates."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest

from fedkube.security import pki

NS, JOB = "team-a", "mnist"
SERVER_NAME = f"{JOB}-server.{NS}.svc"


@dataclass(frozen=True)
class JobPki:
    ca: pki.Issued
    server: pki.TlsFiles
    # Sites of this job, keyed by name; "expired"/"future" are this job's CA signing outside the present.
    sites: dict[str, pki.TlsFiles]
    rogue_site: pki.TlsFiles  # a site certificate of this job's name, signed by another CA
    rogue_server: pki.TlsFiles  # a server certificate for the right names, signed by another CA
    other_job_site: pki.TlsFiles  # signed by this job's CA, but for another job (a CA shared between jobs)


@pytest.fixture(scope="session")
def job_pki(tmp_path_factory: pytest.TempPathFactory) -> JobPki:
    root = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.timezone.utc)
    valid = pki.job_validity(rounds=3, round_seconds=60, ttl_seconds_after_finished=None, now=now)
    ca = pki.make_job_ca(NS, JOB, valid)
    server = pki.issue_server_cert(ca, NS, JOB, valid, extra_dns=["localhost"], extra_ips=["127.0.0.1"])
    sites = {s: pki.write_bundle(root / s, s, ca.cert, pki.issue_site_cert(ca, NS, JOB, s, valid))
             for s in ("site-a", "site-b")}
    past = pki.Validity(now - dt.timedelta(days=2), now - dt.timedelta(days=1))
    future = pki.Validity(now + dt.timedelta(days=1), now + dt.timedelta(days=2))
    for kind, window in (("expired", past), ("future", future)):
        expired_or_future = pki.issue_site_cert(ca, NS, JOB, "site-a", window)
        sites[kind] = pki.write_bundle(root / kind, "site-a", ca.cert, expired_or_future)
    rogue_ca = pki.make_job_ca(NS, JOB, valid)  # same names, different key: only the key makes a CA
    # The attacker knows the job CA's certificate (it is public), so it trusts the real server.
    rogue_site = pki.write_bundle(
        root / "rogue-site", "site-a", ca.cert, pki.issue_site_cert(rogue_ca, NS, JOB, "site-a", valid)
    )
    rogue_server = pki.write_bundle(
        root / "rogue-server", "server", rogue_ca.cert,
        pki.issue_server_cert(rogue_ca, NS, JOB, valid, extra_dns=["localhost"], extra_ips=["127.0.0.1"]),
    )
    other_job_site = pki.write_bundle(
        root / "other-job", "site-a", ca.cert, pki.issue_site_cert(ca, NS, "other-job", "site-a", valid)
    )
    return JobPki(
        ca=ca,
        server=pki.write_bundle(root / "server", "server", ca.cert, server),
        sites=sites,
        rogue_site=rogue_site,
        rogue_server=rogue_server,
        other_job_site=other_job_site,
    )
