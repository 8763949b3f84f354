"""How a Pod manifest's containers become local processes: ports, addresses, volumes, env, programs.

What a pod gets on Kubernetes and must differ on one machine is rewritten here,
and only here (``fedkube.runtime.pod`` runs what this builds):

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
  checkpoint); a projected volume merges its Secrets, ConfigMaps and pod fields
  into one directory; hostPath is used as is. Every path in env, command, args and
  ``workingDir`` under a mount path is rewritten to the local directory, and
  the termination-message path becomes a file in the pod's directory. A
  Secret's files live as long as the pod, as on a node (where they are a
  tmpfs the kubelet unmounts): ``remove_secrets()`` deletes them when the pod
  ended, however it ended; logs, checkpoints and the summary stay.
* **Programs.** ``python``/``python3`` is the interpreter running fedkube (the
  user's virtualenv); ``fedkube`` is the console script next to it. A relative
  command/argument naming a file that exists in ``base_dir`` (the job file's
  directory, standing in for the trainer image's contents) is made absolute,
  and ``base_dir`` is put on ``PYTHONPATH``, because each container's working
  directory is its pod's own fresh directory (LESSONS.md 24), not the
  directory the user's files are in.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.runtime.objects import object_files, write_files
from fedkube.runtime.podtypes import PodOptions
from fedkube.runtime.process import ProcessSpec
from fedkube.runtime.resolver import LOCAL_HOST, pod_key_of

__all__ = ["ADDRESS_VARS", "DEFAULT_TERMINATION_PATH", "PORT_VARS", "PodMapping", "fedkube_command"]

PORT_VARS = frozenset(
    {envvars.GRPC_PORT, envvars.BULK_PORT, envvars.STATUS_PORT, envvars.METRICS_PORT, envvars.TRAINER_PORT,
     envvars.ENROLL_PORT}
)
ADDRESS_VARS = frozenset({envvars.SERVER_ADDRESS, envvars.SERVER_BULK_ADDRESS, envvars.SIDECAR_ADDRESS})
DEFAULT_TERMINATION_PATH = "/dev/termination-log"


class PodMapping:
    """One pod's manifest mapped onto this machine: its volumes as directories, each container as a ProcessSpec.

    Pure of processes: it writes files (volumes, a cleared termination log) but starts nothing.
    """

    def __init__(self, pod: Mapping[str, Any], options: PodOptions, directory: Path) -> None:
        self.pod = pod
        self.options = options
        self.key = pod_key_of(pod)
        self.name = str(pod.get("metadata", {}).get("name", ""))
        self.dir = directory
        self.volumes: dict[str, Path] = {}
        self.secret_dirs: list[Path] = []  # volumes holding a Secret's files (tokens, TLS keys)

    def materialize_volumes(self) -> None:
        """Make every volume of the pod a local directory (Secrets and ConfigMaps written as files)."""
        spec = self.pod.get("spec", {})
        self.volumes = {}
        for volume in spec.get("volumes", []) or []:
            if _holds_secret(volume):  # noted first: a volume that fails half-written is removed too
                self.secret_dirs.append(self.dir / "volumes" / str(volume["name"]))
            self.volumes[str(volume["name"])] = self._materialize(volume)

    def remove_secrets(self) -> list[Path]:
        """Delete the files of every Secret volume of the pod (its processes have ended); the paths removed."""
        removed = []
        for path in self.secret_dirs:
            if path.exists():
                shutil.rmtree(path)
                removed.append(path)
        return removed

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
        if "projected" in volume:
            return self._projected(name, volume["projected"], target)
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
            "persistentVolumeClaim, projected or hostPath"
        )

    def _projected(self, name: str, source: Mapping[str, Any], target: Path) -> Path:
        """One directory holding every projection's files, as the kubelet writes a projected volume."""
        namespace = self.key.split("/", 1)[0]
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        mode = source.get("defaultMode")
        for part in source.get("sources") or []:
            for kind, field_name in (("Secret", "secret"), ("ConfigMap", "configMap")):
                if field_name not in part:
                    continue
                ref = part[field_name]
                obj = self.options.objects.get(kind, namespace, str(ref.get("name")))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(
                        f"pod {self.key}: volume {name!r} projects {kind} {ref.get('name')!r}, which does not "
                        f"exist; fix: create the {kind} before the pod"
                    )
                write_files(target, object_files(obj), ref.get("items"), mode)
            for item in (part.get("downwardAPI") or {}).get("items") or []:
                value = self._value_from(f"{name}/{item.get('path')}", item).encode()
                write_files(target, {"v": value}, [{"key": "v", "path": item["path"], "mode": item.get("mode")}], mode)
            unknown = set(part) - {"secret", "configMap", "downwardAPI"}
            if unknown:
                raise ConfigError(
                    f"pod {self.key}: volume {name!r} projects {sorted(unknown)}, which the local runtime cannot "
                    "provide; fix: project only secret, configMap or downwardAPI"
                )
        return target

    def process_spec(self, manifest: Mapping[str, Any], *, resolve: bool = False) -> ProcessSpec:
        """The process of container ``manifest``; addresses go through the resolver only with ``resolve``.

        With ``ports_reported`` the addresses may name ports a container of this pod has yet to
        report, so the spec is built again, resolved, when the container starts.
        """
        volumes = self.volumes
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


def _holds_secret(volume: Mapping[str, Any]) -> bool:
    """A Secret volume, or a projected volume with a Secret among its sources."""
    if "secret" in volume:
        return True
    return any("secret" in part for part in (volume.get("projected") or {}).get("sources") or [])


def fedkube_command() -> list[str]:
    """How to start the ``fedkube`` command of this installation."""
    script = Path(sys.executable).parent / "fedkube"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("fedkube")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from fedkube.cli import main; sys.exit(main(sys.argv[1:]))"]
