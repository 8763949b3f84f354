"""The operator's calls to the Kubernetes API and to the server's status endpoint, in one small module.

Handlers stay thin and the lifecycle rules stay pure (``status.py``); this is
the only place that talks to the outside. The official ``kubernetes`` client
is synchronous; kopf runs synchronous handlers in worker threads, so nothing
here blocks the operator's event loop. Every call is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from base64 import b64decode
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedkube import envvars
from fedkube.errors import FedkubeError
from fedkube.operator import naming
from fedkube.operator.certapi import CertificateApi
from fedkube.operator.probe import get_document
from fedkube.spec.model import API_GROUP, API_VERSION_NAME, PLURAL
from fedkube.status import STATUS_LIMIT, JobStatus, SummaryError

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # seconds per Kubernetes API call
STATUS_TIMEOUT = 2.0  # seconds per poll of a server's /status
TOKEN_BYTES = 32

# Kinds the operator creates, in the order a job needs them; deleted in reverse on TTL.
CHILD_KINDS = ("ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "PodDisruptionBudget", "Pod")
# Objects whose spec the API server does not let us change in place: an existing one is left as it is.
_IMMUTABLE = frozenset({"Pod", "PersistentVolumeClaim"})


@dataclass(frozen=True)
class JobRef:
    """The FLJob that owns children: its namespace, name and uid (a new FLJob of the same name has a new uid)."""

    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> JobRef:
        """The reference of an FLJob as read from the API server (kopf's body or a fresh GET)."""
        meta = body.get("metadata") or {}
        if not (meta.get("namespace") and meta.get("name") and meta.get("uid")):
            raise ValueError("an FLJob read from the API server has a namespace, a name and a uid; this one lacks "
                             f"some: {dict(meta)!r}")
        return cls(str(meta["namespace"]), str(meta["name"]), str(meta["uid"]))


class NameConflict(FedkubeError):
    """An object the job needs exists already and is not this FLJob's: the operator leaves it untouched."""

    def __init__(self, job: JobRef, kind: str, name: str, why: str) -> None:
        self.job, self.kind, self.name = job, kind, name
        super().__init__(
            f"{kind} {job.namespace}/{name} already exists and does not belong to FLJob {job.namespace}/{job.name} "
            f"({why}); the operator neither changes, uses nor deletes it, and the job failed. Fix: create the FLJob "
            f"under another name, or, if that {kind} is a leftover nobody needs, delete it and create the FLJob again")


class CreateRefused(FedkubeError):
    """The API server refused to create a child (quota, PodSecurity, an admission webhook, an invalid object).

    ``message`` is the API server's own words (they name the quota, the policy or the webhook), prefixed with
    the child's kind and name, since the job's status and Events show it to someone who never saw the request.
    """

    def __init__(self, kind: str, namespace: str, name: str, code: int, reason: str, detail: str) -> None:
        self.kind, self.name, self.code, self.reason, self.detail = kind, name, code, reason, detail
        super().__init__(f"{kind} {namespace}/{name}: the API server refused to create it ({code} {reason}): {detail}")


# Answers to a create that say "not this object, not now" rather than "the request was broken or lost": a
# quota or policy can change, so they are retried with backoff and shown on the job (issue 14).
_REFUSALS = frozenset({400, 403, 422})


def _refusal(exc: Any, kind: str, namespace: str, name: str) -> CreateRefused:
    body: Any = None
    with contextlib.suppress(TypeError, ValueError):
        body = json.loads(exc.body or "")
    status = body if isinstance(body, dict) else {}
    detail = str(status.get("message") or exc.body or exc.reason or "no message")
    return CreateRefused(kind, namespace, name, int(exc.status), str(status.get("reason") or exc.reason or ""),
                         detail)


def foreign(obj: Mapping[str, Any], job: JobRef) -> str | None:
    """Why ``obj`` is not a child of ``job``, or None when it is (it carries the job's label and its uid).

    Both are needed: the label alone can be set by anyone who may create
    objects in the namespace, and an owner reference alone may be a leftover of
    a deleted job's child adopted by hand. The uid is fresh for every FLJob, so
    an object created before the job cannot carry it by accident.
    """
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(naming.LABEL_JOB) != job.name:
        return f"it lacks the label {naming.LABEL_JOB}={job.name}"
    if not any(ref.get("uid") == job.uid for ref in meta.get("ownerReferences") or []):
        return f"no ownerReference names the FLJob's uid {job.uid}"
    return None


class Kube:
    """Create, create-or-patch, read, list and delete an FLJob's children through the core/v1 API.

    Every write is limited to objects this FLJob owns (:func:`foreign`): an
    object of the same name that belongs to someone else is never patched,
    read as the job's own or deleted. The client methods are named literally
    (no ``getattr`` on built names): tests/unit/chart/test_rbac.py reads them
    from this file to derive the chart's RBAC rules, which then cannot drift.
    """

    def __init__(self, api_client: Any, *, timeout: float = REQUEST_TIMEOUT) -> None:
        import kubernetes

        core = kubernetes.client.CoreV1Api(api_client)
        self.core = core
        # fedkube.operator.netpol's policies are networking.k8s.io, not core.
        networking = kubernetes.client.NetworkingV1Api(api_client)
        self.networking = networking
        # The server's PodDisruptionBudget (fedkube.operator.disruption) is policy/v1.
        policy = kubernetes.client.PolicyV1Api(api_client)
        # cert-manager Certificates (spec.security.issuerRef): a custom resource, called the way core kinds are.
        certificates = CertificateApi(api_client)
        self.timeout = timeout
        self._create: dict[str, Callable[..., Any]] = {
            "ConfigMap": core.create_namespaced_config_map,
            "Secret": core.create_namespaced_secret,
            "PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim,
            "Service": core.create_namespaced_service,
            "Pod": core.create_namespaced_pod,
            "NetworkPolicy": networking.create_namespaced_network_policy,
            "PodDisruptionBudget": policy.create_namespaced_pod_disruption_budget,
            "Certificate": certificates.create,
        }
        self._read: dict[str, Callable[..., Any]] = {
            "ConfigMap": core.read_namespaced_config_map,
            "Secret": core.read_namespaced_secret,
            "PersistentVolumeClaim": core.read_namespaced_persistent_volume_claim,
            "Service": core.read_namespaced_service,
            "Pod": core.read_namespaced_pod,
            "NetworkPolicy": networking.read_namespaced_network_policy,
            "PodDisruptionBudget": policy.read_namespaced_pod_disruption_budget,
            "Certificate": certificates.read,
        }
        # Pods and claims are never patched (_IMMUTABLE), so the operator is not granted that.
        self._patch: dict[str, Callable[..., Any]] = {
            "ConfigMap": core.patch_namespaced_config_map,
            "Secret": core.patch_namespaced_secret,
            "Service": core.patch_namespaced_service,
            "NetworkPolicy": networking.patch_namespaced_network_policy,
            "PodDisruptionBudget": policy.patch_namespaced_pod_disruption_budget,
            "Certificate": certificates.patch,
        }
        self._delete: dict[str, Callable[..., Any]] = {
            "ConfigMap": core.delete_namespaced_config_map,
            "Secret": core.delete_namespaced_secret,
            "PersistentVolumeClaim": core.delete_namespaced_persistent_volume_claim,
            "Service": core.delete_namespaced_service,
            "Pod": core.delete_namespaced_pod,
            "PodDisruptionBudget": policy.delete_namespaced_pod_disruption_budget,
            "Certificate": certificates.delete,
        }

    def _fn(self, table: Mapping[str, Callable[..., Any]], kind: str) -> Callable[..., Any]:
        fn = table.get(kind)
        if fn is None:
            raise ValueError(f"the operator does not handle objects of kind {kind!r} this way")
        return fn

    # --- create or patch ------------------------------------------------------------------
    def create_or_patch(self, manifest: Mapping[str, Any], job: JobRef) -> str:
        """Create ``manifest``; when it exists (409) and is ``job``'s own, patch it (pods and claims: leave it).

        Returns "created", "patched" or "exists"; raises :class:`NameConflict`
        when the existing object is not ``job``'s (it is then not touched), and
        :class:`CreateRefused` when the API server refuses the create.
        Idempotent: running it again for the same job changes nothing.
        """
        from kubernetes.client.exceptions import ApiException

        kind = str(manifest["kind"])
        meta = manifest["metadata"]
        name, namespace = str(meta["name"]), str(meta["namespace"])
        try:
            self._fn(self._create, kind)(namespace, dict(manifest), _request_timeout=self.timeout)
            logger.info("created %s %s/%s", kind, namespace, name)
            return "created"
        except ApiException as exc:
            if exc.status in _REFUSALS:
                raise _refusal(exc, kind, namespace, name) from exc
            if exc.status != 409:
                raise
        # A 404 here (deleted since the 409) is an ApiException too: the caller retries, and then creates it.
        existing = self._get(kind, namespace, name)
        why = foreign(existing, job)
        if why is not None:
            raise NameConflict(job, kind, name, why)
        if kind in _IMMUTABLE:
            return "exists"
        # A JSON merge patch: we own these objects whole, so lists (ports, data keys) are replaced, not merged.
        # The resourceVersion we checked ownership at is a precondition: a change since then is a 409, not a write.
        body = {**manifest, "metadata": {**meta, "resourceVersion": existing["metadata"]["resourceVersion"]}}
        self._fn(self._patch, kind)(name, namespace, body, _request_timeout=self.timeout,
                                    _content_type="application/merge-patch+json")
        return "patched"

    # --- read ---------------------------------------------------------------------------
    def _get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        resp = self._fn(self._read, kind)(name, namespace, _preload_content=False, _request_timeout=self.timeout)
        doc = json.loads(resp.data)
        if not isinstance(doc, dict):
            raise ValueError(f"the API server answered a GET of {kind} {namespace}/{name} with no object")
        return doc

    def _get_or_none(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._get(kind, namespace, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def job_service(self, job: JobRef, name: str) -> dict[str, Any] | None:
        """``job``'s Service ``name`` as stored (None when absent); NameConflict when it is not the job's."""
        service = self._get_or_none("Service", job.namespace, name)
        why = None if service is None else foreign(service, job)
        if why is not None:
            raise NameConflict(job, "Service", name, why)
        return service

    def job_secret_data(self, job: JobRef, name: str) -> dict[str, str] | None:
        """The decoded data of ``job``'s Secret ``name``; None when it does not exist.

        Raises :class:`NameConflict` when a Secret of that name exists but is
        not the job's: its content must never become the job's tokens (they are
        mounted into pods that run images the FLJob's author chose).
        """
        secret = self._get_or_none("Secret", job.namespace, name)
        if secret is None:
            return None
        why = foreign(secret, job)
        if why is not None:
            raise NameConflict(job, "Secret", name, why)
        return {k: b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

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

    def job_pods(self, job: JobRef) -> list[dict[str, Any]]:
        """``job``'s pods (its label and its uid; a look-alike pod of someone else is not one), as plain dicts."""
        selector = ",".join(f"{k}={v}" for k, v in naming.job_selector(job.name).items())
        resp: Any = self.core.list_namespaced_pod(job.namespace, label_selector=selector, _preload_content=False,
                                                  _request_timeout=self.timeout)
        doc = json.loads(resp.data)
        return [item for item in doc.get("items") or [] if isinstance(item, dict) and foreign(item, job) is None]

    # --- delete ---------------------------------------------------------------------------
    def delete_pods(self, job: JobRef, pods: Iterable[Mapping[str, Any]]) -> None:
        """Delete these pods of ``job`` (as :meth:`job_pods` gave them); one already gone or replaced is fine."""
        for pod in pods:
            self._delete_owned("Pod", job, pod)

    def delete_children(self, job: JobRef, children: Iterable[tuple[str, str]]) -> int:
        """Delete ``job``'s pods, then each (kind, name) in ``children`` that is ``job``'s; returns how many went.

        The children are named, not listed: listing Secrets would read every
        Secret of the namespace, and a label selector alone would also match
        someone else's look-alike. An object that is not the job's stays.
        """
        count = sum(self._delete_owned("Pod", job, pod) for pod in self.job_pods(job))
        for kind, name in children:
            obj = self._get_or_none(kind, job.namespace, name)
            if obj is None:
                continue
            why = foreign(obj, job)
            if why is not None:
                logger.warning("job %s/%s: %s %s is not the job's (%s); left in place", job.namespace, job.name,
                               kind, name, why)
                continue
            count += self._delete_owned(kind, job, obj)
        return count

    def _delete_owned(self, kind: str, job: JobRef, obj: Mapping[str, Any]) -> bool:
        """Delete ``obj`` (checked to be ``job``'s) only while it is the same object: its uid is a precondition."""
        from kubernetes.client.exceptions import ApiException

        meta = obj.get("metadata") or {}
        name = str(meta["name"])
        body = {"preconditions": {"uid": meta["uid"]}}
        try:
            self._fn(self._delete, kind)(name, job.namespace, body=body, _request_timeout=self.timeout)
        except ApiException as exc:
            # 404: gone already; 409: the name now holds another object (precondition failed), not ours to delete.
            if exc.status in (404, 409):
                return False
            raise
        logger.info("job %s/%s: deleted %s %s", job.namespace, job.name, kind, name)
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
    body = get_document(url, limit=STATUS_LIMIT, timeout=timeout, what="server status")
    if body is None:
        return None
    try:
        return JobStatus.from_json(body)
    except SummaryError as exc:
        logger.warning("server status %s: unreadable document: %s", url, exc)
        return None
