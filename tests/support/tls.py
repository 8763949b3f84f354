"""One job PKI for the whole test session: tests run mutual TLS by default, like the product.

A :class:`~fedkube.security.material.JobTls` per job (``job1`` in namespace ``default`` unless named: what
the integration harnesses use), written once to a temporary directory per party in the TLS Secret layout
(``ca.crt``, ``tls.crt``, ``tls.key``; :func:`~fedkube.security.material.files_in`). A site a test names that
the bundle lacks gets a certificate from the same CA on first use. Tests about plaintext pass
``tls=False`` to the harness (in-process) or set ``FEDKUBE_TLS=disabled`` (processes).
"""

from __future__ import annotations

import atexit
import datetime as dt
import shutil
import tempfile
import threading
from pathlib import Path

from fedkube import envvars
from fedkube.security import pki
from fedkube.security.material import JobTls, files_in
from fedkube.security.settings import TlsSettings
from fedkube.transfer.endpoints import ClientTls, ServerTls

NAMESPACE = "default"
JOB = "job1"
SITES = ("site-a", "site-b", "site-c")
#: The name sidecars check on the server's certificate: every job's test server certificate carries it (the
#: Service names differ per job).
SERVER_NAME = "localhost"


class SessionPki:
    """The session's job CA and the parties' bundles on disk, made lazily and shared by every test."""

    def __init__(self, namespace: str = NAMESPACE, job: str = JOB) -> None:
        self.namespace, self.job = namespace, job
        self.root = Path(tempfile.mkdtemp(prefix=f"fedkube-test-tls-{job}-"))
        atexit.register(shutil.rmtree, self.root, True)
        self.validity = pki.job_validity(rounds=10, round_seconds=600, ttl_seconds_after_finished=None,
                                         now=dt.datetime.now(dt.timezone.utc))
        self.tls = JobTls.generate(namespace, job, SITES, self.validity, extra_dns=["localhost"],
                                   extra_ips=["127.0.0.1", "::1"])
        self._lock = threading.Lock()
        self._dirs: dict[str, Path] = {}

    def _bundle(self, party: str, issued: pki.Issued) -> Path:
        directory = self.root / party
        pki.write_bundle(directory, "tls", self.tls.ca.cert, issued)
        return directory

    def server_dir(self) -> Path:
        with self._lock:
            if "@server" not in self._dirs:
                self._dirs["@server"] = self._bundle("server", self.tls.server)
            return self._dirs["@server"]

    def site_dir(self, site: str) -> Path:
        with self._lock:
            if site not in self._dirs:
                issued = self.tls.sites.get(site) or pki.issue_site_cert(
                    self.tls.ca, self.namespace, self.job, site, self.validity)  # fmt: skip
                self._dirs[site] = self._bundle(f"site-{site}", issued)
            return self._dirs[site]

    def attacker_dir(self, kind: str) -> Path:
        """A bundle an attacker (or a misconfiguration) would present as site-a, trusting the real job CA:

        ``other_ca`` (right names, another CA's key), ``expired``, ``not_yet_valid``, ``other_job`` and
        ``other_namespace`` (this CA, another job's identity: a CA shared between jobs), ``server_as_client``
        (the server's own certificate), ``site_b`` (a real site-b certificate).
        """
        with self._lock:
            key = f"@attacker-{kind}"
            if key not in self._dirs:
                self._dirs[key] = self._bundle(f"attacker-{kind}", self._attacker(kind))
            return self._dirs[key]

    def _attacker(self, kind: str) -> pki.Issued:
        ns, job, now = self.namespace, self.job, dt.datetime.now(dt.timezone.utc)
        if kind == "other_ca":
            return pki.issue_site_cert(pki.make_job_ca(ns, job, self.validity), ns, job, "site-a", self.validity)
        if kind == "expired":
            return pki.issue_site_cert(self.tls.ca, ns, job, "site-a", pki.Validity(
                now - dt.timedelta(days=2), now - dt.timedelta(days=1)))  # fmt: skip
        if kind == "not_yet_valid":
            return pki.issue_site_cert(self.tls.ca, ns, job, "site-a", pki.Validity(
                now + dt.timedelta(days=1), now + dt.timedelta(days=2)))  # fmt: skip
        if kind == "other_job":
            return pki.issue_site_cert(self.tls.ca, ns, f"{job}-other", "site-a", self.validity)
        if kind == "other_namespace":
            return pki.issue_site_cert(self.tls.ca, f"{ns}-other", job, "site-a", self.validity)
        if kind == "server_as_client":
            return self.tls.server
        raise ValueError(f"no attacker bundle {kind!r}")

    # --- what the processes and the in-process parts take -------------------------------------
    def server_settings(self) -> TlsSettings:
        return TlsSettings(files=files_in(self.server_dir()))

    def site_settings(self, site: str, server_name: str = SERVER_NAME) -> TlsSettings:
        return TlsSettings(files=files_in(self.site_dir(site)), server_name=server_name)

    def server_tls(self) -> ServerTls:
        return ServerTls.from_files(files_in(self.server_dir()), namespace=self.namespace, job=self.job)

    def client_tls(self, site: str, server_name: str = SERVER_NAME) -> ClientTls:
        return ClientTls.from_files(files_in(self.site_dir(site)), server_name)

    def server_env(self) -> dict[str, str]:
        """The environment a server process needs for TLS."""
        return {envvars.TLS: "enabled", envvars.TLS_DIR: str(self.server_dir()), envvars.NAMESPACE: self.namespace}

    def site_env(self, site: str, server_name: str = SERVER_NAME) -> dict[str, str]:
        """The environment a sidecar process needs for TLS."""
        return {envvars.TLS: "enabled", envvars.TLS_DIR: str(self.site_dir(site)),
                envvars.TLS_SERVER_NAME: server_name, envvars.NAMESPACE: self.namespace}


_PKIS: dict[tuple[str, str], SessionPki] = {}
_PKI_LOCK = threading.Lock()


def session_pki(job: str = JOB, namespace: str = NAMESPACE) -> SessionPki:
    """The session's PKI of ``namespace``/``job`` (made on first use: a P-256 CA and a few certificates)."""
    with _PKI_LOCK:
        if (namespace, job) not in _PKIS:
            _PKIS[namespace, job] = SessionPki(namespace, job)
        return _PKIS[namespace, job]


__all__ = ["JOB", "NAMESPACE", "SERVER_NAME", "SITES", "SessionPki", "session_pki"]
