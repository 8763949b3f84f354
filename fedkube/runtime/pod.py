"""Run one Kubernetes Pod manifest as local processes (a tiny kubelet).

``fedkube.runtime.mapping`` rewrites what a pod gets on Kubernetes and must
differ on one machine (ports, addresses, volumes, env, programs) into one
``ProcessSpec`` per container; this module runs and supervises them.

Container order follows Kubernetes: plain init containers run to completion
one after the other; native sidecars (init containers with ``restartPolicy:
Always``) start next, each waited for until its port accepts connections (or
it reported its ports), and are restarted (bounded, with backoff) if they exit
non-zero before that or while the pod's main containers run; then the main
containers. When every main container has exited, sidecars get ``sidecar_grace_s`` to finish on their own (the fedkube
sidecar forwards the trainer's final state, then exits), then SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedkube import envvars, portfile
from fedkube.errors import ConfigError, FedkubeError
from fedkube.runtime.mapping import PORT_VARS, PodMapping, fedkube_command
from fedkube.runtime.objects import ApiObjects, ManifestObjects, ObjectLookup
from fedkube.runtime.podtypes import ContainerResult, ContainerStatus, PodOptions, PodResult
from fedkube.runtime.process import ManagedProcess, ProcessSpec
from fedkube.runtime.resolver import LOCAL_HOST, pod_key_of

logger = logging.getLogger(__name__)

# ApiObjects, ManifestObjects, ObjectLookup and fedkube_command are re-exported: callers build a pod run from here.
__all__ = [
    "SIDECAR_EXIT_ON_STOP", "ApiObjects", "ContainerResult", "ContainerStatus", "ManifestObjects", "ObjectLookup",
    "PodOptions", "PodResult", "PodRun", "fedkube_command", "run_pod",
]

# The local runtime's own switch for the sidecar: leave after the job's Stop
# instead of waiting for a SIGTERM that only Kubernetes would send.
SIDECAR_EXIT_ON_STOP = envvars.SIDECAR_EXIT_ON_STOP


@dataclass
class _Container:
    manifest: Mapping[str, Any]
    spec: ProcessSpec
    kind: str  # "init", "sidecar" or "main"
    process: ManagedProcess | None = None
    restarts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    listens: dict[str, int] = field(default_factory=dict)  # port variable -> container port it reports
    ports_file: Path | None = None  # where it reports them (ports_reported only)
    reported: bool = False


class PodRun:
    """A pod running as local processes; ``wait()`` for its result, ``stop()`` to end it."""

    def __init__(self, pod: Mapping[str, Any], options: PodOptions) -> None:
        self.pod = pod
        self.options = options
        self.key = pod_key_of(pod)
        self.name = str(pod.get("metadata", {}).get("name", ""))
        self.dir = options.run_dir / "pods" / self.name
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._containers: list[_Container] = []
        self._mapping = PodMapping(pod, options, self.dir)
        self._result: PodResult | None = None
        self._phase = "Pending"
        self._thread: threading.Thread | None = None
        self._stop_grace = options.stop_grace_s

    # --- public ---------------------------------------------------------------
    @property
    def phase(self) -> str:
        """Pending, Running, Succeeded or Failed."""
        return self._phase

    @property
    def volumes(self) -> Mapping[str, Path]:
        """Each volume of the pod by name: the local directory its containers see (empty before ``start``)."""
        return dict(self._mapping.volumes)

    def start(self) -> None:
        """Prepare volumes and start the pod's supervisor thread (which starts the containers)."""
        try:
            self._containers = self._prepare()
        except BaseException:
            with contextlib.suppress(OSError):
                self._mapping.remove_secrets()  # the pod never runs: nothing may read them
            raise
        self._thread = threading.Thread(target=self._supervise, name=f"pod-{self.name}", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> PodResult | None:
        """The pod's result once every container ended, or None after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            return None
        return self._result

    def stop(self, grace: float | None = None) -> None:
        """Ask the pod to stop: main containers first, then sidecars (returns at once).

        ``grace`` replaces the SIGTERM -> SIGKILL delay of ``PodOptions`` for this stop.
        """
        if grace is not None:
            self._stop_grace = max(0.0, grace)
        self._stop.set()

    def finished(self) -> bool:
        """True once every container ended and the pod has its result."""
        return self._done.is_set()

    def step(self) -> None:
        """Nothing to do: a supervisor thread drives the pod (kept for kubelet-style callers)."""

    def states(self) -> list[ContainerStatus]:
        """Every container, init and sidecar ones first, in manifest order, as a kubelet reports them."""
        out = []
        with self._lock:
            containers = list(self._containers)
        for c in containers:
            code = _exit_code(c.process.returncode) if c.process is not None else None
            if code is not None and c.finished_at is None:
                c.finished_at = _now()
            message = ""
            if code is not None:
                path = self.dir / f"{c.manifest.get('name', '')}.termination-log"
                with contextlib.suppress(OSError):
                    message = path.read_text(errors="replace")[:4096]
            out.append(
                ContainerStatus(
                    name=str(c.manifest.get("name", "")),
                    kind=c.kind,
                    image=str(c.manifest.get("image", "")),
                    started_at=c.started_at,
                    finished_at=c.finished_at if code is not None else None,
                    exit_code=code,
                    reason="" if code is None else ("Completed" if code == 0 else "Error"),
                    message=message,
                )
            )
        return out

    def container_process(self, name: str) -> ManagedProcess | None:
        """The live process of container ``name`` (for tests and the progress display)."""
        with self._lock:
            for c in self._containers:
                if c.manifest.get("name") == name:
                    return c.process
        return None

    def pids(self) -> list[int]:
        """pids of the containers started so far (each leads its own process group)."""
        with self._lock:
            return [c.process.pid for c in self._containers if c.process is not None]

    # --- preparation ----------------------------------------------------------
    def _prepare(self) -> list[_Container]:
        spec = self.pod.get("spec", {})
        self.dir.mkdir(parents=True, exist_ok=True)
        self._mapping.materialize_volumes()
        containers: list[_Container] = []
        for manifest in spec.get("initContainers", []) or []:
            kind = "sidecar" if manifest.get("restartPolicy") == "Always" else "init"
            containers.append(_Container(manifest, self._mapping.process_spec(manifest), kind))
        for manifest in spec.get("containers", []) or []:
            containers.append(_Container(manifest, self._mapping.process_spec(manifest), "main"))
        if not any(c.kind == "main" for c in containers):
            raise ConfigError(f"pod {self.key} has no containers; fix: give spec.containers at least one entry")
        if self.options.ports_reported:
            for c in containers:
                c.listens = {
                    var: int(value) for var in PORT_VARS if (value := c.spec.env.get(var, "")).isdigit() and int(value)
                }
                if c.listens:
                    c.ports_file = Path(c.spec.env[envvars.PORTS_FILE])
                    c.ports_file.unlink(missing_ok=True)  # a new pod binds fresh ports; a restart reuses them
                    for port in c.listens.values():
                        self.options.resolver.expect(self.key, port)
        return containers

    # --- supervision ----------------------------------------------------------
    def _start(self, container: _Container) -> None:
        if self.options.ports_reported:
            container.spec = self._mapping.process_spec(container.manifest, resolve=True)
        process = ManagedProcess(container.spec, self.options.sink)
        process.start()
        with self._lock:
            container.process = process
            container.started_at = _now()
            container.finished_at = None

    def _supervise(self) -> None:
        message = ""
        try:
            message = self._run_containers()
        except FedkubeError as exc:  # says what and the fix already: a traceback would bury it
            logger.error("pod %s: %s", self.key, exc)
            message = str(exc)
        except Exception as exc:  # the pod fails; the runtime must still learn about it
            logger.exception("pod %s: supervisor failed", self.key)
            message = f"{type(exc).__name__}: {exc}"
        finally:
            self._teardown()
            self._remove_secrets()
            self._finish(message)

    def _run_containers(self) -> str:
        for c in (c for c in self._containers if c.kind == "init"):
            if self._stop.is_set():
                return "stopped before start"
            self._start(c)
            assert c.process is not None
            while (code := c.process.wait(0.1)) is None:
                if self._stop.is_set():
                    return "stopped during init"
            if code != 0:
                return f"init container {c.manifest.get('name')!r} exited with code {code}"
        for c in (c for c in self._containers if c.kind == "sidecar"):
            self._start(c)
            self._wait_listening(c)
        self._phase = "Running"
        mains = [c for c in self._containers if c.kind == "main"]
        for c in mains:
            self._start(c)
        backoff: dict[int, float] = {}
        while not self._stop.is_set():
            for c in self._containers:
                self._collect_ports(c)
            if all(c.process is not None and c.process.returncode is not None for c in mains):
                return ""
            for c in (c for c in self._containers if c.kind == "sidecar"):
                self._maybe_restart(c, backoff)
            self._stop.wait(0.1)
        return "stopped"

    def _collect_ports(self, c: _Container) -> bool:
        """Route the ports ``c`` reported (True once it did); stop waiting for them once it ended without."""
        if c.ports_file is None or c.reported:
            return True
        ports = portfile.read(c.ports_file)
        if ports is not None:
            c.reported = True
            for var, container_port in c.listens.items():
                if var in ports:
                    self.options.resolver.bind(self.key, container_port, ports[var])
                else:
                    self.options.resolver.give_up(self.key, container_port)
            return True
        restarts_left = c.kind == "sidecar" and c.restarts < self.options.sidecar_max_restarts
        if c.process is not None and c.process.returncode is not None and not restarts_left:
            for container_port in c.listens.values():
                self.options.resolver.give_up(self.key, container_port)
        return False

    def _maybe_restart(self, c: _Container, backoff: dict[int, float]) -> None:
        if c.process is None or (code := c.process.returncode) is None or code == 0:
            return
        if c.restarts >= self.options.sidecar_max_restarts:
            return
        due = backoff.setdefault(id(c), time.monotonic() + min(2.0**c.restarts, 10.0))
        if time.monotonic() < due:
            return
        backoff.pop(id(c))
        c.restarts += 1
        logger.warning(
            "pod %s: sidecar %r exited with code %s; restarting it (restart %d of at most %d)",
            self.key,
            c.manifest.get("name"),
            code,
            c.restarts,
            self.options.sidecar_max_restarts,
        )
        self._start(c)

    def _wait_listening(self, c: _Container) -> None:
        port = None if c.ports_file is not None else self._sidecar_port(c)
        if port is None and c.ports_file is None:
            return
        deadline = time.monotonic() + self.options.sidecar_ready_timeout_s
        backoff: dict[int, float] = {}
        while time.monotonic() < deadline and not self._stop.is_set():
            if c.ports_file is not None and self._collect_ports(c):
                return  # it reports its ports once it listens on them
            if c.process is None or c.process.returncode is not None:
                crashed = c.process is not None and c.process.returncode != 0
                if c.ports_file is not None and crashed and c.restarts < self.options.sidecar_max_restarts:
                    # Its ports are not known before it listens: the main containers must not start
                    # with an address nobody will serve, so it restarts here (bounded, with backoff).
                    self._maybe_restart(c, backoff)
                    time.sleep(0.05)
                    continue
                return  # it died; the restart logic and the main container's errors tell the story
            if port is not None:
                with contextlib.suppress(OSError), socket.create_connection((LOCAL_HOST, port), timeout=0.5):
                    return
            time.sleep(0.05)
        logger.warning(
            "pod %s: sidecar %r is not listening on %s:%s after %.0f s; starting the main containers anyway",
            self.key,
            c.manifest.get("name"),
            LOCAL_HOST,
            port,
            self.options.sidecar_ready_timeout_s,
        )

    def _sidecar_port(self, c: _Container) -> int | None:
        for probe in ("startupProbe", "readinessProbe"):
            tcp = (c.manifest.get(probe) or {}).get("tcpSocket")
            if tcp and str(tcp.get("port", "")).isdigit():
                return self.options.resolver.local_port(self.key, int(tcp["port"]))
        value = c.spec.env.get(envvars.TRAINER_PORT)
        return int(value) if value and value.isdigit() else None

    def _teardown(self) -> None:
        mains = [c for c in self._containers if c.kind != "sidecar" and c.process is not None]
        for c in mains:
            assert c.process is not None
            c.process.stop(self._stop_grace)
        sidecars = [c for c in self._containers if c.kind == "sidecar" and c.process is not None]
        if not self._stop.is_set():
            deadline = time.monotonic() + self.options.sidecar_grace_s
            while time.monotonic() < deadline and not self._stop.is_set():
                if all(c.process is not None and c.process.returncode is not None for c in sidecars):
                    break
                self._stop.wait(0.05)
        for c in reversed(sidecars):
            assert c.process is not None
            c.process.stop(self._stop_grace)

    def _remove_secrets(self) -> None:
        # Every container has ended: the token and key files have no reader left (success, failure or Ctrl-C).
        try:
            removed = self._mapping.remove_secrets()
        except OSError as exc:  # the pod's result matters more; say what is left behind
            logger.warning("pod %s: could not remove its Secret files: %s; fix: delete %s/volumes by hand",
                           self.key, exc, self.dir)
            return
        if removed:
            logger.debug("pod %s: removed its Secret files %s", self.key, [str(p) for p in removed])

    def _finish(self, message: str) -> None:
        for c in self._containers:
            if not self._collect_ports(c):
                for container_port in c.listens.values():
                    self.options.resolver.give_up(self.key, container_port)
        results = []
        for c in self._containers:
            p = c.process
            results.append(
                ContainerResult(
                    name=str(c.manifest.get("name", "")),
                    exit_code=_exit_code(p.returncode) if p is not None else None,
                    stopped_by_runtime=p.stopped_by_runtime if p is not None else False,
                    restarts=c.restarts,
                )
            )
        mains_ok = all(r.exit_code == 0 for r, c in zip(results, self._containers, strict=True) if c.kind == "main")
        phase = "Succeeded" if mains_ok and not message else "Failed"
        self._result = PodResult(name=self.name, phase=phase, containers=tuple(results), message=message)
        self._phase = phase
        self._done.set()


def run_pod(pod: Mapping[str, Any], options: PodOptions) -> PodRun:
    """Start ``pod`` (a Pod manifest) as local processes and return its handle.

    Raises ``ConfigError`` before anything starts when the pod needs something
    the local runtime cannot provide (a missing Secret, an unsupported volume
    type, a container without a command).
    """
    run = PodRun(pod, options)
    run.start()
    return run


def _exit_code(returncode: int | None) -> int | None:
    """Exit code as Kubernetes reports it: a death by signal N is 128 + N (SIGTERM: 143)."""
    if returncode is not None and returncode < 0:
        return 128 - returncode
    return returncode


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
