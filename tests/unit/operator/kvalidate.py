"""Strict Kubernetes schema validation of rendered objects (kubernetes-validate's bundled schemas).

`kubernetes_validate.validate` re-reads the multi-megabyte definitions file on
every call; the fuzz tests validate hundreds of objects, so the validators are
built once per (Kubernetes version, kind) from the same bundled strict schemas.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jsonschema
from kubernetes_validate import utils
from referencing import Registry, Resource

# Native sidecars (initContainers with restartPolicy: Always) need 1.29+; check the oldest and the newest bundled.
K8S_VERSIONS = ("1.29.0", "1.31.0", "1.37.0")


@functools.cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = utils.schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", version)
    definitions = utils.schema_contents(f"{folder}/_definitions.json", version)
    registry: Registry[Any] = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def assert_valid(obj: dict[str, Any], version: str) -> None:
    """Fail with the object, the field and the reason when `obj` does not validate strictly."""
    error = jsonschema.exceptions.best_match(_validator(version, obj["kind"], obj["apiVersion"]).iter_errors(obj))
    if error is not None:
        where = ".".join(str(p) for p in error.path)
        raise AssertionError(
            f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version} at {where}: {error.message}"
        )
