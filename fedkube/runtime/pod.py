"""Run one Kubernetes Pod manifest as local processes (a tiny kubelet).

What a pod gets on Kubernetes and must differ on one machine is rewritten here,
and only here:

* **Ports and addresses.** Each (pod, port) has its own localhost port. With
  ``PodOptions.ports_reported`` (``fedkube run``) a container with port
  variables (``FEDKUBE_*_PORT``) binds ports the OS picks and reports them in
  ``FEDKUBE_PORTS_FILE`` (``fedkube.portfile``); otherwise the variables are
  rewritten to ports reserved in advance. Address variables
  (``FEDKUBE_*_ADDRESS``) go through the ``LocalResolver``: loopback stays in
  the pod, a Service name goes to the pod behind it.
* **Volumes.** Secret and ConfigMap volumes are written as files (mode kept);
  emptyDir is a fresh directory per pod; a PersistentVolumeClaim is a directory
  under the run dir that outlives the pod (so a restarted server finds its
  checkpoint); hostPath is used as is. Every path in env, command, args and
  ``workingDir`` under a mount path is rewritten to the local directory, and
  the termination-message path becomes a file in the pod's directory.
* **Programs.** ``python``/``python3`` is the interpreter running fedkube (the
  user's virtualenv); ``fedkube`` is the console script next to it. A relative
  command/argument naming a file that exists in ``base_dir`` (the job file's
  directory, standing in for the trainer image's contents) is made absolute,
  and ``base_dir`` is put on ``PYTHONPATH``, because each container's working
  directory is its pod's own fresh directory (LESSONS.md 24), not the
  directory the user's files are in.

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
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedkube import envvars, portfile
from fedkube.errors import ConfigError, FedkubeError
from fedkube.runtime.objects import ApiObjects, ManifestObjects, ObjectLookup, object_files, write_files
from fedkube.runtime.process import ManagedProcess, OutputSink, ProcessSpec, StreamSink
from fedkube.runtime.resolver import LOCAL_HOST, LocalResolver, pod_key_of

logger = logging.getLogger(__name__)

__all__ = [
    "SIDECAR_EXIT_ON_STOP", "ApiObjects", "ContainerResult", "ContainerStatus", "ManifestObjects", "ObjectLookup",
    "PodOptions", "PodResult", "PodRun", "fedkube_command", "run_pod",
]

PORT_VARS = frozenset(
    {envvars.GRPC_PORT, envvars.BULK_PORT, envvars.STATUS_PORT, envvars.METRICS_PORT, envvars.TRAINER_PORT}
)
ADDRESS_VARS = frozenset({envvars.SERVER_ADDRESS, envvars.SERVER_BULK_ADDRESS, envvars.SIDECAR_ADDRESS})
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
# The local runtime's own switch for the sidecar: leave after the job's Stop
# instead of waiting for a SIGTERM that only Kubernetes would send.
SIDECAR_EXIT_ON_STOP = envvars.SIDECAR_EXIT_ON_STOP


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
        self._volumes: dict[str, Path] = {}
        self._result: PodResult | None = None
        self._phase = "Pending"
        self._thread: threading.Thread | None = None
        self._stop_grace = options.stop_grace_s

    # --- public ---------------------------------------------------------------
    @property
    def phase(self) -> str:
        """Pending, Running, Succeeded or Failed."""
        return self._phase

    def start(self) -> None:
        """Prepare volumes and start the pod's supervisor thread (which starts the containers)."""
        self._containers = self._prepare()
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
        self._volumes = {str(v["name"]): self._materialize(v) for v in spec.get("volumes", []) or []}
        containers: list[_Container] = []
        for manifest in spec.get("initContainers", []) or []:
            kind = "sidecar" if manifest.get("restartPolicy") == "Always" else "init"
            containers.append(_Container(manifest, self._process_spec(manifest), kind))
        for manifest in spec.get("containers", []) or []:
            containers.append(_Container(manifest, self._process_spec(manifest), "main"))
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

    def _materialize(self, volume: Mapping[str, Any]) -> Path:
        name = str(volume["name"])
        namespace = self.key.split("/", 1)[0]
        target = self.dir / "volumes" / name
        if "emptyDir" in volume:
            shutil.rmtree(target, ignore_errors=True)  # a new pod gets an empty directory
            target.mkdir(parents=True)
            return target
        if "persistentVolumeClaim" in volume:
            claim = str(volume["persistentVolumeClaim"]["claimName"])
            path = self.options.run_dir / "volumes" / f"{namespace}-{claim}"
            path.mkdir(parents=True, exist_ok=True)
            return path
        if "hostPath" in volume:
            return Path(str(volume["hostPath"]["path"]))
        for kind, field_name, ref_key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
            if field_name in volume:
                source = volume[field_name]
                obj = self.options.objects.get(kind, namespace, str(source.get(ref_key)))
                if obj is None:
                    if source.get("optional"):
                        target.mkdir(parents=True, exist_ok=True)
                        return target
                    raise ConfigError(
                        f"pod {self.key}: volume {name!r} needs {kind} {source.get(ref_key)!r}, which does not exist; "
                        f"fix: create the {kind} before the pod"
                    )
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                write_files(target, object_files(obj), source.get("items"), source.get("defaultMode"))
                return target
        raise ConfigError(
            f"pod {self.key}: volume {name!r} has a type the local runtime cannot provide "
            f"({sorted(k for k in volume if k != 'name')}); fix: use emptyDir, secret, configMap, "
            "persistentVolumeClaim or hostPath"
        )

    def _process_spec(self, manifest: Mapping[str, Any], *, resolve: bool = False) -> ProcessSpec:
        """The process of container ``manifest``; addresses go through the resolver only with ``resolve``.

        With ``ports_reported`` the addresses may name ports a container of this pod has yet to
        report, so the spec is built again, resolved, when the container starts.
        """
        volumes = self._volumes
        resolve = resolve or not self.options.ports_reported
        cname = str(manifest.get("name", ""))
        mounts: list[tuple[str, Path]] = []
        for mount in manifest.get("volumeMounts", []) or []:
            vol = str(mount["name"])
            if vol not in volumes:
                raise ConfigError(
                    f"pod {self.key}: container {cname!r} mounts volume {vol!r}, which the pod does not declare; "
                    "fix: add it to spec.volumes"
                )
            local = volumes[vol] / mount["subPath"] if mount.get("subPath") else volumes[vol]
            mounts.append((str(mount["mountPath"]).rstrip("/") or "/", local))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)
        termination = str(manifest.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH)
        termination_local = self.dir / f"{cname}.termination-log"
        termination_local.unlink(missing_ok=True)  # a reused run dir must not show an old run's message

        def local_path(value: str) -> str:
            if value == termination:
                return str(termination_local)
            for mount_path, local in mounts:
                if value == mount_path:
                    return str(local)
                if value.startswith(mount_path + "/"):
                    return str(local / value[len(mount_path) + 1 :])
            return value

        env = self._env(manifest, local_path, resolve)
        if self.options.ports_reported and any(v.isdigit() and int(v) for k, v in env.items() if k in PORT_VARS):
            env[envvars.PORTS_FILE] = str(self.dir / f"{cname}.ports")
        tmp = local_path("/tmp")
        if tmp != "/tmp":  # an emptyDir at /tmp: make programs use it, as they would in the pod
            env["TMPDIR"] = tmp
        working_dir = manifest.get("workingDir")
        mapped = local_path(str(working_dir)) if working_dir else None
        # A workingDir outside every mount is a directory of the image; here
        # every container gets its own fresh directory instead (LESSONS.md 24).
        # The pod's own FEDKUBE_WORKDIR (an emptyDir) is the next best choice.
        workdir = env.get(envvars.WORKDIR, "")
        if mapped and mapped != working_dir:
            cwd = Path(mapped)
        elif workdir.startswith(str(self.dir)):
            cwd = Path(workdir)
        else:
            cwd = self.dir / "work" / cname
        if envvars.WORKDIR in env and not workdir.startswith(str(self.dir)):
            env[envvars.WORKDIR] = str(cwd)
        argv = self._argv(manifest, local_path)
        if self.options.base_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.options.base_dir), env.get("PYTHONPATH")) if p)
        prefix = self.options.prefix(self.pod, cname) if self.options.prefix else f"{self.name} {cname}"
        return ProcessSpec(
            name=prefix,
            argv=argv,
            env=env,
            cwd=cwd,
            log_path=self.options.run_dir / "logs" / f"{self.name}.{cname}.log",
        )

    def _env(self, manifest: Mapping[str, Any], local_path: Callable[[str], str], resolve: bool) -> dict[str, str]:
        # The host environment (PATH, HOME, the virtualenv) minus fedkube's own
        # settings, which must come from the manifest only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDKUBE_")}
        env["PYTHONUNBUFFERED"] = "1"  # output reaches the console as it happens
        for entry in manifest.get("env", []) or []:
            name = str(entry["name"])
            if "value" in entry:
                value = str(entry["value"] if entry["value"] is not None else "")
            elif "valueFrom" in entry:
                value = self._value_from(name, entry["valueFrom"])
            else:
                value = ""
            env[name] = self._rewrite_env(name, value, local_path, resolve)
        env.update(self.options.extra_env)
        return env

    def _rewrite_env(self, name: str, value: str, local_path: Callable[[str], str], resolve: bool) -> str:
        if name in PORT_VARS and value.isdigit() and int(value) > 0:
            if self.options.ports_reported:
                return value  # only says the listener is on: the process binds a port of its own and reports it
            return str(self.options.resolver.local_port(self.key, int(value)))
        if name in ADDRESS_VARS:
            return self.options.resolver.resolve(self.key, value) if resolve else value
        return local_path(value) if value.startswith("/") else value

    def _value_from(self, name: str, source: Mapping[str, Any]) -> str:
        meta = self.pod.get("metadata", {})
        namespace = self.key.split("/", 1)[0]
        if "fieldRef" in source:
            path = str(source["fieldRef"].get("fieldPath"))
            fields = {
                "metadata.name": str(meta.get("name", "")),
                "metadata.namespace": namespace,
                "status.podIP": LOCAL_HOST,
                "status.hostIP": LOCAL_HOST,
                "spec.nodeName": "localhost",
            }
            if path in fields:
                return fields[path]
            if path.startswith("metadata.labels['") and path.endswith("']"):
                return str(meta.get("labels", {}).get(path[len("metadata.labels['") : -2], ""))
        for kind, ref in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if ref in source:
                obj = self.options.objects.get(kind, namespace, str(source[ref].get("name")))
                files = object_files(obj) if obj is not None else {}
                key = str(source[ref].get("key"))
                if key in files:
                    return files[key].decode("utf-8")
                if source[ref].get("optional"):
                    return ""
        raise ConfigError(
            f"pod {self.key}: env var {name!r} has a valueFrom the local runtime cannot resolve ({dict(source)}); "
            "fix: use a literal value, fieldRef (name/namespace/podIP/labels), secretKeyRef or configMapKeyRef"
        )

    def _argv(self, manifest: Mapping[str, Any], local_path: Callable[[str], str]) -> list[str]:
        argv = [str(a) for a in [*(manifest.get("command") or []), *(manifest.get("args") or [])]]
        if not argv:
            raise ConfigError(
                f"pod {self.key}: container {manifest.get('name')!r} has no command; the local runtime has no image "
                "entrypoint to fall back to; fix: set command in the container template"
            )
        argv = [local_path(a) if a.startswith("/") else a for a in argv]
        program = argv[0]
        if program in ("python", "python3"):
            argv[0] = sys.executable
        elif program == "fedkube":
            argv[0:1] = fedkube_command()
        base = self.options.base_dir
        if base is not None:
            for i, arg in enumerate(argv):
                if i == 0 and arg != program:
                    continue
                if arg and not arg.startswith(("-", "/")) and not any(ch.isspace() for ch in arg):
                    candidate = base / arg
                    if candidate.is_file():
                        argv[i] = str(candidate.resolve())
        return argv

    # --- supervision ----------------------------------------------------------
    def _start(self, container: _Container) -> None:
        if self.options.ports_reported:
            container.spec = self._process_spec(container.manifest, resolve=True)
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


def fedkube_command() -> list[str]:
    """How to start the ``fedkube`` command of this installation."""
    script = Path(sys.executable).parent / "fedkube"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("fedkube")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from fedkube.cli import main; sys.exit(main(sys.argv[1:]))"]
