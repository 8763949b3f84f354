"""Remote sites on the server side: join bundles, the server's token hashes, and the enrollment mount.

Pure like the builders. For each ``spec.clients[].remote`` site the operator makes:

* Secret ``<job>-join-<site>`` (``bundle.json``): the :class:`~fedkube.security.enroll.JoinBundle` the job owner
  hands to the site's admin out of band. Only the operator writes it and no pod mounts it.
* Secret ``<job>-enroll`` (``tokens.json``): per remote site the SHA-256 of its token and its expiry, mounted into
  the server with the job CA (a projected volume at :data:`ENROLL_DIR`): the server signs the CSRs of remote sites
  (it is the job's trust root already: it decides who takes part and what the model becomes), and never sees a
  token it could replay.

No client pod, client token Secret or client TLS Secret exists for a remote site: its key is made at the site.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any

from fedkube import envvars
from fedkube.operator import naming, podspec
from fedkube.security import enroll, pki
from fedkube.security.material import CERT_FILE, KEY_FILE, JobTls
from fedkube.spec.model import FLJob
from fedkube.spec.remote import DEFAULT_ENROLL_PORT

Manifest = dict[str, Any]
MetaFn = Callable[[str, str, "str | None"], dict[str, Any]]

ENROLL_DIR = "/var/run/secrets/fedkube/enroll"
ENROLL_CA_CERT = "ca.crt"
ENROLL_CA_KEY = "ca.key"
ENROLL_TOKENS = "tokens.json"
BUNDLE_FILE = "bundle.json"
VOLUME_ENROLL = "fedkube-enroll"
VOLUME_LEDGER = "fedkube-enroll-ledger"
LEDGER_DIR = "/var/lib/fedkube/enrollment"
# The ledger is a few KiB (a hash per spent token, a serial per site); provisioners round a claim up to their minimum.
LEDGER_SIZE = "16Mi"
FILE_MODE_ENROLL = 0o440  # group-readable: the kubelet's files belong to root, the server reads as the fsGroup


def remote_sites(job: FLJob) -> list[str]:
    return [c.name for c in job.spec.clients if c.remote]


def local_sites(job: FLJob) -> list[str]:
    """Sites whose pod the operator runs (fedkube.operator.podspec.pod_sites, by name)."""
    return [site.name for site in podspec.pod_sites(job)]


def enrolls(job: FLJob) -> bool:
    """True when the server runs the enrollment listener: TLS on, the operator's CA, and a remote site."""
    return job.spec.security.tls == "enabled" and job.spec.security.issuer_ref is None and bool(remote_sites(job))


def join_secret_name(job: str, site: str) -> str:
    return f"{job}-join-{site}"


def enroll_secret_name(job: str) -> str:
    return f"{job}-enroll"


def token_expiry(job: FLJob, tls: JobTls) -> dt.datetime:
    """A join token is good ``joinTokenSeconds`` from when the server certificate was made (created or resumed)."""
    made = tls.server.cert.not_valid_before_utc + pki.CLOCK_SKEW
    return made + dt.timedelta(seconds=job.spec.server.expose.join_token_seconds)


def join_tokens(job: FLJob, tls: JobTls) -> dict[str, str]:
    """Each remote site's join token, derived from the CA key and the server certificate's serial."""
    salt = format(tls.server.cert.serial_number, "x")
    return {s: enroll.derive_token(tls.ca, job.namespace, job.name, s, salt) for s in remote_sites(job)}


def server_name(job: FLJob) -> str:
    """The name remote sites check on the server certificate: the first external address, else the Service's."""
    expose = job.spec.server.expose
    return expose.external_addresses[0] if expose.external_addresses else pki.server_dns_names(
        job.namespace, job.name)[-1]


def build_bundle(job: FLJob, tls: JobTls, site: str) -> enroll.JoinBundle:
    expose = job.spec.server.expose
    hosts = expose.external_addresses or [server_name(job)]
    return enroll.JoinBundle(
        namespace=job.namespace, job=job.name, site=site, server_name=server_name(job),
        addresses=tuple(hosts), grpc_port=envvars.DEFAULT_GRPC_PORT, bulk_port=envvars.DEFAULT_BULK_PORT,
        enroll_port=DEFAULT_ENROLL_PORT, ca_pem=tls.ca.cert_pem().decode(), ca_sha256=enroll.fingerprint(tls.ca.cert),
        token=join_tokens(job, tls)[site], expires_at=token_expiry(job, tls).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )  # fmt: skip


def _secret(metadata: dict[str, Any], files: dict[str, bytes]) -> Manifest:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata,
        "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
    }  # fmt: skip


def build_join_objects(job: FLJob, tls: JobTls | None, meta: MetaFn) -> list[Manifest]:
    """``<job>-enroll`` and one ``<job>-join-<site>`` per remote site; nothing without remote sites or real keys
    (``fedkube render`` shows a placeholder instead: the bundles carry tokens)."""
    if not enrolls(job):
        return []
    marker = naming.TOKEN_PLACEHOLDER.encode()
    if tls is None:
        records = {s: marker.decode() for s in remote_sites(job)}
        out = [_secret(meta(enroll_secret_name(job.name), naming.ROLE_SERVER, None),
                       {ENROLL_TOKENS: json.dumps(records, sort_keys=True).encode()})]
        return out + [_secret(meta(join_secret_name(job.name, s), naming.ROLE_CLIENT, s), {BUNDLE_FILE: marker})
                      for s in remote_sites(job)]
    expiry = token_expiry(job, tls).timestamp()
    tokens = join_tokens(job, tls)
    table = {s: enroll.TokenRecord(enroll.token_hash(t), expiry).to_dict() for s, t in tokens.items()}
    objs = [_secret(meta(enroll_secret_name(job.name), naming.ROLE_SERVER, None),
                    {ENROLL_TOKENS: json.dumps(table, sort_keys=True).encode()})]
    for site in remote_sites(job):
        objs.append(_secret(meta(join_secret_name(job.name, site), naming.ROLE_CLIENT, site),
                            {BUNDLE_FILE: build_bundle(job, tls, site).to_json().encode()}))
    return objs


# --- the server pod ------------------------------------------------------------------------------------------


def ledger_claim_name(job: str) -> str:
    return f"{job}-enrollment"


def _own_ledger(job: FLJob) -> bool:
    # The ledger (spent join tokens, each remote site's current serial) must outlive the server pod, or a new pod
    # would accept a spent token again and forget which certificates a renewal superseded. A checkpoint claim
    # keeps it already; without one, an emptyDir would lose it, so it gets a small claim of its own.
    return enrolls(job) and not job.spec.server.checkpoint.enabled


def build_ledger_pvc(job: FLJob, meta: MetaFn) -> list[Manifest]:
    """``<job>-enrollment`` for a job with remote sites and no checkpoint claim; owned by the FLJob like the rest."""
    if not _own_ledger(job):
        return []
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": LEDGER_SIZE}}}
    if job.spec.server.checkpoint.storage_class_name:
        spec["storageClassName"] = job.spec.server.checkpoint.storage_class_name
    return [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": meta(ledger_claim_name(job.name), naming.ROLE_SERVER, None), "spec": spec}]


def enroll_env(job: FLJob) -> list[dict[str, Any]]:
    if not enrolls(job):
        return []
    return [{"name": envvars.ENROLL_DIR, "value": ENROLL_DIR},
            {"name": envvars.ENROLL_PORT, "value": str(DEFAULT_ENROLL_PORT)},
            *([{"name": envvars.ENROLL_LEDGER_DIR, "value": LEDGER_DIR}] if _own_ledger(job) else [])]


def enroll_mounts(job: FLJob) -> list[dict[str, Any]]:
    if not enrolls(job):
        return []
    return [{"name": VOLUME_ENROLL, "mountPath": ENROLL_DIR, "readOnly": True},
            *([{"name": VOLUME_LEDGER, "mountPath": LEDGER_DIR}] if _own_ledger(job) else [])]


def enroll_volumes(job: FLJob) -> list[dict[str, Any]]:
    """The job CA (certificate and key) and the token hashes, in one directory of the server container."""
    if not enrolls(job):
        return []
    ca = {"name": naming.ca_secret_name(job.name),
          "items": [{"key": CERT_FILE, "path": ENROLL_CA_CERT}, {"key": KEY_FILE, "path": ENROLL_CA_KEY}]}
    tokens = {"name": enroll_secret_name(job.name), "items": [{"key": ENROLL_TOKENS, "path": ENROLL_TOKENS}]}
    ledger = [{"name": VOLUME_LEDGER, "persistentVolumeClaim": {"claimName": ledger_claim_name(job.name)}}]
    return [{"name": VOLUME_ENROLL, "projected": {"defaultMode": FILE_MODE_ENROLL,
                                                  "sources": [{"secret": ca}, {"secret": tokens}]}},
            *(ledger if _own_ledger(job) else [])]


def remote_ingress(job: FLJob) -> list[dict[str, Any]]:
    """The server NetworkPolicy's rule for remote sites: gRPC, bulk and enroll from anywhere.

    A remote site arrives through a load balancer or an ingress whose source address the cluster may rewrite
    (a node's, the controller's), so no selector can name it; what admits it is mutual TLS (and, on the enroll
    port, the join token), exactly as for an in-cluster site. Nothing when the job has no remote site.
    """
    if not enrolls(job):
        return []
    ports = [envvars.DEFAULT_GRPC_PORT, envvars.DEFAULT_BULK_PORT, DEFAULT_ENROLL_PORT]
    return [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}],
             "ports": [{"port": p, "protocol": "TCP"} for p in ports]}]


def remote_service_name(job: str) -> str:
    """``{job}-remote``: as long as ``{job}-server``, so every valid job name fits a Service name."""
    return f"{job}-remote"


def build_remote_service(job: FLJob, meta: MetaFn) -> list[Manifest]:
    """The Service remote sites dial, of ``spec.server.expose.type`` with its annotations: only the gRPC, bulk and
    enroll ports. A separate Service, so that a LoadBalancer never publishes the status and metrics ports (which
    the ``{job}-server`` ClusterIP keeps for the operator and Prometheus). None for ClusterIP (an ingress or
    gateway then routes to ``{job}-server`` with TLS passthrough)."""
    expose = job.spec.server.expose
    if expose.type == "ClusterIP" or not remote_sites(job):
        return []
    ports = [{"name": "grpc", "port": envvars.DEFAULT_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
             {"name": "bulk", "port": envvars.DEFAULT_BULK_PORT, "targetPort": "bulk", "protocol": "TCP"},
             *enroll_ports(job)]
    return [{
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(remote_service_name(job.name), naming.ROLE_SERVER, None),
        "spec": {"type": expose.type, "selector": {naming.LABEL_JOB: job.name, naming.LABEL_ROLE: naming.ROLE_SERVER},
                 "ports": ports},
    }]  # fmt: skip


# --- NodePort: the ports remote sites dial are the API server's choice ------------------------------------------

#: The join bundle's field for each port of ``{job}-remote`` (by the Service port's name).
_BUNDLE_PORT = {"grpc": "grpc_port", "bulk": "bulk_port", "enroll": "enroll_port"}


def node_ports(job: FLJob, service: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The nodePorts the API server gave ``{job}-remote`` (port name -> number) when it is a NodePort Service and
    every port has one; None otherwise. A LoadBalancer forwards the Service ports as they are (7070, 8471, 8472),
    which the bundle already names; a NodePort Service's sites dial a node's address at its nodePorts."""
    if job.spec.server.expose.type != "NodePort" or service is None:
        return None
    got = {str(p.get("name")): p.get("nodePort") for p in (service.get("spec") or {}).get("ports") or []}
    wanted = {name: got.get(name) for name in _BUNDLE_PORT if name in got}
    if "grpc" not in wanted or not all(isinstance(v, int) and v > 0 for v in wanted.values()):
        return None  # not assigned yet
    return {k: int(v) for k, v in wanted.items() if v is not None}


def with_node_ports(obj: Manifest, job: FLJob, ports: Mapping[str, int]) -> Manifest:
    """``obj`` with the bundle's ports replaced by ``ports`` when it is one of the job's join Secrets; else ``obj``.

    The bundle's format is unchanged: its ports apply to each of its addresses, as a nodePort is the same on
    every node (an older ``fedkube join`` reads it as it is)."""
    meta = obj.get("metadata") or {}
    names = {join_secret_name(job.name, s) for s in remote_sites(job)}
    data = obj.get("data") or {}
    if obj.get("kind") != "Secret" or meta.get("name") not in names or BUNDLE_FILE not in data:
        return obj
    try:
        bundle = json.loads(base64.b64decode(data[BUNDLE_FILE]))
    except ValueError:
        return obj  # fedkube render's placeholder: no bundle to rewrite
    bundle.update({_BUNDLE_PORT[name]: port for name, port in ports.items()})
    text = json.dumps(bundle, indent=2, sort_keys=True) + "\n"
    return {**obj, "data": {**data, BUNDLE_FILE: base64.b64encode(text.encode()).decode()}}


def enroll_ports(job: FLJob) -> list[dict[str, Any]]:
    """The Service port of the enrollment listener (the container port has the same name and number)."""
    if not enrolls(job):
        return []
    return [{"name": "enroll", "port": DEFAULT_ENROLL_PORT, "targetPort": "enroll", "protocol": "TCP"}]
