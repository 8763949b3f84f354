"""Strict Kubernetes schema validation of rendered objects (kubernetes-validate's bundled schemas)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

# Native sidecars (initContainers with restartPolicy: Always) need 1.29+; check the oldest and the newest bundled.
K8S_VERSIONS = ("1.29.0", "1.31.0", "1.37.0")


def assert_valid(obj: dict[str, Any], version: str) -> None:
    """Fail with the object, the field and the reason when `obj` does not validate strictly."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise AssertionError(
            f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version} at {where}: {exc.message}"
        ) from None
