"""A test kubelet: runs the Pods of an (emulated) Kubernetes API as local processes.

It watches Pods through the official client and, for each new pod, either
holds it Pending as unschedulable (``hold`` says so, with the scheduler's
message) or runs it: init containers in order (a native sidecar, i.e. an init
container with ``restartPolicy: Always``, is started and left running; a plain
one must exit 0 before the next starts), then the main containers. When every
main container has exited, sidecars get SIGTERM. The pod's status is written
back through the status subresource like a kubelet does: phase Pending ->
Running -> Succeeded/Failed, ``initContainerStatuses``/``containerStatuses``
with running/terminated states (exit code, reason, termination message),
PodScheduled/Initialized/ContainersReady/Ready conditions and podIP 127.0.0.1.
A pod that is deleted has its processes stopped.

Two seams: ``runner`` starts one container (the default ``run_command`` runs
``command + args`` with the container's env in its own work directory), and
``pod_runner`` replaces the whole per-pod sequencing (to plug in fedkube's
local runtime, which runs a pod as a unit). Not emulated: restarts
(restartPolicy of the pod), probes (a running container counts as ready),
resource limits, images.

Mounted ConfigMap and Secret volumes of running pods are written again when
the objects change, as a kubelet's sync does (``volume_sync_s``, for pods
whose runner exposes its volumes: fedkube's runtime; see
:mod:`tests.support.volumesync`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tests.support.volumesync import VolumeSync

logger = logging.getLogger(__name__)

POD_IP = "127.0.0.1"
LOG_TAIL_BYTES = 2048  # what a kubelet keeps of the log for FallbackToLogsOnError


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class ContainerLaunch:
    """Everything a container runner needs to start one container."""

    pod: Mapping[str, Any]
    container: Mapping[str, Any]
    kind: str  # "init", "sidecar" or "main"
    env: Mapping[str, str]  # the container's env with valueFrom/envFrom resolved
    workdir: Path  # this container's own directory
    log_path: Path  # stdout and stderr go here
    termination_log: Path  # the local stand-in for terminationMessagePath


class ContainerProcess(Protocol):
    """A started container (``subprocess.Popen`` fits)."""

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


ContainerRunner = Callable[[ContainerLaunch], ContainerProcess]


class _GroupProcess:
    """A Popen whose signals go to its whole process group (so children of a shell go too)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    def poll(self) -> int | None:
        return self.popen.poll()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def run_command(launch: ContainerLaunch) -> ContainerProcess:
    """The default runner: ``command + args`` as a local process in the container's work directory.

    The environment is this process's (so ``python`` and the virtualenv are
    found) plus the container's. A value equal to the container's
    terminationMessagePath is pointed at ``launch.termination_log``, so a
    program told where to write its termination message writes it locally.
    """
    command = list(launch.container.get("command") or []) + [str(a) for a in launch.container.get("args") or []]
    if not command:
        raise ValueError(f"container {launch.container.get('name')!r} has no command: images are not emulated, so "
                         "the test kubelet needs command (and args) to know what to run")
    message_path = str(launch.container.get("terminationMessagePath") or "/dev/termination-log")
    local = {k: (str(launch.termination_log) if v == message_path else v) for k, v in launch.env.items()}
    env = {**os.environ, **local}
    workdir = Path(str(launch.container.get("workingDir") or launch.workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    with launch.log_path.open("ab") as log:
        popen = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    return _GroupProcess(popen)


@dataclasses.dataclass
class ContainerState:
    """One container as the kubelet reports it."""

    name: str
    kind: str  # "init", "sidecar" or "main"
    image: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str = ""
    message: str = ""

    @property
    def running(self) -> bool:
        return self.started_at is not None and self.finished_at is None


class PodProcesses(Protocol):
    """A pod's processes, advanced by the kubelet's loop (never blocks)."""

    def step(self) -> None:
        """Start what is due, notice exits, enforce stop deadlines."""

    def states(self) -> list[ContainerState]:
        """Every container of the pod, init/sidecar ones first, in manifest order."""

    def finished(self) -> bool:
        """True once no process of the pod is left running."""

    def stop(self, grace: float) -> None:
        """Ask every container to end (SIGTERM), SIGKILL after ``grace`` seconds."""


@runtime_checkable
class AddressedPod(Protocol):
    """PodProcesses with an address of their own (a container backend), reported as ``status.podIP``."""

    @property
    def pod_ip(self) -> str: ...


@dataclasses.dataclass
class _Slot:
    state: ContainerState
    manifest: Mapping[str, Any]
    process: ContainerProcess | None = None
    launch: ContainerLaunch | None = None
    kill_at: float | None = None


class LocalPod:
    """Kubernetes' container order, each container started through a ContainerRunner."""

    def __init__(self, pod: Mapping[str, Any], runner: ContainerRunner, workdir: Path,
                 env_of: Callable[[Mapping[str, Any]], dict[str, str]], *, sidecar_grace: float = 5.0) -> None:
        self.pod, self.runner, self.workdir, self.env_of = pod, runner, workdir, env_of
        self.sidecar_grace = sidecar_grace
        spec = pod.get("spec") or {}
        self.slots: list[_Slot] = []
        for c in spec.get("initContainers") or []:
            kind = "sidecar" if c.get("restartPolicy") == "Always" else "init"
            self.slots.append(_Slot(ContainerState(str(c["name"]), kind, str(c.get("image", ""))), c))
        for c in spec.get("containers") or []:
            self.slots.append(_Slot(ContainerState(str(c["name"]), "main", str(c.get("image", ""))), c))
        # Resolved up front, as a kubelet does before creating containers: a missing
        # Secret/ConfigMap raises ContainerConfigError here and the pod waits.
        self.envs = [env_of(slot.manifest) for slot in self.slots]
        self.stopping = False
        self.failed_init = False

    def _start(self, slot: _Slot) -> None:
        directory = self.workdir / slot.state.name
        directory.mkdir(parents=True, exist_ok=True)
        launch = ContainerLaunch(pod=self.pod, container=slot.manifest, kind=slot.state.kind,
                                 env=self.envs[self.slots.index(slot)], workdir=directory,
                                 log_path=directory / "log", termination_log=directory / "termination-log")
        slot.launch = launch
        slot.state.started_at = _now()
        try:
            slot.process = self.runner(launch)
        except Exception as exc:  # a container that cannot start ends like one that crashed at once
            logger.warning("pod %s: container %s could not start: %s", self._name(), slot.state.name, exc)
            slot.state.finished_at, slot.state.exit_code = _now(), 128
            slot.state.reason, slot.state.message = "StartError", str(exc)

    def _name(self) -> str:
        meta = self.pod.get("metadata") or {}
        return f"{meta.get('namespace')}/{meta.get('name')}"

    def _collect(self, slot: _Slot) -> None:
        if slot.process is None or slot.state.finished_at is not None:
            return
        code = slot.process.poll()
        if code is None:
            return
        state = slot.state
        state.finished_at, state.exit_code = _now(), code
        state.reason = "Completed" if code == 0 else "Error"
        assert slot.launch is not None
        message = ""
        with contextlib.suppress(OSError):
            message = slot.launch.termination_log.read_text(errors="replace").strip()
        if not message and code != 0 and slot.manifest.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                data = slot.launch.log_path.read_bytes()
                message = data[-LOG_TAIL_BYTES:].decode(errors="replace").strip()
        state.message = message

    def step(self) -> None:
        for slot in self.slots:
            self._collect(slot)
            if slot.kill_at is not None and slot.state.finished_at is None and time.monotonic() >= slot.kill_at:
                assert slot.process is not None
                slot.process.kill()
        if self.stopping:
            return
        for slot in self.slots:  # init order: a sidecar starts and stays, a plain init must succeed first
            if slot.state.kind == "main":
                break
            if slot.state.started_at is None:
                self._start(slot)
            if slot.state.kind == "init" and slot.state.finished_at is None:
                return
            if slot.state.kind == "init" and slot.state.exit_code != 0:
                self.failed_init = True
                self.stop(self.sidecar_grace)
                return
        mains = [s for s in self.slots if s.state.kind == "main"]
        for slot in mains:
            if slot.state.started_at is None:
                self._start(slot)
        if all(s.state.finished_at is not None for s in mains):
            self.stop(self.sidecar_grace)  # the pod is done: sidecars end now, as on Kubernetes

    def states(self) -> list[ContainerState]:
        return [dataclasses.replace(s.state) for s in self.slots]

    def finished(self) -> bool:
        return all(s.process is None or s.state.finished_at is not None for s in self.slots)

    def stop(self, grace: float) -> None:
        if self.stopping:
            return
        self.stopping = True
        for slot in self.slots:
            if slot.process is not None and slot.state.finished_at is None:
                slot.process.terminate()
                slot.kill_at = time.monotonic() + grace


class ContainerConfigError(Exception):
    """A runner cannot start a pod yet: a Secret or ConfigMap it references does not exist.

    A kubelet keeps such a pod Pending (waiting reason CreateContainerConfigError)
    and retries, instead of failing: the object may still be created, or the pod
    deleted (e.g. during a cascading delete).
    """


CONFIG_RETRY_S = 0.5


@dataclasses.dataclass
class _PodEntry:
    pod: dict[str, Any]
    processes: PodProcesses | None = None
    held: str | None = None  # the scheduler's message while held Pending
    config_error: str | None = None  # why the pod cannot start yet (retried every CONFIG_RETRY_S)
    retry_at: float = 0.0
    deleted: bool = False
    written: dict[str, Any] | None = None
    since: dict[str, str] = dataclasses.field(default_factory=dict)  # condition -> lastTransitionTime
    start_time: str | None = None


class TestKubelet:
    """Runs pods of the API behind ``api_client`` as local processes and reports their status.

    ``hold(pod)`` returns a scheduler message to keep a pod Pending as
    Unschedulable (``release`` lets it run later), or None to run it.
    Use as a context manager; ``stop()`` ends every process it started.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, api_client: Any, workdir: Path, *, namespace: str | None = None,
                 runner: ContainerRunner = run_command,
                 pod_runner: Callable[[dict[str, Any], Path], PodProcesses] | None = None,
                 hold: Callable[[Mapping[str, Any]], str | None] | None = None,
                 poll_interval: float = 0.05, stop_grace: float = 5.0, volume_sync_s: float | None = 0.5) -> None:
        import kubernetes

        self.core = kubernetes.client.CoreV1Api(api_client)
        self.workdir, self.namespace = workdir, namespace
        self.runner, self.pod_runner, self.hold = runner, pod_runner, hold
        self.poll_interval, self.stop_grace = poll_interval, stop_grace
        self._events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._pods: dict[str, _PodEntry] = {}  # by uid
        self._release: queue.Queue[tuple[str, str]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch: Any = None
        self.failures: list[BaseException] = []  # errors of the kubelet's own threads
        # A real kubelet's sync period is about a minute; tests wait on it, so it is short here.
        self.volume_sync = VolumeSync(self.core, volume_sync_s) if volume_sync_s else None

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> TestKubelet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for target, name in ((self._watch_loop, "kubelet-watch"), (self._main_loop, "kubelet-main")):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop watching, end every pod's processes (SIGTERM, then SIGKILL after stop_grace)."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        for thread in self._threads:
            thread.join(timeout)
        if any(t.is_alive() for t in self._threads):
            raise RuntimeError(f"the test kubelet did not stop within {timeout} s")
        if self.failures:
            raise RuntimeError("the test kubelet failed while running") from self.failures[0]

    def release(self, namespace: str, name: str) -> None:
        """Let a pod held Pending be scheduled and run."""
        self._release.put((namespace, name))

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # surfaced by stop()
                logger.exception("test kubelet thread failed")
                self.failures.append(e)
                self._stop.set()
        return run

    # -- watching ---------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        import kubernetes
        from kubernetes.client.exceptions import ApiException

        list_fn: Callable[..., Any]
        args: tuple[str, ...]
        if self.namespace:
            list_fn, args = self.core.list_namespaced_pod, (self.namespace,)
        else:
            list_fn, args = self.core.list_pod_for_all_namespaces, ()
        rv = ""
        while not self._stop.is_set():
            self._watch = kubernetes.watch.Watch()
            try:
                kwargs: dict[str, Any] = {"timeout_seconds": 1}
                if rv:
                    kwargs["resource_version"] = rv
                for event in self._watch.stream(list_fn, *args, **kwargs):
                    raw = event["raw_object"]
                    if event["type"] == "ERROR":
                        rv = ""  # e.g. 410 Expired: start over with the current state
                        break
                    rv = raw["metadata"]["resourceVersion"]
                    self._events.put((event["type"], raw))
                    if self._stop.is_set():
                        break
            except ApiException as e:
                if self._stop.is_set():
                    return
                logger.warning("test kubelet: pod watch failed (%s); restarting it", e.status)
                rv = ""
                self._stop.wait(0.2)
            except Exception:
                if self._stop.is_set():
                    return  # the connection was closed under us on purpose
                raise

    # -- the loop ---------------------------------------------------------------------------------
    def _main_loop(self) -> None:
        while not self._stop.is_set():
            self._drain()
            for uid, entry in list(self._pods.items()):
                if entry.processes is not None:
                    entry.processes.step()
                if entry.deleted and (entry.processes is None or entry.processes.finished()):
                    del self._pods[uid]
                    continue
                if (not entry.deleted and entry.processes is None and entry.config_error is not None
                        and time.monotonic() >= entry.retry_at):
                    self._run(entry)
                if not entry.deleted:
                    self._report(entry)
            if self.volume_sync is not None:
                self.volume_sync.tick([(e.pod, e.processes) for e in self._pods.values() if not e.deleted])
            self._stop.wait(self.poll_interval)
        self._shutdown()

    def _drain(self) -> None:
        while True:
            try:
                namespace, name = self._release.get_nowait()
            except queue.Empty:
                break
            for held in self._pods.values():
                meta = held.pod["metadata"]
                if (meta.get("namespace"), meta["name"]) == (namespace, name) and held.held is not None:
                    held.held = None
                    self._run(held)
        while True:
            try:
                kind, pod = self._events.get_nowait()
            except queue.Empty:
                return
            uid = pod["metadata"]["uid"]
            entry: _PodEntry | None = self._pods.get(uid)
            gone = kind == "DELETED" or bool(pod["metadata"].get("deletionTimestamp"))
            if entry is None and not gone:
                phase = (pod.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    continue  # finished before this kubelet started (or by someone else)
                entry = self._pods[uid] = _PodEntry(pod=pod)
                entry.held = self.hold(pod) if self.hold is not None else None
                if entry.held is None:
                    self._run(entry)
            elif entry is not None:
                entry.pod = pod if kind != "DELETED" else entry.pod
                if gone and not entry.deleted:
                    entry.deleted = True
                    logger.info("test kubelet: pod %s/%s deleted; stopping its containers",
                                pod["metadata"].get("namespace"), pod["metadata"]["name"])
                    if entry.processes is not None:
                        entry.processes.stop(self.stop_grace)

    def _run(self, entry: _PodEntry) -> None:
        meta = entry.pod["metadata"]
        directory = self.workdir / str(meta.get("namespace")) / f"{meta['name']}-{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        try:
            if self.pod_runner is not None:
                entry.processes = self.pod_runner(entry.pod, directory)
            else:
                entry.processes = LocalPod(entry.pod, self.runner, directory,
                                           lambda c: self.container_env(entry.pod, c))
        except ContainerConfigError as e:
            if entry.config_error != str(e):
                logger.info("test kubelet: pod %s/%s cannot start yet: %s", meta.get("namespace"), meta["name"], e)
            entry.config_error, entry.retry_at = str(e), time.monotonic() + CONFIG_RETRY_S
            return
        entry.config_error = None
        entry.start_time = _now()

    def _shutdown(self) -> None:
        for pod_entry in self._pods.values():
            if pod_entry.processes is not None:
                pod_entry.processes.stop(self.stop_grace)
        deadline = time.monotonic() + self.stop_grace + 5
        while time.monotonic() < deadline:
            pending = [e for e in self._pods.values() if e.processes is not None and not e.processes.finished()]
            if not pending:
                return
            for entry in pending:
                assert entry.processes is not None
                entry.processes.step()
            time.sleep(self.poll_interval)
        raise RuntimeError("test kubelet: some containers did not end after SIGKILL")

    # -- env --------------------------------------------------------------------------------------
    def container_env(self, pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
        """The container's environment: envFrom, then env (value, fieldRef, secretKeyRef, configMapKeyRef)."""
        namespace = str(pod["metadata"].get("namespace"))
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = str(source.get("prefix") or "")
            for kind, ref in (("Secret", source.get("secretRef")), ("ConfigMap", source.get("configMapRef"))):
                if ref:
                    data = self._data(kind, namespace, str(ref["name"]), optional=bool(ref.get("optional")))
                    env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            name = str(var["name"])
            if "valueFrom" not in var:
                env[name] = str(var.get("value", ""))
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[name] = _field(pod, str(source["fieldRef"]["fieldPath"]))
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                kind, ref = ("Secret", source["secretKeyRef"]) if "secretKeyRef" in source else (
                    "ConfigMap", source["configMapKeyRef"])
                data = self._data(kind, namespace, str(ref["name"]), optional=bool(ref.get("optional")))
                if ref["key"] in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise ValueError(f"{kind} {namespace}/{ref['name']} has no key {ref['key']!r} for env {name}")
            else:
                raise ValueError(f"env {name}: valueFrom {sorted(source)} is not supported by the test kubelet")
        return env

    def _data(self, kind: str, namespace: str, name: str, *, optional: bool) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "Secret":
                secret = self.core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            if e.status == 404:
                raise ContainerConfigError(f"{kind.lower()} {name!r} not found") from e
            raise ValueError(f"{kind} {namespace}/{name} referenced by a pod cannot be read: {e.status}") from e

    # -- status -----------------------------------------------------------------------------------
    def _report(self, entry: _PodEntry) -> None:
        status = self._status(entry)
        if status == entry.written:
            return
        meta = entry.pod["metadata"]
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status},
                                                  _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status == 404:
                entry.deleted = True  # the DELETED event is on its way
                if entry.processes is not None:
                    entry.processes.stop(self.stop_grace)
                return
            raise
        entry.written = status

    def _condition(self, entry: _PodEntry, kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        value = "True" if ok else "False"
        key = f"{kind}={value}"
        if key not in entry.since:
            entry.since = {k: v for k, v in entry.since.items() if not k.startswith(kind + "=")}
            entry.since[key] = _now()
        cond = {"type": kind, "status": value, "lastTransitionTime": entry.since[key], "lastProbeTime": None}
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        return cond

    def _status(self, entry: _PodEntry) -> dict[str, Any]:
        if entry.held is None and entry.processes is None and entry.config_error is not None:
            waiting = {"reason": "CreateContainerConfigError", "message": entry.config_error}
            return {"phase": "Pending", "conditions": [self._condition(entry, "PodScheduled", True)],
                    "containerStatuses": [{"name": str(c.get("name")), "ready": False, "restartCount": 0,
                                           "image": str(c.get("image", "")), "imageID": "",
                                           "state": {"waiting": waiting}}
                                          for c in (entry.pod.get("spec") or {}).get("containers") or []]}
        if entry.held is not None or entry.processes is None:
            return {"phase": "Pending", "conditions": [
                self._condition(entry, "PodScheduled", False, "Unschedulable", entry.held or "")]}
        states = entry.processes.states()
        inits = [s for s in states if s.kind != "main"]
        mains = [s for s in states if s.kind == "main"]
        initialized = all(s.exit_code == 0 for s in inits if s.kind == "init") and all(
            s.started_at is not None for s in inits)
        failed_init = any(s.kind == "init" and s.exit_code not in (None, 0) for s in inits)
        mains_done = bool(mains) and all(s.finished_at is not None for s in mains)
        finished = entry.processes.finished() and (mains_done or failed_init)
        if finished:
            phase = "Failed" if failed_init or any(s.exit_code != 0 for s in mains) else "Succeeded"
        elif any(s.started_at is not None for s in mains):
            phase = "Running"
        else:
            phase = "Pending"
        ready = phase == "Running" and all(s.running for s in mains) and all(
            s.running for s in inits if s.kind == "sidecar")
        not_ready = [s.name for s in states if s.kind != "init" and not s.running]
        why = "" if ready else ("PodCompleted" if finished else "ContainersNotReady")
        msg = "" if ready or finished else f"containers with unready status: [{' '.join(not_ready)}]"
        ip = entry.processes.pod_ip if isinstance(entry.processes, AddressedPod) else POD_IP
        return {
            "phase": phase, "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": POD_IP,
            "startTime": entry.start_time,
            "conditions": [
                self._condition(entry, "PodScheduled", True),
                self._condition(entry, "Initialized", initialized),
                self._condition(entry, "ContainersReady", ready, why, msg),
                self._condition(entry, "Ready", ready, why, msg),
            ],
            "initContainerStatuses": [_container_status(s) for s in inits],
            "containerStatuses": [_container_status(s) for s in mains],
        }


def _container_status(s: ContainerState) -> dict[str, Any]:
    state: dict[str, Any]
    if s.finished_at is not None:
        terminated: dict[str, Any] = {"exitCode": s.exit_code, "reason": s.reason, "startedAt": s.started_at,
                                      "finishedAt": s.finished_at}
        if s.message:
            terminated["message"] = s.message
        state = {"terminated": terminated}
    elif s.started_at is not None:
        state = {"running": {"startedAt": s.started_at}}
    else:
        state = {"waiting": {"reason": "PodInitializing"}}
    return {"name": s.name, "image": s.image, "imageID": "", "ready": s.running, "started": s.running,
            "restartCount": 0, "state": state}


def _field(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API fieldRef: metadata.name, metadata.labels['k'], status.podIP, ..."""
    if path in ("status.podIP", "status.hostIP"):
        return POD_IP
    meta = pod.get("metadata") or {}
    for mapping in ("labels", "annotations"):
        prefix = f"metadata.{mapping}['"
        if path.startswith(prefix) and path.endswith("']"):
            return str((meta.get(mapping) or {}).get(path[len(prefix):-2], ""))
    node: Any = pod
    for token in path.split("."):
        node = node.get(token) if isinstance(node, Mapping) else None
    if node is None and path not in ("spec.nodeName", "spec.serviceAccountName"):
        raise ValueError(f"fieldRef {path!r} is not supported by the test kubelet")
    return "" if node is None else str(node)


def which_python() -> str:
    """The interpreter for trivial test pods (the one running the tests)."""
    import sys

    return sys.executable or shutil.which("python3") or "python3"
