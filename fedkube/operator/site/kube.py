"""The site operator's API calls: the bundle Secret, its own TLS Secret and client pod (core/v1 only).

Client methods are named literally: tests/unit/chart/test_rbac.py reads them from this file to derive the
chart's site-mode RBAC.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

REQUEST_TIMEOUT = 10.0


class SiteKube:
    """Reads the join bundle; creates (409 = exists) and reads the FLSite's Secret and pod; deletes a refused pod."""

    def __init__(self, api_client: Any, *, timeout: float = REQUEST_TIMEOUT) -> None:
        import kubernetes

        self.core = kubernetes.client.CoreV1Api(api_client)
        self.timeout = timeout

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's decoded data, None when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self.core.read_namespaced_secret(name, namespace, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def create(self, manifest: Mapping[str, Any]) -> bool:
        """Create a Secret or Pod; False when it already exists."""
        from kubernetes.client.exceptions import ApiException

        namespace = manifest["metadata"]["namespace"]
        body: Any = dict(manifest)  # the client serializes plain dicts as they are
        try:
            if manifest["kind"] == "Secret":
                self.core.create_namespaced_secret(namespace, body, _request_timeout=self.timeout)
            else:
                self.core.create_namespaced_pod(namespace, body, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def patch_secret(self, manifest: Mapping[str, Any]) -> None:
        """Replace the data of the FLSite's own Secret (a renewed certificate)."""
        meta = manifest["metadata"]
        self.core.patch_namespaced_secret(meta["name"], meta["namespace"], {"data": dict(manifest["data"])},
                                          _request_timeout=self.timeout)

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            pod = self.core.read_namespaced_pod(name, namespace, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.core.api_client.sanitize_for_serialization(pod))

    def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        """Delete pod ``name`` if it still is the one with ``uid``; False when it is gone or another one."""
        from kubernetes.client import V1DeleteOptions, V1Preconditions
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_pod(name, namespace, body=V1DeleteOptions(preconditions=V1Preconditions(
                uid=uid)), _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status in (404, 409):  # gone, or a newer pod of that name (the precondition failed)
                return False
            raise
        return True
