"""The pod-template fields of an FLJob: what users of Kubeflow Trainer, JobSet and plain pods expect to set.

fedkube takes *named fields* merged under its own reserved ones, not a free
``PodTemplateSpec`` (docs/kubernetes.md, "Pod templates", says why against
Kubeflow Trainer's and JobSet's choices): every field is typed, bounded in the
CRD (``maxItems``/``maxLength``), checked by the admin policy, and a value
outside the Pod Security "restricted" profile is refused here, naming the
field and the fix, instead of by the API server after the job was accepted.

The same fields sit on ``spec.server``, ``spec.trainer`` and each
``spec.clients[]`` entry (:class:`PodOverrides`); a site's value replaces the
trainer's. The container building blocks (env, resources, mounts) live here
too so that init containers can use them; :mod:`fedkube.spec.model` imports them.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from fedkube.spec.problems import Problem

# Bounds that keep an FLJob (and its CRD schema) small: the API server stores it in etcd whole.
MAX_ITEMS = 32  # imagePullSecrets, envFrom, supplementalGroups, affinity terms and expressions, values
MAX_INIT_CONTAINERS = 8
MAX_ARGS = 256  # command/args entries of an init container
MAX_NAME = 253  # a DNS subdomain: Secret, ServiceAccount, PriorityClass, RuntimeClass names
MAX_TEXT = 4096  # one command argument or label-selector value

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: Container names fedkube uses itself; an init container may not take them.
RESERVED_CONTAINER_NAMES = ("server", "sidecar", "trainer")
RESERVED_CONTAINER_PREFIX = "fedkube-"
#: Capabilities the restricted profile lets a container add (it must drop ALL, which fedkube always does).
ALLOWED_CAPABILITIES = ("NET_BIND_SERVICE",)

#: Label the FLJob may carry instead of ``spec.queueName`` (Kueue's own key, so kueuectl and users agree).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


class _Model(BaseModel):
    # The same strictness as every spec model (fedkube.spec.model._Model).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=DNS1123_SUBDOMAIN)]


# Kubernetes quantity ("500m", "2Gi", "1e3", "4").
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"
# Names Kubernetes accepts for environment variables.
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

_QUANTITY_RE = re.compile(QUANTITY)


def _quantity(value: Any) -> str:
    """Normalize a Kubernetes quantity to its string form, rejecting what the API server would reject."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("a quantity must be a number or a string; fix: write it like '500m', '2Gi' or '1'")
    text = str(value) if not isinstance(value, float) else repr(value)
    if not _QUANTITY_RE.match(text):
        raise ValueError(
            f"{text!r} is not a Kubernetes quantity; fix: use e.g. '500m' (CPU), '2Gi' (memory), '1' (GPUs)"
        )
    return text


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "description": "A Kubernetes quantity, e.g. 500m, 2Gi, 1."}),
]


class FieldRef(_Model):
    """A field of the pod (Kubernetes ObjectFieldSelector), e.g. ``metadata.name`` or ``status.podIP``."""

    field_path: str = Field(alias="fieldPath", min_length=1, description="Path of the field, e.g. status.podIP.")
    api_version: str | None = Field(default=None, alias="apiVersion", description="Schema version of fieldPath.")


class ResourceFieldRef(_Model):
    """A container's resource request or limit (Kubernetes ResourceFieldSelector)."""

    resource: str = Field(min_length=1, description="e.g. limits.cpu, requests.memory.")
    container_name: str | None = Field(default=None, alias="containerName", description="Container to read.")
    divisor: Quantity | None = Field(default=None, description="Unit of the value, e.g. 1Mi.")


class KeyRef(_Model):
    """One key of a ConfigMap or Secret in the job's namespace."""

    name: str = Field(min_length=1, description="ConfigMap or Secret name.")
    key: str = Field(min_length=1, description="Key within it.")
    optional: bool | None = Field(default=None, description="Allow the object or key to be missing.")


class EnvVarSource(_Model):
    """Where a variable's value comes from; set exactly one field (Kubernetes EnvVarSource)."""

    field_ref: FieldRef | None = Field(default=None, alias="fieldRef", description="A field of the pod.")
    resource_field_ref: ResourceFieldRef | None = Field(
        default=None, alias="resourceFieldRef", description="A resource request/limit."
    )
    config_map_key_ref: KeyRef | None = Field(default=None, alias="configMapKeyRef", description="A ConfigMap key.")
    secret_key_ref: KeyRef | None = Field(default=None, alias="secretKeyRef", description="A Secret key.")


class EnvVar(_Model):
    """An environment variable, as in a Kubernetes container: a literal `value` or a `valueFrom` source."""

    name: str = Field(pattern=ENV_NAME, min_length=1, description="Variable name.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: EnvVarSource | None = Field(
        default=None, alias="valueFrom", description="Take the value from the pod, a ConfigMap or a Secret."
    )


class VolumeMount(_Model):
    """Where a volume appears in the container (Kubernetes VolumeMount)."""

    name: str = Field(min_length=1, description="Name of a volume declared in the same template.")
    mount_path: str = Field(alias="mountPath", min_length=1, description="Absolute path in the container.")
    read_only: bool | None = Field(default=None, alias="readOnly", description="Mount read-only.")
    sub_path: str | None = Field(default=None, alias="subPath", description="Sub-path of the volume to mount.")


class Resources(_Model):
    """Compute resources, as in a Kubernetes container (`nvidia.com/gpu` and other extended resources included)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Minimum resources to schedule on.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Maximum resources; GPUs go here.")


# --- pod-level fields -------------------------------------------------------------------------


class LocalObjectReference(_Model):
    """An object of the job's namespace by name (an image pull Secret)."""

    name: Name = Field(description="Secret name.")


class _EnvFromRef(_Model):
    name: Name = Field(description="ConfigMap or Secret name.")
    optional: bool | None = Field(default=None, description="Allow the object to be missing.")


class EnvFromSource(_Model):
    """Every key of a ConfigMap or Secret as an environment variable (Kubernetes EnvFromSource)."""

    prefix: str | None = Field(default=None, max_length=MAX_NAME, description="Prepended to every key.")
    config_map_ref: _EnvFromRef | None = Field(default=None, alias="configMapRef", description="A ConfigMap.")
    secret_ref: _EnvFromRef | None = Field(default=None, alias="secretRef", description="A Secret.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("envFrom needs exactly one of configMapRef and secretRef; fix: give one per entry")
        return self


Values = Annotated[list[Annotated[str, Field(max_length=MAX_TEXT)]], Field(max_length=MAX_ITEMS)]


class NodeSelectorRequirement(_Model):
    """A rule on a node label (or field): ``key operator values``."""

    key: str = Field(min_length=1, max_length=317, description="Node label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(description="How to match.")
    values: Values | None = Field(default=None, description="Values for In/NotIn (one integer for Gt/Lt).")


class NodeSelectorTerm(_Model):
    """Requirements that must all hold (ANDed)."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(
        default=None, alias="matchExpressions", max_length=MAX_ITEMS, description="Rules on node labels.")
    match_fields: list[NodeSelectorRequirement] | None = Field(
        default=None, alias="matchFields", max_length=MAX_ITEMS, description="Rules on node fields.")


class NodeSelector(_Model):
    """Terms of which at least one must hold (ORed)."""

    node_selector_terms: list[NodeSelectorTerm] = Field(
        alias="nodeSelectorTerms", min_length=1, max_length=MAX_ITEMS, description="Node selector terms.")


class PreferredSchedulingTerm(_Model):
    """A weighted node preference."""

    weight: int = Field(ge=1, le=100, description="Weight, 1-100.")
    preference: NodeSelectorTerm = Field(description="The preferred nodes.")


class NodeAffinity(_Model):
    """Which nodes the pod may (required) or should (preferred) run on."""

    required: NodeSelector | None = Field(
        default=None, alias="requiredDuringSchedulingIgnoredDuringExecution", description="Hard rule.")
    preferred: list[PreferredSchedulingTerm] | None = Field(
        default=None, alias="preferredDuringSchedulingIgnoredDuringExecution", max_length=MAX_ITEMS,
        description="Soft rules.")


class LabelSelectorRequirement(_Model):
    """A rule on a pod's or namespace's label."""

    key: str = Field(min_length=1, max_length=317, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="How to match.")
    values: Values | None = Field(default=None, description="Values for In/NotIn.")


class LabelSelector(_Model):
    """Pods (or namespaces) by label."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, alias="matchLabels", max_length=MAX_ITEMS, description="Labels that must be equal.")
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, alias="matchExpressions", max_length=MAX_ITEMS, description="Label rules.")


class PodAffinityTerm(_Model):
    """Pods matched by ``labelSelector`` in ``namespaces``, within the same ``topologyKey`` domain."""

    label_selector: LabelSelector | None = Field(default=None, alias="labelSelector", description="Pods to match.")
    namespaces: list[Name] | None = Field(default=None, max_length=MAX_ITEMS, description="Their namespaces.")
    namespace_selector: LabelSelector | None = Field(
        default=None, alias="namespaceSelector", description="Their namespaces, by label.")
    topology_key: str = Field(alias="topologyKey", min_length=1, max_length=317,
                              description="Node label that defines the domain, e.g. kubernetes.io/hostname.")
    match_label_keys: list[Annotated[str, Field(max_length=317)]] | None = Field(
        default=None, alias="matchLabelKeys", max_length=MAX_ITEMS, description="Keys taken from this pod.")
    mismatch_label_keys: list[Annotated[str, Field(max_length=317)]] | None = Field(
        default=None, alias="mismatchLabelKeys", max_length=MAX_ITEMS, description="Keys that must differ.")


class WeightedPodAffinityTerm(_Model):
    """A weighted pod (anti-)affinity preference."""

    weight: int = Field(ge=1, le=100, description="Weight, 1-100.")
    pod_affinity_term: PodAffinityTerm = Field(alias="podAffinityTerm", description="The term.")


class PodAffinity(_Model):
    """Run near (affinity) or away from (anti-affinity) the matched pods."""

    required: list[PodAffinityTerm] | None = Field(
        default=None, alias="requiredDuringSchedulingIgnoredDuringExecution", max_length=MAX_ITEMS,
        description="Hard rules.")
    preferred: list[WeightedPodAffinityTerm] | None = Field(
        default=None, alias="preferredDuringSchedulingIgnoredDuringExecution", max_length=MAX_ITEMS,
        description="Soft rules.")


class Affinity(_Model):
    """Kubernetes affinity: node affinity and pod (anti-)affinity."""

    node_affinity: NodeAffinity | None = Field(default=None, alias="nodeAffinity", description="Node affinity.")
    pod_affinity: PodAffinity | None = Field(default=None, alias="podAffinity", description="Pod affinity.")
    pod_anti_affinity: PodAffinity | None = Field(
        default=None, alias="podAntiAffinity", description="Pod anti-affinity.")


# --- security contexts within the restricted profile ------------------------------------------

_RESTRICTED = "the Pod Security restricted profile"
# Keys people copy from other manifests that fedkube never lets a job set, and why (named in the error).
_OUTSIDE = {
    "privileged": "a privileged container controls the node",
    "procMount": "an unmasked /proc exposes the node",
    "seLinuxOptions": "a custom SELinux type can escape the container",
    "windowsOptions": "fedkube pods run Linux containers",
    "appArmorProfile": "fedkube pods run with the runtime's default AppArmor profile",
    "sysctls": "sysctls change the node's kernel settings",
    "seLinuxChangePolicy": "fedkube leaves SELinux relabelling to the runtime",
}


def _restricted(value: Any, where: str) -> Any:
    """Refuse, by name and with the reason, what would take a pod outside the restricted profile."""
    if not isinstance(value, dict):
        return value  # the strict model reports the wrong type
    for key, why in _OUTSIDE.items():
        if key in value:
            raise ValueError(f"{where}.{key} is outside {_RESTRICTED} ({why}); fix: remove it")
    for key, bad in (("runAsNonRoot", False), ("allowPrivilegeEscalation", True)):
        if value.get(key) is bad:
            raise ValueError(f"{where}.{key}: {str(bad).lower()} is outside {_RESTRICTED}; fix: remove it "
                             "(fedkube sets runAsNonRoot: true and allowPrivilegeEscalation: false)")
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        if value.get(key) == 0:
            raise ValueError(f"{where}.{key}: 0 is root, outside {_RESTRICTED}; fix: use a non-zero id, "
                             "e.g. 65532 (fedkube's default)")
    seccomp = value.get("seccompProfile")
    if isinstance(seccomp, dict) and seccomp.get("type") not in (None, "RuntimeDefault", "Localhost"):
        raise ValueError(f"{where}.seccompProfile.type {seccomp.get('type')!r} is outside {_RESTRICTED}; "
                         "fix: use RuntimeDefault or Localhost")
    caps = value.get("capabilities")
    if isinstance(caps, dict):
        extra = [c for c in caps.get("add") or [] if c not in ALLOWED_CAPABILITIES]
        if extra:
            raise ValueError(f"{where}.capabilities.add {extra} is outside {_RESTRICTED}, which admits only "
                             f"{list(ALLOWED_CAPABILITIES)}; fix: remove them")
        if "drop" in caps:
            raise ValueError(f"{where}.capabilities.drop: fedkube drops ALL capabilities itself; fix: remove it")
    return value


class SeccompProfile(_Model):
    """The container's seccomp profile: the runtime's default or a profile on the node."""

    type: Literal["RuntimeDefault", "Localhost"] = Field(description="RuntimeDefault or Localhost.")
    localhost_profile: str | None = Field(
        default=None, alias="localhostProfile", max_length=MAX_NAME, description="With Localhost: the profile.")


class Capabilities(_Model):
    """Capabilities to add; fedkube always drops ALL first."""

    add: list[Literal["NET_BIND_SERVICE"]] = Field(default_factory=list, max_length=1,
                                                   description="Only NET_BIND_SERVICE (restricted profile).")


class SecurityContext(_Model):
    """A container's security settings, limited to what the Pod Security restricted profile admits.

    fedkube always adds ``runAsNonRoot: true``, ``allowPrivilegeEscalation: false``, ``capabilities.drop:
    [ALL]`` and seccomp ``RuntimeDefault`` (unless a Localhost profile is given); anything outside the profile
    (privileged, root ids, other capabilities, Unconfined seccomp) is refused with the reason.
    """

    run_as_user: int | None = Field(default=None, alias="runAsUser", ge=1, le=2**31 - 1,
                                    description="User id (non-zero; default 65532).")
    run_as_group: int | None = Field(default=None, alias="runAsGroup", ge=1, le=2**31 - 1,
                                     description="Group id (non-zero; default 65532).")
    run_as_non_root: Literal[True] | None = Field(default=None, alias="runAsNonRoot",
                                                  description="Always true (may be stated).")
    allow_privilege_escalation: Literal[False] | None = Field(
        default=None, alias="allowPrivilegeEscalation", description="Always false (may be stated).")
    read_only_root_filesystem: bool | None = Field(
        default=None, alias="readOnlyRootFilesystem",
        description="Read-only root filesystem (default: true for fedkube's containers, false for the trainer).")
    capabilities: Capabilities | None = Field(default=None, description="Capabilities to add (NET_BIND_SERVICE).")
    seccomp_profile: SeccompProfile | None = Field(default=None, alias="seccompProfile",
                                                   description="Seccomp profile (default RuntimeDefault).")

    @model_validator(mode="before")
    @classmethod
    def _within_restricted(cls, value: Any) -> Any:
        return _restricted(value, "securityContext")


class PodSecurityContext(_Model):
    """Pod-wide settings that concern volumes: the group that owns them and how ownership is applied."""

    fs_group: int | None = Field(default=None, alias="fsGroup", ge=1, le=2**31 - 1,
                                 description="Group owning the volumes (default 65532).")
    supplemental_groups: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] | None = Field(
        default=None, alias="supplementalGroups", max_length=MAX_ITEMS,
        description="Extra groups of every container, e.g. the group of a shared dataset volume.")
    fs_group_change_policy: Literal["OnRootMismatch", "Always"] | None = Field(
        default=None, alias="fsGroupChangePolicy",
        description="When to re-own volumes (default OnRootMismatch: only when the root differs).")

    @model_validator(mode="before")
    @classmethod
    def _within_restricted(cls, value: Any) -> Any:
        return _restricted(value, "podSecurityContext")


# --- init containers --------------------------------------------------------------------------


class InitContainer(_Model):
    """A container that runs to completion before fedkube's own (e.g. to fetch a dataset onto a volume)."""

    name: str = Field(min_length=1, max_length=63, description="Container name (a DNS label).")
    image: str = Field(min_length=1, max_length=MAX_TEXT, description="Image.")
    command: list[Annotated[str, Field(max_length=MAX_TEXT)]] | None = Field(
        default=None, max_length=MAX_ARGS, description="Entrypoint; the image's when absent.")
    args: list[Annotated[str, Field(max_length=MAX_TEXT)]] | None = Field(
        default=None, max_length=MAX_ARGS, description="Arguments.")
    working_dir: str | None = Field(default=None, alias="workingDir", max_length=MAX_TEXT,
                                    description="Working directory (absolute).")
    env: list[EnvVar] | None = Field(default=None, max_length=MAX_ARGS, description="Environment variables.")
    env_from: list[EnvFromSource] | None = Field(default=None, alias="envFrom", max_length=MAX_ITEMS,
                                                 description="ConfigMaps/Secrets as variables.")
    resources: Resources | None = Field(default=None, description="Compute resources.")
    volume_mounts: list[VolumeMount] | None = Field(
        default=None, alias="volumeMounts", max_length=MAX_ITEMS,
        description="Mounts of volumes declared in the same template.")
    security_context: SecurityContext | None = Field(
        default=None, alias="securityContext", description="Security settings within the restricted profile.")


class PodOverrides(_Model):
    """Pod fields for ``spec.server``, ``spec.trainer`` and each ``spec.clients[]`` entry (a site's replace the
    trainer's); fedkube's own fields (restart policy, tokens, ports, probes, its volumes and env) stay reserved."""

    service_account_name: Name | None = Field(
        default=None, alias="serviceAccountName",
        description="Service account (workload identity for datasets); must be in the admin policy's "
        "allowedServiceAccounts. Default: the namespace's default account. No API token is mounted either way.")
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None, alias="imagePullSecrets", max_length=MAX_ITEMS,
        description="Secrets for pulling the images; added to the operator's default pull secrets.")
    affinity: Affinity | None = Field(default=None, description="Node affinity and pod (anti-)affinity.")
    priority_class_name: Name | None = Field(default=None, alias="priorityClassName", description="PriorityClass.")
    runtime_class_name: Name | None = Field(default=None, alias="runtimeClassName", description="RuntimeClass.")
    scheduler_name: Name | None = Field(default=None, alias="schedulerName", description="Scheduler to use.")
    env_from: list[EnvFromSource] | None = Field(
        default=None, alias="envFrom", max_length=MAX_ITEMS,
        description="Every key of ConfigMaps/Secrets as variables of the main container (server or trainer).")
    init_containers: list[InitContainer] | None = Field(
        default=None, alias="initContainers", max_length=MAX_INIT_CONTAINERS,
        description="Run in order to completion before fedkube's containers start.")
    security_context: SecurityContext | None = Field(
        default=None, alias="securityContext",
        description="The main container's security settings, within the Pod Security restricted profile.")
    pod_security_context: PodSecurityContext | None = Field(
        default=None, alias="podSecurityContext", description="fsGroup, supplementalGroups, fsGroupChangePolicy.")


OVERRIDE_FIELDS = tuple(PodOverrides.model_fields)


def merged_overrides(base: PodOverrides, site: PodOverrides) -> PodOverrides:
    """A site's pod fields: each one the site sets replaces the trainer template's (lists included)."""
    return PodOverrides.model_validate(
        {name: getattr(site, name) if getattr(site, name) is not None else getattr(base, name)
         for name in OVERRIDE_FIELDS})


# --- cross-field rules (called from fedkube.spec.checks) ---------------------------------------


def override_problems(path: str, pod: PodOverrides, volume_names: Iterable[str],
                      reserved_mount_roots: Sequence[str]) -> Iterator[Problem]:
    """What no model can see alone: init container names and mounts against the template's volumes."""
    names = set(volume_names)
    seen: set[str] = set()
    for i, init in enumerate(pod.init_containers or []):
        where = f"{path}.initContainers[{i}]"
        if (not _DNS1123_LABEL_RE.match(init.name) or init.name in RESERVED_CONTAINER_NAMES
                or init.name.startswith(RESERVED_CONTAINER_PREFIX)):
            yield Problem(f"{where}.name", f"{init.name!r} is not a DNS label or is fedkube's own "
                          f"({', '.join(RESERVED_CONTAINER_NAMES)}, {RESERVED_CONTAINER_PREFIX}*)",
                          "use another lower-case name, e.g. fetch-data")
        elif init.name in seen:
            yield Problem(f"{where}.name", f"init container {init.name!r} is listed twice", "give each a unique name")
        seen.add(init.name)
        if any(c.isspace() for c in init.image):
            yield Problem(f"{where}.image", f"{init.image!r} contains whitespace", "write the image without spaces")
        if init.working_dir is not None and not posixpath.isabs(init.working_dir):
            yield Problem(f"{where}.workingDir", f"{init.working_dir!r} is not absolute", "use e.g. /work")
        yield from mount_problems(where, init.volume_mounts or [], names, reserved_mount_roots)


def mount_problems(path: str, mounts: Sequence[VolumeMount], volume_names: set[str],
                   reserved_mount_roots: Sequence[str]) -> Iterator[Problem]:
    """Each mount names a declared volume at a distinct absolute path outside fedkube's own directories."""
    paths: set[str] = set()
    for i, mount in enumerate(mounts):
        where = f"{path}.volumeMounts[{i}]"
        if mount.name not in volume_names:
            yield Problem(f"{where}.name", f"volumeMount refers to volume {mount.name!r}, which is not declared",
                          "declare it in the template's (or the site's) volumes, or fix the name")
        norm = posixpath.normpath(mount.mount_path)
        if not posixpath.isabs(mount.mount_path):
            yield Problem(f"{where}.mountPath", f"mountPath {mount.mount_path!r} is not absolute", "use e.g. /data")
        elif any(norm == root or norm.startswith(root + "/") for root in reserved_mount_roots):
            yield Problem(f"{where}.mountPath", f"{mount.mount_path} is where fedkube mounts its own files",
                          "mount somewhere else, e.g. /data")
        elif norm in paths:
            yield Problem(f"{where}.mountPath", f"two volumes are mounted at {mount.mount_path}", "use distinct paths")
        paths.add(norm)


def queue_problems(labels: Mapping[str, str], queue_name: str | None) -> Iterator[Problem]:
    """``spec.queueName`` and the FLJob's Kueue queue label must not name two queues."""
    label = labels.get(KUEUE_QUEUE_LABEL)
    if queue_name is not None and label is not None and label != queue_name:
        yield Problem("spec.queueName", f"spec.queueName is {queue_name!r} but the label {KUEUE_QUEUE_LABEL} "
                      f"is {label!r}", "keep one of them, or make them equal")
