"""End-to-end harness: the real kopf operator against the emulated Kubernetes API, pods run by fedkube's runtime.

``fl`` gives a cluster with the real FLJob CRD applied, a test kubelet whose
pods run through ``fedkube.runtime.pod.run_pod`` (real server, sidecars and
trainers as local processes, talking real gRPC on localhost), and the
operator's handlers running in kopf. The only seam is the operator's status
poll: a pod IP plus port 8080 is the same for every pod here, so the memo's
``status_url`` maps the server pod to the local port the runtime gave it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
import yaml

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import handlers
from fedkube.runtime.pod import SIDECAR_EXIT_ON_STOP, PodOptions, PodRun, run_pod
from fedkube.runtime.resolver import LOCAL_HOST, LocalResolver, pod_key_of
from fedkube.spec import API_GROUP, PLURAL
from fedkube.spec.model import API_VERSION_NAME
from tests.support import fixtures
from tests.support.kopfrun import running_operator
from tests.support.kubelet import ContainerConfigError, TestKubelet

kube = fixtures.kube
kubeconfig = fixtures.kubeconfig
k8s_tools = fixtures.k8s_tools

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "fedkube.dev_fljobs.yaml"
QUICKSTART = ROOT / "examples" / "quickstart-numpy"
NAMESPACE = "default"
INTERVAL = 0.3  # the operator's look at each job, fast here so tests wait little


def server_command() -> list[str] | None:
    """The server command for test jobs: the default ``fedkube server`` once the CLI wires it, else the app's main."""
    if importlib.util.find_spec("fedkube.server.main") is not None:
        return None
    return ["python", "-c", "import sys; from fedkube.server.app import main; sys.exit(main())"]


def quickstart_job(name: str, *, sites: tuple[str, ...] = ("site-a", "site-b"), min_clients: int | None = None,
                   rounds: int = 3, **spec: Any) -> dict[str, Any]:
    """The quickstart FLJob renamed, with short timeouts so lifecycle rules fire within seconds."""
    doc = yaml.safe_load((QUICKSTART / "fljob.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NAMESPACE}
    s = doc["spec"]
    s["rounds"] = rounds
    s["clients"] = [{"name": site} for site in sites]
    s["minClients"] = min_clients if min_clients is not None else len(sites)
    s["timeouts"] = {"roundSeconds": 120, "registrationSeconds": 30, "deploySeconds": 60, "pendingSeconds": 30}
    command = server_command()
    if command is not None:
        s.setdefault("server", {})["command"] = command
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(s.get(key), dict):
            s[key] = {**s[key], **value}
        else:
            s[key] = value
    return doc


class ApiObjects:
    """The runtime's ObjectLookup over the emulated API: Secrets and ConfigMaps as pods see them."""

    def __init__(self, core: Any) -> None:
        self.core = core

    def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        fn = {"Secret": self.core.read_namespaced_secret, "ConfigMap": self.core.read_namespaced_config_map}[kind]
        try:
            resp = fn(name, namespace, _preload_content=False)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(json.loads(resp.data))


def _require_objects(pod: Mapping[str, Any], objects: ApiObjects) -> None:
    """Raise the kubelet's ContainerConfigError when a Secret/ConfigMap volume of ``pod`` is missing.

    A real kubelet leaves such a pod Pending and retries; during a cascading
    delete the objects can vanish before the pod does.
    """
    namespace = str(pod["metadata"]["namespace"])
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        for kind, field, key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
            source = volume.get(field)
            if source and not source.get("optional") and objects.get(kind, namespace, str(source[key])) is None:
                raise ContainerConfigError(f"{kind.lower()} {source[key]!r} not found")


class LogSink:
    """Container output of every pod, into one file (printed when a test times out)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def emit(self, prefix: str, line: str) -> None:
        with self._lock, self.path.open("a") as f:
            f.write(f"[{prefix}] {line}\n")

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclasses.dataclass
class FL:
    """An emulated cluster with the FLJob CRD, a kubelet running pods with fedkube's runtime, and the operator."""

    kube: fixtures.KubeHandle
    run_dir: Path
    resolver: LocalResolver
    holds: dict[str, str]
    sink: LogSink
    pods_started: list[str]

    @property
    def core(self) -> Any:
        return kubernetes.client.CoreV1Api(self.kube.api_client)

    @property
    def custom(self) -> Any:
        return kubernetes.client.CustomObjectsApi(self.kube.api_client)

    def apply(self, job: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.custom.create_namespaced_custom_object(API_GROUP, API_VERSION_NAME, NAMESPACE, PLURAL,
                                                                dict(job)))

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION_NAME, NAMESPACE, PLURAL, name))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def patch_spec(self, name: str, spec: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(API_GROUP, API_VERSION_NAME, NAMESPACE, PLURAL, name,
                                                   {"spec": dict(spec)})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION_NAME, NAMESPACE, PLURAL, name)

    def children(self, job: str) -> dict[str, list[str]]:
        """Names of the job's children by kind (label fedkube.dev/job)."""
        sel = f"fedkube.dev/job={job}"
        core = self.core
        return {
            "Pod": [p.metadata.name for p in core.list_namespaced_pod(NAMESPACE, label_selector=sel).items],
            "Service": [p.metadata.name for p in core.list_namespaced_service(NAMESPACE, label_selector=sel).items],
            "Secret": [p.metadata.name for p in core.list_namespaced_secret(NAMESPACE, label_selector=sel).items],
            "ConfigMap": [p.metadata.name for p in core.list_namespaced_config_map(NAMESPACE,
                                                                                 label_selector=sel).items],
            "PersistentVolumeClaim": [p.metadata.name for p in core.list_namespaced_persistent_volume_claim(
                NAMESPACE, label_selector=sel).items],
        }

    def events(self, name: str) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events about FLJob ``name``, oldest first."""
        items = self.core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={name}").items
        return [(e.type, e.reason, e.message) for e in items]

    def wait(self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """Poll the FLJob's status until ``check`` holds; fail with the status and the pods' output otherwise."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status(name)
            if check(status):
                return status
            time.sleep(0.1)
        pytest.fail(f"FLJob {name}: not {what} within {timeout}s; status:\n{yaml.safe_dump(status)}\n"
                    f"events: {self.events(name)}\npod output (tail):\n{self.sink.tail()}")

    def wait_phase(self, name: str, phase: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait(name, lambda s: s.get("phase") == phase, timeout, f"phase {phase}")


def _status_url(resolver: LocalResolver) -> Callable[[Mapping[str, Any]], str]:
    def url(pod: Mapping[str, Any]) -> str:
        port = resolver.local_port(pod_key_of(pod), envvars.DEFAULT_STATUS_PORT)
        return f"http://{LOCAL_HOST}:{port}/status"
    return url


@pytest.fixture
def fl(kube: fixtures.KubeHandle, tmp_path: Path) -> Iterator[FL]:
    """The whole e2e setup; everything it started is stopped at the end."""
    ext = kubernetes.client.ApiextensionsV1Api(kube.api_client)
    ext.create_custom_resource_definition(yaml.safe_load(CRD.read_text()))
    run_dir = tmp_path / "run"
    resolver = LocalResolver()
    holds: dict[str, str] = {}
    sink = LogSink(tmp_path / "pods.log")
    core = kubernetes.client.CoreV1Api(kube.api_client)
    objects = ApiObjects(core)
    started: list[str] = []
    runs: dict[str, PodRun] = {}

    def pod_runner(pod: dict[str, Any], directory: Path) -> PodRun:
        meta = pod["metadata"]
        earlier = runs.get(meta["name"])
        if earlier is not None:
            # A pod created again under the same name (the operator replacing a deleted one) shares its
            # predecessor's directory here, unlike a kubelet's per-uid one: let that one finish its teardown
            # (which removes its Secret files) before the new one's volumes are written.
            earlier.wait(timeout=15)
        labels = meta.get("labels") or {}
        raw: Any = core.list_namespaced_service(meta["namespace"], _preload_content=False)
        services = json.loads(raw.data)
        for svc in services.get("items") or []:
            selector = (svc.get("spec") or {}).get("selector") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                resolver.add_service(svc, pod)
        # A pod recreated under the same name (resume) must not see its predecessor's termination message.
        shutil.rmtree(run_dir / "pods" / meta["name"], ignore_errors=True)
        started.append(meta["name"])
        options = PodOptions(run_dir=run_dir, resolver=resolver, objects=objects, sink=sink, base_dir=QUICKSTART,
                             extra_env={SIDECAR_EXIT_ON_STOP: "1"}, sidecar_grace_s=3.0, stop_grace_s=3.0)
        _require_objects(pod, objects)
        try:
            runs[meta["name"]] = run = run_pod(pod, options)
            return run
        except ConfigError:
            _require_objects(pod, objects)  # deleted meanwhile (a cascade): wait like a kubelet
            raise

    registry = handlers.register(kopf.OperatorRegistry(), interval=INTERVAL)
    memo = kopf.Memo()
    memo[handlers.Memo.API_CLIENT] = kube.api_client
    memo[handlers.Memo.STATUS_URL] = _status_url(resolver)
    memo[handlers.Memo.STATUS_TIMEOUT] = 1.0
    with TestKubelet(kube.api_client, tmp_path / "kubelet", pod_runner=pod_runner,  # type: ignore[arg-type]
                     hold=lambda pod: holds.get(pod["metadata"]["name"]), stop_grace=3.0), \
            running_operator(kube.url, registry, memo=memo):
        yield FL(kube=kube, run_dir=run_dir, resolver=resolver, holds=holds, sink=sink, pods_started=started)
