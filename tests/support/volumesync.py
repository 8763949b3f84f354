"""The kubelet's refresh of mounted ConfigMap and Secret volumes, for the test kubelet.

A kubelet writes a pod's ConfigMap and Secret volumes when the pod starts and,
while the pod runs, writes them again when the object changed (its periodic
sync, about a minute by default). fedkube relies on that: the operator
propagates ``spec.revokedSites`` by patching the ConfigMap ``<job>-spec`` that
the server mounts (docs/security.md, "Revoke a site now"). fedkube's local
runtime writes volumes once (``fedkube run`` has nothing that changes them);
:class:`VolumeSync` adds the refresh for pods the test kubelet runs through it.

What it keeps of the kubelet's behaviour:

* bounded: one list of ConfigMaps and one of Secrets per namespace every
  ``period`` seconds, and files are rendered again only for an object whose
  ``resourceVersion`` changed since its last write;
* atomic per file: the new files are written into a staging directory inside
  the volume (like the kubelet's ``..<timestamp>`` directories) and renamed
  over the old ones, so a reader sees the old file or the new one, never half
  of one; keys gone from the object are removed. The kubelet also swaps all
  keys at once through its ``..data`` symlink; here a reader of two keys may
  see one old and one new for a moment (fedkube's readers read one file);
* a volume any container mounts with ``subPath`` is not refreshed: a real
  subPath mount keeps what it had at the container's start, and here every
  mount of a volume is the same directory;
* a deleted object leaves the files as they are (the kubelet keeps the last
  content and logs), and nothing is written for a pod that finished: its
  Secret files are removed then and must not come back. Projected volumes
  are not refreshed (fedkube mounts none that change while a pod runs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fedkube.errors import ConfigError
from fedkube.runtime.objects import object_files, write_files

logger = logging.getLogger(__name__)

STAGING = "..sync"  # inside the volume, hidden like the kubelet's own "..data" and "..<timestamp>" entries
SOURCES = (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName"))


@runtime_checkable
class MountedVolumes(Protocol):
    """A running pod whose volumes are local directories (fedkube's ``PodRun``)."""

    @property
    def volumes(self) -> Mapping[str, Path]:
        """Each volume of the pod by name: the directory its containers see."""

    def finished(self) -> bool:
        """True once every container of the pod ended."""


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root`` (not the ``..`` entries): relative path -> (content, mode)."""
    out: dict[str, tuple[bytes, int]] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0].startswith("..") or not path.is_file():
            continue
        out[rel.as_posix()] = (path.read_bytes(), path.stat().st_mode & 0o777)
    return out


def refresh_dir(target: Path, files: Mapping[str, bytes], items: Sequence[Mapping[str, Any]] | None,
                default_mode: int | None) -> bool:
    """Make the volume directory ``target`` hold ``files`` (as ``items``/``default_mode`` lay them out).

    Returns True when a file changed. Nothing happens when ``target`` is gone (the pod ended and its
    Secret files were removed): the staging directory is made inside it, so it cannot bring it back.
    """
    staging = target / STAGING
    try:
        staging.mkdir()
    except FileNotFoundError:
        return False
    except FileExistsError:  # left by a refresh that failed half-way
        shutil.rmtree(staging)
        staging.mkdir()
    try:
        write_files(staging, files, items, default_mode)
        new, old = _tree(staging), _tree(target)
        if new == old:
            return False
        for rel in sorted(new):
            dest = target / rel
            for depth in range(1, len(Path(rel).parts)):  # one level at a time: never re-creates ``target``
                (target / Path(*Path(rel).parts[:depth])).mkdir(exist_ok=True)
            os.replace(staging / rel, dest)  # atomic: a reader opens the old file or the new one
        for rel in sorted(set(old) - set(new)):
            (target / rel).unlink(missing_ok=True)
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pinned_volumes(pod: Mapping[str, Any]) -> set[str]:
    """Volumes some container of ``pod`` mounts with ``subPath`` (a kubelet never refreshes those mounts)."""
    spec = pod.get("spec") or {}
    return {str(mount["name"]) for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
            for mount in c.get("volumeMounts") or [] if mount.get("subPath") or mount.get("subPathExpr")}


class VolumeSync:
    """Writes changed ConfigMaps and Secrets into the volumes of running pods, at most every ``period`` s.

    ``core`` is a CoreV1Api of the (emulated) cluster; the test kubelet calls :meth:`tick` from its loop.
    """

    def __init__(self, core: Any, period: float) -> None:
        self.core = core
        self.period = period
        self._next = 0.0
        self._written: dict[tuple[str, str], str] = {}  # (pod uid, volume) -> resourceVersion last written

    def tick(self, pods: Sequence[tuple[Mapping[str, Any], object]]) -> None:
        """Called from the test kubelet's loop with every pod it runs (manifest, processes): syncs when due."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.period
        running = [(pod, run) for pod, run in pods if isinstance(run, MountedVolumes)]
        if not running:
            return
        from kubernetes.client.exceptions import ApiException

        try:
            self.sync(running)
        except ApiException as exc:  # as a kubelet: log, and the next sync tries again
            logger.warning("test kubelet: listing ConfigMaps/Secrets to refresh volumes failed (%s)", exc.status)

    def _objects(self, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every ConfigMap and Secret of ``namespace`` by (kind, name), as raw manifests."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for kind, list_fn in (("ConfigMap", self.core.list_namespaced_config_map),
                              ("Secret", self.core.list_namespaced_secret)):
            raw: Any = list_fn(namespace, _preload_content=False)
            for item in json.loads(raw.data).get("items") or []:
                out[(kind, str(item["metadata"]["name"]))] = {**item, "kind": kind}  # a list's items carry no kind
        return out

    def sync(self, pods: Sequence[tuple[Mapping[str, Any], MountedVolumes]]) -> list[str]:
        """Refresh the ConfigMap and Secret volumes of ``pods`` (manifest, running pod); the ``ns/pod volume``
        names whose files changed."""
        objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        seen: set[tuple[str, str]] = set()
        changed: list[str] = []
        for pod, run in pods:
            meta = pod["metadata"]
            namespace, uid = str(meta.get("namespace") or "default"), str(meta["uid"])
            pinned = pinned_volumes(pod)
            dirs = run.volumes
            for volume in (pod.get("spec") or {}).get("volumes") or []:
                name = str(volume["name"])
                for kind, field, ref in SOURCES:
                    source = volume.get(field)
                    if source is None or name in pinned or name not in dirs:
                        continue
                    key = (uid, name)
                    seen.add(key)
                    if namespace not in objects:
                        objects[namespace] = self._objects(namespace)
                    obj = objects[namespace].get((kind, str(source.get(ref))))
                    version = str((obj or {}).get("metadata", {}).get("resourceVersion"))
                    if obj is None or self._written.get(key) == version or run.finished():
                        continue
                    try:
                        if refresh_dir(dirs[name], object_files(obj), source.get("items"), source.get("defaultMode")):
                            changed.append(f"{namespace}/{meta['name']} {name}")
                    except (OSError, ConfigError) as exc:  # the kubelet logs and tries at its next sync
                        logger.warning("test kubelet: cannot refresh volume %s of pod %s/%s: %s", name, namespace,
                                       meta["name"], exc)
                        continue
                    self._written[key] = version
        self._written = {k: v for k, v in self._written.items() if k in seen}
        for what in changed:
            logger.info("test kubelet: refreshed %s", what)
        return changed
