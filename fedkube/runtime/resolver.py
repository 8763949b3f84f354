"""Ports and addresses for pods that share one machine.

In Kubernetes every pod has its own network namespace, so the server can listen
on 7070 and every client pod's sidecar on 7071. On one machine those ports
collide, so each (pod, container port) pair stands for its own localhost port,
and each Service DNS name is mapped to the local port of the pod behind it.

Where that port comes from: ``fedkube run`` lets each process bind a port the
OS picks and report it (``fedkube.portfile``); the pod says which ports it will
report (``expect``), lookups of those wait until it did (``bind``) or gave up
(``give_up``). A pair nobody reports gets a port reserved in advance
(``free_port``), which another socket can take before the process binds it:
that is what the e2e tests' emulated kubelet and the fault harness still use,
whose stand-in processes take the number they are given.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from fedkube.errors import ConfigError, FedkubeError

LOCAL_HOST = "127.0.0.1"
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
_CLUSTER_SUFFIXES = (".svc", ".svc.cluster.local")


# Ports handed out in advance come from below Linux's ephemeral range (net.ipv4.ip_local_port_range,
# 32768-60999 by default): an outgoing connection (a sidecar's dial, a TLS handshake's socket) takes its local
# port from that range, and one that took a reserved port before its listener bound it failed that bind
# ("Address already in use" on the sidecar's metrics port in the e2e suite).
RESERVE_RANGE = (20000, 32767)


def free_port() -> int:
    """A TCP port nothing is bound to right now, on any address, outside the ephemeral range when one is free.

    The port is closed again before it is returned, so another listener could
    take it in between; the pool in ``LocalResolver`` never hands the same port
    out twice, which is the collision that matters here.
    """
    for _ in range(64):
        port = random.randint(*RESERVE_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCAL_HOST, 0))
        return int(sock.getsockname()[1])


class LocalResolver:
    """Maps pod ports and Service names of a rendered job onto localhost ports (thread-safe)."""

    def __init__(self, report_timeout_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._reported = threading.Condition(self._lock)
        self._ports: dict[tuple[str, int], int] = {}
        self._taken: set[int] = set()
        self._pending: set[tuple[str, int]] = set()  # ports a starting process will report
        self._services: dict[tuple[str, int], tuple[str, int]] = {}  # (host, port) -> (pod key, container port)
        self.report_timeout_s = report_timeout_s

    def expect(self, pod_key: str, container_port: int) -> None:
        """A process of ``pod_key`` will bind ``container_port``'s listener itself and report the port."""
        with self._lock:
            if (pod_key, container_port) not in self._ports:
                self._pending.add((pod_key, container_port))

    def bind(self, pod_key: str, container_port: int, local: int) -> None:
        """The process reported ``local`` for ``container_port`` of ``pod_key``: route there from now on."""
        with self._lock:
            self._ports[(pod_key, container_port)] = local
            self._taken.add(local)
            self._pending.discard((pod_key, container_port))
            self._reported.notify_all()

    def give_up(self, pod_key: str, container_port: int) -> None:
        """The process ended without reporting ``container_port``: stop waiting for it."""
        with self._lock:
            self._pending.discard((pod_key, container_port))
            self._reported.notify_all()

    def reported(self, pod_key: str, container_port: int, wait_s: float = 0.0) -> int | None:
        """The local port of ``container_port`` if known, waiting up to ``wait_s`` for a pending report."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while (pod_key, container_port) in self._pending and (left := deadline - time.monotonic()) > 0:
                self._reported.wait(left)
            return self._ports.get((pod_key, container_port))

    def local_port(self, pod_key: str, container_port: int) -> int:
        """The localhost port that stands for ``container_port`` of the pod ``pod_key`` (stable).

        A port its process will report is waited for (up to ``report_timeout_s``); one nobody
        reports is reserved now.
        """
        if container_port <= 0:
            raise ValueError(f"container port must be positive, got {container_port}")
        deadline = time.monotonic() + self.report_timeout_s
        with self._lock:
            while (pod_key, container_port) in self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PortNotReported(
                        f"pod {pod_key} has not reported the local port of its port {container_port} after "
                        f"{self.report_timeout_s:.0f} s; fix: see that pod's logs under <run dir>/logs/"
                    )
                self._reported.wait(left)
            known = self._ports.get((pod_key, container_port))
            if known is not None:
                return known
            port = free_port()
            while port in self._taken:
                port = free_port()
            self._taken.add(port)
            self._ports[(pod_key, container_port)] = port
            return port

    def add_service(self, service: Mapping[str, Any], pod: Mapping[str, Any]) -> None:
        """Route the Service's DNS names and ports to ``pod`` (which its selector picks).

        ``targetPort`` may be a number or the name of a container port, as in
        Kubernetes; a missing targetPort means the same number as ``port``.
        """
        meta = service.get("metadata", {})
        name = str(meta.get("name", ""))
        namespace = str(meta.get("namespace") or "default")
        pod_key = pod_key_of(pod)
        named = _named_ports(pod)
        for entry in service.get("spec", {}).get("ports", []):
            port = int(entry["port"])
            target = entry.get("targetPort", port)
            if isinstance(target, str) and not target.isdigit():
                if target not in named:
                    raise ConfigError(
                        f"Service {name!r} targets port {target!r}, which no container of pod "
                        f"{pod_key!r} declares; fix: name the container port or use a number"
                    )
                target = named[target]
            hosts = [name, f"{name}.{namespace}", *(f"{name}.{namespace}{suffix}" for suffix in _CLUSTER_SUFFIXES)]
            with self._lock:
                for host in hosts:
                    self._services[(host, port)] = (pod_key, int(target))

    def resolve(self, pod_key: str, address: str) -> str:
        """Rewrite ``host:port`` as seen from inside ``pod_key`` into a localhost address.

        Loopback addresses stay inside the same pod; Service names go to the pod
        behind the Service. Anything else is left as it is (an external host).
        """
        host, sep, port_text = address.rpartition(":")
        if not sep or not port_text.isdigit():
            return address
        port = int(port_text)
        if host in _LOOPBACK_NAMES:
            return f"{LOCAL_HOST}:{self.local_port(pod_key, port)}"
        with self._lock:
            target = self._services.get((host, port))
        if target is None:
            return address
        return f"{LOCAL_HOST}:{self.local_port(*target)}"


class PortNotReported(FedkubeError):
    """A process that was to report the port it listens on did not, in time."""


def pod_key_of(pod: Mapping[str, Any]) -> str:
    """``namespace/name`` of a pod manifest: the key its ports are stored under."""
    meta = pod.get("metadata", {})
    return f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"


def _named_ports(pod: Mapping[str, Any]) -> dict[str, int]:
    spec = pod.get("spec", {})
    named: dict[str, int] = {}
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        for entry in container.get("ports", []) or []:
            if entry.get("name"):
                named[str(entry["name"])] = int(entry["containerPort"])
    return named
