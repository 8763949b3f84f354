"""Pure manifest builders: an FLJob in, the Kubernetes objects that run it out.

No I/O, no kopf, no clock: the operator creates exactly what these return,
`fedkube render` prints it, and the local runtime runs its commands. Tokens
are inputs (the operator generates them), so the builders stay deterministic.

Choices that apply to every pod, and why:

* ``restartPolicy: Never``. Retrying belongs to the operator and the server:
  a client exit is a decision with a reason (DeployTimeout,
  ExitedBeforeDownload, teardown noise after success, lesson 19), and a
  kubelet restart would hide it and re-run a trainer mid-round; a server
  restart is the operator's to make, resuming from the checkpoint. The
  sidecar is the exception: as a native sidecar (``restartPolicy: Always`` in
  ``initContainers``) the kubelet restarts it, and it reconnects and resumes.
* Non-root everywhere: fixed UID/GID 65532 with fsGroup so Secrets, emptyDirs
  and the checkpoint claim are readable/writable, no privilege escalation,
  all capabilities dropped, seccomp RuntimeDefault, no service-account token
  (no fedkube pod talks to the Kubernetes API), no service-link env noise.
* Read-only root filesystems for the server and sidecar (fedkube's own image,
  which only writes to the mounted directories and /tmp). The trainer's root
  stays writable: user scripts and their libraries write caches in places we
  cannot predict; it gets its own emptyDir work directory (lesson 24).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import certificates, disruption, joins, naming, netpol, podspec
from fedkube.operator.certificates import TlsMaterial
from fedkube.operator.podspec import PodDefaults
from fedkube.spec import layout
from fedkube.spec.checks import merge_env, merge_resources
from fedkube.spec.load import validate_job
from fedkube.spec.model import ClientSite, FLJob, Resources, Toleration
from fedkube.spec.output import OUTPUT_DIR, OUTPUT_VOLUME, output_claim_name
from fedkube.spec.podtemplate import merged_overrides

RUN_AS = 65532
FILE_MODE_SECRET = 0o440  # group-readable: files belong to root, readable by the fsGroup

VOLUME_SPEC = f"{layout.RESERVED_VOLUME_PREFIX}spec"
VOLUME_TOKENS = f"{layout.RESERVED_VOLUME_PREFIX}tokens"
VOLUME_TOKEN = f"{layout.RESERVED_VOLUME_PREFIX}token"
VOLUME_CHECKPOINT = f"{layout.RESERVED_VOLUME_PREFIX}checkpoint"
VOLUME_WORKDIR = f"{layout.RESERVED_VOLUME_PREFIX}work"
VOLUME_TMP = f"{layout.RESERVED_VOLUME_PREFIX}tmp"

Manifest = dict[str, Any]

#: The sidecar's /metrics port. Not the server's 9090: a client pod's containers share one network
#: namespace, and the user's trainer may well run something of its own on the common 9090.
SIDECAR_METRICS_PORT = 9091
METRICS_PATH = "/metrics"
LOG_FORMATS = ("text", "json")


def prometheus_annotations(port: int) -> dict[str, str]:
    """The ``prometheus.io/*`` annotations a plain Prometheus (kubernetes_sd pod role) scrapes by."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": METRICS_PATH}


def _check_log_format(log_format: str) -> str:
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"log format must be one of {list(LOG_FORMATS)}, got {log_format!r}; "
                          f"fix {envvars.LOG_FORMAT} or --log-format of the operator")
    return log_format


def build_all(
    job: FLJob,
    *,
    tokens: Mapping[str, str],
    tls: TlsMaterial | None = None,
    owner: Mapping[str, Any] | None = None,
    log_format: str = "text",
    network: netpol.NetworkPolicyConfig | None = None,
    defaults: PodDefaults | None = None,
) -> list[Manifest]:
    """Every object the operator creates for `job`, in creation order (config and secrets before pods).

    `tokens` maps each site name to its token. `owner` is the FLJob object as
    the API server returned it (apiVersion, kind, metadata.name, metadata.uid);
    when given, every child gets a controller owner reference so deleting the
    FLJob deletes them. ``log_format`` (text or json) is passed to the server
    and the sidecars as FEDKUBE_LOG_FORMAT. ``tls`` is the job's TLS material
    (rendered as the TLS Secrets, see :mod:`fedkube.operator.certificates`);
    None renders cert-manager Certificates when ``spec.security.issuerRef`` is
    set, and is needed for nothing when ``spec.security.tls`` is disabled.
    With ``network`` the job's NetworkPolicies (:mod:`fedkube.operator.netpol`)
    come before its pods. ``defaults`` (the chart's ``jobDefaults``) fill in the
    server/sidecar image, pull secrets and server resources a job leaves unset.
    Raises :class:`SpecError` for an invalid job and :class:`ConfigError` for
    a missing token or TLS material, an owner without a uid or an unknown log
    format.
    """
    validate_job(job)
    objs = [
        build_spec_configmap(job, owner=owner),
        build_server_tokens_secret(job, tokens=tokens, owner=owner),
        *(build_client_token_secret(job, site, tokens=tokens, owner=owner) for site in joins.local_sites(job)),
        *certificates.build_tls_objects(
            job, tls, lambda name, role, site: _meta(job, name, role, owner, site)),
    ]
    for pvc in (build_checkpoint_pvc(job, owner=owner), build_output_pvc(job, owner=owner)):
        if pvc is not None:
            objs.append(pvc)
    objs.extend(joins.build_ledger_pvc(job, lambda name, role, site: _meta(job, name, role, owner, site)))
    objs.extend(netpol.build_network_policies(job, network, owner_references(owner)))  # before any pod runs
    objs.append(build_server_service(job, owner=owner))
    objs.extend(joins.build_remote_service(job, lambda name, role, site: _meta(
        job, name, role, owner, site, annotations=job.spec.server.expose.annotations or None)))
    objs.append(disruption.build_server_pdb(job, owner_references(owner)))
    objs.append(build_server_pod(job, owner=owner, log_format=log_format, defaults=defaults))
    # A remote site runs its own sidecar and trainer (docs/remote-sites.md): no pod here.
    objs.extend(build_client_pod(job, site.name, owner=owner, log_format=log_format, defaults=defaults)
                for site in podspec.pod_sites(job))
    return objs


# --- metadata -----------------------------------------------------------------


def owner_references(owner: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The controller owner reference to the FLJob, or none without an owner."""
    if owner is None:
        return []
    meta = owner.get("metadata") or {}
    missing = [
        k
        for k, v in (
            ("apiVersion", owner.get("apiVersion")),
            ("kind", owner.get("kind")),
            ("metadata.name", meta.get("name")),
            ("metadata.uid", meta.get("uid")),
        )
        if not v
    ]
    if missing:
        raise ConfigError(
            f"the owner object lacks {', '.join(missing)}; fix: pass the FLJob as read from the API server "
            "(owner references need its uid), or owner=None"
        )
    return [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _meta(
    job: FLJob,
    name: str,
    role: str,
    owner: Mapping[str, Any] | None,
    site: str | None = None,
    annotations: Mapping[str, str] | None = None,
    *,
    pod: PodDefaults | None = None,
) -> dict[str, Any]:
    labels, notes = naming.labels(job.name, role, site), dict(annotations or {})
    if pod is not None:  # the FLJob's own labels/annotations and Kueue's pod-group keys go on pods only
        labels, notes = podspec.pod_metadata(job, labels, notes, pod)
    meta: dict[str, Any] = {"name": name, "namespace": job.namespace, "labels": labels}
    if notes:
        meta["annotations"] = notes
    refs = owner_references(owner)
    if refs:
        meta["ownerReferences"] = refs
    return meta


def spec_hash(job: FLJob) -> str:
    """A short digest of the spec, so the operator can tell whether a running pod matches the current spec."""
    text = json.dumps(job.to_manifest()["spec"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- config, secrets, storage ---------------------------------------------------


def build_spec_configmap(job: FLJob, *, owner: Mapping[str, Any] | None = None) -> Manifest:
    """The job as JSON (every default filled in), mounted into the server at ``FEDKUBE_SPEC_FILE``."""
    manifest = job.to_manifest()
    manifest["metadata"]["namespace"] = job.namespace
    # The server reads the spec only; kubectl's last-applied copy alone would double the ConfigMap.
    manifest["metadata"].pop("annotations", None)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, naming.spec_configmap_name(job.name), naming.ROLE_SERVER, owner),
        "data": {layout.SPEC_FILE_NAME: json.dumps(manifest, indent=2, sort_keys=True) + "\n"},
    }


def _token(tokens: Mapping[str, str], site: str, job: str) -> str:
    token = tokens.get(site)
    if not isinstance(token, str) or not token:
        raise ConfigError(f"no token for site {site!r} of job {job!r}; fix: pass tokens with one entry per client site")
    return token


def build_server_tokens_secret(
    job: FLJob, *, tokens: Mapping[str, str], owner: Mapping[str, Any] | None = None
) -> Manifest:
    """Every site's token, one key per site; mounted only into the server (``FEDKUBE_TOKENS_DIR``)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(job, naming.server_tokens_secret_name(job.name), naming.ROLE_SERVER, owner),
        "stringData": {site.name: _token(tokens, site.name, job.name) for site in job.spec.clients},
    }


def build_client_token_secret(
    job: FLJob, site: str, *, tokens: Mapping[str, str], owner: Mapping[str, Any] | None = None
) -> Manifest:
    """One site's token; mounted only into that site's sidecar (``FEDKUBE_TOKEN_FILE``), never the trainer."""
    _site(job, site)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(job, naming.client_token_secret_name(job.name, site), naming.ROLE_CLIENT, owner, site),
        "stringData": {layout.TOKEN_FILE_NAME: _token(tokens, site, job.name)},
    }


def build_checkpoint_pvc(job: FLJob, *, owner: Mapping[str, Any] | None = None) -> Manifest | None:
    """The checkpoint claim when ``spec.server.checkpoint.enabled``, else None (an emptyDir is used)."""
    ckpt = job.spec.server.checkpoint
    if not ckpt.enabled:
        return None
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": ckpt.storage_size}},
    }
    if ckpt.storage_class_name:
        spec["storageClassName"] = ckpt.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(job, naming.checkpoint_pvc_name(job.name), naming.ROLE_SERVER, owner),
        "spec": spec,
    }


def build_output_pvc(job: FLJob, *, owner: Mapping[str, Any] | None = None) -> Manifest | None:
    """The claim ``{job}-output`` when ``spec.output.size`` asks for one; None for claimName or no output."""
    out = job.spec.output
    if out is None or out.size is None:
        return None
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": out.size}}}
    if out.storage_class_name:
        spec["storageClassName"] = out.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(job, output_claim_name(job.name), naming.ROLE_SERVER, owner),
        "spec": spec,
    }


# --- server ----------------------------------------------------------------------


def build_server_service(job: FLJob, *, owner: Mapping[str, Any] | None = None) -> Manifest:
    """ClusterIP Service ``{job}-server``: gRPC + bulk for sidecars, status for the operator, metrics for Prometheus,
    enroll for remote sites (which reach it through ``{job}-remote``, :func:`joins.build_remote_service`)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, naming.server_name(job.name), naming.ROLE_SERVER, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": {naming.LABEL_JOB: job.name, naming.LABEL_ROLE: naming.ROLE_SERVER},
            "ports": [
                {
                    "name": "grpc",
                    "port": envvars.DEFAULT_GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",
                },
                {
                    # Tensor bytes on plain TCP (docs/protocol.md, "Bulk connections"); control stays on grpc.
                    "name": "bulk",
                    "port": envvars.DEFAULT_BULK_PORT,
                    "targetPort": "bulk",
                    "protocol": "TCP",
                },
                {
                    "name": "status",
                    "port": envvars.DEFAULT_STATUS_PORT,
                    "targetPort": "status",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
                {
                    "name": "metrics",
                    "port": envvars.DEFAULT_METRICS_PORT,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
                *joins.enroll_ports(job),
            ],
        },
    }


def build_server_pod(job: FLJob, *, owner: Mapping[str, Any] | None = None, log_format: str = "text",
                     defaults: PodDefaults | None = None) -> Manifest:
    """The aggregator Pod ``{job}-server``, annotated for Prometheus to scrape its ``metrics`` port."""
    server, defaults = job.spec.server, defaults or PodDefaults()
    env = [
        _env(envvars.JOB, job.name),
        _env(envvars.NAMESPACE, job.namespace),
        _env(envvars.SPEC_FILE, f"{layout.SPEC_DIR}/{layout.SPEC_FILE_NAME}"),
        _env(envvars.GRPC_PORT, str(envvars.DEFAULT_GRPC_PORT)),
        _env(envvars.BULK_PORT, str(envvars.DEFAULT_BULK_PORT)),
        _env(envvars.STATUS_PORT, str(envvars.DEFAULT_STATUS_PORT)),
        _env(envvars.METRICS_PORT, str(envvars.DEFAULT_METRICS_PORT)),
        _env(envvars.LOG_FORMAT, _check_log_format(log_format)),
        _env(envvars.TOKENS_DIR, layout.TOKENS_DIR),
        _env(envvars.CHECKPOINT_DIR, layout.CHECKPOINT_DIR),
        *([_env(envvars.OUTPUT_DIR, OUTPUT_DIR)] if job.spec.output is not None else []),
        _env(envvars.TERMINATION_LOG, layout.TERMINATION_LOG),
        *certificates.tls_env(job, sidecar=False),
        *joins.enroll_env(job),
        *(podspec.env_var(e) for e in server.env),
    ]
    mounts = [
        {"name": VOLUME_SPEC, "mountPath": layout.SPEC_DIR, "readOnly": True},
        {"name": VOLUME_TOKENS, "mountPath": layout.TOKENS_DIR, "readOnly": True},
        {"name": VOLUME_CHECKPOINT, "mountPath": layout.CHECKPOINT_DIR},
        *([{"name": OUTPUT_VOLUME, "mountPath": OUTPUT_DIR}] if job.spec.output is not None else []),
        {"name": VOLUME_TMP, "mountPath": layout.TMP_DIR},
        *certificates.tls_mounts(job),
        *joins.enroll_mounts(job),
        *(m.model_dump(by_alias=True, exclude_none=True) for m in server.volume_mounts),
    ]
    container: dict[str, Any] = {
        "name": naming.SERVER_CONTAINER,
        "image": server.image or defaults.image,
        "command": list(server.command),
        "env": env,
        "ports": [
            {"name": "grpc", "containerPort": envvars.DEFAULT_GRPC_PORT, "protocol": "TCP"},
            {"name": "bulk", "containerPort": envvars.DEFAULT_BULK_PORT, "protocol": "TCP"},
            {"name": "status", "containerPort": envvars.DEFAULT_STATUS_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": envvars.DEFAULT_METRICS_PORT, "protocol": "TCP"},
            *({"name": p["name"], "containerPort": p["port"], "protocol": "TCP"} for p in joins.enroll_ports(job)),
        ],
        # A TCP check needs no knowledge of the status endpoint's paths: listening means serving.
        "readinessProbe": {"tcpSocket": {"port": "status"}, "periodSeconds": 5, "failureThreshold": 3},
        "volumeMounts": mounts,
        "terminationMessagePath": layout.TERMINATION_LOG,
        # The server writes its JSON summary there; if it dies before writing, the log tail says why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if server.args:
        container["args"] = list(server.args)
    # Requests by default, so a node under memory pressure does not evict the server (BestEffort) first.
    server_resources = server.resources if (server.resources.requests or server.resources.limits) else (
        defaults.server_resources)
    _set_resources(container, server_resources)
    checkpoint: dict[str, Any]
    if server.checkpoint.enabled:
        checkpoint = {"persistentVolumeClaim": {"claimName": naming.checkpoint_pvc_name(job.name)}}
    else:
        checkpoint = {"emptyDir": {}}
    volumes = [
        {"name": VOLUME_SPEC, "configMap": {"name": naming.spec_configmap_name(job.name)}},
        {
            "name": VOLUME_TOKENS,
            "secret": {"secretName": naming.server_tokens_secret_name(job.name), "defaultMode": FILE_MODE_SECRET},
        },
        {"name": VOLUME_CHECKPOINT, **checkpoint},
        *([{"name": OUTPUT_VOLUME, "persistentVolumeClaim": {
            "claimName": job.spec.output.claim_name or output_claim_name(job.name)}}] if job.spec.output else []),
        {"name": VOLUME_TMP, "emptyDir": {}},
        *certificates.tls_volumes(job, None),
        *joins.enroll_volumes(job),
        *(v.manifest() for v in server.volumes),
    ]
    pod_spec = _pod_spec([container], volumes, server.node_selector, server.tolerations)
    podspec.apply_overrides(pod_spec, container, server, defaults, read_only_root=True)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(
            job,
            naming.server_name(job.name),
            naming.ROLE_SERVER,
            owner,
            annotations={naming.ANNOTATION_SPEC_HASH: spec_hash(job),
                         **prometheus_annotations(envvars.DEFAULT_METRICS_PORT)},
            pod=defaults,
        ),
        "spec": pod_spec,
    }


# --- clients ----------------------------------------------------------------------


def _site(job: FLJob, site: str) -> ClientSite:
    for entry in job.spec.clients:
        if entry.name == site:
            return entry
    known = ", ".join(c.name for c in job.spec.clients)
    raise ConfigError(f"job {job.name!r} has no client site {site!r}; fix: use one of {known}")


def build_client_pod(
    job: FLJob, site: str, *, owner: Mapping[str, Any] | None = None, log_format: str = "text",
    defaults: PodDefaults | None = None,
) -> Manifest:
    """Client Pod ``{job}-client-{site}``: the job-cell sidecar (native sidecar) and the user's trainer.

    Only the sidecar mounts the site's token; the trainer reaches the server
    solely through the sidecar on localhost. The pod is annotated for
    Prometheus to scrape the sidecar's ``metrics`` port (the trainer's own
    timings and ``log_metric()`` values are exported there too).
    """
    entry, defaults = _site(job, site), defaults or PodDefaults()
    spec, trainer = job.spec, job.spec.trainer
    sidecar_port = envvars.DEFAULT_TRAINER_PORT
    sidecar: dict[str, Any] = {
        "name": naming.SIDECAR_CONTAINER,
        "image": spec.sidecar.image or defaults.image,
        "command": ["fedkube", "sidecar"],
        # Native sidecar (Kubernetes >= 1.29): starts before the trainer, outlives it, and never blocks completion.
        "restartPolicy": "Always",
        "env": [
            _env(envvars.JOB, job.name),
            _env(envvars.NAMESPACE, job.namespace),
            _env(envvars.SITE, site),
            _env(envvars.SERVER_ADDRESS, naming.server_address(job.name, job.namespace, envvars.DEFAULT_GRPC_PORT)),
            _env(envvars.SERVER_BULK_ADDRESS,
                 naming.server_address(job.name, job.namespace, envvars.DEFAULT_BULK_PORT)),
            _env(envvars.TOKEN_FILE, f"{layout.TOKEN_DIR}/{layout.TOKEN_FILE_NAME}"),
            _env(envvars.TRAINER_PORT, str(sidecar_port)),
            _env(envvars.METRICS_PORT, str(SIDECAR_METRICS_PORT)),
            _env(envvars.LOG_FORMAT, _check_log_format(log_format)),
            *certificates.tls_env(job, sidecar=True),
        ],
        "ports": [{"name": "metrics", "containerPort": SIDECAR_METRICS_PORT, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": VOLUME_TOKEN, "mountPath": layout.TOKEN_DIR, "readOnly": True},
            {"name": VOLUME_TMP, "mountPath": layout.TMP_DIR},
            *certificates.tls_mounts(job),  # the sidecar's only: the trainer never gets the site's key
        ],
        "securityContext": podspec.container_security(None, read_only_root=True),
    }
    _set_resources(sidecar, spec.sidecar.resources)

    user_env = merge_env(trainer.env, entry.env)
    ours = [
        _env(envvars.JOB, job.name),
        _env(envvars.NAMESPACE, job.namespace),
        _env(envvars.SITE, site),
        _env(envvars.SIDECAR_ADDRESS, f"127.0.0.1:{sidecar_port}"),
        _env(envvars.WORKDIR, layout.WORKDIR),
    ]
    if not any(e.name == "HOME" for e in user_env):
        # The fixed non-root UID has no home directory; libraries that cache under $HOME then fail.
        ours.append(_env("HOME", layout.WORKDIR))
    container: dict[str, Any] = {
        "name": naming.TRAINER_CONTAINER,
        "image": entry.image or trainer.image,
        "command": list(trainer.command),
        "env": [*ours, *(podspec.env_var(e) for e in user_env)],
        "volumeMounts": [
            {"name": VOLUME_WORKDIR, "mountPath": layout.WORKDIR},
            *(m.model_dump(by_alias=True, exclude_none=True)
              for m in podspec.site_mounts(trainer.volume_mounts, entry.volume_mounts)),
        ],
    }
    if trainer.args:
        container["args"] = list(trainer.args)
    if trainer.working_dir:
        container["workingDir"] = trainer.working_dir
    _set_resources(container, merge_resources(trainer.resources, entry.resources))

    volumes = [
        {
            "name": VOLUME_TOKEN,
            "secret": {
                "secretName": naming.client_token_secret_name(job.name, site),
                "defaultMode": FILE_MODE_SECRET,
            },
        },
        {"name": VOLUME_WORKDIR, "emptyDir": {}},
        {"name": VOLUME_TMP, "emptyDir": {}},
        *certificates.tls_volumes(job, site),
        *(v.manifest() for v in podspec.site_volumes(trainer.volumes, entry.volumes)),
    ]
    node_selector = {**trainer.node_selector, **entry.node_selector}
    tolerations = entry.tolerations if entry.tolerations is not None else trainer.tolerations
    pod_spec = _pod_spec([container], volumes, node_selector, tolerations)
    pod_spec["initContainers"] = [sidecar]
    podspec.apply_overrides(pod_spec, container, merged_overrides(trainer, entry), defaults, read_only_root=False)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(
            job,
            naming.client_pod_name(job.name, site),
            naming.ROLE_CLIENT,
            owner,
            site,
            annotations={naming.ANNOTATION_SPEC_HASH: spec_hash(job), **prometheus_annotations(SIDECAR_METRICS_PORT)},
            pod=defaults,
        ),
        "spec": pod_spec,
    }


# --- shared pieces ----------------------------------------------------------------


def _pod_spec(
    containers: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    node_selector: Mapping[str, str],
    tolerations: Sequence[Toleration],
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "fsGroupChangePolicy": podspec.FS_GROUP_CHANGE_POLICY,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": volumes,
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in tolerations]
    return spec


def _set_resources(container: dict[str, Any], resources: Resources) -> None:
    out = podspec.resources(resources)
    if out:
        container["resources"] = out


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}
