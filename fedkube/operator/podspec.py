"""Pure pieces of the job pods that come from outside fedkube's fixed design (used by the builders).

* :class:`PodDefaults`: what the cluster admin sets once in the chart (``jobDefaults``) for every job pod:
  the server/sidecar image (an air-gapped cluster's mirror), image pull secrets and the server's resources.
* :func:`apply_overrides`: the FLJob's pod-template fields (:class:`fedkube.spec.podtemplate.PodOverrides`)
  merged *under* fedkube's reserved fields: the restart policy, the token and TLS volumes, the ports and
  probes, fedkube's env and mounts, ``automountServiceAccountToken: false`` and the restricted security
  settings always stay as the builders made them; a user field only adds to them or fills what is unset.
* :func:`pod_metadata`: the FLJob's own annotations on every pod (minus reserved prefixes), its labels
  whose keys the admin listed in ``jobDefaults.copyLabels``, and the Kueue plain pod group keys when the
  job names a queue.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import revoking
from fedkube.spec.model import DEFAULT_IMAGE, ClientSite, EnvVar, FLJob, Resources, Volume, VolumeMount
from fedkube.spec.podtemplate import (
    KUEUE_QUEUE_LABEL,
    InitContainer,
    LocalObjectReference,
    PodOverrides,
    SecurityContext,
)

#: Set by the chart's Deployment (JSON of the ``jobDefaults:`` values).
ENV_JOB_DEFAULTS = "FEDKUBE_JOB_DEFAULTS"
MAX_DEFAULTS_BYTES = 16 * 1024

#: Label and annotation domains an FLJob's own keys may not bring onto its pods: fedkube's (the operator
#: selects and judges pods by them), Kubernetes' (kubernetes.io, k8s.io: reserved for core components,
#: e.g. kubectl's last-applied-configuration, and app.kubernetes.io/*, which fedkube sets itself) and
#: Kueue's (fedkube derives the pod-group keys from spec.queueName; a copied pod-group-name would split
#: or merge groups). A subdomain of one counts as that domain.
RESERVED_DOMAINS = ("fedkube.dev", "kubernetes.io", "k8s.io", "kueue.x-k8s.io")

KUEUE_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"

#: Pods with an fsGroup re-own their volumes only when the volume's root does not match already: a large
#: dataset claim is then not walked file by file at every pod start.
FS_GROUP_CHANGE_POLICY = "OnRootMismatch"


class _Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    image: str | None = Field(default=None, min_length=1, max_length=1024)
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, alias="imagePullSecrets",
                                                           max_length=32)
    server_resources: Resources | None = Field(default=None, alias="serverResources")
    copy_labels: list[Annotated[str, Field(min_length=1, max_length=317)]] = Field(
        default_factory=list, alias="copyLabels", max_length=64)


@dataclass(frozen=True)
class PodDefaults:
    """What every job pod gets unless its FLJob says otherwise (the chart's ``jobDefaults``)."""

    image: str = DEFAULT_IMAGE
    """Server and sidecar image when the job names none."""
    image_pull_secrets: tuple[str, ...] = ()
    """Pull Secrets (names in the job's namespace) of every job pod, before the job's own."""
    server_resources: Resources = field(default_factory=Resources)
    """The server's resources when ``spec.server.resources`` is empty."""
    copy_labels: tuple[str, ...] = ()
    """Keys of the FLJob's labels its pods carry too. Not all by default: whoever may create an FLJob but not a
    pod could otherwise label the operator's pods into another workload's Service (app=payments)."""


def parse_defaults(data: Any) -> PodDefaults:
    """The defaults from the chart's ``jobDefaults`` JSON; :class:`ConfigError` names what is malformed."""
    try:
        doc = _Defaults.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<document>"
        raise ConfigError(f"{ENV_JOB_DEFAULTS} (the chart's jobDefaults) at {where}: {first['msg']}; fix: correct "
                          "the value, e.g. jobDefaults.imagePullSecrets: [{name: regcred}]") from None
    names = tuple(dict.fromkeys(s.name for s in doc.image_pull_secrets))
    return PodDefaults(image=doc.image or DEFAULT_IMAGE, image_pull_secrets=names,
                       server_resources=doc.server_resources or Resources(),
                       copy_labels=tuple(k for k in dict.fromkeys(doc.copy_labels) if not _reserved(k)))


def defaults_from_env(environ: Mapping[str, str]) -> PodDefaults:
    """The defaults in ``FEDKUBE_JOB_DEFAULTS`` (JSON), or fedkube's own when it is unset or empty."""
    data = envvars.json_document(environ, ENV_JOB_DEFAULTS, MAX_DEFAULTS_BYTES, source="the values' jobDefaults:")
    return PodDefaults() if data is None else parse_defaults(data)


# --- which pods -------------------------------------------------------------------------------------


def pod_sites(job: FLJob) -> list[ClientSite]:
    """The client sites that get a pod from the operator (one place, so the Kueue count matches the pods).

    A remote site runs its own sidecar and trainer (docs/remote-sites.md): no pod here.
    """
    return [site for site in job.spec.clients if not site.remote]


def pod_count(job: FLJob) -> int:
    """How many pods the operator creates for ``job``: the server and one per pod site not revoked at creation.

    Kueue admits the pod group with this count, and every pod of a group must carry the same one: so a site
    revoked while the job runs keeps counting (its pod goes, but pods made later by a restart or a resume
    announce the admitted group's count); only names already in ``spec.revokedSites`` when the job's pods
    were first created are left out (:func:`fedkube.operator.revoking.at_creation`).
    """
    revoked = revoking.at_creation(job)
    return 1 + sum(1 for site in pod_sites(job) if site.name not in revoked)


# --- metadata ---------------------------------------------------------------------------------------


def _reserved(key: str) -> bool:
    domain = key.split("/", 1)[0] if "/" in key else ""
    return any(domain == d or domain.endswith("." + d) for d in RESERVED_DOMAINS)


def propagated(values: Mapping[str, str], keys: Collection[str] | None = None) -> dict[str, str]:
    """The FLJob's annotations (or, with ``keys``, those of its labels) its pods carry too; never a reserved key."""
    return {k: v for k, v in values.items() if not _reserved(k) and (keys is None or k in keys)}


def queue_name(job: FLJob) -> str | None:
    """The job's Kueue LocalQueue: ``spec.queueName``, else its ``kueue.x-k8s.io/queue-name`` label."""
    return job.spec.queue_name or job.metadata.labels.get(KUEUE_QUEUE_LABEL) or None


def pod_group_name(job: FLJob) -> str:
    """The Kueue pod group (and Workload) name: the job's, plus its uid's start so a re-created job of the
    same name is a new group; the same across suspend/resume, which re-creates the same pods."""
    uid = (job.metadata.uid or "").replace("-", "")[:6]
    return f"{job.name}-{uid}" if uid else job.name


def pod_metadata(job: FLJob, labels: Mapping[str, str], annotations: Mapping[str, str],
                 defaults: PodDefaults) -> tuple[dict[str, str], dict[str, str]]:
    """A pod's labels and annotations: the FLJob's propagated ones, fedkube's over them, then Kueue's."""
    out_labels = {**propagated(job.metadata.labels, defaults.copy_labels), **labels}
    out_annotations = {**propagated(job.metadata.annotations), **annotations}
    queue = queue_name(job)
    if queue:
        out_labels[KUEUE_QUEUE_LABEL] = queue
        out_labels[KUEUE_GROUP_LABEL] = pod_group_name(job)
        out_annotations[KUEUE_TOTAL_ANNOTATION] = str(pod_count(job))
    return out_labels, out_annotations


# --- pod and container fields ----------------------------------------------------------------------


def container_security(user: SecurityContext | None, *, read_only_root: bool) -> dict[str, Any]:
    """A container's securityContext: fedkube's restricted settings, with what the user may change applied."""
    out: dict[str, Any] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if user is None:
        return out
    if user.run_as_user is not None:
        out["runAsUser"] = user.run_as_user
    if user.run_as_group is not None:
        out["runAsGroup"] = user.run_as_group
    if user.read_only_root_filesystem is not None:
        out["readOnlyRootFilesystem"] = user.read_only_root_filesystem
    if user.capabilities is not None and user.capabilities.add:
        out["capabilities"]["add"] = list(user.capabilities.add)
    if user.seccomp_profile is not None:
        out["seccompProfile"] = user.seccomp_profile.model_dump(by_alias=True, exclude_none=True)
    return out


def env_var(var: EnvVar) -> dict[str, Any]:
    """A container env entry of ``var``."""
    out: dict[str, Any] = {"name": var.name}
    if var.value_from is not None:
        out["valueFrom"] = var.value_from.model_dump(by_alias=True, exclude_none=True)
    elif var.value is not None:
        out["value"] = var.value
    return out


def resources(res: Resources) -> dict[str, Any]:
    """A container's ``resources`` (empty when nothing is set)."""
    return {k: dict(v) for k, v in (("requests", res.requests), ("limits", res.limits)) if v}


def init_container(init: InitContainer) -> dict[str, Any]:
    """A user's init container, with fedkube's restricted security settings under the user's own."""
    out: dict[str, Any] = {"name": init.name, "image": init.image}
    if init.command:
        out["command"] = list(init.command)
    if init.args:
        out["args"] = list(init.args)
    if init.working_dir:
        out["workingDir"] = init.working_dir
    if init.env:
        out["env"] = [env_var(e) for e in init.env]
    if init.env_from:
        out["envFrom"] = [e.model_dump(by_alias=True, exclude_none=True) for e in init.env_from]
    if init.resources is not None and resources(init.resources):
        out["resources"] = resources(init.resources)
    if init.volume_mounts:
        out["volumeMounts"] = [m.model_dump(by_alias=True, exclude_none=True) for m in init.volume_mounts]
    out["securityContext"] = container_security(init.security_context, read_only_root=False)
    return out


def apply_overrides(pod_spec: dict[str, Any], main: dict[str, Any], overrides: PodOverrides,
                    defaults: PodDefaults, *, read_only_root: bool) -> None:
    """Merge the job's pod-template fields into ``pod_spec`` (its main container ``main``), under fedkube's own.

    User init containers run before fedkube's (the client pod's sidecar among them), so a dataset an init
    container fetches is there before the site registers with the server.
    """
    secrets = [*defaults.image_pull_secrets, *(s.name for s in overrides.image_pull_secrets or [])]
    if secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in dict.fromkeys(secrets)]
    for key, value in (("serviceAccountName", overrides.service_account_name),
                       ("priorityClassName", overrides.priority_class_name),
                       ("runtimeClassName", overrides.runtime_class_name),
                       ("schedulerName", overrides.scheduler_name)):
        if value is not None:
            pod_spec[key] = value
    if overrides.affinity is not None:
        pod_spec["affinity"] = overrides.affinity.model_dump(by_alias=True, exclude_none=True)
    if overrides.init_containers:
        pod_spec["initContainers"] = [*(init_container(i) for i in overrides.init_containers),
                                      *pod_spec.get("initContainers", [])]
    if overrides.env_from:
        # Kubernetes lets env win over envFrom: fedkube's own variables cannot be replaced this way.
        main["envFrom"] = [e.model_dump(by_alias=True, exclude_none=True) for e in overrides.env_from]
    main["securityContext"] = container_security(overrides.security_context, read_only_root=read_only_root)
    user_pod = overrides.pod_security_context
    if user_pod is not None:
        sc = pod_spec["securityContext"]
        if user_pod.fs_group is not None:
            sc["fsGroup"] = user_pod.fs_group
        if user_pod.supplemental_groups:
            sc["supplementalGroups"] = list(user_pod.supplemental_groups)
        if user_pod.fs_group_change_policy is not None:
            sc["fsGroupChangePolicy"] = user_pod.fs_group_change_policy


def site_volumes(base: Sequence[Volume], site: Sequence[Volume]) -> list[Volume]:
    """The trainer's volumes with the site's: one of the same name replaces the trainer's, in its place."""
    by_name = {v.name: v for v in site}
    merged = [by_name.pop(v.name, v) for v in base]
    return merged + [v for v in site if v.name in by_name]


def site_mounts(base: Sequence[VolumeMount], site: Sequence[VolumeMount]) -> list[VolumeMount]:
    """The trainer's volumeMounts with the site's: one at the same mountPath replaces the trainer's."""
    by_path = {m.mount_path: m for m in site}
    merged = [by_path.pop(m.mount_path, m) for m in base]
    return merged + [m for m in site if m.mount_path in by_path]
