"""The FLJob document: one pydantic model for `kubectl apply`, `fedkube run` and the CRD schema.

Field names are camelCase on the wire (aliases) and snake_case in Python. Every
model forbids unknown fields, so a typo is reported with its path instead of
being silently ignored. Structural rules that involve more than one field
(duplicate sites, quorum, timeout relationships) live in
:mod:`fedkube.spec.checks`, so that all of them are reported at once with the
exact field path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

import fedkube
from fedkube.spec.egress import Egress
from fedkube.spec.evaluation import Evaluation
from fedkube.spec.output import Output
from fedkube.spec.podtemplate import (  # noqa: F401  (re-exported: the spec's container building blocks)
    ENV_NAME,
    QUANTITY,
    EnvVar,
    EnvVarSource,
    FieldRef,
    KeyRef,
    PodOverrides,
    Quantity,
    ResourceFieldRef,
    Resources,
    VolumeMount,
)
from fedkube.spec.quantity import parse_quantity
from fedkube.spec.remote import Expose
from fedkube.spec.revocation import SiteName
from fedkube.spec.security import Security
from fedkube.spec.strategy import Strategy

API_GROUP = "fedkube.dev"
API_VERSION_NAME = "v1alpha1"
API_VERSION = f"{API_GROUP}/{API_VERSION_NAME}"
KIND = "FLJob"
PLURAL = "fljobs"
SHORT_NAME = "flj"

# The one place the default image is named: server and sidecar run it unless the spec or the operator's
# chart values (jobDefaults.image, fedkube.operator.podspec.PodDefaults) say otherwise.
DEFAULT_IMAGE = f"ghcr.io/fedkube/fedkube:{fedkube.__version__}"

# RFC 1123 label (Kubernetes names of most objects, label values and site names).
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# RFC 1035 label: a Service name must also start with a letter, and the server Service is named after the job.
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Label keys: optional DNS-subdomain prefix and a name segment of at most 63 characters.
_LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"

# Bounds are inclusive (ge/le) everywhere: the CRD's OpenAPI v3.0 can only say "greater than 0" as
# `minimum: 0` plus a boolean `exclusiveMinimum`, which JSON Schema tools and readers take to allow
# 0 (issue 11). These are the smallest (largest) values that make sense, so the schema means the
# same to every reader; fedkube.spec.crd refuses exclusive bounds.
MIN_SECONDS = 0.001  # every timeout


class _Model(BaseModel):
    # strict: a value of the wrong JSON type is refused as the CRD's schema refuses it (rounds: "3",
    # suspend: "yes"), instead of being converted here and rejected by the API server.
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        validate_default=True,
        strict=True,
    )


# A pass-through object (the status the operator writes): the API server keeps it as given.
PassThrough = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]


# Volume kinds a job may add. Whoever creates an FLJob gets pods from the operator, so a volume kind that
# reaches outside the namespace's own objects (hostPath: the node's files and container runtime socket;
# serviceAccountToken: an API credential; csi/ephemeral/nfs/...: storage an admin has not granted) would let
# them do through the operator what they may not do themselves (issue 13).
ALLOWED_VOLUME_KINDS = ("emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected")
ALLOWED_PROJECTIONS = ("configMap", "secret", "downwardAPI")
_VOLUME_FIX = "use one of " + ", ".join(ALLOWED_VOLUME_KINDS)
_REFUSED_WHY = {
    "hostPath": "it exposes the node's files (e.g. / or /run/containerd) to the job's pods",
    "serviceAccountToken": "it hands the job's pods a Kubernetes API credential",
}

FileMode = Annotated[int, Field(ge=0, le=0o777, description="File mode bits (0-0777, e.g. 0644 = 420).")]


def _relative_path(value: str) -> str:
    # The kubelet refuses these too, but only when the pod is created; `fedkube run` would write outside the volume.
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r} leaves the volume; fix: give a relative path without '..', e.g. config/app.yaml")
    return value


VolumePath = Annotated[str, Field(min_length=1), AfterValidator(_relative_path)]


def _one_kind(value: Any, allowed: tuple[str, ...], what: str, fix: str) -> Any:
    """Refuse a source kind outside `allowed` (naming it and why), and require exactly one source."""
    if not isinstance(value, dict):
        return value  # the strict model reports the wrong type
    # A source given as null is no source: counted, it would let a volume with none through to the pod.
    kinds = [k for k, v in value.items() if k not in ("name", "defaultMode") and v is not None]
    for kind in kinds:
        if kind not in allowed:
            why = _REFUSED_WHY.get(kind, "fedkube admits only kinds that stay within the job's namespace")
            raise ValueError(f"{what} kind {kind!r} is not allowed: {why}; fix: {fix}")
    if len(kinds) != 1:
        found = f"{len(kinds)} ({', '.join(kinds)})" if kinds else "none"
        raise ValueError(f"{what} needs exactly one source, found {found}; fix: {fix}")
    return value


class KeyToPath(_Model):
    """One key of a ConfigMap or Secret written as a file (Kubernetes KeyToPath)."""

    key: str = Field(min_length=1, description="Key to project.")
    path: VolumePath = Field(description="Relative path of the file in the volume.")
    mode: FileMode | None = Field(default=None, description="File mode bits of this file.")


class EmptyDirSource(_Model):
    """A fresh directory for the pod's lifetime."""

    medium: Literal["", "Memory"] | None = Field(default=None, description="'' (node disk) or Memory (tmpfs).")
    size_limit: Quantity | None = Field(default=None, alias="sizeLimit", description="Size limit, e.g. 1Gi.")


class ConfigMapSource(_Model):
    """A ConfigMap of the job's namespace, its keys as files."""

    name: str = Field(min_length=1, description="ConfigMap name.")
    items: list[KeyToPath] | None = Field(default=None, description="Keys to project; all when absent.")
    default_mode: FileMode | None = Field(default=None, alias="defaultMode", description="Mode of the files.")
    optional: bool | None = Field(default=None, description="Allow the ConfigMap to be missing.")


class SecretSource(_Model):
    """A Secret of the job's namespace, its keys as files."""

    secret_name: str = Field(alias="secretName", min_length=1, description="Secret name.")
    items: list[KeyToPath] | None = Field(default=None, description="Keys to project; all when absent.")
    default_mode: FileMode | None = Field(default=None, alias="defaultMode", description="Mode of the files.")
    optional: bool | None = Field(default=None, description="Allow the Secret to be missing.")


class PersistentVolumeClaimSource(_Model):
    """A PersistentVolumeClaim of the job's namespace."""

    claim_name: str = Field(alias="claimName", min_length=1, description="Claim name.")
    read_only: bool | None = Field(default=None, alias="readOnly", description="Mount read-only.")


class ProjectedKeys(_Model):
    """A ConfigMap's or Secret's keys inside a projected volume."""

    name: str = Field(min_length=1, description="ConfigMap or Secret name.")
    items: list[KeyToPath] | None = Field(default=None, description="Keys to project; all when absent.")
    optional: bool | None = Field(default=None, description="Allow the object to be missing.")


class DownwardAPIFile(_Model):
    """One file holding a field of the pod or a container resource."""

    path: VolumePath = Field(description="Relative path of the file in the volume.")
    field_ref: FieldRef | None = Field(default=None, alias="fieldRef", description="A field of the pod.")
    resource_field_ref: ResourceFieldRef | None = Field(
        default=None, alias="resourceFieldRef", description="A resource request/limit."
    )
    mode: FileMode | None = Field(default=None, description="File mode bits of this file.")

    @model_validator(mode="after")
    def _one_field(self) -> DownwardAPIFile:
        if (self.field_ref is None) == (self.resource_field_ref is None):
            raise ValueError(f"file {self.path!r} needs exactly one of fieldRef and resourceFieldRef; fix: give one")
        return self


class DownwardAPIProjection(_Model):
    """Fields of the pod as files."""

    items: list[DownwardAPIFile] | None = Field(default=None, description="Files to write.")


class VolumeProjection(_Model):
    """One source of a projected volume: configMap, secret or downwardAPI (never serviceAccountToken)."""

    config_map: ProjectedKeys | None = Field(default=None, alias="configMap", description="ConfigMap keys.")
    secret: ProjectedKeys | None = Field(default=None, description="Secret keys.")
    downward_api: DownwardAPIProjection | None = Field(
        default=None, alias="downwardAPI", description="Fields of the pod."
    )

    @model_validator(mode="before")
    @classmethod
    def _allowed_projection(cls, value: Any) -> Any:
        return _one_kind(value, ALLOWED_PROJECTIONS, "projection", "use one of " + ", ".join(ALLOWED_PROJECTIONS))


class ProjectedSource(_Model):
    """Several ConfigMaps, Secrets and pod fields in one directory."""

    sources: list[VolumeProjection] = Field(min_length=1, description="What to project.")
    default_mode: FileMode | None = Field(default=None, alias="defaultMode", description="Mode of the files.")


class Volume(_Model):
    """A pod volume with exactly one source: emptyDir, configMap, secret, persistentVolumeClaim or projected."""

    # hostPath, serviceAccountToken projections and every other kind are refused by _allowed_kind.

    name: str = Field(min_length=1, description="Volume name (a DNS label not starting with fedkube-).")
    empty_dir: EmptyDirSource | None = Field(default=None, alias="emptyDir", description="A fresh directory.")
    config_map: ConfigMapSource | None = Field(default=None, alias="configMap", description="A ConfigMap.")
    secret: SecretSource | None = Field(default=None, description="A Secret.")
    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(
        default=None, alias="persistentVolumeClaim", description="A PersistentVolumeClaim."
    )
    projected: ProjectedSource | None = Field(default=None, description="ConfigMaps, Secrets and pod fields.")

    @model_validator(mode="before")
    @classmethod
    def _allowed_kind(cls, value: Any) -> Any:
        name = value.get("name") if isinstance(value, dict) else None
        return _one_kind(value, ALLOWED_VOLUME_KINDS, f"volume {name!r}:", _VOLUME_FIX)

    def manifest(self) -> dict[str, Any]:
        """The Kubernetes volume object for the pod."""
        return self.model_dump(by_alias=True, exclude_none=True)


class Toleration(_Model):
    """A Kubernetes toleration, so pods can land on tainted (e.g. GPU) nodes."""

    key: str | None = Field(default=None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default).")
    value: str | None = Field(default=None, description="Taint value (Equal only).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(
        default=None, alias="tolerationSeconds", description="How long a NoExecute taint is tolerated."
    )


class _PodPlacement(PodOverrides):
    env: list[EnvVar] = Field(default_factory=list, description="Environment variables.")
    resources: Resources = Field(default_factory=Resources, description="Compute resources (requests/limits).")
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector", description="Node labels.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for tainted nodes.")


class _ContainerTemplate(_PodPlacement):
    args: list[str] = Field(default_factory=list, description="Arguments appended to the command.")
    volumes: list[Volume] = Field(
        default_factory=list, description="Kubernetes volumes added to the pod (names must not start with fedkube-)."
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, alias="volumeMounts", description="Kubernetes volumeMounts of this container."
    )


class Checkpoint(_Model):
    """Where the server checkpoints after every round; a PersistentVolumeClaim survives server pod restarts."""

    enabled: bool = Field(default=False, description="Keep checkpoints on a PersistentVolumeClaim.")
    storage_size: Quantity = Field(default="1Gi", alias="storageSize", description="Size of the claim.")
    storage_class_name: str | None = Field(
        default=None, alias="storageClassName", description="StorageClass of the claim; empty uses the default."
    )
    on_unusable: Literal["Fail", "StartFresh"] = Field(
        default="Fail",
        alias="onUnusable",
        description="When checkpoints exist but none can be loaded: Fail (the server refuses to start and names "
        "each) or StartFresh (train from round 1; the unusable checkpoints are moved aside, never deleted).",
    )


class ServerTemplate(_ContainerTemplate):
    """The aggregator's container; image and command default to fedkube's own."""

    image: str | None = Field(
        default=None, min_length=1, description="Server image; default: the operator's (chart jobDefaults.image)."
    )
    command: list[str] = Field(
        default_factory=lambda: ["fedkube", "server"], min_length=1, description="Server command."
    )
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Checkpoint storage.")
    expose: Expose = Field(default_factory=Expose, description="Reach the server from outside (remote sites).")


class TrainerTemplate(_ContainerTemplate):
    """The user's training container, run once per client site next to the job-cell sidecar."""

    image: str = Field(min_length=1, description="Trainer image (holds the training script).")
    command: list[str] = Field(min_length=1, description="Trainer command, e.g. [python, train.py].")
    working_dir: str | None = Field(
        default=None, alias="workingDir", description="Working directory of the command (absolute path)."
    )
    egress: Egress = Field(default_factory=list)


class ClientSite(PodOverrides):
    """One client site, with optional overrides of the trainer template for this site only."""

    name: str = Field(
        max_length=63, pattern=DNS1123_LABEL, description="Site name: lower-case letters, digits and '-'."
    )
    env: list[EnvVar] = Field(
        default_factory=list, description="Added to the trainer's env; a name the template also sets is replaced."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Merged over the trainer's resources, per resource name."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, alias="nodeSelector", description="Merged over the trainer's nodeSelector."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, description="Replaces the trainer template's tolerations when given."
    )
    image: str | None = Field(default=None, min_length=1, description="Replaces the trainer's image for this site.")
    volumes: list[Volume] = Field(
        default_factory=list, description="Added to the trainer's volumes; one of the same name replaces it."
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        alias="volumeMounts",
        description="Added to the trainer's volumeMounts; one at the same mountPath replaces it.",
    )
    remote: bool = Field(
        default=False,
        description="The site runs outside this cluster and joins with its join bundle ({job}-join-{site}); "
        "the operator creates no pod for it (docs/remote-sites.md).",
    )


ModelSourceKind = Literal["file", "firstClient"]


class ModelSource(_Model):
    """Where round 1's global model comes from."""

    source: ModelSourceKind = Field(
        default="firstClient", description="file: load `path` in the server; firstClient: ask one client."
    )
    path: str | None = Field(
        default=None,
        description=(
            "With source file: path of the weights in the server pod: a .safetensors file or a directory of shards "
            "with model.safetensors.index.json, a torch.save state dict, a numpy .npz, or a fedkube checkpoint "
            "directory; the format is read from the content."
        ),
    )
    max_bytes: int | None = Field(
        default=None,
        alias="maxBytes",
        ge=1,
        description=(
            "Largest initial model (bytes, all tensors) the server accepts from the first client; a larger "
            "announcement is refused before anything is allocated. The server holds about 2.2x the model during a "
            "round, so the model must stay below limit/2.5. Default: 40% of spec.server.resources.limits.memory "
            "when set, otherwise 64 GiB."
        ),
    )


# The server holds ~2.2x S during a round (bench/README.md); 40% of its memory limit keeps 2.5x S under it.
MAX_BYTES_SHARE_OF_MEMORY_PERCENT = 40
DEFAULT_MAX_BYTES = 64 << 30


def model_max_bytes(model: ModelSource, server_memory_limit: str | None) -> int:
    """The bound on the initial model's bytes: ``maxBytes``, else derived from the server's memory limit."""
    if model.max_bytes is not None:
        return model.max_bytes
    if server_memory_limit is None:
        return DEFAULT_MAX_BYTES
    return max(1, int(parse_quantity(server_memory_limit) * MAX_BYTES_SHARE_OF_MEMORY_PERCENT / 100))


class Sidecar(_Model):
    """The job-cell sidecar next to every trainer."""

    image: str | None = Field(
        default=None, min_length=1, description="Sidecar image; default: the operator's (chart jobDefaults.image)."
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "50m", "memory": "64Mi"}, limits={"memory": "256Mi"}),
        description="Sidecar resources; it relays streams with bounded memory.",
    )


class Transfer(_Model):
    """Chunked tensor transfer settings."""

    # Bounds mirror fedkube.transfer.wire (DEFAULT/MAX_CHUNK_BYTES; a test keeps them equal): the spec model
    # stays free of grpc, and a chunk above the transfer layer's gRPC message size could never be sent.
    chunk_bytes: int = Field(default=1 << 20, alias="chunkBytes", ge=4096, le=16 << 20, description="Bytes per chunk.")
    chunk_timeout_seconds: float = Field(
        default=30.0, alias="chunkTimeoutSeconds", ge=MIN_SECONDS, description="Timeout of one chunk request."
    )
    idle_timeout_seconds: float = Field(
        default=120.0,
        alias="idleTimeoutSeconds",
        ge=MIN_SECONDS,
        description="A transfer with no progress this long fails.",
    )
    max_attempts: int = Field(default=5, alias="maxAttempts", ge=1, le=100, description="Attempts per transfer.")


class Timeouts(_Model):
    """Job lifecycle timeouts, in seconds."""

    round_seconds: float = Field(
        default=3600.0, alias="roundSeconds", ge=MIN_SECONDS, description="Deadline of one round."
    )
    heartbeat_seconds: float = Field(
        default=30.0,
        alias="heartbeatSeconds",
        ge=MIN_SECONDS,
        description="A registered client silent this long is lost.",
    )
    registration_seconds: float = Field(
        default=600.0, alias="registrationSeconds", ge=MIN_SECONDS, description="How long round 1 waits for clients."
    )
    deploy_seconds: float = Field(
        default=600.0, alias="deploySeconds", ge=MIN_SECONDS, description="A client pod not Ready this long fails."
    )
    pending_seconds: float = Field(
        default=300.0, alias="pendingSeconds", ge=MIN_SECONDS, description="A pod Pending this long fails."
    )


class FLJobSpec(_Model):
    """What to train, where, and how."""

    rounds: int = Field(ge=1, le=1_000_000, description="Number of federated rounds.")
    min_clients: int | None = Field(
        default=None, alias="minClients", ge=1, description="Quorum: results needed per round (default: all clients)."
    )
    strategy: Strategy = Field(default_factory=Strategy, description="Aggregation strategy.")
    model: ModelSource = Field(default_factory=ModelSource, description="Initial global model.")
    output: Output | None = Field(default=None, description="Where the trained model is delivered (safetensors).")
    evaluation: Evaluation | None = Field(default=None, description="Federated evaluation of the global model.")
    server: ServerTemplate = Field(default_factory=ServerTemplate, description="Server (aggregator) container.")
    clients: list[ClientSite] = Field(
        min_length=1,
        description="Client sites, one pod each.",
        # Lets the API server itself reject duplicate site names.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    trainer: TrainerTemplate = Field(description="Trainer container every client site runs.")
    sidecar: Sidecar = Field(default_factory=Sidecar, description="Job-cell sidecar.")
    transfer: Transfer = Field(default_factory=Transfer, description="Tensor transfer settings.")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Lifecycle timeouts.")
    security: Security = Field(default_factory=Security, description="Mutual TLS between the server and sites.")
    suspend: bool = Field(default=False, description="Remove the pods and keep the checkpoint; false resumes.")
    revoked_sites: list[SiteName] | None = Field(
        default=None, alias="revokedSites", max_length=1000,
        description="Sites refused from now on, while the job runs (docs/security.md, 'Revoke a site').",
    )
    client_restart_limit: int = Field(
        default=3, alias="clientRestartLimit", ge=0, le=100,
        description="Times a site's evicted, deleted or failed pod is created again; past it the site fails.",
    )
    queue_name: str | None = Field(
        default=None,
        alias="queueName",
        max_length=63,
        pattern=DNS1123_LABEL,
        description="Kueue LocalQueue: the job's pods are admitted as one Kueue pod group (or label the FLJob "
        "kueue.x-k8s.io/queue-name).",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        alias="ttlSecondsAfterFinished",
        ge=0,
        description="Delete the job's pods this long after it ends.",
    )

    @property
    def quorum(self) -> int:
        """Results needed per round: `minClients`, or every client when unset."""
        return self.min_clients if self.min_clients is not None else len(self.clients)


class ObjectMeta(_Model):
    """The part of Kubernetes metadata fedkube reads; what the API server adds is ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

    name: str = Field(min_length=1, max_length=63, pattern=DNS1035_LABEL, description="FLJob name.")
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS1123_LABEL, description="Namespace.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations (copied to the pods).")
    uid: str | None = Field(default=None, description="Set by the API server.")


class FLJob(_Model):
    """A federated learning job (apiVersion fedkube.dev/v1alpha1, kind FLJob)."""

    # The API server adds status; the spec model reads only what it owns.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)

    api_version: Literal["fedkube.dev/v1alpha1"] = Field(default="fedkube.dev/v1alpha1", alias="apiVersion")
    kind: Literal["FLJob"] = "FLJob"
    metadata: ObjectMeta
    spec: FLJobSpec
    status: PassThrough | None = Field(default=None, exclude=True)

    @property
    def name(self) -> str:
        """The job's name."""
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """The job's namespace (`default` when the manifest names none)."""
        return self.metadata.namespace or "default"

    def to_manifest(self) -> dict[str, Any]:
        """The job as a Kubernetes manifest with every default filled in; `parse_job` of it gives this job back."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
        meta = data["metadata"]
        for key in ("labels", "annotations"):
            if not meta.get(key):
                meta.pop(key, None)
        return data
