"""Names and labels of an FLJob's children, in one place so builders, handlers and the runtime agree."""

from __future__ import annotations

GROUP = "fedkube.dev"
LABEL_JOB = f"{GROUP}/job"
LABEL_ROLE = f"{GROUP}/role"
LABEL_SITE = f"{GROUP}/site"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"

ROLE_SERVER = "server"
ROLE_CLIENT = "client"
#: The job CA's Secret: read by the operator only, mounted by no pod.
ROLE_CA = "ca"

SERVER_CONTAINER = "server"
SIDECAR_CONTAINER = "sidecar"
TRAINER_CONTAINER = "trainer"

# Placeholder that `fedkube render` prints instead of real tokens, so its output is safe to share.
TOKEN_PLACEHOLDER = "<generated-by-operator>"


def server_name(job: str) -> str:
    """The server Pod and Service: ``{job}-server``."""
    return f"{job}-server"


def client_pod_name(job: str, site: str) -> str:
    """A client site's Pod: ``{job}-client-{site}``."""
    return f"{job}-client-{site}"


def spec_configmap_name(job: str) -> str:
    """The ConfigMap holding the job spec as JSON."""
    return f"{job}-spec"


def server_tokens_secret_name(job: str) -> str:
    """The Secret with every site's token, mounted only into the server."""
    return f"{job}-server-tokens"


def client_token_secret_name(job: str, site: str) -> str:
    """The Secret with one site's token, mounted only into that site's sidecar."""
    return f"{job}-client-{site}-token"


def ca_secret_name(job: str) -> str:
    """The Secret with the job CA's certificate and key; only the operator reads it."""
    return f"{job}-ca"


def server_tls_secret_name(job: str) -> str:
    """The server's TLS Secret (job CA, its certificate and key), mounted only into the server container."""
    return f"{job}-server-tls"


def client_tls_secret_name(job: str, site: str) -> str:
    """One site's TLS Secret, mounted only into that site's sidecar.

    ``{job}-client-{site}-tls`` like the token Secret, not ``{job}-{site}-tls``: a site may be named ``server``.
    """
    return f"{job}-client-{site}-tls"


def checkpoint_pvc_name(job: str) -> str:
    """The checkpoint PersistentVolumeClaim."""
    return f"{job}-checkpoint"


def server_address(job: str, namespace: str, port: int) -> str:
    """The server's in-cluster gRPC address, as the sidecars dial it."""
    return f"{server_name(job)}.{namespace}.svc:{port}"


def job_selector(job: str) -> dict[str, str]:
    """Labels that select every child of a job."""
    return {LABEL_JOB: job}


def labels(job: str, role: str, site: str | None = None) -> dict[str, str]:
    """The labels of one child: ours under fedkube.dev/ plus the recommended app.kubernetes.io/ set."""
    out = {
        LABEL_JOB: job,
        LABEL_ROLE: role,
        "app.kubernetes.io/name": "fedkube",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/part-of": "fedkube",
        "app.kubernetes.io/managed-by": "fedkube-operator",
    }
    if site is not None:
        out[LABEL_SITE] = site
    return out
