"""What ``run_pod`` takes and reports: its options, each container's result and status, the pod's result."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkube.runtime.objects import ObjectLookup
from fedkube.runtime.process import OutputSink, StreamSink
from fedkube.runtime.resolver import LocalResolver

__all__ = ["ContainerResult", "ContainerStatus", "PodOptions", "PodResult"]


@dataclass
class PodOptions:
    """How ``run_pod`` maps a pod onto this machine."""

    run_dir: Path  # pods/<name>/ and volumes/ go here
    resolver: LocalResolver
    objects: ObjectLookup
    sink: OutputSink = field(default_factory=StreamSink)
    base_dir: Path | None = None  # where relative script paths of containers resolve
    extra_env: Mapping[str, str] = field(default_factory=dict)  # added to every container
    sidecar_ready_timeout_s: float = 20.0
    sidecar_grace_s: float = 10.0
    stop_grace_s: float = 5.0  # SIGTERM -> SIGKILL
    sidecar_max_restarts: int = 5
    prefix: Callable[[Mapping[str, Any], str], str] | None = None  # console prefix for (pod, container)
    # True (fedkube run): a container with port variables binds ports the OS picks and reports them in
    # FEDKUBE_PORTS_FILE (fedkube.portfile), and the pod's next containers start once it did. False:
    # the resolver reserves each port in advance (for stand-in processes that bind the number given).
    ports_reported: bool = False


@dataclass(frozen=True)
class ContainerResult:
    """How one container ended."""

    name: str
    exit_code: int | None  # None: never started
    stopped_by_runtime: bool  # ended by SIGTERM/SIGKILL from the runtime, not by itself
    restarts: int = 0


@dataclass(frozen=True)
class PodResult:
    """How a pod ended: phase as Kubernetes would report it, plus each container's exit."""

    name: str
    phase: str  # "Succeeded" or "Failed"
    containers: tuple[ContainerResult, ...]
    message: str = ""

    def container(self, name: str) -> ContainerResult | None:
        """The result of the container called ``name``, if it exists."""
        return next((c for c in self.containers if c.name == name), None)


@dataclass
class ContainerStatus:
    """One container as a kubelet reports it (the fields of a Pod's containerStatuses)."""

    name: str
    kind: str  # "init", "sidecar" or "main"
    image: str = ""
    started_at: str | None = None  # RFC 3339, UTC
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str = ""  # Completed, Error
    message: str = ""  # the termination message the container wrote

    @property
    def running(self) -> bool:
        """Started and not yet finished."""
        return self.started_at is not None and self.finished_at is None
