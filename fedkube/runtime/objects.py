"""Secrets and ConfigMaps of pods run locally: where they come from, and how they become files."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedkube.errors import ConfigError


class ObjectLookup(Protocol):
    """Finds the Secrets and ConfigMaps a pod's volumes and env refer to."""

    def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The manifest of ``kind`` (``Secret`` or ``ConfigMap``) named ``name``, or None."""


class ManifestObjects:
    """An ``ObjectLookup`` over a list of rendered manifests."""

    def __init__(self, manifests: Sequence[Mapping[str, Any]]) -> None:
        self._objects: dict[tuple[str, str, str], Mapping[str, Any]] = {}
        for obj in manifests:
            meta = obj.get("metadata", {})
            key = (str(obj.get("kind")), str(meta.get("namespace") or "default"), str(meta.get("name")))
            self._objects[key] = obj

    def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self._objects.get((kind, namespace, name))


class ApiObjects:
    """An ``ObjectLookup`` that reads Secrets and ConfigMaps from a Kubernetes API.

    ``api_client`` is a ``kubernetes.client.ApiClient`` (duck-typed, so the
    runtime does not import the Kubernetes client): this is how the runtime
    serves as a kubelet for pods created in an (emulated) cluster.
    """

    def __init__(self, api_client: Any) -> None:
        self._api_client = api_client

    def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        import kubernetes

        core = kubernetes.client.CoreV1Api(self._api_client)
        read = {"Secret": core.read_namespaced_secret, "ConfigMap": core.read_namespaced_config_map}.get(kind)
        if read is None:
            return None
        try:
            obj = read(name, namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        doc: dict[str, Any] = self._api_client.sanitize_for_serialization(obj)
        doc.setdefault("kind", kind)
        return doc


def object_files(obj: Mapping[str, Any]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if obj.get("kind") == "Secret":
        for key, value in (obj.get("data") or {}).items():
            files[str(key)] = base64.b64decode(value)
        for key, value in (obj.get("stringData") or {}).items():
            files[str(key)] = str(value).encode()
    else:
        for key, value in (obj.get("data") or {}).items():
            files[str(key)] = str(value).encode()
        for key, value in (obj.get("binaryData") or {}).items():
            files[str(key)] = base64.b64decode(value)
    return files


def write_files(
    target: Path, files: Mapping[str, bytes], items: Sequence[Mapping[str, Any]] | None, default_mode: int | None
) -> None:
    chosen = (
        [(str(i["key"]), str(i.get("path", i["key"])), i.get("mode")) for i in items]
        if items
        else [(key, key, None) for key in files]
    )
    for key, rel, mode in chosen:
        if key not in files:
            raise ConfigError(
                f"volume item {key!r} is not a key of its Secret/ConfigMap; fix: use one of {sorted(files)}"
            )
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[key])
        chosen_mode = mode if mode is not None else default_mode
        path.chmod((int(chosen_mode) if chosen_mode is not None else 0o644) & 0o777)
