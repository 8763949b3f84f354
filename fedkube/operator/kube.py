"""The operator's calls to the Kubernetes API and to the server's status endpoint, in one small module.

Handlers stay thin and the lifecycle rules stay pure (``status.py``); this is
the only place that talks to the outside. The official ``kubernetes`` client
is synchronous; kopf runs synchronous handlers in worker threads, so nothing
here blocks the operator's event loop. Every call is bounded by a timeout.
"""

from __future__ import annotations

import json
import logging
import secrets
import urllib.error
import urllib.request
from base64 import b64decode
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fedkube import envvars
from fedkube.operator import naming
from fedkube.spec.model import API_GROUP, API_VERSION_NAME, PLURAL
from fedkube.status import STATUS_LIMIT, JobStatus, SummaryError

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # seconds per Kubernetes API call
STATUS_TIMEOUT = 2.0  # seconds per poll of a server's /status
TOKEN_BYTES = 32

CERTIFICATE_GROUP_VERSION = ("cert-manager.io", "v1")
CERTIFICATE_PLURAL = "certificates"
# Kinds the operator creates, in the order a job needs them; deleted in reverse on TTL.
CHILD_KINDS = ("ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "Pod")
# Objects whose spec the API server does not let us change in place: an existing one is left as it is.
_IMMUTABLE = frozenset({"Pod", "PersistentVolumeClaim"})


class Kube:
    """Create, adopt-aware create-or-patch, list and delete an FLJob's children through the core/v1 API."""

    def __init__(self, api_client: Any, *, timeout: float = REQUEST_TIMEOUT) -> None:
        import kubernetes

        self.core = kubernetes.client.CoreV1Api(api_client)
        self.timeout = timeout

    # --- create or patch ------------------------------------------------------------------
    def _ops(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        suffix = {
            "ConfigMap": "config_map",
            "Secret": "secret",
            "PersistentVolumeClaim": "persistent_volume_claim",
            "Service": "service",
            "Pod": "pod",
        }.get(kind)
        if suffix is None:
            raise ValueError(f"the operator does not create objects of kind {kind!r}")
        return (getattr(self.core, f"create_namespaced_{suffix}"), getattr(self.core, f"patch_namespaced_{suffix}"))

    def create_or_patch(self, manifest: Mapping[str, Any]) -> str:
        """Create ``manifest``; when it exists (409), patch it, except pods and claims (immutable spec).

        Returns "created", "patched" or "exists". Idempotent: running it again
        for the same job changes nothing.
        """
        from kubernetes.client.exceptions import ApiException

        kind = str(manifest["kind"])
        meta = manifest["metadata"]
        name, namespace = str(meta["name"]), str(meta["namespace"])
        create, patch = self._ops(kind)
        try:
            create(namespace, dict(manifest), _request_timeout=self.timeout)
            logger.info("created %s %s/%s", kind, namespace, name)
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        if kind in _IMMUTABLE:
            return "exists"
        # A JSON merge patch: we own these objects whole, so lists (ports, data keys) are replaced, not merged.
        patch(name, namespace, dict(manifest), _request_timeout=self.timeout,
              _content_type="application/merge-patch+json")
        return "patched"

    def create_or_patch_custom(self, manifest: Mapping[str, Any], plural: str) -> str:
        """``create_or_patch`` for a namespaced custom object (a cert-manager Certificate): "created" or "patched"."""
        import kubernetes
        from kubernetes.client.exceptions import ApiException

        custom = kubernetes.client.CustomObjectsApi(self.core.api_client)
        group, _, version = str(manifest["apiVersion"]).rpartition("/")
        meta = manifest["metadata"]
        name, namespace = str(meta["name"]), str(meta["namespace"])
        try:
            custom.create_namespaced_custom_object(group, version, namespace, plural, dict(manifest),
                                                   _request_timeout=self.timeout)
            logger.info("created %s %s/%s", manifest["kind"], namespace, name)
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        custom.patch_namespaced_custom_object(group, version, namespace, plural, name, dict(manifest),
                                              _request_timeout=self.timeout,
                                              _content_type="application/merge-patch+json")
        return "patched"

    # --- read ---------------------------------------------------------------------------
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The decoded data of a Secret, or None when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self.core.read_namespaced_secret(name, namespace, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def fljob(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FLJob as the API server has it now (kopf's cached body may lag behind our last status patch)."""
        import kubernetes
        from kubernetes.client.exceptions import ApiException

        custom = kubernetes.client.CustomObjectsApi(self.core.api_client)
        try:
            resp: Any = custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION_NAME, namespace, PLURAL, name, _preload_content=False,
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        doc = json.loads(resp.data)
        return doc if isinstance(doc, dict) else None

    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """Every pod of ``job`` (by the ``fedkube.dev/job`` label), as plain dicts in API field names."""
        return self._list("pod", namespace, job)

    def _list(self, suffix: str, namespace: str, job: str) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in naming.job_selector(job).items())
        fn = getattr(self.core, f"list_namespaced_{suffix}")
        resp = fn(namespace, label_selector=selector, _preload_content=False, _request_timeout=self.timeout)
        doc = json.loads(resp.data)
        return [item for item in doc.get("items") or [] if isinstance(item, dict)]

    # --- delete ---------------------------------------------------------------------------
    def delete_pods(self, namespace: str, names: Iterable[str]) -> None:
        """Delete these pods; one already gone is fine."""
        for name in names:
            self._delete("pod", namespace, name)

    def delete_children(self, namespace: str, job: str, *, certificates: bool = False) -> int:
        """Delete every child of ``job`` (pods first); returns how many objects were deleted.

        ``certificates``: the job has cert-manager Certificates (``spec.security.issuerRef``); only then is
        cert-manager's API called, which a cluster without cert-manager (or the RBAC rule for it) refuses.
        """
        # Certificates before Secrets: a Certificate left behind has cert-manager write its Secret again.
        count = self._delete_certificates(namespace, job) if certificates else 0
        for suffix in ("pod", "service", "secret", "config_map", "persistent_volume_claim"):
            for item in self._list(suffix, namespace, job):
                if self._delete(suffix, namespace, str(item["metadata"]["name"])):
                    count += 1
        return count

    def _delete_certificates(self, namespace: str, job: str) -> int:
        """Delete the job's cert-manager Certificates; none (and no cert-manager installed) is fine."""
        import kubernetes
        from kubernetes.client.exceptions import ApiException

        custom = kubernetes.client.CustomObjectsApi(self.core.api_client)
        selector = ",".join(f"{k}={v}" for k, v in naming.job_selector(job).items())
        group, version = CERTIFICATE_GROUP_VERSION
        try:
            resp: Any = custom.list_namespaced_custom_object(group, version, namespace, CERTIFICATE_PLURAL,
                                                        label_selector=selector, _preload_content=False,
                                                        _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                return 0  # cert-manager's CRD is not installed: no job of this cluster has Certificates
            raise
        count = 0
        for item in json.loads(resp.data).get("items") or []:
            name = str(item["metadata"]["name"])
            try:
                custom.delete_namespaced_custom_object(group, version, namespace, CERTIFICATE_PLURAL, name,
                                                       _request_timeout=self.timeout)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                continue
            logger.info("deleted certificate %s/%s", namespace, name)
            count += 1
        return count

    def _delete(self, suffix: str, namespace: str, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            getattr(self.core, f"delete_namespaced_{suffix}")(name, namespace, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        logger.info("deleted %s %s/%s", suffix, namespace, name)
        return True


def job_tokens(existing: Mapping[str, str] | None, sites: Iterable[str]) -> dict[str, str]:
    """Per-site tokens: the ones already stored for the job, a fresh random one only for a site that has none.

    Tokens are never regenerated for an existing job: a running sidecar holds
    its token, and a new one would lock it out.
    """
    have = dict(existing or {})
    return {site: have.get(site) or secrets.token_urlsafe(TOKEN_BYTES) for site in sites}


def default_status_url(pod: Mapping[str, Any]) -> str | None:
    """``http://{pod IP}:{status port}/status`` of a server pod, None while it has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = envvars.DEFAULT_STATUS_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for entry in container.get("ports") or []:
            if entry.get("name") == "status":
                port = int(entry["containerPort"])
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"http://{host}:{port}/status"


def fetch_server_status(url: str, timeout: float = STATUS_TIMEOUT) -> JobStatus | None:
    """The server's status document, or None when it does not answer (yet) or answers garbage.

    Not answering is normal while the server starts or after it exited; the
    pod's state tells those apart, so this only logs.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(STATUS_LIMIT + 1)  # one byte more: an oversized answer is refused, not cut
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.debug("server status %s: no answer (%s)", url, exc)
        return None
    try:
        return JobStatus.from_json(body)
    except SummaryError as exc:
        logger.warning("server status %s: unreadable document: %s", url, exc)
        return None
