"""Soak benchmark (issue 4): a long real local job with random, survivable faults injected.

The job: FedAvg, 3 clients (``site-0..2``), ``minClients`` 2, ``--rounds``
rounds, a model of ``--size-mib`` MiB of float32 tensors whose values are
multiples of 1/1024. Each trainer (bench/soak_trainer.py) adds 0.5·(i+1) at
``site-i`` and every site reports the same ``num_examples``, so every value
stays exact in float32 and the final model is checked exactly against the
participants the server logged for each round ("aggregated the results of").

The harness is a tiny kubelet of its own (``fedkube.runtime.pod.run_pod`` on
the operator's rendered manifests, like ``fedkube run``), so it can kill and
restart processes as Kubernetes would. After each completed round, with
probability ``--fault-rate`` (seeded RNG, ``--seed``), and only when the last
fault has been recovered from, it injects one fault during the next round:

* ``sidecar_kill``: SIGKILL a random site's sidecar; the pod's supervisor
  restarts it (a native sidecar, ``restartPolicy: Always``);
* ``server_kill``: SIGKILL the server; the harness starts the server pod again
  (same checkpoint claim, same tokens), which resumes from its checkpoint;
* ``proxy_stall``: the TCP proxy between ``site-2``'s sidecar and the server
  forwards nothing for ``--stall-s`` seconds;
* ``proxy_flip``: the proxy flips one byte of tensor data (either direction);
* ``straggler``: a random site's trainer sleeps past the round deadline once.

Kinds come in a seeded shuffled cycle (every kind once before any repeats);
each decision has its own generator derived from the seed, so a run is
reproducible up to timing. A fault needs a whole round after the one it hits.

A fault counts as *survived* when its component is back in the job: the site
delivered a result in a later round (sidecar, proxy, straggler), or the
restarted server completed a round and every site delivered again after it. A
fault still open when the job ends is not survived. RSS of every component
(server, each sidecar, each trainer) is sampled at every round end the harness
sees; ``drift`` is (last - at round 5) / at round 5 (goal < 5 %, judged on the
processes that lived from round 5 to the end: a restart starts a fresh heap).
Because one sample can catch a round's buffers in flight, the line also gives
``drift_median5`` and ``drift_min5`` (medians / minima of five round ends at
each side) and ``steady_drift`` for the final process of a restarted one.

One JSON line. Usage::

    python bench/soak.py --rounds 50 --seed 1
    python bench/soak.py --rounds 3 --fault-rate 1 --seed 1 --size-mib 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, mib
from soak_proxy import DOWN, UP, FaultProxy

from fedkube import envvars
from fedkube.runtime.local import new_tokens, render_job
from fedkube.runtime.pod import SIDECAR_EXIT_ON_STOP, ManifestObjects, PodOptions, PodRun, run_pod
from fedkube.runtime.process import NullSink
from fedkube.runtime.resolver import LOCAL_HOST, LocalResolver, pod_key_of

TRAINER_SCRIPT = Path(__file__).resolve().with_name("soak_trainer.py")
CONTROL_ENV = "FEDKUBE_SOAK_CONTROL"  # read by soak_trainer.py
JOB = "soak"
CLIENTS = 3
MIN_CLIENTS = 2
PROXIED_SITE = f"site-{CLIENTS - 1}"
ROW = 1024
TENSOR_MIB = 1
KINDS = ("sidecar_kill", "server_kill", "proxy_stall", "proxy_flip", "straggler")
DRIFT_ROUND = 5
DRIFT_GOAL = 0.05
_AGGREGATED = re.compile(r"round (\d+): aggregated the results of (\S+);")
_RESUMED = re.compile(r"resuming after the checkpoint of round (\d+)")

log = logging.getLogger("soak")


# --- the model and its check ----------------------------------------------------------------


def tensor_sizes(size_mib: int) -> list[int]:
    total = size_mib * (1 << 20) // 4
    per = TENSOR_MIB * (1 << 20) // 4
    sizes = [per] * (total // per)
    if total % per:
        sizes.append(total % per)
    return sizes


def tensor_name(index: int) -> str:
    return f"layer{index:03d}.weight"


def initial_tensor(seed: int, index: int, elements: int) -> np.ndarray:
    """Multiples of 1/1024 in [0, 1): exact in float32 through every round's additions and means."""
    rng = np.random.default_rng([seed, index])
    return (rng.integers(0, 1024, elements).astype(np.float32) / np.float32(1024)).reshape(-1, ROW)


def write_model(path: Path, seed: int, sizes: list[int]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, n in enumerate(sizes):
            with zf.open(tensor_name(i) + ".npy", "w") as f:
                np.lib.format.write_array(f, initial_tensor(seed, i, n), allow_pickle=False)


def site_offset(site: str) -> float:
    return 0.5 * (int(site.rsplit("-", 1)[-1]) + 1)


def participants_by_round(server_log: Path) -> dict[int, list[str]]:
    """Who the server aggregated in each round; a round redone after a restart keeps its last line."""
    out: dict[int, list[str]] = {}
    for line in server_log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _AGGREGATED.search(line)
        if m:
            out[int(m.group(1))] = m.group(2).split(",")
    return out


def verify(run_dir: Path, seed: int, sizes: list[int], rounds: int, parts: Mapping[int, list[str]]) -> dict[str, Any]:
    """The server's last checkpoint against initial + Σ_rounds mean(offsets of that round's participants)."""
    from fedkube.server import checkpoint

    manifests = sorted(run_dir.glob(f"volumes/*/{JOB}/round-*/manifest.json"))  # the checkpoint claim
    if not manifests:
        return {"ok": False, "problem": f"no checkpoint under {run_dir}"}
    ck = checkpoint.load(manifests[-1].parent)
    if ck.round != rounds:
        return {"ok": False, "problem": f"last checkpoint is of round {ck.round}, expected {rounds}"}
    missing = [r for r in range(1, rounds + 1) if r not in parts]
    if missing:
        return {"ok": False, "problem": f"no 'aggregated' log line for rounds {missing}"}
    shift = np.float32(0)
    for r in range(1, rounds + 1):
        shift = np.float32(shift + np.float32(np.mean([site_offset(s) for s in parts[r]])))
    worst = 0.0
    for i, n in enumerate(sizes):
        got = ck.model.get(tensor_name(i))
        if got is None:
            return {"ok": False, "problem": f"{tensor_name(i)} missing from the checkpoint"}
        want = initial_tensor(seed, i, n) + shift
        if got.dtype != np.float32 or got.shape != want.shape:
            return {"ok": False, "problem": f"{tensor_name(i)}: {got.dtype}{got.shape}, expected float32{want.shape}"}
        worst = max(worst, float(np.max(np.abs(got - want))))
    return {"ok": worst == 0.0, "max_abs_err": worst, "round": ck.round, "shift": float(shift)}


# --- the job's processes ----------------------------------------------------------------------


class ProxyResolver(LocalResolver):
    """The runtime's resolver, except that one pod reaches the server through the fault proxies."""

    def __init__(self) -> None:
        super().__init__()
        self.proxied_pod = ""
        # The server's gRPC and bulk addresses on this machine -> their proxies' (only the proxied pod's).
        self.proxied: dict[str, str] = {}

    def resolve(self, pod_key: str, address: str) -> str:
        real = super().resolve(pod_key, address)
        if pod_key == self.proxied_pod:
            return self.proxied.get(real, real)
        return real


def job_manifest(model_path: Path, rounds: int, round_s: float, control: Path) -> dict[str, Any]:
    return {
        "apiVersion": "fedkube.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": JOB},
        "spec": {
            "rounds": rounds,
            "minClients": MIN_CLIENTS,
            "strategy": {"name": "fedavg"},
            "model": {"source": "file", "path": str(model_path)},
            "server": {"checkpoint": {"enabled": True}},
            "clients": [{"name": f"site-{i}"} for i in range(CLIENTS)],
            "trainer": {
                "image": "local",
                "command": [sys.executable, str(TRAINER_SCRIPT)],
                "env": [{"name": CONTROL_ENV, "value": str(control)}],
            },
            # Short timeouts so that faults resolve in seconds; their relations pass the spec's checks.
            "transfer": {"chunkTimeoutSeconds": round_s / 5, "idleTimeoutSeconds": round_s / 4, "maxAttempts": 5},
            "timeouts": {"roundSeconds": round_s, "heartbeatSeconds": round_s / 2},
        },
    }


@dataclass
class Fault:
    kind: str
    round: int  # the round it was injected in
    target: str  # site, "server" or a direction
    at: float
    survived: bool = False
    note: str = ""


@dataclass
class Job:
    """The job's pods and the handles the harness needs to hurt them."""

    manifests: list[dict[str, Any]]
    options: PodOptions
    server_manifest: dict[str, Any]
    clients: dict[str, dict[str, Any]]  # site -> pod manifest
    server: PodRun | None = None
    pods: dict[str, PodRun] = field(default_factory=dict)
    status_url: str = ""
    grpc_port: int = 0
    bulk_port: int = 0  # 0: the job moves tensors over gRPC only

    def start_server(self, timeout_s: float = 30.0) -> None:
        self.server = run_pod(self.server_manifest, self.options)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server.wait(0) is not None:
                raise RuntimeError(f"the server pod ended at start: {self.server.wait(0)}")
            with contextlib.suppress(OSError), socket.create_connection((LOCAL_HOST, self.grpc_port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the server did not listen within {timeout_s:.0f} s")

    def pid(self, site: str | None, container: str) -> int | None:
        run = self.server if site is None else self.pods.get(site)
        proc = run.container_process(container) if run is not None else None
        if proc is None or proc.returncode is not None:
            return None
        return proc.pid

    def status(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(self.status_url, timeout=1.0) as r:
                doc = json.loads(r.read())
            if isinstance(doc, dict):
                return doc
        return {}


def build_job(run_dir: Path, manifest: dict[str, Any], resolver: ProxyResolver, transport: str = "bulk") -> Job:
    from fedkube.spec import parse_job

    job = parse_job(manifest)
    manifests = render_job(job, new_tokens([c.name for c in job.spec.clients]))
    pods = [m for m in manifests if m.get("kind") == "Pod"]
    server = next(p for p in pods if p["metadata"]["labels"].get("fedkube.dev/role") == "server")
    clients = {p["metadata"]["labels"]["fedkube.dev/site"]: p for p in pods if p is not server}
    if transport == "grpc":  # no bulk address: the sidecars, and so the trainers, move tensors over gRPC
        for pod in clients.values():
            for c in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
                c["env"] = [e for e in c.get("env", []) if e["name"] != envvars.SERVER_BULK_ADDRESS]
    for service in (m for m in manifests if m.get("kind") == "Service"):
        selector = service.get("spec", {}).get("selector") or {}
        for pod in pods:
            if selector and all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items()):
                resolver.add_service(service, pod)
    options = PodOptions(
        run_dir=run_dir,
        resolver=resolver,
        objects=ManifestObjects(manifests),
        sink=NullSink(),  # every container's output is in run_dir/logs
        extra_env={SIDECAR_EXIT_ON_STOP: "1"},
        stop_grace_s=5.0,
        sidecar_max_restarts=1000,  # a kubelet restarts a native sidecar without limit (with backoff)
    )
    out = Job(manifests, options, server, clients)
    key = pod_key_of(server)
    env = {e["name"]: e.get("value") for e in server["spec"]["containers"][0].get("env", [])}
    out.grpc_port = resolver.local_port(key, int(env[envvars.GRPC_PORT]))
    out.status_url = f"http://{LOCAL_HOST}:{resolver.local_port(key, int(env[envvars.STATUS_PORT]))}/status"
    if transport == "bulk" and int(env.get(envvars.BULK_PORT) or 0):
        out.bulk_port = resolver.local_port(key, int(env[envvars.BULK_PORT]))
    resolver.proxied_pod = pod_key_of(clients[PROXIED_SITE])
    return out


# --- the soak ---------------------------------------------------------------------------------


@dataclass
class Soak:
    args: argparse.Namespace
    job: Job
    proxy: FaultProxy
    control: Path
    server_log: Path
    faults: list[Fault] = field(default_factory=list)
    voided: list[dict[str, Any]] = field(default_factory=list)  # stragglers that could not show recovery, and why
    rss: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)  # slot -> [(round, pid, rss)]
    server_starts: int = 1
    completed: int = 0

    def slots(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {"server": self.job.pid(None, "server")}
        for site in sorted(self.job.clients):
            out[f"sidecar:{site}"] = self.job.pid(site, "sidecar")
            out[f"trainer:{site}"] = self.job.pid(site, "trainer")
        return out

    def sample_rss(self, round_: int) -> None:
        for slot, pid in self.slots().items():
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error, OSError):
                rss = int(psutil.Process(pid).memory_info().rss)
                if rss:  # 0: the process already exited (a zombie not reaped yet), e.g. a trainer after its last round
                    self.rss.setdefault(slot, []).append((round_, pid, rss))

    def open_fault(self) -> Fault | None:
        return next((f for f in self.faults if not f.survived), None)

    def check_recovery(self) -> None:
        parts = participants_by_round(self.server_log)
        for f in self.faults:
            if f.survived:
                continue
            if f.kind == "straggler":
                # The round the delay really hit: the trainer names it when it starts sleeping.
                hit = sorted(self.control.glob(f"straggled-{f.target}-r*"))
                taken = {g.round for g in self.faults if g.kind == "straggler" and g is not f and g.target == f.target}
                rounds = [int(h.name.rsplit("-r", 1)[1]) for h in hit]
                fresh = [r for r in rounds if r >= f.round and r not in taken]
                if fresh:
                    f.round = min(fresh)
                else:
                    continue  # not picked up yet
            if f.kind == "server_kill":
                # The restarted server finished a round, and every site took part again after the kill.
                after = [who for r, who in parts.items() if r > f.round]
                f.survived = bool(after) and all(any(site in who for who in after) for site in self.job.clients)
            else:
                site = PROXIED_SITE if f.kind.startswith("proxy") else f.target
                later = [r for r, who in parts.items() if r > f.round and site in who]
                f.survived = bool(later)
                if f.kind == "proxy_flip" and f.survived and not self.proxy.flipped:
                    f.note = "no large DATA frame passed; nothing flipped"

    def void_unshowable(self) -> None:
        """At the job's end, set aside stragglers that could not show recovery, saying why.

        A straggle order is written during one round and taken at the start of
        the trainer's next one. Rounds of a small model go by in tens of
        milliseconds, so the order can arrive after the trainer's last check
        (it never hit) or land in the last round (nothing after it to show
        recovery). Neither says anything about fedkube; both are reported.
        """
        for f in list(self.faults):
            if f.kind != "straggler" or f.survived:
                continue
            hit = [int(h.name.rsplit("-r", 1)[1]) for h in self.control.glob(f"straggled-{f.target}-r*")]
            fired = [r for r in hit if r >= f.round]
            if not fired:
                why = "the order came after the trainer's last round started; it never straggled"
            elif min(fired) >= self.args.rounds:
                why = f"it straggled in round {min(fired)}, the last: no later round to show recovery"
            else:
                continue
            self.faults.remove(f)
            self.voided.append({"kind": f.kind, "round": f.round, "target": f.target, "why": why})
            log.info("straggler order for %s (round %s) not counted: %s", f.target, f.round, why)

    def draw(self, round_: int, purpose: str) -> random.Random:
        """A generator per decision, from the seed: one shared stream showed strong correlations between
        consecutive draws made in a fixed pattern (seed 4 chose the same kind and direction every time)."""
        return random.Random(f"{self.args.seed}:{round_}:{purpose}")

    def inject(self, kind: str, round_: int) -> Fault | None:
        """Hurt the job now; None when the job already reached its last round (nothing left to show recovery)."""
        time.sleep(self.draw(round_, 'when').uniform(0.0, self.args.inject_window_s))  # somewhere inside the round
        now = time.monotonic()
        current = self.job.status().get("round")
        if isinstance(current, int) and current > round_:
            round_ = current  # small rounds go by faster than the window
        if round_ >= self.args.rounds:
            return None
        if kind == "sidecar_kill":
            site = self.draw(round_, 'site').choice(sorted(self.job.clients))
            pid = self.job.pid(site, "sidecar")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            return Fault(kind, round_, site, now, note="" if pid else "sidecar was not running")
        if kind == "server_kill":
            pid = self.job.pid(None, "server")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            assert self.job.server is not None
            if self.job.server.wait(30) is None:
                raise RuntimeError("the server pod did not end within 30 s of SIGKILL")
            self.job.start_server()  # a new pod, the same claim: it resumes from its checkpoint
            self.server_starts += 1
            return Fault(kind, round_, "server", now)
        if kind == "proxy_stall":
            seconds = round(self.draw(round_, 'stall').uniform(1.0, self.args.stall_s), 1)
            self.proxy.stall(seconds)
            return Fault(kind, round_, PROXIED_SITE, now, note=f"{seconds:g} s")
        if kind == "proxy_flip":
            direction = self.draw(round_, 'direction').choice((UP, DOWN))
            self.proxy.flip(direction)
            return Fault(kind, round_, direction, now)
        site = self.draw(round_, 'site').choice(sorted(self.job.clients))
        (self.control / f"straggle-{site}").write_text(f"{self.args.round_seconds + 1.0}\n")
        return Fault(kind, round_, site, now)

    def run(self) -> int | None:
        deadline = time.monotonic() + self.args.timeout
        last_seen = -1  # the first status (0 rounds completed) may bring a fault into round 1
        while time.monotonic() < deadline:
            server = self.job.server
            assert server is not None
            ended = server.wait(0)
            doc = self.job.status()
            done = doc.get("completedRounds")
            if isinstance(done, int) and done > last_seen:
                last_seen = self.completed = max(self.completed, done)
                if done > 0:
                    self.sample_rss(done)
                self.check_recovery()
                # A fault needs a whole round after the one it hits, to show its component came back.
                room = done + 2 <= self.args.rounds
                if room and self.open_fault() is None and self.draw(done, 'fault').random() < self.args.fault_rate:
                    # Kinds come in a seeded shuffled cycle, so even a short run sees different ones.
                    order = self.draw(0, "order").sample(self.args.kinds, len(self.args.kinds))
                    kind = order[len(self.faults) % len(order)]
                    fault = self.inject(kind, done + 1)
                    if fault is not None:
                        self.faults.append(fault)
                        log.info("round %s: injected %s", fault.round, fault)
            if ended is not None:
                main = ended.containers[-1].exit_code
                self.check_recovery()
                self.void_unshowable()
                return main
            time.sleep(0.05)
        return None


def drift(samples: list[tuple[int, int, int]]) -> dict[str, Any]:
    at5 = next((s for s in samples if s[0] >= DRIFT_ROUND), None)
    last = samples[-1] if samples else None
    out: dict[str, Any] = {
        "rss_mib_at_round_5": None,
        "rss_mib_last": None,
        "drift": None,
        "drift_median5": None,
        "drift_min5": None,
        "restarted": False,
        "steady_drift": None,
    }
    if at5 is None or last is None:
        return out
    out["rss_mib_at_round_5"] = mib(at5[2])
    out["rss_mib_last"] = mib(last[2])
    out["drift"] = round((last[2] - at5[2]) / at5[2], 4)
    out["restarted"] = len({pid for r, pid, _ in samples if r >= at5[0]}) > 1
    # Medians of 5 round ends at each side: one sample can catch a round's model buffers in flight.
    head = [s[2] for s in samples if s[0] >= at5[0]][:5]
    tail = [s[2] for s in samples if s[0] >= at5[0]][-5:]
    if not out["restarted"] and len(samples) >= 2 * 5:
        mid = float(np.median(head))
        out["drift_median5"] = round((float(np.median(tail)) - mid) / mid, 4)
        # The floor: the RSS a process returns to between rounds; a leak lifts it, buffers in flight do not.
        out["drift_min5"] = round((min(tail) - min(head)) / min(head), 4)
    # The final process alone, from its 5th round end on (None when it lived through fewer than 10).
    own = [s for s in samples if s[1] == last[1]]
    if len(own) >= 2 * DRIFT_ROUND:
        first = own[DRIFT_ROUND - 1]
        out["steady_drift"] = round((last[2] - first[2]) / first[2], 4)
    else:
        out["steady_drift"] = None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size-mib", type=int, default=4, help="model size in MiB (1 MiB float32 tensors)")
    p.add_argument("--fault-rate", type=float, default=0.3, help="probability of a fault after each round, 0..1")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated fault kinds (default: all of {KINDS})")
    p.add_argument("--round-seconds", type=float, default=20.0, help="the job's round deadline (stragglers exceed it)")
    p.add_argument("--stall-s", type=float, default=6.0, help="a proxy stall lasts 1..this many s")
    p.add_argument("--inject-window-s", type=float, default=0.3, help="faults land 0..this many s into a round")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the soak gives up")
    p.add_argument("--keep-dir", default=None, help="keep the run directory here (default: a temp dir)")
    p.add_argument("--transport", choices=("bulk", "grpc"), default="bulk",
                   help="how tensors travel between sidecar and server (grpc: no bulk address, the fallback)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.size_mib < 1:
        p.error("--size-mib must be at least 1")
    if not 0.0 <= args.fault_rate <= 1.0:
        p.error("--fault-rate must be between 0 and 1")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        p.error(f"--kinds {args.kinds!r}: unknown {unknown}; choose from {', '.join(KINDS)}")
    args.kinds = kinds
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with contextlib.ExitStack() as stack:
        if args.keep_dir:
            work = Path(args.keep_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedkube-soak-")))
        result = soak(args, work)
    emit(result)
    return 0 if result["pass"] else 1


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = tensor_sizes(args.size_mib)
    model_path = work / "initial.npz"
    write_model(model_path, args.seed, sizes)
    control = work / "control"
    control.mkdir(exist_ok=True)
    run_dir = work / "run"
    resolver = ProxyResolver()
    manifest = job_manifest(model_path, args.rounds, args.round_seconds, control)
    job = build_job(run_dir, manifest, resolver, args.transport)
    # Tensor bytes travel on the bulk connection when the job has one: faults go where the bytes are.
    proxy = FaultProxy((LOCAL_HOST, job.bulk_port or job.grpc_port), bulk=bool(job.bulk_port)).start()
    control_proxy = FaultProxy((LOCAL_HOST, job.grpc_port)).start() if job.bulk_port else proxy
    resolver.proxied[f"{LOCAL_HOST}:{job.grpc_port}"] = control_proxy.address
    if job.bulk_port:
        resolver.proxied[f"{LOCAL_HOST}:{job.bulk_port}"] = proxy.address
    server_log = run_dir / "logs" / f"{job.server_manifest['metadata']['name']}.server.log"
    s = Soak(args, job, proxy, control, server_log)
    start = time.perf_counter()
    code: int | None = None
    try:
        job.start_server()
        for site, pod in sorted(job.clients.items()):
            job.pods[site] = run_pod(pod, job.options)
        code = s.run()
    finally:
        if code is None and job.server is not None:
            job.server.stop()
        for run in job.pods.values():
            if run.wait(30) is None:
                run.stop()
        for run in [*job.pods.values(), *([job.server] if job.server else [])]:
            run.wait(60)
        proxy.close()
        control_proxy.close()
    wall = time.perf_counter() - start
    parts = participants_by_round(server_log) if server_log.exists() else {}
    check: dict[str, Any] = {"ok": False, "problem": "job failed"}
    if code == 0:
        check = verify(run_dir, args.seed, sizes, args.rounds, parts)
    by_kind: dict[str, dict[str, int]] = {}
    for f in s.faults:
        k = by_kind.setdefault(f.kind, {"injected": 0, "survived": 0})
        k["injected"] += 1
        k["survived"] += int(f.survived)
    drifts = {slot: drift(samples) for slot, samples in sorted(s.rss.items())}
    # Judged on processes that lived from round 5 to the end; a restarted one starts again from a fresh heap.
    judged = [d["drift"] for d in drifts.values() if d["drift"] is not None and not d["restarted"]]
    worst = max(judged, default=None)
    worst_median5 = max((d["drift_median5"] for d in drifts.values() if d["drift_median5"] is not None), default=None)
    worst_min5 = max((d["drift_min5"] for d in drifts.values() if d["drift_min5"] is not None), default=None)
    summary = _summary(run_dir)
    ok = code == 0 and bool(check.get("ok")) and all(f.survived for f in s.faults)
    return {
        "bench": "soak",
        "transport": args.transport,
        "rounds": args.rounds,
        "seed": args.seed,
        "size_mib": args.size_mib,
        "fault_rate": args.fault_rate,
        "clients": CLIENTS,
        "min_clients": MIN_CLIENTS,
        "exit_code": code,
        "outcome_reason": summary.get("reason") or None,
        "outcome_message": summary.get("message") or None,
        # The server's own count: the last rounds of a fast job can end between two of the harness's looks.
        "rounds_completed": max(s.completed, int(summary.get("completedRounds") or 0)),
        "server_starts": s.server_starts,
        "faults": by_kind,
        "faults_injected": len(s.faults),
        "faults_survived": sum(f.survived for f in s.faults),
        "fault_log": [
            {"kind": f.kind, "round": f.round, "target": f.target, "survived": f.survived, "note": f.note}
            for f in s.faults
        ],
        "faults_voided": s.voided,
        "proxy": {"connections": proxy.connections, "flipped": proxy.flipped},
        "verified": check,
        "rss_drift_after_round_5": drifts,
        # slot -> [[round, MiB], ...] at every round end the harness saw (a restart shows as a drop)
        "rss_mib_by_round": {slot: [[r, mib(b)] for r, _, b in samples] for slot, samples in sorted(s.rss.items())},
        "worst_drift_unrestarted": worst,
        "drift_goal": DRIFT_GOAL,
        "worst_drift_median5": worst_median5,
        "worst_drift_min5": worst_min5,
        "drift_pass": worst is not None and worst < DRIFT_GOAL,
        "wall_s": round(wall, 1),
        "pass": ok,
    }


def _summary(run_dir: Path) -> dict[str, Any]:
    for path in sorted(run_dir.glob("pods/*-server/*.termination-log")):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if isinstance(doc, dict):
                return doc
    return {}


if __name__ == "__main__":
    sys.exit(main())
