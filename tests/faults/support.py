"""Shared helpers of the fault-injection suite: run a real local FLJob, watch it, scrape its /metrics.

A fault test runs the job with fedkube's own local runtime
(:class:`fedkube.runtime.local.LocalJobRun`: the server, and a sidecar and a
trainer per site, as real processes talking gRPC on localhost) and looks at it
the way an operator would: the server's ``/status`` JSON, every process's
``/metrics`` (real HTTP, parsed with prometheus-client's text parser), the
log files, and at the end the runtime's outcome with the server's
termination summary.

Metrics live only as long as their process, so a test that must read a
counter keeps the job open with a *gate*: the healthy trainers
(``knob_trainer.py`` with ``FAULT_GATE``) hold their last result until
:meth:`LocalJob.open_gate`, the test waits (bounded) for what it expects on
the live endpoints, then opens the gate and lets the job end.

Typical use::

    doc = job_doc("f01", ("site-a", "site-b", "site-c"), rounds=2, min_clients=2,
                  site_env={"site-c": {"FAULT_RAISE_AT_ROUND": "1"}})
    with LocalJob(doc, tmp_path) as job:
        m = job.until_metrics(lambda m: m.value(FAILURES, reason="Exception") == 1, "the failure counted")
        status = job.status()             # the live /status JSON
        job.open_gate()
        outcome = job.result()            # exit code, termination summary, per-pod results, notes

The fault knobs of the trainer are listed in ``knob_trainer.py``; a test that
needs a misconfigured pod (a wrong token, a wrong server address) edits the
rendered manifests with ``LocalJob(..., mutate=...)`` (see :func:`pod_named`,
:func:`container_env`). The emulated-cluster variant (the real operator) is the
``operator_cluster`` fixture in ``conftest.py``.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fedkube import envvars
from fedkube.runtime.cli import execute
from fedkube.runtime.local import LocalJobRun, RunOptions, RunOutcome, new_tokens, render_job
from fedkube.runtime.process import OutputSink
from fedkube.runtime.resolver import LOCAL_HOST
from fedkube.spec import parse_job

T = TypeVar("T")

TRAINER = Path(__file__).with_name("knob_trainer.py")

# Metric names the fault tests read (fedkube/metrics/*.py).
FAILURES = "fedkube_server_client_failures_total"
REJECTED = "fedkube_server_rejected_connections_total"
CLIENTS = "fedkube_server_clients"
ROUNDS_DONE = "fedkube_server_rounds_completed_total"
OPERATOR_TIMEOUTS = "fedkube_operator_timeouts_total"

#: Short timeouts so lifecycle rules fire within seconds; a test overrides what it is about.
FAST_TIMEOUTS: dict[str, float] = {"roundSeconds": 60, "heartbeatSeconds": 15, "registrationSeconds": 30}
FAST_TRANSFER: dict[str, Any] = {"chunkTimeoutSeconds": 10, "idleTimeoutSeconds": 20}


def until(check: Callable[[], T | None], what: str, timeout: float, *, interval: float = 0.1,
          context: Callable[[], str] = lambda: "") -> T:
    """Poll ``check`` until it returns something truthy, and return it; AssertionError after ``timeout`` s.

    An exception from ``check`` counts as "not yet" (an endpoint that is not
    up yet) and is shown if the wait times out. ``context`` adds what a
    person needs to see on failure (logs, the last status).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            got = check()
            if got:
                return got
        except (OSError, AssertionError, ValueError, KeyError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_error!r}" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}\n{context()}")
        time.sleep(interval)


@dataclass(frozen=True)
class Metrics:
    """One parsed /metrics scrape: sample name -> samples."""

    samples: Mapping[str, Sequence[Sample]]

    def values(self, name: str, **labels: str) -> list[float]:
        """Values of every ``name`` series whose labels include ``labels``."""
        return [s.value for s in self.samples.get(name, ()) if labels.items() <= s.labels.items()]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one ``name`` series matching ``labels``; AssertionError if not exactly one."""
        got = self.values(name, **labels)
        assert len(got) == 1, f"expected one {name}{labels}, got {got}"
        return got[0]

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``label`` value -> sample value, over the ``name`` series matching ``labels``."""
        return {s.labels[label]: s.value for s in self.samples.get(name, ())
                if label in s.labels and labels.items() <= s.labels.items()}


def scrape(url: str, timeout: float = 5.0) -> Metrics:
    """GET a Prometheus endpoint over HTTP and parse the text exposition format."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        if resp.status != 200:
            raise AssertionError(f"GET {url}: HTTP {resp.status}")
        text = resp.read().decode()
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return Metrics(out)


def get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET a JSON document (the server's /status)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        doc = json.loads(resp.read().decode())
    if not isinstance(doc, dict):
        raise AssertionError(f"GET {url}: expected a JSON object, got {doc!r}")
    return doc


def clients_of(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Site -> client entry of a status document or termination summary (``clients`` is a list there)."""
    return {str(c["name"]): dict(c) for c in status.get("clients") or []}


def job_doc(
    name: str,
    sites: Sequence[str],
    *,
    rounds: int,
    min_clients: int,
    env: Mapping[str, str] | None = None,
    site_env: Mapping[str, Mapping[str, str]] | None = None,
    timeouts: Mapping[str, float] | None = None,
    transfer: Mapping[str, Any] | None = None,
    checkpoint: bool = False,
    trainer: Path = TRAINER,
) -> dict[str, Any]:
    """An FLJob manifest running ``trainer`` (default: the knob trainer) at every site.

    ``env`` goes to every trainer, ``site_env[site]`` to that site's trainer
    only (the fault knobs). The initial model comes from the first client
    (site order), as in the quickstart; ``checkpoint`` keeps each round's model
    on the job's claim so a test can check the aggregate exactly.
    """
    spec: dict[str, Any] = {
        "rounds": rounds,
        "minClients": min_clients,
        "clients": [
            {"name": s, **({"env": [{"name": k, "value": v} for k, v in site_env[s].items()]}
                           if site_env and s in site_env else {})}
            for s in sites
        ],
        "trainer": {
            "image": "example/trainer:1",
            "command": ["python", str(trainer)],
            "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        },
        "timeouts": {**FAST_TIMEOUTS, **(timeouts or {})},
    }
    spec["transfer"] = {**FAST_TRANSFER, **(transfer or {})}
    if checkpoint:
        spec["server"] = {"checkpoint": {"enabled": True}}
    return {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": name}, "spec": spec}


def pod_named(manifests: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    """The Pod manifest called ``name`` (KeyError naming the pods there otherwise)."""
    for m in manifests:
        if m.get("kind") == "Pod" and m["metadata"]["name"] == name:
            return m
    raise KeyError(f"no pod {name!r}; pods: {[m['metadata']['name'] for m in manifests if m.get('kind') == 'Pod']}")


def container_env(pod: Mapping[str, Any], container: str) -> list[dict[str, Any]]:
    """The env list of ``container`` (init containers included) in a pod manifest, to edit in place."""
    spec = pod["spec"]
    for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
        if c["name"] == container:
            env: list[dict[str, Any]] = c.setdefault("env", [])
            return env
    raise KeyError(f"pod {pod['metadata']['name']!r} has no container {container!r}")


class _RunEnded(Exception):
    """The local run is over while a test still waited for something of it."""


class _LinesSink:
    """Keeps every output line of the run (prefixed like the console) for assertions and failure reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lines: list[str] = []

    def emit(self, prefix: str, line: str) -> None:
        with self._lock:
            self.lines.append(f"[{prefix}] {line}")

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


@dataclass
class LocalJob:
    """One FLJob run by the local runtime on a background thread; use as a context manager.

    ``mutate`` edits the rendered manifests before anything starts (the fault
    of a test that needs a misconfigured pod: a wrong token, a wrong server
    address). Every trainer gets ``FAULT_GATE`` (see the module docstring).
    Leaving the ``with`` block opens the gate and stops whatever still runs.
    """

    doc: dict[str, Any]
    tmp_path: Path
    mutate: Callable[[list[dict[str, Any]]], None] | None = None
    client_grace_s: float = 5.0
    name: str = field(init=False)
    gate: Path = field(init=False)
    run: LocalJobRun = field(init=False)
    manifests: list[dict[str, Any]] = field(init=False)
    tokens: dict[str, str] = field(init=False)
    output: _LinesSink = field(init=False, default_factory=_LinesSink)
    _thread: threading.Thread | None = field(init=False, default=None)
    _outcome: RunOutcome | None = field(init=False, default=None)
    _error: BaseException | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.gate = self.tmp_path / "gate"
        spec = self.doc["spec"]
        spec["trainer"].setdefault("env", []).append({"name": "FAULT_GATE", "value": str(self.gate)})
        job = parse_job(self.doc)
        self.name = str(job.metadata.name)
        self.tokens = new_tokens([c.name for c in job.spec.clients])
        self.manifests = render_job(job, self.tokens)
        if self.mutate is not None:
            self.mutate(self.manifests)
        sink: OutputSink = self.output
        options = RunOptions(run_dir=self.tmp_path / "run", base_dir=self.tmp_path, sink=sink,
                             client_grace_s=self.client_grace_s, stop_grace_s=3.0)
        self.run = LocalJobRun(self.manifests, options, job_name=self.name)

    # --- running ---------------------------------------------------------------------
    def start(self) -> LocalJob:
        def target() -> None:
            try:
                self._outcome = execute(self.run)
            except BaseException as exc:  # surfaced by result()
                self._error = exc

        self._thread = threading.Thread(target=target, name=f"local-job-{self.name}", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> LocalJob:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.open_gate()
        if self._thread is not None and self._thread.is_alive():
            self.run.interrupt()
            self._thread.join(60)

    def open_gate(self) -> None:
        """Let the trainers holding their result at the gate send it."""
        self.gate.touch()

    def result(self, timeout: float = 60.0) -> RunOutcome:
        """The run's outcome once the server exited and the clients wound down (bounded)."""
        assert self._thread is not None, "start() the job first"
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"job {self.name} did not end within {timeout} s\n{self.context()}")
        if self._error is not None:
            raise AssertionError(f"job {self.name}: the runtime failed: {self._error!r}") from self._error
        assert self._outcome is not None
        return self._outcome

    # --- looking at it ---------------------------------------------------------------
    @property
    def status_url(self) -> str:
        url = self.run.status_url()
        assert url is not None, "the server pod has no status port"
        return url

    def server_address(self) -> str:
        """``host:port`` of the server's gRPC endpoint on this machine (for a hand-made hostile client)."""
        server = pod_named(self.manifests, f"{self.name}-server")
        port = next(int(e["value"]) for e in container_env(server, "server") if e["name"] == envvars.GRPC_PORT)
        return f"{LOCAL_HOST}:{self.run.resolver.local_port(self.run.server_key, port)}"

    def metrics_url(self, who: str = "server") -> str:
        """The /metrics URL of the server (``server``) or of a site's sidecar (its site name)."""
        return self.run.metrics_urls()[who]

    def status(self) -> dict[str, Any]:
        """The server's live /status document."""
        return get_json(self.status_url)

    def scrape(self, who: str = "server") -> Metrics:
        """A live scrape of the server's (or a site's sidecar's) /metrics."""
        return scrape(self.metrics_url(who))

    def until(self, check: Callable[[], T | None], what: str, timeout: float = 45.0) -> T:
        """:func:`until` with this job's output and last status shown on a timeout.

        Gives up at once when the run has ended (nothing it serves can change
        any more), saying how it ended.
        """

        def look() -> T | None:
            ended = self._thread is not None and not self._thread.is_alive()
            try:
                got = check()
            except Exception:
                if ended:
                    raise _RunEnded() from None
                raise
            if not got and ended:
                raise _RunEnded()
            return got

        try:
            return until(look, what, timeout, context=self.context)
        except _RunEnded:
            raise AssertionError(f"job {self.name} ended before {what}: {self._ended()}\n{self.context()}") from None

    def _ended(self) -> str:
        if self._error is not None:
            return f"the runtime failed: {self._error!r}"
        o = self._outcome
        return "no outcome" if o is None else f"exit code {o.exit_code}, summary {o.summary}, notes {o.notes}"

    def until_metrics(self, check: Callable[[Metrics], bool], what: str, who: str = "server",
                      timeout: float = 45.0) -> Metrics:
        """Scrape ``who`` until ``check`` holds for a scrape, and return that scrape."""

        def look() -> Metrics | None:
            m = self.scrape(who)
            return m if check(m) else None

        return self.until(look, what, timeout)

    def until_status(self, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 45.0
                     ) -> dict[str, Any]:
        """Read the server's /status until ``check`` holds for it, and return that document."""

        def look() -> dict[str, Any] | None:
            s = self.status()
            return s if check(s) else None

        return self.until(look, what, timeout)

    def sidecar_process(self, site: str) -> psutil.Process:
        """The running sidecar process of ``site`` (a child of this test; the only one holding a token file)."""

        def mine(p: psutil.Process) -> bool:
            try:
                env = p.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                return False
            return (env.get(envvars.JOB) == self.name and env.get(envvars.SITE) == site
                    and envvars.TOKEN_FILE in env and p.is_running() and p.status() != psutil.STATUS_ZOMBIE)

        found = [p for p in psutil.Process().children(recursive=True) if mine(p)]
        assert len(found) == 1, f"expected one running sidecar of {site}, found {found}"
        return found[0]

    def log(self, pod: str, container: str) -> str:
        """A process's log file (``pod`` is ``server`` or a site name), as the runtime wrote it so far."""
        name = f"{self.name}-server" if pod == "server" else f"{self.name}-client-{pod}"
        path = self.tmp_path / "run" / "logs" / f"{name}.{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def context(self) -> str:
        """What a person needs when a wait failed: the last status and the tail of every process's output."""
        status: Any
        try:
            status = self.status()
        except (OSError, ValueError) as exc:
            status = f"(no status: {exc!r})"
        tail = "\n".join(self.output.text().splitlines()[-60:])
        return f"last status: {status}\noutput (tail):\n{tail}"

    def checkpoint_dir(self) -> Path:
        """The directory of the job's checkpoint claim on this machine."""
        volumes = sorted((self.tmp_path / "run" / "volumes").glob("*checkpoint*"))
        assert len(volumes) == 1, f"expected one checkpoint volume, found {volumes}"
        return volumes[0]


def expected_fedavg(start: float, steps: Mapping[str, tuple[float, int]], rounds: int) -> float:
    """The value every element reaches after ``rounds`` FedAvg rounds of the knob trainer.

    ``steps`` maps each site whose result is aggregated to (FAULT_STEP,
    FAULT_EXAMPLES); every round adds the example-weighted mean of the steps.
    """
    total = sum(n for _, n in steps.values())
    mean = sum(step * n for step, n in steps.values()) / total
    return start + rounds * mean


__all__ = [
    "CLIENTS",
    "FAILURES",
    "FAST_TIMEOUTS",
    "FAST_TRANSFER",
    "OPERATOR_TIMEOUTS",
    "REJECTED",
    "ROUNDS_DONE",
    "TRAINER",
    "LocalJob",
    "Metrics",
    "clients_of",
    "container_env",
    "expected_fedavg",
    "get_json",
    "job_doc",
    "pod_named",
    "scrape",
    "until",
]
