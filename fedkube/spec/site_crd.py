"""The FLSite CustomResourceDefinition, generated from :mod:`fedkube.spec.site` like the FLJob's."""

from __future__ import annotations

from typing import Any

from fedkube.spec.crd import to_structural
from fedkube.spec.site import API_GROUP, API_VERSION_NAME, KIND, PLURAL, SHORT_NAME, FLSite, FLSiteSpec, FLSiteStatus


def openapi_schema() -> dict[str, Any]:
    spec = to_structural(FLSiteSpec.model_json_schema(by_alias=True, mode="validation"))
    status = to_structural(FLSiteStatus.model_json_schema(by_alias=True, mode="validation"))
    status["x-kubernetes-preserve-unknown-fields"] = True  # kopf's handler progress under status.kopf
    return {
        "type": "object",
        "description": FLSite.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def build_site_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition manifest for FLSite (namespaced; installed by the chart in site mode)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "fedkube", "app.kubernetes.io/part-of": "fedkube"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower(),
                "shortNames": [SHORT_NAME], "categories": ["fedkube"],
            },
            "versions": [
                {
                    "name": API_VERSION_NAME,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Job", "type": "string", "jsonPath": ".status.job"},
                        {"name": "Round", "type": "integer", "jsonPath": ".status.round"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }
