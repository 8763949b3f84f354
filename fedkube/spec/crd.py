"""The FLJob CustomResourceDefinition, generated from the spec model (the one source of the schema).

Kubernetes wants a *structural* OpenAPI v3 schema: every node typed, no
``$ref``, no ``anyOf`` over types, ``additionalProperties`` never next to
``properties``; bounds are inclusive only (``minimum``/``maximum``). Pydantic emits JSON
Schema 2020-12; :func:`to_structural` rewrites it. Defaults are left out of the
CRD and applied by the spec model instead (the server, the operator and
``fedkube run`` all load jobs through it), but are named in each description so
``kubectl explain`` shows them.
"""

from __future__ import annotations

import json
from typing import Any

from fedkube.spec.cel import attach as attach_cel_rules
from fedkube.spec.model import API_GROUP, API_VERSION_NAME, KIND, PLURAL, SHORT_NAME, FLJob, FLJobSpec
from fedkube.spec.status import FLJobStatus

_DROP = {"title", "default", "examples"}


def to_structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rewrite a pydantic JSON schema into a structural Kubernetes schema with every ``$ref`` inlined."""
    defs = schema.get("$defs", {}) if defs is None else defs
    return _convert(schema, defs)


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    node.pop("$defs", None)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        node = {**defs[name], **node}
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"a CRD schema cannot express a union of {len(variants)} types: {variants}")
        node = {**variants[0], **node}
        if "$ref" in node:
            return _convert(node, defs)
    out: dict[str, Any] = {}
    default = node.get("default")
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # OpenAPI v3.0 spells it `minimum: 0` + `exclusiveMinimum: true`, which JSON Schema
            # tools (and readers) take to allow 0 while the model refuses it.
            raise ValueError(
                f"{key} {value!r} has no reading that every CRD consumer shares; "
                "use an inclusive bound (ge=/le=) with the smallest value that makes sense"
            )
        elif key == "properties":
            out[key] = {k: _convert(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _convert(value, defs)
            elif value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            # False: Kubernetes prunes unknown fields and `kubectl apply` rejects them (strict field validation).
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = _json_type(out["enum"][0])
    if default is not None and default != [] and default != {}:
        shown = json.dumps(default)
        out["description"] = (out.get("description", "").rstrip() + f" Default: {shown}.").strip()
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def resource_schema(doc: str | None, spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """A fedkube custom resource's openAPIV3Schema from its structural spec and status schemas."""
    # kopf keeps handler progress under status.kopf; without this the API server would prune it.
    status["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "type": "object",
        "description": doc,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def resource_definition(*, kind: str, plural: str, short_name: str, columns: list[dict[str, str]],
                        schema: dict[str, Any]) -> dict[str, Any]:
    """The CustomResourceDefinition manifest of a namespaced fedkube resource (group fedkube.dev, one version)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "fedkube", "app.kubernetes.io/part-of": "fedkube"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["fedkube"],
            },
            "versions": [
                {
                    "name": API_VERSION_NAME,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema: spec from :class:`FLJobSpec`, status from :class:`FLJobStatus`."""
    # Cross-field rules as CEL (fedkube.spec.cel), so `kubectl apply` refuses what the operator would.
    spec = attach_cel_rules(to_structural(FLJobSpec.model_json_schema(by_alias=True, mode="validation")))
    status = to_structural(FLJobStatus.model_json_schema(by_alias=True, mode="validation"))
    return resource_schema(FLJob.__doc__, spec, status)


def build_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition manifest for FLJob."""
    return resource_definition(kind=KIND, plural=PLURAL, short_name=SHORT_NAME, schema=openapi_schema(), columns=[
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Round", "type": "string", "jsonPath": ".status.roundDisplay"},
        {"name": "Clients", "type": "string", "jsonPath": ".status.clientsDisplay"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ])
