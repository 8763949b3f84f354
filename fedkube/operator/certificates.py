"""The job's TLS objects: which Secrets or cert-manager Certificates it gets, how pods mount them, and when the
operator reuses, rotates or replaces the certificates it made.

Pure like the builders: no I/O and no clock (``now`` is an argument). Three modes, from the FLJob's
``spec.security``:

* ``tls: enabled`` (default), no ``issuerRef``: the operator's own job CA (:mod:`fedkube.security.pki`). The
  CA's certificate and key live in Secret ``<job>-ca`` (type kubernetes.io/tls, mounted by no pod: only the
  operator reads it); the server's certificate in ``<job>-server-tls``, each site's in
  ``<job>-client-<site>-tls`` (not ``<job>-<site>-tls``: a site may be called ``server``, and its Secret would
  then be the server's).
* ``issuerRef``: cert-manager signs. We render one ``Certificate`` per party whose ``secretName`` is the same
  Secret name, so pods mount them exactly alike; no private key is ever rendered by us.
* ``tls: disabled``: FEDKUBE_TLS=disabled, no TLS Secrets, no mounts (``fedkube validate`` warns, the FLJob
  status carries a ``TLSDisabled`` condition).

Lifetimes (decided here, see :func:`provision`): the job CA lives ``pki.MAX_VALIDITY`` (90 days), the leaf
certificates the job's own validity (``pki.job_validity``), never past the CA. A reconcile reuses every
certificate that is still good (a restarted operator must not change what running pods hold). Resuming a
suspended job rotates: new leaf keys and certificates from the same CA, which the server and the sites trust
already; a new CA only when the old one would expire before the new leaves do (then every pod is new anyway,
because suspending deleted them), or when the stored one is unusable.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import joins, naming
from fedkube.operator import status as lifecycle
from fedkube.security import pki
from fedkube.security.material import CERT_FILE, KEY_FILE, MOUNT_PATH, SECRET_TYPE, JobTls, PartyTls
from fedkube.spec.model import FLJob

logger = logging.getLogger(__name__)

Manifest = dict[str, Any]
#: Metadata of a child: (name, role, site) -> the ``metadata`` the builders give every child.
MetaFn = Callable[[str, str, "str | None"], dict[str, Any]]

VOLUME_TLS = "fedkube-tls"
#: Read by the owner only. In a pod the kubelet adds group read for the pod's fsGroup (the container's group),
#: which is how the non-root server and sidecar read it; in a local run the file belongs to the user running it.
FILE_MODE_TLS = 0o400

CERT_MANAGER_API_VERSION = "cert-manager.io/v1"
CERTIFICATE_KIND = "Certificate"
TLS_ENABLED, TLS_DISABLED = "enabled", "disabled"

COND_TLS_DISABLED = "TLSDisabled"
REASON_TLS_DISABLED = "TLSDisabledBySpec"
REASON_TLS_ENABLED = "TLSEnabled"

# Anything works as "now" for a certificate's relative duration: job_validity's lifetime does not depend on it.
_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


def tls_enabled(job: FLJob) -> bool:
    return job.spec.security.tls == TLS_ENABLED


def uses_issuer(job: FLJob) -> bool:
    """True when cert-manager (``spec.security.issuerRef``) signs the job's certificates."""
    return tls_enabled(job) and job.spec.security.issuer_ref is not None


def job_validity(job: FLJob, now: dt.datetime) -> pki.Validity:
    """The validity of the job's leaf certificates made at ``now``: ``pki.job_validity`` of its spec."""
    t = job.spec.timeouts
    return pki.job_validity(
        rounds=job.spec.rounds,
        round_seconds=t.round_seconds,
        ttl_seconds_after_finished=job.spec.ttl_seconds_after_finished,
        registration_margin=dt.timedelta(seconds=t.deploy_seconds + t.registration_seconds),
        now=now,
    )


# --- what fedkube render prints instead of keys ---------------------------------------------------------------


class TlsPlaceholder:
    """Stands in for a :class:`JobTls` in ``fedkube render``: Secrets with a marker instead of keys."""

    def _party(self) -> PartyTls:
        marker = naming.TOKEN_PLACEHOLDER.encode()
        return PartyTls(ca_pem=marker, cert_pem=marker, key_pem=marker)

    def for_server(self) -> PartyTls:
        return self._party()

    def for_site(self, site: str) -> PartyTls:
        return self._party()

    def ca_files(self) -> dict[str, bytes]:
        marker = naming.TOKEN_PLACEHOLDER.encode()
        return {CERT_FILE: marker, KEY_FILE: marker}


TlsMaterial = JobTls | TlsPlaceholder


def ca_files(tls: TlsMaterial) -> dict[str, bytes]:
    """The job CA's Secret content: its certificate and its key under the kubernetes.io/tls key names."""
    if isinstance(tls, TlsPlaceholder):
        return tls.ca_files()
    return {CERT_FILE: tls.ca.cert_pem(), KEY_FILE: tls.ca.key_pem()}


# --- objects ----------------------------------------------------------------------------------------------------


def build_tls_objects(job: FLJob, tls: TlsMaterial | None, meta: MetaFn) -> list[Manifest]:
    """The job's TLS children in creation order: CA Secret, server and site Secrets, or cert-manager Certificates.

    ``tls`` is the job's material (the operator's CA) or a placeholder; None means cert-manager issues (only
    valid with ``issuerRef``). Nothing for ``tls: disabled``. A ``tls`` given with ``issuerRef`` wins: the local
    runtime has no cert-manager and makes its own CA.
    """
    if not tls_enabled(job):
        return []
    if tls is None:
        if job.spec.security.issuer_ref is None:
            raise ConfigError(
                f"job {job.namespace}/{job.name} has spec.security.tls enabled but no TLS material was given; "
                "fix: pass tls=JobTls.generate(...) (the operator and `fedkube run` do), set "
                "spec.security.issuerRef to let cert-manager issue, or set spec.security.tls: disabled"
            )
        return [build_certificate(job, site, meta) for site in (None, *joins.local_sites(job))]
    objs = [_tls_secret(job, naming.ca_secret_name(job.name), ca_files(tls), meta(
        naming.ca_secret_name(job.name), naming.ROLE_CA, None))]
    objs.append(_tls_secret(job, naming.server_tls_secret_name(job.name), tls.for_server().files(), meta(
        naming.server_tls_secret_name(job.name), naming.ROLE_SERVER, None)))
    for site in joins.local_sites(job):  # a remote site makes its own key (fedkube.operator.joins)
        name = naming.client_tls_secret_name(job.name, site)
        objs.append(_tls_secret(job, name, tls.for_site(site).files(), meta(name, naming.ROLE_CLIENT, site)))
    return objs + joins.build_join_objects(job, tls if isinstance(tls, JobTls) else None, meta)


def _tls_secret(job: FLJob, name: str, files: Mapping[str, bytes], metadata: dict[str, Any]) -> Manifest:
    # data, not stringData: the API server stores data either way, and the operator reads it back to reuse it.
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": metadata,
        "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
    }


def go_duration(seconds: float) -> str:
    """``seconds`` as a Go duration (what cert-manager's ``duration`` takes), e.g. ``26h20m0s``."""
    total = max(0, int(seconds))
    return f"{total // 3600}h{total % 3600 // 60}m{total % 60}s"


def build_certificate(job: FLJob, site: str | None, meta: MetaFn) -> Manifest:
    """A cert-manager Certificate for the server (``site`` None) or one site, into the Secret its pod mounts.

    Same identity as our own CA gives: the server's Service DNS names (``pki.server_dns_names``) with server
    auth, a site's SPIFFE URI (``pki.site_uri``) with client auth; ECDSA P-256; the job's validity. The
    Secret gets the job's labels (``secretTemplate``), so the operator's label-selected cleanup finds it.
    """
    ref = job.spec.security.issuer_ref
    if ref is None:
        raise ConfigError(f"job {job.namespace}/{job.name}: a Certificate needs spec.security.issuerRef")
    if site is None:
        name, role = naming.server_tls_secret_name(job.name), naming.ROLE_SERVER
        expose = job.spec.server.expose
        identity: dict[str, Any] = {"dnsNames": pki.server_dns_names(job.namespace, job.name) + expose.dns_names()}
        if expose.ip_addresses():
            identity["ipAddresses"] = expose.ip_addresses()
        usages = ["digital signature", "server auth"]
    else:
        name, role = naming.client_tls_secret_name(job.name, site), naming.ROLE_CLIENT
        identity = {"uris": [pki.site_uri(job.namespace, job.name, site)]}
        usages = ["digital signature", "client auth"]
    validity = job_validity(job, _EPOCH)
    metadata = meta(name, role, site)
    return {
        "apiVersion": CERT_MANAGER_API_VERSION,
        "kind": CERTIFICATE_KIND,
        "metadata": metadata,
        "spec": {
            "secretName": name,
            "secretTemplate": {"labels": dict(metadata["labels"])},
            "subject": {"organizations": ["fedkube"], "organizationalUnits": [f"{job.namespace}/{job.name}"]},
            **identity,
            "usages": usages,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "duration": go_duration((validity.not_after - _EPOCH).total_seconds()),
            "issuerRef": {"name": ref.name, "kind": ref.kind, "group": ref.group},
        },
    }


# --- pods ---------------------------------------------------------------------------------------------------


def tls_env(job: FLJob, *, sidecar: bool) -> list[dict[str, Any]]:
    """FEDKUBE_TLS (and, when enabled, the directory; for a sidecar the server's DNS name) of a server or sidecar."""
    if not tls_enabled(job):
        return [{"name": envvars.TLS, "value": TLS_DISABLED}]
    env = [{"name": envvars.TLS, "value": TLS_ENABLED}, {"name": envvars.TLS_DIR, "value": MOUNT_PATH}]
    if sidecar:
        # The name the server's certificate carries; the address the sidecar dials may differ (a local run
        # rewrites it to 127.0.0.1), the name it verifies must not.
        dns = pki.server_dns_names(job.namespace, job.name)[-1]
        env.append({"name": envvars.TLS_SERVER_NAME, "value": dns})
    return env


def tls_mounts(job: FLJob) -> list[dict[str, Any]]:
    return [{"name": VOLUME_TLS, "mountPath": MOUNT_PATH, "readOnly": True}] if tls_enabled(job) else []


def tls_volumes(job: FLJob, site: str | None) -> list[dict[str, Any]]:
    """The volume of the server's (``site`` None) or one site's TLS Secret; none when TLS is disabled."""
    if not tls_enabled(job):
        return []
    name = naming.server_tls_secret_name(job.name) if site is None else naming.client_tls_secret_name(job.name, site)
    return [{"name": VOLUME_TLS, "secret": {"secretName": name, "defaultMode": FILE_MODE_TLS}}]


# --- reuse and rotation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTls:
    """The job's TLS Secrets as the API server has them (decoded ``data``; None for a missing Secret)."""

    ca: Mapping[str, str] | None = None
    server: Mapping[str, str] | None = None
    sites: Mapping[str, Mapping[str, str] | None] = field(default_factory=dict)


def _load(data: Mapping[str, str] | None) -> pki.Issued | None:
    if not data or CERT_FILE not in data or KEY_FILE not in data:
        return None
    try:
        return pki.load_issued(data[CERT_FILE].encode(), data[KEY_FILE].encode())
    except (ConfigError, ValueError, TypeError):
        return None


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.UniformResourceIdentifier)


def _leaf_ok(leaf: pki.Issued | None, ca: pki.Issued, now: dt.datetime, dns: list[str], uris: list[str]) -> bool:
    if leaf is None or not _valid_at(leaf.cert, now):
        return False
    try:
        leaf.cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    have_dns, have_uris = _sans(leaf.cert)
    return set(dns) <= set(have_dns) and have_uris == uris


def _ca_ok(ca: pki.Issued | None, now: dt.datetime, needed_until: dt.datetime) -> bool:
    if ca is None or not _valid_at(ca.cert, now) or ca.cert.not_valid_after_utc < needed_until:
        return False
    try:
        return bool(ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def provision(job: FLJob, stored: StoredTls, *, now: dt.datetime, rotate: bool) -> JobTls:
    """The job's TLS material for this reconcile: what is stored when still good, new certificates otherwise.

    * the CA is reused while it is valid now and, when new leaves are made (``rotate``), until the new leaves
      expire; otherwise a new CA (valid ``pki.MAX_VALIDITY``), and then every leaf is new;
    * without ``rotate`` a leaf is reused when it is valid now, signed by the CA and names the identity the job
      needs (a missing site, a replaced CA or an expired certificate gets a new one);
    * with ``rotate`` (resume after suspend) every leaf is new, valid ``job_validity`` from ``now`` (never past
      the CA).
    """
    ns, name = job.namespace, job.name
    validity = job_validity(job, now)
    ca = _load(stored.ca)
    if not _ca_ok(ca, now, validity.not_after if rotate else now):
        if stored.ca is not None:
            logger.info("job %s/%s: the stored job CA is expired, unreadable or expires too soon; making a new one",
                        ns, name)
        ca = pki.make_job_ca(ns, name, pki.Validity(validity.not_before, now + pki.MAX_VALIDITY))
        rotate = True  # nothing the old CA signed is trusted any more
    assert ca is not None
    leaf_validity = pki.Validity(validity.not_before, min(validity.not_after, ca.cert.not_valid_after_utc))
    kept = None if rotate else _load(stored.server)
    expose = job.spec.server.expose
    dns, ips = pki.server_dns_names(ns, name) + expose.dns_names(), expose.ip_addresses()
    server = kept if _leaf_ok(kept, ca, now, dns, []) and _has_ips(kept, ips) else None
    sites: dict[str, pki.Issued] = {}
    for site in joins.local_sites(job):
        leaf = None if rotate else _load(stored.sites.get(site))
        ok = leaf if _leaf_ok(leaf, ca, now, [], [pki.site_uri(ns, name, site)]) else None
        sites[site] = ok or pki.issue_site_cert(ca, ns, name, site, leaf_validity)
    return JobTls(ca=ca, server=server or pki.issue_server_cert(
        ca, ns, name, leaf_validity, extra_dns=expose.dns_names(), extra_ips=ips), sites=sites)


def _has_ips(leaf: pki.Issued | None, ips: list[str]) -> bool:
    """The server certificate names every external IP address (a new ``externalAddresses`` entry reissues it)."""
    if leaf is None or not ips:
        return leaf is not None
    try:
        san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= set(ips)


def stored_names(job: FLJob) -> tuple[str, str, dict[str, str]]:
    """The Secret names :class:`StoredTls` is read from: (CA, server, {site: name})."""
    return (
        naming.ca_secret_name(job.name),
        naming.server_tls_secret_name(job.name),
        {site: naming.client_tls_secret_name(job.name, site) for site in joins.local_sites(job)},
    )


# --- status ----------------------------------------------------------------------------------------------------


def certificates_status(job: FLJob, tls: JobTls | None) -> dict[str, Any] | None:
    """``status.certificates``: when the first certificate expires (RFC 3339), and who issues them."""
    if not tls_enabled(job):
        return None
    ref = job.spec.security.issuer_ref
    if tls is None:
        return {"issuer": f"{ref.kind}/{ref.name}" if ref is not None else "unknown"}
    stamp = tls.not_after.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"notAfter": stamp, "issuer": "job-ca"}


def with_tls_status(
    job: FLJob, previous: Mapping[str, Any], fields: Mapping[str, Any], tls: JobTls | None, stamp: str
) -> dict[str, Any]:
    """``fields`` (a status patch) plus ``certificates`` and the ``TLSDisabled`` condition where they changed.

    The condition is True while the spec disables TLS; once a job has had it, enabling TLS turns it False
    (a condition that only ever appears would leave a stale True behind).
    """
    out = dict(fields)
    certs = certificates_status(job, tls)
    if certs != previous.get("certificates"):
        out["certificates"] = certs  # None removes it (merge patch) when TLS was turned off
    base = out.get("conditions", previous.get("conditions")) or []
    conds = list(base)
    if not tls_enabled(job):
        conds = lifecycle.set_condition(
            base, COND_TLS_DISABLED, "True", REASON_TLS_DISABLED,
            "spec.security.tls is disabled: tokens, models and updates travel in plaintext; anyone on the network "
            "path can read and alter them; remove spec.security.tls (default enabled) outside trusted test clusters",
            stamp)
    elif lifecycle.get_condition(base, COND_TLS_DISABLED) is not None:
        conds = lifecycle.set_condition(base, COND_TLS_DISABLED, "False", REASON_TLS_ENABLED,
                                        "every connection is mutual TLS", stamp)
    if "conditions" in out or conds != list(previous.get("conditions") or []):
        out["conditions"] = conds
    return out
