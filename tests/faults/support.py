"""Shared helpers of the fault-injection suite: build an FLJob, run it for real, watch it, scrape its /metrics.

Every fault test runs a real job on this machine (the server, and a sidecar
and a trainer per site, as real processes talking gRPC on localhost) and looks
at it the way an operator would: the server's ``/status`` JSON, every
process's ``/metrics`` (real HTTP, parsed by prometheus-client's own text
parser: :class:`Metrics`), the log files and the end state. There are two ways
to run the job, sharing everything but the running:

* :class:`LocalJob`: the project's local runtime
  (:class:`fedkube.runtime.local.LocalJobRun`, what ``fedkube run`` does) on a
  background thread; the test reads the runtime's outcome at the end.
* :class:`PodJob`: the rendered pods started one by one with
  :func:`fedkube.runtime.pod.run_pod`, keeping a handle on each, so a test can
  SIGKILL the server and start it again, kill a sidecar (its pod restarts it as
  a kubelet would), or route a site's sidecar through a :class:`TcpProxy` that
  stalls or corrupts the bytes.

Both build the job from :func:`job_doc`. Metrics live only as long as their
process, so a test that must read a counter keeps the job open with the
*gate*, a directory every trainer gets as ``GATE_DIR``: a trainer holds its
result until the test creates a file there (:meth:`Job.open_gate`), the test
waits (bounded, :func:`until`) for what it expects on the live endpoints, then
opens the gate and lets the job end. Trainers are either ``knob_trainer.py``
(fault knobs, see its docstring) or a short script written with
:func:`trainer_script` on top of :data:`PRELUDE`.

Typical use::

    doc = job_doc("f01", ("site-a", "site-b", "site-c"), rounds=2, min_clients=2,
                  site_env={"site-c": {"FAULT_RAISE_AT_ROUND": "1"}})
    with LocalJob(doc, tmp_path) as job:
        m = job.until_metrics(lambda m: m.value(FAILURES, reason="Exception") == 1, "the failure counted")
        status = job.status()             # the live /status JSON
        job.open_gate()
        outcome = job.result()            # exit code, termination summary, per-pod results, notes

A test that needs a misconfigured pod (a wrong token, a wrong server address)
edits the rendered manifests with ``mutate=`` (see :func:`pod_named`,
:func:`container_env`). The emulated-cluster variant (the real operator) is the
``operator_cluster`` fixture in ``conftest.py``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import socket
import textwrap
import threading
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fedkube import envvars
from fedkube.operator.naming import SERVER_CONTAINER, SIDECAR_CONTAINER, client_tls_secret_name
from fedkube.runtime.cli import execute
from fedkube.runtime.local import (
    ROLE_LABEL,
    SITE_LABEL,
    LocalJobRun,
    RunOptions,
    RunOutcome,
    new_tokens,
    render_job,
    summary_document,
)
from fedkube.runtime.pod import SIDECAR_EXIT_ON_STOP, ManifestObjects, PodOptions, PodResult, PodRun, run_pod
from fedkube.runtime.process import ManagedProcess
from fedkube.runtime.resolver import LOCAL_HOST, LocalResolver, pod_key_of
from fedkube.security.pki import server_dns_names
from fedkube.server import checkpoint
from fedkube.spec import parse_job
from fedkube.status import Phase
from tests.support import delayline, waiting

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What :func:`until` treats as "not yet" rather than a failure of ``check``.
_NOT_YET: tuple[type[BaseException], ...] = (OSError, AssertionError, ValueError, KeyError)

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
#: ``job_doc(roomy=True)``: a two-minute round and the product's transfer and heartbeat defaults, for a test
#: whose injected fault (a stall, a restart) must be the only thing that can end a round.
ROOMY_TIMEOUTS: dict[str, float] = {"roundSeconds": 120, "heartbeatSeconds": 30, "registrationSeconds": 60}
ROOMY_TRANSFER: dict[str, Any] = {"chunkTimeoutSeconds": 30, "idleTimeoutSeconds": 120}

#: The head of every inline trainer script (:func:`trainer_script`): imports, ``site``, ``gate`` (the job's gate
#: directory) and ``hold(name)``, which waits (bounded) until the test creates ``gate / name``.
PRELUDE = '''\
import os
import time
from pathlib import Path

import numpy as np
import fedkube.trainer_sdk as fk

fk.init()
site = os.environ["FEDKUBE_SITE"]
gate = Path(os.environ["GATE_DIR"])


def hold(name, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (gate / name).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


'''

#: A trainer body on :data:`PRELUDE`: site-a adds 1 and site-b 2 to every tensor, weights 1:3, so one round
#: makes ``x + 1.75`` (exact for dyadic ``x``: every step of the server's running mean is exact in float32).
#: The sites named in ``HOLD`` (comma-separated) hold their result until the gate's ``go``.
ONE_AND_TWO = """\
k = {"site-a": 1.0, "site-b": 2.0}[site]
while fk.is_running():
    model = fk.receive()
    params = {n: v + np.float32(k) for n, v in model.params.items()}
    if site in os.environ.get("HOLD", "").split(","):
        hold("go")
    fk.send(fk.FLModel(params=params, num_examples=1 if site == "site-a" else 3))
"""


def until(check: Callable[[], T | None], what: str, timeout: float, *, interval: float = 0.1,
          context: Callable[[], str] = lambda: "") -> T:
    """:func:`tests.support.waiting.until`, where an endpoint that is not up yet counts as "not yet".

    An exception from ``check`` of the kinds in :data:`_NOT_YET` (an endpoint
    that is not up yet, a checkpoint not written yet) is retried and shown if
    the wait times out. ``context`` adds what a person needs to see on failure
    (logs, the last status).
    """
    return waiting.until(check, what, timeout, interval=interval, retry_on=_NOT_YET, context=context)


# --- metrics and status -------------------------------------------------------------------------


class Metrics:
    """One parsed /metrics scrape: sample name -> samples."""

    def __init__(self, samples: Mapping[str, Sequence[Sample]]) -> None:
        self.samples = samples

    def values(self, name: str, **labels: str) -> list[float]:
        """Values of every ``name`` series whose labels include ``labels``."""
        return [s.value for s in self.samples.get(name, ()) if labels.items() <= s.labels.items()]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one ``name`` series matching ``labels``; AssertionError if not exactly one."""
        got = self.values(name, **labels)
        assert len(got) == 1, f"expected one {name}{labels}, got {got}"
        return got[0]

    def total(self, name: str, **labels: str) -> float:
        """The sum over the ``name`` series matching ``labels`` (0 when there is none)."""
        return float(sum(self.values(name, **labels)))

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


# --- the job ------------------------------------------------------------------------------------


def trainer_script(directory: Path, body: str) -> Path:
    """Write :data:`PRELUDE` + ``body`` to ``directory/train.py`` and return its path (for ``job_doc(trainer=)``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.py"
    path.write_text(PRELUDE + textwrap.dedent(body))
    return path


def save_model(path: Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """Save an initial model as .npz (for ``job_doc(initial=)``) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **dict(tensors))  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    return path


def job_doc(
    name: str,
    sites: Sequence[str],
    *,
    rounds: int,
    min_clients: int | None = None,
    env: Mapping[str, str] | None = None,
    site_env: Mapping[str, Mapping[str, str]] | None = None,
    timeouts: Mapping[str, float] | None = None,
    transfer: Mapping[str, Any] | None = None,
    roomy: bool = False,
    checkpoint: bool = False,
    initial: Path | None = None,
    trainer: Path = TRAINER,
) -> dict[str, Any]:
    """An FLJob manifest running ``trainer`` (default: the knob trainer) at every site.

    ``min_clients`` defaults to every site. ``env`` goes to every trainer,
    ``site_env[site]`` to that site's trainer only (the fault knobs).
    ``timeouts`` and ``transfer`` override :data:`FAST_TIMEOUTS` and
    :data:`FAST_TRANSFER` (``roomy``: :data:`ROOMY_TIMEOUTS` and
    :data:`ROOMY_TRANSFER`). Without ``initial`` (an .npz, see
    :func:`save_model`) the initial model comes from the first client, as in
    the quickstart; ``checkpoint`` keeps each round's model on the job's claim
    so a test can check the aggregate exactly.
    """
    base_timeouts, base_transfer = (ROOMY_TIMEOUTS, ROOMY_TRANSFER) if roomy else (FAST_TIMEOUTS, FAST_TRANSFER)
    spec: dict[str, Any] = {
        "rounds": rounds,
        "minClients": min_clients if min_clients is not None else len(sites),
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
        "timeouts": {**base_timeouts, **(timeouts or {})},
        "transfer": {**base_transfer, **(transfer or {})},
    }
    if initial is not None:
        spec["model"] = {"source": "file", "path": str(initial)}
    if checkpoint:
        spec["server"] = {"checkpoint": {"enabled": True}}
    return {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": name}, "spec": spec}


def site_channel(manifests: Sequence[dict[str, Any]], job: str, site: str, address: str) -> grpc.Channel:
    """A gRPC channel to ``job``'s server holding ``site``'s certificate (from its rendered TLS Secret), as that
    site's sidecar holds it: an attacker who stole the key but not the token. Plaintext when the job has no TLS
    Secrets (``security.tls: disabled``)."""
    name = client_tls_secret_name(job, site)
    secret = next((m for m in manifests if m.get("kind") == "Secret" and m["metadata"]["name"] == name), None)
    if secret is None:
        return grpc.insecure_channel(address)
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    creds = grpc.ssl_channel_credentials(root_certificates=files["ca.crt"], private_key=files["tls.key"],
                                         certificate_chain=files["tls.crt"])
    server_name = server_dns_names(str(secret["metadata"]["namespace"]), job)[-1]
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", server_name)])


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


def _env_value(pod: Mapping[str, Any], var: str) -> str:
    """The literal value of ``var`` in any container of ``pod`` (init containers included)."""
    spec = pod["spec"]
    for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
        for entry in c.get("env") or []:
            if entry.get("name") == var and "value" in entry:
                return str(entry["value"])
    raise AssertionError(f"pod {pod['metadata']['name']} sets no {var}")


class _RunEnded(Exception):
    """The job is over while a test still waited for something of it."""


class _LinesSink:
    """Keeps every output line of the job (prefixed like the console) for assertions and failure reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lines: list[str] = []

    def emit(self, prefix: str, line: str) -> None:
        with self._lock:
            self.lines.append(f"[{prefix}] {line}")

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


class Job:
    """What both ways of running a job share: the rendered manifests, the gate, and looking at the live job.

    ``mutate`` edits the rendered manifests before anything starts (the fault
    of a test that needs a misconfigured pod). Every trainer gets the gate
    directory as ``GATE_DIR``. Files go under ``tmp_path``: ``run/`` (pod
    directories, logs, volumes) and ``gate/``.
    """

    def __init__(self, doc: Mapping[str, Any], tmp_path: Path,
                 mutate: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.tmp_path = tmp_path
        self.run_dir = tmp_path / "run"
        self.gate = tmp_path / "gate"
        self.gate.mkdir(parents=True, exist_ok=True)
        doc = copy.deepcopy(dict(doc))
        doc["spec"]["trainer"].setdefault("env", []).append({"name": "GATE_DIR", "value": str(self.gate)})
        job = parse_job(doc)
        self.name = str(job.metadata.name)
        self.tokens = new_tokens([c.name for c in job.spec.clients])
        self.manifests = render_job(job, self.tokens)
        if mutate is not None:
            mutate(self.manifests)
        self.output = _LinesSink()
        pods = [m for m in self.manifests if m.get("kind") == "Pod"]
        self.server_pod = next(p for p in pods if p["metadata"]["labels"].get(ROLE_LABEL) == "server")
        self.client_pods = {str(p["metadata"]["labels"][SITE_LABEL]): p for p in pods if p is not self.server_pod}

    @property
    def resolver(self) -> LocalResolver:
        """Where the pods' ports are on this machine."""
        raise NotImplementedError

    def open_gate(self, name: str = "go") -> None:
        """Let the trainers holding their result at the gate's ``name`` go on."""
        (self.gate / name).touch()

    # --- addresses ---
    def _local_port(self, pod: Mapping[str, Any], var: str) -> int:
        return self.resolver.local_port(pod_key_of(pod), int(_env_value(pod, var)))

    def server_address(self) -> str:
        """``host:port`` of the server's gRPC endpoint on this machine (for a hand-made client)."""
        return f"{LOCAL_HOST}:{self._local_port(self.server_pod, envvars.GRPC_PORT)}"

    @property
    def status_url(self) -> str:
        return f"http://{LOCAL_HOST}:{self._local_port(self.server_pod, envvars.STATUS_PORT)}/status"

    def metrics_url(self, who: str = "server") -> str:
        """The /metrics URL of the server (``server``) or of a site's sidecar (its site name)."""
        pod = self.server_pod if who == "server" else self.client_pods[who]
        return f"http://{LOCAL_HOST}:{self._local_port(pod, envvars.METRICS_PORT)}/metrics"

    # --- looking at it ---
    def status(self) -> dict[str, Any]:
        """The server's live /status document."""
        return get_json(self.status_url)

    def scrape(self, who: str = "server") -> Metrics:
        """A live scrape of the server's (or a site's sidecar's) /metrics."""
        return scrape(self.metrics_url(who))

    def log(self, pod: str, container: str) -> str:
        """A process's log file (``pod`` is ``server`` or a site name), as the runtime wrote it so far."""
        manifest = self.server_pod if pod == "server" else self.client_pods[pod]
        path = self.run_dir / "logs" / f"{manifest['metadata']['name']}.{container}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def checkpoint_dir(self) -> Path:
        """The directory of the job's checkpoint claim on this machine."""
        volumes = sorted((self.run_dir / "volumes").glob("*checkpoint*"))
        assert len(volumes) == 1, f"expected one checkpoint volume, found {volumes}"
        return volumes[0]

    def checkpoint(self) -> checkpoint.Checkpoint:
        """The newest checkpoint on the job's claim (AssertionError while there is none)."""
        found = checkpoint.load_latest(self.checkpoint_dir(), self.name)
        assert found is not None, f"no checkpoint of {self.name} under {self.checkpoint_dir()}"
        return found

    def context(self) -> str:
        """What a person needs when a wait failed: the last status and the tail of every process's output."""
        status: Any
        try:
            status = self.status()
        except (OSError, ValueError) as exc:
            status = f"(no status: {exc!r})"
        tail = "\n".join(self.output.text().splitlines()[-60:])
        return f"last status: {status}\noutput (tail):\n{tail}"

    def _over(self) -> str | None:
        """How the job ended, once nothing it serves can change any more; None while it may."""
        return None

    # --- waiting ---
    def until(self, check: Callable[[], T | None], what: str, timeout: float = 45.0) -> T:
        """:func:`until` with this job's output and last status shown on a timeout.

        Gives up at once when the job has ended (see ``_over``), saying how it ended.
        """

        def look() -> T | None:
            ended = self._over() is not None
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
            raise AssertionError(f"job {self.name} ended before {what}: {self._over()}\n{self.context()}") from None

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

    def until_failed(self, site: str, reason: str, count: int = 1) -> dict[str, Any]:
        """Wait until the server counts ``count`` failures of ``reason``; return ``site``'s live /status entry.

        Checks on the way that ``reason`` is the only failure counted, that
        exactly one client is Failed and none Lost, and that the Failed one is
        ``site``, with ``reason``.
        """
        # The failure counter and the clients gauge are two updates: a scrape between them sees the count but not
        # yet the Failed client, so both are waited for (more than one Failed client never satisfies it).
        m = self.until_metrics(lambda m: m.value(FAILURES, reason=reason) == count
                               and m.value(CLIENTS, state="Failed") == 1,
                               f"{count} {reason} failure(s) and one Failed client on the server's /metrics")
        assert {r: v for r, v in m.by(FAILURES, "reason").items() if v} == {reason: count}
        assert m.value(CLIENTS, state="Lost") == 0
        live = clients_of(self.status())[site]
        assert (live["state"], live["reason"]) == ("Failed", reason), live
        return live


class LocalJob(Job):
    """One FLJob run by the project's local runtime on a background thread; use as a context manager.

    Leaving the ``with`` block opens the gate and stops whatever still runs.
    """

    def __init__(self, doc: Mapping[str, Any], tmp_path: Path, *,
                 mutate: Callable[[list[dict[str, Any]]], None] | None = None, client_grace_s: float = 5.0) -> None:
        super().__init__(doc, tmp_path, mutate)
        options = RunOptions(run_dir=self.run_dir, base_dir=tmp_path, sink=self.output,
                             client_grace_s=client_grace_s, stop_grace_s=3.0)
        self.run = LocalJobRun(self.manifests, options, job_name=self.name)
        self._thread: threading.Thread | None = None
        self._outcome: RunOutcome | None = None
        self._error: BaseException | None = None

    @property
    def resolver(self) -> LocalResolver:
        return self.run.resolver

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

    def succeeded(self, rounds: int, timeout: float = 60.0) -> tuple[RunOutcome, dict[str, Any]]:
        """The outcome (bounded) of a run that must have succeeded after ``rounds`` rounds, and its summary."""
        outcome = self.result(timeout)
        assert outcome.exit_code == 0, outcome.notes
        summary = outcome.summary
        assert summary is not None and summary.phase == Phase.SUCCEEDED and summary.completed_rounds == rounds, (
            summary)
        return outcome, summary_document(summary)

    def _over(self) -> str | None:
        if self._thread is None or self._thread.is_alive():
            return None
        if self._error is not None:
            return f"the runtime failed: {self._error!r}"
        o = self._outcome
        return "no outcome" if o is None else f"exit code {o.exit_code}, summary {o.summary}, notes {o.notes}"

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


# Sidecar env vars whose address is routed through a TcpProxy for a proxied site.
PROXIED_ENV: tuple[str, ...] = (envvars.SERVER_ADDRESS, envvars.SERVER_BULK_ADDRESS)
# The one of them whose connection carries tensor bytes (faults 5 and 6 stall or corrupt it): the bulk
# data plane's plain-TCP connections (docs/protocol.md), next to the gRPC control connection.
TENSOR_ENV: str = envvars.SERVER_BULK_ADDRESS


class PodJob(Job):
    """An FLJob's pods as local processes started one by one, with a handle on each (see the module doc).

    Each pod runs as ``fedkube run`` would run it (the sidecar is restarted by
    the pod supervisor as a kubelet would); every sidecar address of a site in
    ``proxied_sites`` goes through its own :class:`TcpProxy` (see
    :data:`PROXIED_ENV`). ``with`` starts the server, then the clients, and
    stops everything at the end.
    """

    def __init__(self, doc: Mapping[str, Any], tmp_path: Path, *, proxied_sites: Iterable[str] = ()) -> None:
        super().__init__(doc, tmp_path)
        self._resolver = LocalResolver()
        self._objects = ManifestObjects(self.manifests)
        pods = [self.server_pod, *self.client_pods.values()]
        for service in (m for m in self.manifests if m.get("kind") == "Service"):
            selector = service.get("spec", {}).get("selector") or {}
            for pod in pods:
                if selector and all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items()):
                    self._resolver.add_service(service, pod)
        self.proxies = {site: self._proxies_for(site) for site in proxied_sites}
        self.server: PodRun | None = None
        self.servers: list[PodRun] = []
        self.clients: dict[str, PodRun] = {}

    @property
    def resolver(self) -> LocalResolver:
        return self._resolver

    def _options(self, extra: Mapping[str, str] | None = None) -> PodOptions:
        return PodOptions(
            run_dir=self.run_dir,
            resolver=self._resolver,
            objects=self._objects,
            sink=self.output,
            base_dir=self.tmp_path,
            extra_env={SIDECAR_EXIT_ON_STOP: "1", **(extra or {})},
            stop_grace_s=3.0,
            sidecar_grace_s=10.0,
        )

    def _proxies_for(self, site: str) -> dict[str, TcpProxy]:
        pod = self.client_pods[site]
        out: dict[str, TcpProxy] = {}
        for var in PROXIED_ENV:
            upstream = self._resolver.resolve(pod_key_of(pod), _env_value(pod, var))
            host, _, port = upstream.rpartition(":")
            out[var] = TcpProxy((host, int(port)), name=f"{site}:{var}").start()
        return out

    def proxy(self, site: str, var: str = TENSOR_ENV) -> TcpProxy:
        """The proxy carrying ``var`` of ``site``'s sidecar (by default the one tensor bytes travel on)."""
        return self.proxies[site][var]

    # --- lifecycle ---
    def start(self) -> PodJob:
        """Start the server, wait until it listens, then every client pod."""
        self.start_server()
        for site in self.client_pods:
            self.start_client(site)
        return self

    def start_server(self) -> PodRun:
        """Start (or start again, after it ended) the server pod; waits until its gRPC port accepts."""
        if self.server is not None and not self.server.finished():
            raise AssertionError("the previous server pod is still running")
        server = self.server = run_pod(self.server_pod, self._options())
        self.servers.append(server)
        host, _, port = self.server_address().rpartition(":")
        until(lambda: _accepts(host, int(port)) or server.finished(), "the server's gRPC port to accept connections",
              30, context=self.context)
        return server

    def start_client(self, site: str) -> PodRun:
        """Start ``site``'s pod (sidecar + trainer), through its proxies if it has any."""
        extra = {var: p.address for var, p in self.proxies.get(site, {}).items()}
        run = run_pod(self.client_pods[site], self._options(extra))
        self.clients[site] = run
        return run

    def close(self) -> None:
        """Stop every pod and proxy (bounded); safe to call twice."""
        for run in [*self.clients.values(), *self.servers]:
            run.stop(grace=1.0)
        for run in [*self.clients.values(), *self.servers]:
            if run.wait(30) is None:
                log.warning("job %s: pod %s did not stop within 30 s", self.name, run.name)
        for proxies in self.proxies.values():
            for p in proxies.values():
                p.close()

    def __enter__(self) -> PodJob:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- observations ---
    def wait_server(self, timeout: float) -> PodResult:
        """The server pod's result; fails the test if it has not ended within ``timeout`` seconds."""
        assert self.server is not None
        result = self.server.wait(timeout)
        assert result is not None, f"the server did not end within {timeout} s\n{self.context()}"
        return result

    def server_succeeded(self, timeout: float) -> dict[str, Any]:
        """Wait (bounded) for the server pod to end, check that it succeeded, and return its termination summary."""
        result = self.wait_server(timeout)
        assert result.phase == "Succeeded", self.log("server", "server")[-3000:]
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """The last server's termination summary (JSON)."""
        assert self.server is not None
        path = self.server.dir / f"{SERVER_CONTAINER}.termination-log"
        found = [path] if path.is_file() else sorted(self.server.dir.glob("*.termination-log"))
        assert found, f"no termination summary in {self.server.dir}"
        doc: dict[str, Any] = json.loads(found[0].read_text())
        return doc

    def process(self, site: str | None, container: str) -> ManagedProcess:
        """The live process of ``container`` in ``site``'s pod (``site`` None: the current server pod)."""
        run = self.server if site is None else self.clients[site]
        proc = None if run is None else run.container_process(container)
        assert proc is not None, f"{site or 'the server'}: {container} has not started"
        return proc

    def sidecar(self, site: str) -> ManagedProcess:
        """The live process of ``site``'s sidecar."""
        return self.process(site, SIDECAR_CONTAINER)


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


# --- the proxy ----------------------------------------------------------------------------------

UP = "up"  # client -> server
DOWN = "down"  # server -> client
RECORD_LIMIT = 256 << 20  # bytes a recording proxy keeps: a round of a small model fits many times
#: What the proxy edits in place: a piece it read (a delay line hands it a view of its ring).
B = TypeVar("B", bytearray, memoryview)


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
    * ``record()``: from now on keep every byte forwarded, per direction and connection
      (``recorded``), up to :data:`RECORD_LIMIT` bytes in all: what a wiretap sees.
    * ``delay_s``: a link with latency: each byte leaves ``delay_s`` after it arrived, in each direction
      (RTT = 2 * ``delay_s``), with at most ``in_flight_bytes`` on the way per direction over all
      connections (a path's bandwidth-delay capacity; the sender's TCP waits beyond it). None: forward at once.
    """

    def __init__(
        self, upstream: tuple[str, int], *, name: str = "proxy", delay_s: float | None = None,
        in_flight_bytes: int = 8 << 20,
    ) -> None:  # fmt: skip
        self.upstream = upstream
        self.name = name
        self.delay_s = delay_s
        self.in_flight_bytes = in_flight_bytes
        self._budgets = {d: delayline.Budget(in_flight_bytes) for d in (UP, DOWN)}  # shared by the connections
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
        self._recording = False
        self._recorded_total = 0
        self.recorded: dict[tuple[int, str], bytearray] = {}  # (connection key, direction) -> bytes, in order
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{name}", daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    @property
    def address(self) -> str:
        return f"{LOCAL_HOST}:{self.port}"

    def record(self) -> None:
        with self._lock:
            self._recording = True

    def recorded_bytes(self) -> int:
        with self._lock:
            return self._recorded_total

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
            pump = self._pump if self.delay_s is None else self._delayed_pump
            for src, dst, direction in ((client, server, UP), (server, client, DOWN)):
                threading.Thread(target=pump, args=(src, dst, direction), daemon=True,
                                 name=f"proxy-{self.name}-{direction}").start()

    def _delayed_pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        """Forward with ``delay_s`` latency through a delay line holding at most ``in_flight_bytes``."""
        assert self.delay_s is not None
        key = id(src)
        try:
            delayline.forward_delayed(
                src, dst, delay_s=self.delay_s, budget=self._budgets[direction], flowing=self._flowing,
                closed=self._closed, edit=lambda piece: self._edit(key, direction, piece),
                name=f"proxy-{self.name}-{direction}",
            )  # fmt: skip
        finally:
            self._tail.pop(key, None)

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

    def _edit(self, key: int, direction: str, data: B) -> B:
        with self._lock:
            start = self.bytes[direction]
            end = start + len(data)
            self.bytes[direction] = end
            if self._recording and self._recorded_total + len(data) <= RECORD_LIMIT:
                self.recorded.setdefault((key, direction), bytearray()).extend(data)
                self._recorded_total += len(data)
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


#: The healthy sites of the knob-trainer tests: site -> (FAULT_STEP, FAULT_EXAMPLES).
HEALTHY: dict[str, tuple[float, int]] = {"site-a": (1, 10), "site-b": (3, 30)}


def knob_steps(steps: Mapping[str, tuple[float, int]] = HEALTHY) -> dict[str, dict[str, str]]:
    """``job_doc(site_env=)`` entries giving each site its FAULT_STEP and FAULT_EXAMPLES."""
    return {site: {"FAULT_STEP": f"{step:g}", "FAULT_EXAMPLES": str(n)} for site, (step, n) in steps.items()}


def assert_knob_aggregate(ck: checkpoint.Checkpoint, rounds: int,
                          steps: Mapping[str, tuple[float, int]] = HEALTHY) -> None:
    """``ck`` is round ``rounds``' model, its float32 ``w`` and ``b`` exactly the FedAvg of ``steps`` alone."""
    assert ck.round == rounds
    assert sorted(ck.model) == ["b", "w"]
    want = expected_fedavg(0.0, steps, rounds)
    for name in ("w", "b"):
        assert ck.model[name].dtype == np.float32
        np.testing.assert_array_equal(ck.model[name], np.full_like(ck.model[name], want))


def expected_fedavg(start: float, steps: Mapping[str, tuple[float, int]], rounds: int) -> float:
    """The value every element reaches after ``rounds`` FedAvg rounds of the knob trainer.

    ``steps`` maps each site whose result is aggregated to (FAULT_STEP,
    FAULT_EXAMPLES); every round adds the example-weighted mean of the steps.
    """
    total = sum(n for _, n in steps.values())
    mean = sum(step * n for step, n in steps.values()) / total
    return start + rounds * mean
