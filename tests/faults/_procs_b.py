"""Shared helpers of faults 3, 4, 5, 6 and 10: a local job with per-pod control, a TCP proxy, metric scrapes.

``LocalJob`` runs a rendered FLJob the way ``fedkube run`` does (the operator's
builders render the pods, ``run_pod`` runs each one as local processes, the
sidecar is restarted by the pod supervisor as a kubelet would), but keeps a
handle on every pod so a test can kill, restart or re-route one of them.

``TcpProxy`` sits between a sidecar and the server. Which sidecar settings go
through proxies is the one tuple ``PROXIED_ENV``: every address variable named
there gets its own proxy per proxied site; tensor bytes travel on the bulk
data address (``TENSOR_ENV``), so faults that stall or corrupt traffic hit it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fedkube import envvars
from fedkube.operator.naming import SERVER_CONTAINER, SIDECAR_CONTAINER
from fedkube.runtime.local import SITE_LABEL, new_tokens, render_job
from fedkube.runtime.pod import SIDECAR_EXIT_ON_STOP, ManifestObjects, PodOptions, PodResult, PodRun, run_pod
from fedkube.runtime.process import NullSink, OutputSink
from fedkube.runtime.resolver import LOCAL_HOST, LocalResolver, pod_key_of
from fedkube.server import checkpoint
from fedkube.spec import load_job

log = logging.getLogger(__name__)

# Sidecar env vars whose address is routed through a TcpProxy for a proxied site.
PROXIED_ENV: tuple[str, ...] = (envvars.SERVER_ADDRESS, envvars.SERVER_BULK_ADDRESS)
# The one of them whose connection carries tensor bytes (faults 5 and 6 stall or corrupt it): the bulk
# data plane's plain-TCP connections (docs/protocol.md), next to the gRPC control connection.
TENSOR_ENV: str = envvars.SERVER_BULK_ADDRESS

UP = "up"  # client -> server
DOWN = "down"  # server -> client


# --- job files ----------------------------------------------------------------------------------


def write_job(
    directory: Path,
    script: str,
    *,
    name: str,
    sites: Sequence[str] = ("site-a", "site-b"),
    rounds: int = 2,
    min_clients: int | None = None,
    initial: Mapping[str, np.ndarray] | None = None,
    transfer: Mapping[str, Any] | None = None,
    timeouts: Mapping[str, Any] | None = None,
    checkpoint_enabled: bool = False,
    client_env: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Write ``fljob.yaml`` and ``train.py`` into ``directory`` and return the job file's path.

    ``initial`` (tensors) becomes ``spec.model`` with ``source: file`` (an .npz
    in ``directory``), so no client uploads an initial model and the only
    result uploads are the rounds' own. ``client_env`` adds env vars per site.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.py").write_text(script)
    spec: dict[str, Any] = {
        "rounds": rounds,
        "minClients": min_clients if min_clients is not None else len(sites),
        "clients": [
            {"name": s, **({"env": [{"name": k, "value": v} for k, v in client_env[s].items()]}
                          if client_env and s in client_env else {})}
            for s in sites
        ],
        "trainer": {"image": "example/trainer:1", "command": ["python", "train.py"]},
        "timeouts": {"roundSeconds": 120, "registrationSeconds": 60, **(timeouts or {})},
    }
    if initial is not None:
        path = directory / "initial.npz"
        np.savez(path, **dict(initial))  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        spec["model"] = {"source": "file", "path": str(path)}
    if transfer:
        spec["transfer"] = dict(transfer)
    if checkpoint_enabled:
        spec["server"] = {"checkpoint": {"enabled": True}}
    doc = {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": name}, "spec": spec}
    job_file = directory / "fljob.yaml"
    job_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    return job_file


# --- the job ------------------------------------------------------------------------------------


class LocalJob:
    """An FLJob's pods as local processes, with a handle on each pod (see the module doc)."""

    def __init__(
        self,
        job_file: Path,
        run_dir: Path,
        *,
        proxied_sites: Iterable[str] = (),
        sink: OutputSink | None = None,
    ) -> None:
        job = load_job(job_file)
        self.name = job.metadata.name
        self.base_dir = job_file.parent
        self.run_dir = run_dir
        self.resolver = LocalResolver()
        self.manifests = render_job(job, new_tokens([c.name for c in job.spec.clients]))
        self._objects = ManifestObjects(self.manifests)
        self._sink: OutputSink = sink if sink is not None else NullSink()
        pods = [m for m in self.manifests if m.get("kind") == "Pod"]
        self._server_manifest = next(p for p in pods if p["metadata"]["labels"].get("fedkube.dev/role") == "server")
        self._client_manifests = {
            str(p["metadata"]["labels"][SITE_LABEL]): p for p in pods if p is not self._server_manifest
        }
        for service in (m for m in self.manifests if m.get("kind") == "Service"):
            selector = service.get("spec", {}).get("selector") or {}
            for pod in pods:
                if selector and all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items()):
                    self.resolver.add_service(service, pod)
        self.proxies: dict[str, dict[str, TcpProxy]] = {}
        for site in proxied_sites:
            self.proxies[site] = self._proxies_for(site)
        self.server: PodRun | None = None
        self.servers: list[PodRun] = []
        self.clients: dict[str, PodRun] = {}

    def _options(self, extra: Mapping[str, str] | None = None) -> PodOptions:
        return PodOptions(
            run_dir=self.run_dir,
            resolver=self.resolver,
            objects=self._objects,
            sink=self._sink,
            base_dir=self.base_dir,
            extra_env={SIDECAR_EXIT_ON_STOP: "1", **(extra or {})},
            stop_grace_s=3.0,
            sidecar_grace_s=10.0,
        )

    def _proxies_for(self, site: str) -> dict[str, TcpProxy]:
        pod = self._client_manifests[site]
        key = pod_key_of(pod)
        out: dict[str, TcpProxy] = {}
        for container in pod["spec"].get("initContainers", []) + pod["spec"].get("containers", []):
            for entry in container.get("env", []) or []:
                if entry.get("name") in PROXIED_ENV and "value" in entry:
                    upstream = self.resolver.resolve(key, str(entry["value"]))
                    host, _, port = upstream.rpartition(":")
                    out[str(entry["name"])] = TcpProxy((host, int(port)), name=f"{site}:{entry['name']}").start()
        missing = set(PROXIED_ENV) - set(out)
        if missing:
            raise AssertionError(f"site {site}: the sidecar has no {sorted(missing)} to route through a proxy")
        return out

    def proxy(self, site: str, var: str = TENSOR_ENV) -> TcpProxy:
        """The proxy carrying ``var`` of ``site``'s sidecar (by default the one tensor bytes travel on)."""
        return self.proxies[site][var]

    # --- lifecycle ---
    def start(self) -> LocalJob:
        """Start the server, wait until it listens, then every client pod."""
        self.start_server()
        for site in self._client_manifests:
            self.start_client(site)
        return self

    def start_server(self) -> PodRun:
        """Start (or start again, after it ended) the server pod; waits until its gRPC port accepts."""
        if self.server is not None and not self.server.finished():
            raise AssertionError("the previous server pod is still running")
        self.server = run_pod(self._server_manifest, self._options())
        self.servers.append(self.server)
        wait_for(lambda: _accepts(self.grpc_port()) or self.server is None or self.server.finished(),
                 30, "the server's gRPC port to accept connections")
        return self.server

    def start_client(self, site: str) -> PodRun:
        """Start ``site``'s pod (sidecar + trainer), through its proxies if it has any."""
        extra = {var: f"{LOCAL_HOST}:{p.port}" for var, p in self.proxies.get(site, {}).items()}
        run = run_pod(self._client_manifests[site], self._options(extra))
        self.clients[site] = run
        return run

    def close(self) -> None:
        """Stop every pod and proxy (bounded); safe to call twice."""
        for run in [*self.clients.values(), *self.servers]:
            run.stop(grace=1.0)
        for run in [*self.clients.values(), *self.servers]:
            if run.wait(30) is None:
                log.warning("pod %s did not stop within 30 s", run.name)
        for proxies in self.proxies.values():
            for p in proxies.values():
                p.close()

    def __enter__(self) -> LocalJob:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- addresses ---
    def _server_port(self, var: str) -> int:
        for c in self._server_manifest["spec"]["containers"]:
            for entry in c.get("env", []) or []:
                if entry.get("name") == var:
                    return self.resolver.local_port(pod_key_of(self._server_manifest), int(entry["value"]))
        raise AssertionError(f"the server pod has no {var}")

    def grpc_port(self) -> int:
        """The server's gRPC port on this machine."""
        return self._server_port(envvars.GRPC_PORT)

    def server_metrics_url(self) -> str:
        return f"http://{LOCAL_HOST}:{self._server_port(envvars.METRICS_PORT)}/metrics"

    def status_url(self) -> str:
        return f"http://{LOCAL_HOST}:{self._server_port(envvars.STATUS_PORT)}/status"

    def sidecar_metrics_url(self, site: str) -> str:
        pod = self._client_manifests[site]
        for c in pod["spec"].get("initContainers", []):
            for entry in c.get("env", []) or []:
                if entry.get("name") == envvars.METRICS_PORT:
                    port = self.resolver.local_port(pod_key_of(pod), int(entry["value"]))
                    return f"http://{LOCAL_HOST}:{port}/metrics"
        raise AssertionError(f"site {site}: the sidecar exports no metrics")

    # --- observations ---
    def status(self) -> dict[str, Any]:
        """The server's ``/status`` document."""
        with urllib.request.urlopen(self.status_url(), timeout=5) as r:
            doc: dict[str, Any] = json.loads(r.read())
        return doc

    def wait_server(self, timeout: float) -> PodResult:
        """The server pod's result; fails the test if it has not ended within ``timeout`` seconds."""
        assert self.server is not None
        result = self.server.wait(timeout)
        assert result is not None, f"the server did not end within {timeout} s"
        return result

    def summary(self) -> dict[str, Any]:
        """The last server's termination summary (JSON)."""
        assert self.server is not None
        path = self.server.dir / f"{SERVER_CONTAINER}.termination-log"
        found = [path] if path.is_file() else sorted(self.server.dir.glob("*.termination-log"))
        assert found, f"no termination summary in {self.server.dir}"
        doc: dict[str, Any] = json.loads(found[0].read_text())
        return doc

    def checkpoint(self) -> checkpoint.Checkpoint:
        """The newest checkpoint on the server's claim."""
        found = checkpoint.load_latest(self.checkpoint_dir(), self.name)
        assert found is not None, f"no checkpoint of {self.name} under {self.checkpoint_dir()}"
        return found

    def checkpoint_dir(self) -> Path:
        claims = sorted((self.run_dir / "volumes").glob("*"))
        assert claims, f"no persistent volume under {self.run_dir / 'volumes'}"
        return claims[0]

    def sidecar(self, site: str) -> Any:
        """The live ManagedProcess of ``site``'s sidecar."""
        proc = self.clients[site].container_process(SIDECAR_CONTAINER)
        assert proc is not None, f"site {site}: the sidecar has not started"
        return proc

    def log_text(self, site: str | None, container: str) -> str:
        """What a container wrote (its log file under the run dir; ``site`` None for the server)."""
        pod = self._server_manifest if site is None else self._client_manifests[site]
        path = self.run_dir / "logs" / f"{pod['metadata']['name']}.{container}.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOCAL_HOST, port), timeout=0.5):
        return True
    return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


# --- metrics ------------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """One real HTTP scrape of a ``/metrics`` endpoint, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def try_scrape(url: str) -> Samples | None:
    """A scrape, or None while the endpoint is not up (a restarting process)."""
    try:
        return scrape(url)
    except OSError:
        return None


# --- the proxy ----------------------------------------------------------------------------------


class TcpProxy:
    """A threaded TCP proxy with fault switches; counts bytes per direction over all its connections.

    * ``pause()`` / ``resume()``: stop / restart forwarding on every connection
      (new ones included); bytes read meanwhile are held, not lost.
    * ``pause_at(n, direction)``: pause as soon as ``n`` bytes went in ``direction``.
    * ``flip_byte_at(n, direction)``: XOR 0xFF into the byte at stream offset ``n``
      (counted over the proxy's life in that direction), once.
    * ``flip_after(marker, direction)``: flip the last byte of the first occurrence
      of ``marker`` from now on (a tensor's known bytes), once.
    * ``drop_connections()``: close every open connection (new ones still work).
    """

    def __init__(self, upstream: tuple[str, int], *, name: str = "proxy") -> None:
        self.upstream = upstream
        self.name = name
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOCAL_HOST, 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self.bytes = {UP: 0, DOWN: 0}
        self.connections = 0
        self._pause_at: dict[str, int] = {}
        self._flip_at: dict[str, int] = {}
        self._flip_marker: dict[str, bytes] = {}
        self._tail: dict[int, bytes] = {}
        self.flipped: list[tuple[str, int]] = []  # (direction, offset) of each flip done
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{name}", daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    @property
    def address(self) -> str:
        return f"{LOCAL_HOST}:{self.port}"

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def pause_at(self, n: int, direction: str = UP) -> None:
        with self._lock:
            self._pause_at[direction] = n

    def flip_byte_at(self, n: int, direction: str = UP) -> None:
        with self._lock:
            self._flip_at[direction] = n

    def flip_after(self, marker: bytes, direction: str = UP) -> None:
        if not marker:
            raise ValueError("flip_after needs a non-empty marker")
        with self._lock:
            self._flip_marker[direction] = bytes(marker)

    def drop_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop_connections()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, server]
                self.connections += 1
            for src, dst, direction in ((client, server, UP), (server, client, DOWN)):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True,
                                 name=f"proxy-{self.name}-{direction}").start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        key = id(src)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                data = bytes(self._edit(key, direction, bytearray(data)))
                while not self._flowing.wait(0.1):
                    if self._closed.is_set():
                        return
                dst.sendall(data)
                if self._closed.is_set():
                    return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._tail.pop(key, None)

    def _edit(self, key: int, direction: str, data: bytearray) -> bytearray:
        with self._lock:
            start = self.bytes[direction]
            end = start + len(data)
            self.bytes[direction] = end
            at = self._flip_at.get(direction)
            if at is not None and start <= at < end:
                data[at - start] ^= 0xFF
                del self._flip_at[direction]
                self.flipped.append((direction, at))
            marker = self._flip_marker.get(direction)
            if marker is not None:
                tail = self._tail.get(key, b"")
                window = tail + bytes(data)
                i = window.find(marker)
                if i >= 0:
                    pos = i + len(marker) - 1 - len(tail)
                    if pos >= 0:  # the marker's last byte is in this read (it always is on the first find)
                        data[pos] ^= 0xFF
                        del self._flip_marker[direction]
                        self.flipped.append((direction, start + pos))
                self._tail[key] = window[-(len(marker) - 1):] if len(marker) > 1 else b""
            limit = self._pause_at.get(direction)
            if limit is not None and end >= limit:
                del self._pause_at[direction]
                self._flowing.clear()
                log.info("proxy %s: paused after %d bytes %s", self.name, end, direction)
        return data
