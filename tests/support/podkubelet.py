"""The test kubelet's container backend: each Pod of the emulated API runs as a podman pod.

:class:`~tests.support.kubelet.TestKubelet` runs a pod's containers as local
processes; with a :class:`PodmanBackend` as its ``pod_runner`` they run from
their images instead, as a kubelet with a container runtime runs them:

* one podman pod per Pod (the containers share its network namespace, so
  ``127.0.0.1`` and abstract Unix sockets are shared as on Kubernetes), on a
  bridge network the test creates and removes at the end, with a fixed IP per
  pod that the kubelet reports as ``status.podIP``. Not ``--internal``: that
  leaves the host without an address on the bridge, and the operator (a
  thread of the test) polls the server pod's status at its pod IP as it does
  on a cluster. Pods are told only the addresses of pods the test made;
* the securityContext: runAsUser/runAsGroup with fsGroup as a supplementary
  group, readOnlyRootFilesystem (without podman's extra tmpfs mounts: a
  kubelet adds none), dropped capabilities, no privilege escalation;
* volumes as a kubelet lays them out: Secret/ConfigMap keys as files of mode
  ``defaultMode`` owned by root, group fsGroup and group-readable when the pod
  has an fsGroup (the kubelet's ownership rule); emptyDirs mode 0777;
  PersistentVolumeClaims as one host directory per claim (``claims_dir``),
  kept after the pod;
* env as the process kubelet resolves it, with the downward API's
  ``status.podIP``/``status.hostIP`` the pod's real addresses;
* Services: every Service of the pod's namespace whose selector matches a pod
  this backend started resolves (``--add-host``) to that pod's IP under
  ``name``, ``name.ns``, ``name.ns.svc`` and ``name.ns.svc.cluster.local``. A
  pod whose Services have no pod yet waits (ContainerConfigError, retried);
* container order, exit codes and termination messages (a host file mounted
  at ``terminationMessagePath``) through the process kubelet's
  :class:`~tests.support.kubelet.LocalPod`.

Not emulated: resource limits, probes, restarts, image pulls (images must
exist locally: ``scripts/build-images.sh``), volume ``items``/``subPath``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.support.kubelet import (
    ContainerConfigError,
    ContainerLaunch,
    ContainerProcess,
    ContainerState,
    LocalPod,
)

logger = logging.getLogger(__name__)

PODMAN = "podman"
DEFAULT_FILE_MODE = 0o644  # a Secret/ConfigMap volume's mode when the manifest names none (Kubernetes' default)
RO_GROUP_BITS = 0o440  # what the kubelet ORs into read-only volume files that get an fsGroup
FIRST_HOST = 10  # pod IPs start at .10 of the network (below: the gateway and room for podman's own)


class PodmanUnavailable(Exception):
    """podman cannot run containers on this machine (the reason says why and what to install)."""


def podman_problem() -> str | None:
    """Why podman cannot run pods here (not installed, or `podman info` fails), or None."""
    if shutil.which(PODMAN) is None:
        return "podman is not installed; fix: apt-get install -y podman runc (see .ci/run)"
    try:
        done = subprocess.run([PODMAN, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`podman info` failed: {exc}"
    if done.returncode != 0:
        return f"`podman info` failed: {done.stderr.strip()[-500:]}; fix: /etc/containers/containers.conf (.ci/run)"
    return None


def podman(*args: str, check: bool = True, timeout: float = 120, env: Mapping[str, str] | None = None) -> str:
    """Run one podman command; its stdout. A failure raises with podman's stderr."""
    done = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(env) if env is not None else None)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


class _PodmanContainer:
    """An attached ``podman run``: its exit status is the container's; signals go through ``podman kill``."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str) -> None:
        self.popen, self.name = popen, name

    def poll(self) -> int | None:
        return self.popen.poll()

    def _signal(self, sig: str) -> None:
        if self.popen.poll() is None:
            subprocess.run([PODMAN, "kill", "--signal", sig, self.name], capture_output=True, timeout=60)

    def terminate(self) -> None:
        self._signal("TERM")

    def kill(self) -> None:
        self._signal("KILL")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


@dataclasses.dataclass(frozen=True)
class _Mount:
    host: Path
    path: str
    read_only: bool


@dataclasses.dataclass
class PodmanPod:
    """One Pod as a podman pod: the process kubelet's container order over ``podman run`` containers."""

    pod_name: str  # the podman pod's name
    ip: str
    local: LocalPod

    def step(self) -> None:
        self.local.step()

    def states(self) -> list[ContainerState]:
        return self.local.states()

    def finished(self) -> bool:
        return self.local.finished()

    def stop(self, grace: float) -> None:
        """Main containers first; the sidecars once they have ended (a native sidecar outlives its pod's mains).

        LocalPod's own completion rule stops the sidecars when the last main container has exited.
        """
        if self.local.stopping:
            return
        mains = [s for s in self.local.slots if s.state.kind == "main" and s.process is not None and s.state.running]
        if not mains:  # nothing main running (not started yet, or done): whatever runs stops now
            self.local.stop(grace)
            return
        deadline = time.monotonic() + grace
        for slot in mains:
            assert slot.process is not None
            slot.process.terminate()
            slot.kill_at = deadline

    @property
    def pod_ip(self) -> str:
        return self.ip


def _security_options(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    """podman options for the pod's and the container's securityContext (the container's wins)."""
    pod_ctx = pod_spec.get("securityContext") or {}
    ctx = {**pod_ctx, **(container.get("securityContext") or {})}
    options: list[str] = []
    user, group = ctx.get("runAsUser"), ctx.get("runAsGroup")
    if user is not None:
        options += ["--user", f"{user}:{group}" if group is not None else str(user)]
    elif ctx.get("runAsNonRoot"):
        raise ValueError("runAsNonRoot without runAsUser: the test kubelet cannot check the image's user; "
                         "fix: set runAsUser in the pod's securityContext")
    if pod_ctx.get("fsGroup") is not None:
        options += ["--group-add", str(pod_ctx["fsGroup"])]
    for gid in pod_ctx.get("supplementalGroups") or []:
        options += ["--group-add", str(gid)]
    if ctx.get("readOnlyRootFilesystem"):
        options += ["--read-only", "--read-only-tmpfs=false"]
    caps = ctx.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        options += ["--cap-drop", str(cap)]
    for cap in caps.get("add") or []:
        options += ["--cap-add", str(cap)]
    if ctx.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    return options


class PodmanBackend:
    """Runs the kubelet's pods as podman pods on a network of its own; use as a context manager.

    ``env_of(pod, container)`` resolves a container's env (the process
    kubelet's :meth:`~tests.support.kubelet.TestKubelet.container_env`);
    ``core`` is a CoreV1Api of the emulated cluster (Secrets, ConfigMaps,
    Services). Pass :meth:`run_pod` as the TestKubelet's ``pod_runner``.
    """

    def __init__(self, core: Any, claims_dir: Path, *, env_of: Callable[[Mapping[str, Any], Mapping[str, Any]],
                                                                        dict[str, str]] | None = None) -> None:
        self.core, self.claims_dir = core, claims_dir
        self.env_of = env_of
        self.network = f"fedkube-test-{secrets.token_hex(4)}"
        self._hosts: list[ipaddress.IPv4Address] = []
        self.gateway = ""
        self._lock = threading.Lock()
        self._pods: dict[str, tuple[Mapping[str, str], str]] = {}  # podman pod name -> (labels, ip), started ones
        self._by_key: dict[tuple[str, str], str] = {}  # (namespace, name) -> the IP of its latest pod
        self._podman_pods: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> PodmanBackend:
        podman("network", "create", "--disable-dns", self.network)
        info = json.loads(podman("network", "inspect", self.network))[0]
        subnet = info["subnets"][0]
        net = ipaddress.ip_network(subnet["subnet"])
        self.gateway = str(subnet.get("gateway") or next(net.hosts()))
        self._hosts = [h for h in net.hosts() if int(h) - int(net.network_address) >= FIRST_HOST]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every podman pod this backend made, then its network."""
        for name in reversed(self._podman_pods):
            podman("pod", "rm", "--force", "--time", "2", name, check=False)
        self._podman_pods.clear()
        podman("network", "rm", "--force", self.network, check=False)

    def ip_of(self, namespace: str, name: str) -> str | None:
        """The IP of the latest pod ``namespace/name`` started here."""
        with self._lock:
            return self._by_key.get((namespace, name))

    def podman_pod_of(self, namespace: str, name: str) -> str | None:
        """The podman pod name of the latest pod ``namespace/name`` (for ``podman kill`` and friends)."""
        with self._lock:
            ip = self._by_key.get((namespace, name))
            return next((p for p, (_, i) in self._pods.items() if i == ip), None) if ip else None

    # -- one pod ----------------------------------------------------------------------------------
    def run_pod(self, pod: dict[str, Any], directory: Path) -> PodmanPod:
        """The kubelet's ``pod_runner``: create the podman pod and let LocalPod start its containers."""
        if self.env_of is None:
            raise RuntimeError("PodmanBackend.env_of is not set; fix: give it TestKubelet.container_env")
        meta, spec = pod["metadata"], pod.get("spec") or {}
        namespace = str(meta.get("namespace"))
        pod_name = f"{namespace}-{meta['name']}-{str(meta['uid'])[:8]}"
        with self._lock:  # the address first: a pod may reach itself through its own Service
            if pod_name not in self._pods:
                used = {ip for _, ip in self._pods.values()}
                ip = next(str(h) for h in self._hosts if str(h) not in used)
                self._pods[pod_name] = (dict(meta.get("labels") or {}), ip)
                self._by_key[(namespace, str(meta["name"]))] = ip
            ip = self._pods[pod_name][1]
        hosts = self._service_hosts(namespace)
        mounts = self._volumes(pod, directory)  # raises ContainerConfigError for a missing Secret/ConfigMap
        args = ["pod", "create", "--name", pod_name, "--network", self.network, "--ip", ip,
                "--hostname", str(meta["name"])[:63]]
        for host, address in hosts.items():
            args += ["--add-host", f"{host}:{address}"]
        podman(*args)
        self._podman_pods.append(pod_name)
        env_of = self.env_of

        def container_env(container: Mapping[str, Any]) -> dict[str, str]:
            env = env_of(pod, container)
            for var in container.get("env") or []:
                path = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
                if path in ("status.podIP", "status.hostIP"):
                    env[str(var["name"])] = ip if path == "status.podIP" else self.gateway
            return env

        def runner(launch: ContainerLaunch) -> ContainerProcess:
            return self._run_container(launch, pod_name, spec, mounts)

        return PodmanPod(pod_name=pod_name, ip=ip, local=LocalPod(pod, runner, directory, container_env))

    def _service_hosts(self, namespace: str) -> dict[str, str]:
        raw: Any = self.core.list_namespaced_service(namespace, _preload_content=False)
        hosts: dict[str, str] = {}
        for svc in json.loads(raw.data).get("items") or []:
            selector = (svc.get("spec") or {}).get("selector") or {}
            if not selector:
                continue
            name = str(svc["metadata"]["name"])
            with self._lock:
                ips = [ip for labels, ip in self._pods.values()
                       if all(labels.get(k) == v for k, v in selector.items())]
            if not ips:
                raise ContainerConfigError(f"service {namespace}/{name} has no pod yet: the test kubelet resolves "
                                           "Service names to a pod's IP when it creates the pod")
            for host in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc",
                         f"{name}.{namespace}.svc.cluster.local"):
                hosts[host] = ips[-1]
        return hosts

    def _object(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, bytes] | None:
        from kubernetes.client.exceptions import ApiException

        fn = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
        try:
            obj = json.loads(fn(name, namespace, _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            if exc.status == 404:
                raise ContainerConfigError(f"{kind.lower()} {name!r} not found") from exc
            raise
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        files = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        files.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return files

    def _volumes(self, pod: Mapping[str, Any], directory: Path) -> dict[str, Path]:
        """Each volume of ``pod`` as a host path, laid out as a kubelet does (see the module's docstring)."""
        spec = pod.get("spec") or {}
        namespace = str(pod["metadata"].get("namespace"))
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        root = directory / "volumes"
        paths: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            name = str(volume["name"])
            path = root / name
            for kind, field, key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
                source = volume.get(field)
                if source is None:
                    continue
                if source.get("items"):
                    raise ValueError(f"volume {name}: items are not emulated by the podman test kubelet")
                files = self._object(kind, namespace, str(source[key]), bool(source.get("optional"))) or {}
                mode = int(source.get("defaultMode", DEFAULT_FILE_MODE))
                _write_files(path, files, mode, fs_group)
                paths[name] = path
            if "emptyDir" in volume:
                path.mkdir(parents=True, exist_ok=True)
                os.chmod(path, 0o777)
                paths[name] = path
            elif "persistentVolumeClaim" in volume:
                claim = self.claims_dir / f"{namespace}-{volume['persistentVolumeClaim']['claimName']}"
                claim.mkdir(parents=True, exist_ok=True)
                if fs_group is not None:
                    os.chown(claim, 0, int(fs_group))
                    os.chmod(claim, 0o2770)  # what the kubelet's fsGroup ownership change leaves
                paths[name] = claim
            elif name not in paths:
                raise ValueError(f"volume {name}: {sorted(set(volume) - {'name'})} is not emulated by the podman "
                                 "test kubelet")
        return paths

    def _run_container(self, launch: ContainerLaunch, pod_name: str, spec: Mapping[str, Any],
                       volumes: Mapping[str, Path]) -> ContainerProcess:
        container = launch.container
        name = f"{pod_name}-{container['name']}"
        message_path = str(container.get("terminationMessagePath") or "/dev/termination-log")
        launch.termination_log.touch()
        os.chmod(launch.termination_log, 0o666)  # the kubelet's file is writable by the container's user
        args = ["run", "--pod", pod_name, "--name", name, "--init=false", "--pull", "never",
                *_security_options(spec, container),
                "-v", f"{launch.termination_log}:{message_path}"]
        for mount in container.get("volumeMounts") or []:
            if "subPath" in mount:
                raise ValueError(f"container {container['name']}: subPath is not emulated by the podman kubelet")
            host = volumes[str(mount["name"])]
            args += ["-v", f"{host}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
        for key in launch.env:  # values travel in podman's environment, not on its command line
            args += ["--env", key]
        if container.get("workingDir"):
            args += ["--workdir", str(container["workingDir"])]
        command = [str(c) for c in container.get("command") or []]
        if command:
            args += ["--entrypoint", json.dumps(command)]
        args += [str(container["image"]), *[str(a) for a in container.get("args") or []]]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **launch.env}
        with launch.log_path.open("ab") as log:
            popen = subprocess.Popen([PODMAN, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return _PodmanContainer(popen, name)


def _write_files(path: Path, files: Mapping[str, bytes], mode: int, fs_group: int | None) -> None:
    """Secret/ConfigMap keys as files: owner root, and with an fsGroup group-owned and group-readable by it."""
    path.mkdir(parents=True, exist_ok=True)
    if fs_group is not None:
        mode |= RO_GROUP_BITS
        os.chown(path, 0, int(fs_group))
    os.chmod(path, 0o755 if fs_group is None else 0o2755)
    for key, data in files.items():
        target = path / key
        target.write_bytes(data)
        os.chown(target, 0, int(fs_group) if fs_group is not None else 0)
        os.chmod(target, mode)

