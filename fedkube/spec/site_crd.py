"""The FLSite CustomResourceDefinition, generated from :mod:`fedkube.spec.site` like the FLJob's."""

from __future__ import annotations

from typing import Any

from fedkube.spec.crd import resource_definition, resource_schema, to_structural
from fedkube.spec.site import KIND, PLURAL, SHORT_NAME, FLSite, FLSiteSpec, FLSiteStatus


def openapi_schema() -> dict[str, Any]:
    spec = to_structural(FLSiteSpec.model_json_schema(by_alias=True, mode="validation"))
    status = to_structural(FLSiteStatus.model_json_schema(by_alias=True, mode="validation"))
    return resource_schema(FLSite.__doc__, spec, status)


def build_site_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition manifest for FLSite (namespaced; installed by the chart in site mode)."""
    return resource_definition(kind=KIND, plural=PLURAL, short_name=SHORT_NAME, schema=openapi_schema(), columns=[
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Job", "type": "string", "jsonPath": ".status.job"},
        {"name": "Round", "type": "integer", "jsonPath": ".status.round"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ])
