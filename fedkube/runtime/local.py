"""Run a whole FLJob on this machine: the operator's manifests, as local processes.

The job is rendered by the operator's own builders, so the processes get the
commands and environment the pods get on Kubernetes; ``run_pod`` rewrites what
must differ on one machine. The server's exit decides the outcome (0 succeeded,
1 failed, 2 configuration error — as for the server pod). After it exits the
clients get a bounded grace period to end on their own (they stop on the job's
``Stop``), then SIGTERM, then SIGKILL. A trainer that exits non-zero after that
point is reported, never promoted to a job failure (LESSONS.md 19).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.runtime.pod import SIDECAR_EXIT_ON_STOP, ManifestObjects, PodOptions, PodResult, PodRun, run_pod
from fedkube.runtime.process import OutputSink, StreamSink
from fedkube.runtime.resolver import LOCAL_HOST, LocalResolver, pod_key_of
from fedkube.runtime.rundir import RunDirLock, default_run_dir
from fedkube.security.material import JobTls
from fedkube.status import STATUS_LIMIT, ClientState, SummaryError
from fedkube.termination import TERMINATION_LIMIT, TerminationSummary

__all__ = [
    "LocalJobRun", "RunOptions", "RunOutcome", "default_run_dir", "new_tls", "new_tokens", "read_summary_file",
    "render_job", "summary_document",
]

logger = logging.getLogger(__name__)

# Where `fedkube run` delivers the trained model (fedkube.server.output), under the run directory.
MODEL_DIR = "model"
ROLE_LABEL = "fedkube.dev/role"
SITE_LABEL = "fedkube.dev/site"
LOCAL_NAME = "localhost"
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C


@dataclass
class RunOptions:
    """Knobs of a local run; the defaults suit ``fedkube run``."""

    run_dir: Path
    base_dir: Path | None = None  # the job file's directory: relative script paths resolve here
    sink: OutputSink = field(default_factory=StreamSink)
    client_grace_s: float = 20.0  # after the server exits, for clients to end on their own
    stop_grace_s: float = 5.0  # SIGTERM -> SIGKILL
    server_ready_timeout_s: float = 30.0
    # False: tensors travel over gRPC only (the server opens no bulk port, sidecars relay no bulk);
    # for comparing the two data planes (bench/round.py --no-bulk) and for hosts that block the port.
    bulk: bool = True
    # The host the listeners meant for other hosts bind (server ports, sidecar metrics); pod-local ones
    # stay on loopback. 127.0.0.1: nothing of the run is reachable from another machine (fedkube run --bind).
    bind: str = LOCAL_HOST


@dataclass(frozen=True)
class RunOutcome:
    """The result of a local run."""

    exit_code: int
    summary: TerminationSummary | None
    """The server's termination summary, if it wrote one that reads as one (otherwise a note says what was wrong)."""
    pods: Mapping[str, PodResult]
    notes: tuple[str, ...]  # things a person should know that did not change the outcome
    run_dir: Path
    interrupted: bool
    metrics_urls: Mapping[str, str] = field(default_factory=dict)
    """Prometheus endpoints of the run: ``server`` and each client site (see :meth:`LocalJobRun.metrics_urls`)."""
    client_sites: Mapping[str, str] = field(default_factory=dict)
    """Pod name -> site name of every client pod."""


# Overrides the manifests' bulk settings in every container: the server's port off, sidecars on gRPC only.
_NO_BULK = {envvars.BULK_PORT: "0", envvars.SERVER_BULK_ADDRESS: ""}


class LocalJobRun:
    """One FLJob's pods running locally. ``start()``, then ``wait()``; ``interrupt()`` from any thread."""

    def __init__(self, manifests: Sequence[Mapping[str, Any]], options: RunOptions, *, job_name: str) -> None:
        self.job_name = job_name
        self.options = options
        self.resolver = LocalResolver()
        self._manifests = list(manifests)
        self._interrupt = threading.Event()
        self._pods: dict[str, PodRun] = {}
        self._lock = RunDirLock(options.run_dir)
        pods = [m for m in self._manifests if m.get("kind") == "Pod"]
        servers = [p for p in pods if _labels(p).get(ROLE_LABEL) == "server"]
        if len(servers) != 1:
            raise ConfigError(
                f"job {job_name}: expected exactly one server pod in the rendered job, got {len(servers)}"
            )
        self._server = servers[0]
        self._clients = sorted(
            (p for p in pods if p is not self._server), key=lambda p: str(p.get("metadata", {}).get("name"))
        )
        self._pod_options = PodOptions(
            run_dir=options.run_dir,
            resolver=self.resolver,
            objects=ManifestObjects(self._manifests),
            sink=options.sink,
            base_dir=options.base_dir,
            extra_env={
                SIDECAR_EXIT_ON_STOP: "1", envvars.BIND_ADDRESS: options.bind, **({} if options.bulk else _NO_BULK),
                # The trained model is delivered to runs/<job>/model/ (spec.output's claim has no meaning here).
                envvars.OUTPUT_DIR: str(options.run_dir / MODEL_DIR),
            },
            stop_grace_s=options.stop_grace_s,
            prefix=_prefix,
            ports_reported=True,  # no port is reserved in advance: another socket could take it (issue 11)
        )

    @property
    def server_key(self) -> str:
        """``namespace/name`` of the server pod."""
        return pod_key_of(self._server)

    def status_url(self) -> str | None:
        """The server's HTTP status endpoint on this machine (None when the pod has no status port)."""
        return self._server_url(envvars.STATUS_PORT, "/status")

    def metrics_url(self) -> str | None:
        """The server's Prometheus endpoint on this machine (None when metrics are off)."""
        return self._server_url(envvars.METRICS_PORT, "/metrics")

    def metrics_urls(self, wait_s: float = 10.0) -> dict[str, str]:
        """Every process's Prometheus endpoint on this machine: ``server`` and each client's site name.

        The sidecar serves its site's metrics (the trainer's reported timings and
        ``log_metric()`` values included); trainers themselves are not scraped.
        A process that has not reported its port within ``wait_s`` (all together) is left out.
        """
        deadline = time.monotonic() + wait_s
        urls: dict[str, str] = {}
        server = self.metrics_url()
        if server is not None:
            urls["server"] = server
        for pod in self._clients:
            port = _env_of(pod, init=True).get(envvars.METRICS_PORT)
            if port and port.isdigit() and int(port) > 0:
                local = self.resolver.reported(pod_key_of(pod), int(port), max(0.0, deadline - time.monotonic()))
                if local is not None:
                    urls[_site_of(pod)] = f"http://{LOCAL_HOST}:{local}/metrics"
        return urls

    def _server_url(self, port_var: str, path: str) -> str | None:
        port = _env_of(self._server).get(port_var)
        if not port or not port.isdigit() or int(port) == 0:
            return None
        local = self.resolver.reported(self.server_key, int(port), self.options.server_ready_timeout_s)
        return None if local is None else f"http://{LOCAL_HOST}:{local}{path}"

    def start(self) -> None:
        """Start the server pod, wait (bounded) until it accepts connections, then the client pods.

        Raises ``RunDirInUse`` (a ``ConfigError``) before anything starts when another run holds the run dir.
        """
        self._lock.acquire()  # held until stop_all(): nothing else may write this run dir meanwhile
        # The pods' Secrets (tokens, TLS keys) become files below it: no other user may even look inside.
        os.chmod(self.options.run_dir, 0o700)
        for service in (m for m in self._manifests if m.get("kind") == "Service"):
            selector = service.get("spec", {}).get("selector") or {}
            for pod in (m for m in self._manifests if m.get("kind") == "Pod"):
                if selector and all(_labels(pod).get(k) == v for k, v in selector.items()):
                    self.resolver.add_service(service, pod)
        logger.info("job %s: starting the server pod; run dir %s", self.job_name, self.options.run_dir)
        server = run_pod(self._server, self._pod_options)
        self._pods[server.name] = server
        self._wait_server_listening(server)
        for pod in self._clients:
            if self._interrupt.is_set() or server.wait(0) is not None:
                break  # a server that already exited (e.g. a configuration error) has no use for clients
            run = run_pod(pod, self._pod_options)
            self._pods[run.name] = run

    def interrupt(self) -> None:
        """Stop the run as soon as possible (Ctrl-C): every pod is stopped, nothing is left behind."""
        self._interrupt.set()

    def wait(self) -> RunOutcome:
        """Block until the server pod ended (or an interrupt), wind the clients down, and report."""
        server = self._pods[str(self._server["metadata"]["name"])]
        while server.wait(0.2) is None and not self._interrupt.is_set():
            pass
        interrupted = self._interrupt.is_set() and server.wait(0) is None
        if interrupted:
            logger.warning("job %s: interrupted; stopping every pod", self.job_name)
            for run in self._pods.values():
                run.stop()
        else:
            self._grace_for_clients()
        results = {name: self._final(run) for name, run in self._pods.items()}
        server_result = results[server.name]
        summary, problem = self._read_summary(server)
        exit_code = EXIT_INTERRUPTED if interrupted else _server_exit_code(server_result)
        notes = self._notes(results, server.name, exit_code, summary)
        if problem:
            logs = self.options.run_dir / "logs"
            notes.insert(
                0,
                f"the server's termination summary was ignored: {problem}; the outcome comes from the server's exit "
                f"code alone; what the server did is in {logs}/{server.name}.*.log",
            )
        return RunOutcome(
            exit_code=exit_code,
            summary=summary,
            pods=results,
            notes=tuple(notes),
            run_dir=self.options.run_dir,
            interrupted=interrupted,
            metrics_urls=self.metrics_urls(),
            client_sites={str(p["metadata"]["name"]): _site_of(p) for p in self._clients},
        )

    def stop_all(self) -> None:
        """Stop every pod and wait for each (bounded), then release the run dir; safe to call more than once."""
        for run in self._pods.values():
            run.stop()
        for run in self._pods.values():
            self._final(run)
        self._lock.release()

    def pids(self) -> list[int]:
        """pids of every container process started so far (for tests)."""
        return [pid for run in self._pods.values() for pid in run.pids()]

    # --- internals ----------------------------------------------------------------
    def _wait_server_listening(self, server: PodRun) -> None:
        port = _env_of(self._server).get(envvars.GRPC_PORT)
        if not port or not port.isdigit():
            return
        deadline = time.monotonic() + self.options.server_ready_timeout_s
        local: int | None = None
        while time.monotonic() < deadline and not self._interrupt.is_set():
            if server.wait(0) is not None:
                return  # it exited already (e.g. a configuration error): wait() reports it
            # The server reports its ports once it listens (fedkube.portfile); the connect confirms it.
            local = local or self.resolver.reported(self.server_key, int(port), 0.1)
            if local is not None:
                with contextlib.suppress(OSError), socket.create_connection((LOCAL_HOST, local), timeout=0.5):
                    return
            time.sleep(0.05)
        logger.warning(
            "job %s: the server is not listening on %s:%s after %.0f s; starting the clients anyway",
            self.job_name,
            LOCAL_HOST,
            local or "(port not reported)",
            self.options.server_ready_timeout_s,
        )

    def _grace_for_clients(self) -> None:
        deadline = time.monotonic() + self.options.client_grace_s
        for run in self._pods.values():
            while run.wait(0.1) is None and time.monotonic() < deadline and not self._interrupt.is_set():
                pass
        late = [name for name, run in self._pods.items() if run.wait(0) is None]
        if late:
            logger.warning(
                "job %s: pods %s still running %.0f s after the server exited; stopping them",
                self.job_name,
                late,
                self.options.client_grace_s,
            )
            for name in late:
                self._pods[name].stop()

    def _final(self, run: PodRun) -> PodResult:
        # Each pod's own teardown is bounded (grace + SIGKILL); this bound only
        # guards against a supervisor bug hanging the runtime forever.
        bound = self.options.stop_grace_s * 4 + 30.0
        result = run.wait(bound)
        if result is None:
            run.stop()
            result = run.wait(bound)
        if result is None:
            raise RuntimeError(f"pod {run.key} did not stop within {bound:.0f} s")
        return result

    def _read_summary(self, server: PodRun) -> tuple[TerminationSummary | None, str]:
        """The server's summary, or None and what was wrong with the file it wrote ("" when it wrote none)."""
        for path in sorted(server.dir.glob("*.termination-log")):
            try:
                summary = read_summary_file(path)
            except (OSError, SummaryError) as exc:
                # Another process wrote this file: whatever it holds, the run reports it and goes on.
                problem = f"{path}: {exc}"
                logger.warning("job %s: the server's termination summary is unusable: %s", self.job_name, problem)
                return None, problem
            if summary is not None:
                return summary, ""
        return None, ""

    def _notes(
        self, results: Mapping[str, PodResult], server_name: str, exit_code: int, summary: TerminationSummary | None
    ) -> list[str]:
        notes: list[str] = []
        judged = _client_states(summary)
        for name, result in results.items():
            if name == server_name:
                continue
            pod = next(p for p in self._clients if p["metadata"]["name"] == name)
            site = _labels(pod).get(SITE_LABEL, name)
            for c in result.containers:
                if c.exit_code is None:
                    notes.append(f"{site} {c.name}: never started{f' ({result.message})' if result.message else ''}")
                elif c.stopped_by_runtime:
                    notes.append(
                        f"{site} {c.name}: still running after the job ended; stopped by the runtime "
                        f"(exit {c.exit_code})"
                    )
                elif c.exit_code != 0:
                    notes.append(f"{site} {c.name}: exited with code {c.exit_code}{_when(judged.get(site), exit_code)}")
                if c.restarts:
                    notes.append(f"{site} {c.name}: restarted {c.restarts} time(s)")
        return notes


def read_summary_file(path: Path) -> TerminationSummary | None:
    """The termination summary in ``path``; None when the file is empty.

    The file comes from another process, so at most ``TERMINATION_LIMIT`` + 1
    bytes of it are read, and only from a regular file (a FIFO put there would
    block the runtime, a device could be endless). SummaryError says what is
    wrong with it (size, JSON, the field) in ``fedkube.status``'s words.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SummaryError("it is not a regular file; the server writes its summary as one")
        data = f.read(TERMINATION_LIMIT + 1)
    if len(data) > TERMINATION_LIMIT:
        size = max(info.st_size, len(data))
        raise SummaryError(
            f"it is {size} bytes, more than the {TERMINATION_LIMIT} a termination summary may have "
            "(Kubernetes keeps no more of a termination message)"
        )
    if not data.strip():
        return None
    return TerminationSummary.from_json(data)


def summary_document(summary: TerminationSummary) -> dict[str, Any]:
    """``summary`` as the JSON document the server writes (camelCase keys), for ``--json`` and the progress bar."""
    # A limit far above TERMINATION_LIMIT: a summary already read keeps every client it lists.
    doc: dict[str, Any] = json.loads(summary.to_json(limit=STATUS_LIMIT))
    return doc


def _client_states(summary: TerminationSummary | None) -> dict[str, tuple[ClientState, str]]:
    """site -> (state, reason) of each client the server's summary lists."""
    if summary is None:
        return {}
    return {c.name: (ClientState(c.state), c.reason) for c in summary.clients}


def _when(judged: tuple[ClientState, str] | None, exit_code: int) -> str:
    """What a client container's non-zero exit meant, as far as the server's summary tells."""
    if judged is not None and judged[0].unhealthy:
        state, reason = judged
        return f" during the job (the server marked the client {state.value}{f': {reason}' if reason else ''})"
    if exit_code == 0:
        # The server did not count this client failed (failed and lost clients are the last ones
        # its summary leaves out): the exit came after the client's part was done.
        return " after the job succeeded; teardown noise, not a job failure"
    return ""


def _server_exit_code(result: PodResult) -> int:
    codes = [c.exit_code for c in result.containers]
    if any(c is None for c in codes) and result.message:
        return 1
    main = result.containers[-1]
    if main.exit_code in (0, 1, 2):
        return int(main.exit_code)
    return 1  # killed by a signal or an unexpected code: the job did not succeed


def _site_of(pod: Mapping[str, Any]) -> str:
    return _labels(pod).get(SITE_LABEL) or str(pod.get("metadata", {}).get("name"))


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def _env_of(pod: Mapping[str, Any], *, init: bool = False) -> dict[str, str]:
    """Literal env values of the pod's containers (and of its init containers, the sidecar among them, if ``init``)."""
    env: dict[str, str] = {}
    spec = pod.get("spec", {})
    containers = [*(spec.get("initContainers", []) or [] if init else []), *(spec.get("containers", []) or [])]
    for container in containers:
        for entry in container.get("env", []) or []:
            if "value" in entry:
                env[str(entry["name"])] = str(entry["value"])
    return env


def _prefix(pod: Mapping[str, Any], container: str) -> str:
    labels = _labels(pod)
    short = container.removeprefix("fedkube-")
    if labels.get(ROLE_LABEL) == "server":
        return "server" if short in ("server", "") else f"server {short}"
    site = labels.get(SITE_LABEL) or str(pod.get("metadata", {}).get("name"))
    return f"{site} {short}"


def new_tokens(sites: Sequence[str]) -> dict[str, str]:
    """A fresh random token per site (what the operator generates into the token Secrets)."""
    return {site: secrets.token_urlsafe(32) for site in sites}


def new_tls(job: Any, now: datetime.datetime | None = None) -> JobTls | None:
    """A fresh job CA and certificates for one run of ``job`` (an ``FLJob``); None when its TLS is disabled.

    Made here even when the job names a cert-manager ``issuerRef``: a local run has no cert-manager. Validity:
    ``pki.job_validity`` of the job (``fedkube.operator.certificates.job_validity``). The server certificate
    also names ``localhost`` and 127.0.0.1, where its local clients reach it.
    """
    from fedkube.operator import certificates

    if not certificates.tls_enabled(job):
        return None
    start = now or datetime.datetime.now(datetime.timezone.utc)
    return JobTls.generate(
        job.namespace, job.name, [c.name for c in job.spec.clients], certificates.job_validity(job, start),
        extra_dns=[LOCAL_NAME], extra_ips=[LOCAL_HOST],
    )


def render_job(job: Any, tokens: Mapping[str, str], tls: JobTls | None = None) -> list[dict[str, Any]]:
    """The manifests the operator would create for ``job`` (an ``FLJob``), with these tokens and TLS material.

    ``tls`` None makes a fresh one (:func:`new_tls`) when the job uses TLS: a run is never plaintext by accident.
    """
    from fedkube.operator.builders import build_all

    return list(build_all(job, tokens=tokens, tls=tls if tls is not None else new_tls(job), owner=None))
