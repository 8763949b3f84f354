"""A job's TLS material: its CA, the server's and every site's certificate, as files and as Secrets.

One shape everywhere: each party (the server, each site) gets a directory, or a Kubernetes Secret of type
`kubernetes.io/tls`, holding `ca.crt` (the job CA certificate), `tls.crt` and `tls.key` (its own certificate
and key). These are the key names Kubernetes uses for TLS Secrets and cert-manager writes, so a certificate
cert-manager issued is mounted exactly like one the operator made, and a process reads it with
`TlsFiles.in_dir` whatever made it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fedkube.security.pki import (
    Issued,
    TlsFiles,
    Validity,
    issue_server_cert,
    issue_site_cert,
    make_job_ca,
)

CA_CERT_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
#: Where a pod mounts its party's TLS Secret (the server container, and the sidecar only: never the trainer).
MOUNT_PATH = "/var/run/secrets/fedkube/tls"
#: The Secret type cert-manager and kubectl create for a certificate and its key.
SECRET_TYPE = "kubernetes.io/tls"


def files_in(directory: Path) -> TlsFiles:
    """The TLS files of one party in `directory` (a mounted TLS Secret, or a local run's bundle)."""
    return TlsFiles(ca=directory / CA_CERT_FILE, cert=directory / CERT_FILE, key=directory / KEY_FILE)


@dataclass(frozen=True)
class PartyTls:
    """One party's TLS material in PEM: what its Secret (or directory) holds."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def files(self) -> dict[str, bytes]:
        """File name -> content, the Secret's `data` before base64."""
        return {CA_CERT_FILE: self.ca_pem, CERT_FILE: self.cert_pem, KEY_FILE: self.key_pem}


@dataclass(frozen=True)
class JobTls:
    """The job CA and every certificate it issued for one job."""

    ca: Issued
    server: Issued
    sites: Mapping[str, Issued]

    @classmethod
    def generate(
        cls,
        namespace: str,
        job: str,
        sites: Iterable[str],
        validity: Validity,
        *,
        extra_dns: Iterable[str] = (),
        extra_ips: Iterable[str] = (),
    ) -> JobTls:
        """A fresh job CA, a server certificate (Service names plus extras) and one certificate per site."""
        ca = make_job_ca(namespace, job, validity)
        server = issue_server_cert(ca, namespace, job, validity, extra_dns=extra_dns, extra_ips=extra_ips)
        return cls(ca=ca, server=server, sites={s: issue_site_cert(ca, namespace, job, s, validity) for s in sites})

    def _party(self, issued: Issued) -> PartyTls:
        ca_pem = self.ca.cert.public_bytes(serialization.Encoding.PEM)
        return PartyTls(ca_pem=ca_pem, cert_pem=issued.cert_pem(), key_pem=issued.key_pem())

    def for_server(self) -> PartyTls:
        return self._party(self.server)

    def for_site(self, site: str) -> PartyTls:
        """The material of `site`; KeyError for a site the job does not have."""
        return self._party(self.sites[site])

    @property
    def not_after(self) -> dt.datetime:
        """When the first of the job's certificates expires (what the FLJob status reports)."""
        certs = [self.ca.cert, self.server.cert, *(i.cert for i in self.sites.values())]
        return min(c.not_valid_after_utc for c in certs)


__all__ = [
    "CA_CERT_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "MOUNT_PATH",
    "SECRET_TYPE",
    "JobTls",
    "PartyTls",
    "files_in",
]
