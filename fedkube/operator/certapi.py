"""cert-manager's Certificate resource, called with the signatures of the core API's namespaced methods.

`fedkube.operator.kube` keeps one table per verb, kind -> client method ``(name, namespace, ...)``; a
Certificate is a custom resource of another group, so these adapters give it the same shape and the ownership
checks, preconditions and NameConflict handling of every other child apply to it unchanged. Only jobs with
`spec.security.issuerRef` have Certificates; a cluster without cert-manager answers 404, which the callers
treat as "none". (tests/unit/chart/test_rbac.py reads this module's custom-object calls as cert-manager's.)
"""

from __future__ import annotations

from typing import Any

GROUP = "cert-manager.io"
VERSION = "v1"
PLURAL = "certificates"


class CertificateApi:
    """create/read/patch/delete of namespaced cert-manager Certificates."""

    def __init__(self, api_client: Any) -> None:
        import kubernetes

        self._custom = kubernetes.client.CustomObjectsApi(api_client)

    def create(self, namespace: str, body: Any, **kw: Any) -> Any:
        return self._custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, **kw)

    def read(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, **kw)

    def patch(self, name: str, namespace: str, body: Any, **kw: Any) -> Any:
        return self._custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body, **kw)

    def delete(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, **kw)
