"""Process-tree memory sampling for the round benchmark (bench/round.py).

Every process under the ``fedkube run`` process is found with psutil
(``children(recursive=True)``), classified as server, sidecar or trainer from
its command line and ``FEDKUBE_SITE``, and its ``VmHWM`` (the kernel's
monotonic peak RSS, bench/_common.vm_hwm) is read every ``interval_s`` until
it exits; the last value read is the process's peak (a process that lives less
than one interval is missed, which none of fedkube's does).

The sampler shares the two cores with the job it measures, so it keeps its
own cost down: the process tree (psutil walks every process on the machine
for it) is rescanned every ``scan_interval_s``, not on every tick, and the
server's ``/status`` is polled every ``status_interval_s``. Measured with
perf on the 1 GiB round, the earlier every-50-ms rescan plus a 10 Hz status
poll took about 3 % of the machine during rounds.

The sampler also tails the server's log and, on each "round N: completed"
line (the round aggregated and its checkpoint handed to the background
writer), records the server's peak and current RSS: the per-round view that
shows whether the server's memory is flat over rounds. On the first "train
task sent" line it records the same once more (``first_round``): what loading or
receiving the initial model cost before the first round. And it polls the
server's ``/status`` (port from the server process's ``FEDKUBE_STATUS_PORT``)
every ``status_interval_s``, keeping the last document: its ``roundSeconds``
are the per-round times, with the log's timestamps as the fallback.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
from _common import current_rss, vm_hwm

SERVER, SIDECAR, TRAINER = "server", "sidecar", "trainer"
_ROUND_DONE = re.compile(r"round (\d+): completed in")
_FIRST_TRAIN = re.compile(r"round (\d+): train task sent")


@dataclass
class ProcPeak:
    """What the sampler knows of one process."""

    pid: int
    role: str
    site: str
    peak_bytes: int = 0
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    """CPU seconds at the last sample (a process's time after that is not seen)."""
    tls_env: str | None = None
    """Its FEDKUBE_TLS when it was found (None: unset or unreadable): shows which mode a process really ran."""


@dataclass
class RoundMark:
    """The server's memory when it logged that round ``round`` was completed."""

    round: int
    server_peak_bytes: int
    server_rss_bytes: int
    cpu_s: dict[str, float] = field(default_factory=dict)
    """Each process's CPU seconds (user + system) so far, by its label (server, sidecar:site-0, ...)."""


def classify(proc: psutil.Process, trainer_script: str) -> tuple[str, str] | None:
    """(role, site) of a fedkube process, None for anything else (a shell, a helper)."""
    try:
        argv = proc.cmdline()
    except (psutil.Error, OSError):
        return None
    if any(a.endswith(trainer_script) for a in argv):
        role = TRAINER
    elif "sidecar" in argv:
        role = SIDECAR
    elif "server" in argv:
        role = SERVER
    else:
        return None
    site = ""
    if role != SERVER:
        with contextlib.suppress(psutil.Error, OSError):
            site = proc.environ().get("FEDKUBE_SITE", "")
    return role, site


@dataclass
class TreeSampler:
    """Samples VmHWM of every fedkube process under ``root_pid`` until stopped."""

    root_pid: int
    trainer_script: str
    server_log_dir: Path
    interval_s: float = 0.05
    procs: dict[int, ProcPeak] = field(default_factory=dict)
    rounds: list[RoundMark] = field(default_factory=list)
    first_round: RoundMark | None = None
    """The server's memory when it sent the first round's train tasks (the initial model in place)."""
    root_peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _log_pos: int = 0
    _log_tail: str = ""
    status_interval_s: float = 0.5
    scan_interval_s: float = 1.0
    _scanned_at: float = -1e9
    _children: list[psutil.Process] = field(default_factory=list)
    last_status: dict[str, object] = field(default_factory=dict)
    """The last ``/status`` document the server served (empty when none could be read)."""
    _status_port: int | None = None
    _status_at: float = 0.0

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="round-bench-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        self.root_peak_bytes = max(self.root_peak_bytes, vm_hwm(self.root_pid) or 0)
        now = time.monotonic()
        if now - self._scanned_at >= self.scan_interval_s:
            self._scanned_at = now
            try:
                self._children = psutil.Process(self.root_pid).children(recursive=True)
            except psutil.Error:
                return
        for child in self._children:
            known = self.procs.get(child.pid)
            if known is None:
                # Not cached as "other": between fork and exec a child still shows the runtime's
                # command line, and the same pid becomes a server, sidecar or trainer a moment later.
                kind = classify(child, self.trainer_script)
                if kind is None:
                    continue
                known = self.procs[child.pid] = ProcPeak(child.pid, kind[0], kind[1])
                with contextlib.suppress(psutil.Error, OSError):
                    known.tls_env = child.environ().get("FEDKUBE_TLS")
            hwm = vm_hwm(child.pid)
            if hwm is not None:
                known.peak_bytes = max(known.peak_bytes, hwm)
            with contextlib.suppress(psutil.Error, OSError):
                cpu = child.cpu_times()
                known.cpu_user_s, known.cpu_system_s = cpu.user, cpu.system
            if known.role == SERVER and self._status_port is None:
                with contextlib.suppress(psutil.Error, OSError, ValueError):
                    self._status_port = int(child.environ().get("FEDKUBE_STATUS_PORT", ""))
        self._tail_server_log()
        self._poll_status()

    def _poll_status(self) -> None:
        now = time.monotonic()
        if self._status_port is None or now - self._status_at < self.status_interval_s:
            return
        self._status_at = now
        # The server exits right after its last round; a refused or cut-off read just keeps the last document.
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"http://127.0.0.1:{self._status_port}/status", timeout=1.0) as r:
                doc = json.loads(r.read())
            if isinstance(doc, dict):
                self.last_status = doc

    def round_seconds(self) -> dict[int, float]:
        """Per-round seconds from the last ``/status`` (``roundSeconds``, oldest first, up to ``completedRounds``)."""
        raw = self.last_status.get("roundSeconds")
        done = self.last_status.get("completedRounds")
        if not isinstance(raw, list) or not isinstance(done, int):
            return {}
        first = done - len(raw) + 1
        return {first + i: round(float(x), 3) for i, x in enumerate(raw)}

    def _cpu_now(self) -> dict[str, float]:
        """CPU seconds of every known process, read now (a round mark's snapshot)."""
        out: dict[str, float] = {}
        with contextlib.suppress(psutil.Error, OSError):
            t = psutil.Process(self.root_pid).cpu_times()
            out["runtime"] = t.user + t.system
        for p in self.procs.values():
            with contextlib.suppress(psutil.Error, OSError):
                t = psutil.Process(p.pid).cpu_times()
                out[p.role if p.role == SERVER else f"{p.role}:{p.site}"] = t.user + t.system
        return out

    def _server_pid(self) -> int | None:
        return next((p.pid for p in self.procs.values() if p.role == SERVER), None)

    def _tail_server_log(self) -> None:
        logs = sorted(self.server_log_dir.glob("*-server.server.log")) if self.server_log_dir.is_dir() else []
        if not logs:
            return
        with open(logs[0], encoding="utf-8", errors="replace") as f:
            f.seek(self._log_pos)
            chunk = f.read()
            self._log_pos = f.tell()
        text = self._log_tail + chunk
        lines = text.split("\n")
        self._log_tail = lines.pop()  # an unfinished last line waits for the next read
        pid = self._server_pid()
        for line in lines:
            if pid is None:
                break
            m = _ROUND_DONE.search(line)
            if m:
                self.rounds.append(self._mark(pid, int(m.group(1))))
            elif self.first_round is None:
                m = _FIRST_TRAIN.search(line)
                if m:
                    self.first_round = self._mark(pid, int(m.group(1)))

    def _mark(self, pid: int, round_: int) -> RoundMark:
        peak = vm_hwm(pid) or 0
        rss = 0
        with contextlib.suppress(psutil.Error, OSError):
            rss = current_rss(pid)
        return RoundMark(round_, peak, rss, self._cpu_now())


_TS = r"^(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}[.,]\d{3})Z?"
# fedkube.logs' text format: "<ISO time> INFO <logger> [component job=..] <message>" (older: "<logger>: ").
_WF = r" INFO fedkube\.server\.workflow(?::| \[[^\]]*\]) job \S+ round (\d+): "
_SENT = re.compile(_TS + _WF + "train task sent")
_AGGREGATED = re.compile(_TS + _WF + "aggregated the results")
_CHECKPOINTED = re.compile(_TS + _WF + "checkpoint written")


@dataclass
class RoundTimes:
    """Per-round wall times from the server's log (its own timestamps, millisecond resolution)."""

    round_s: dict[int, float]
    """Train tasks sent -> aggregate finished: what the server's fedkube_server_round_seconds measures."""
    with_checkpoint_s: dict[int, float]
    """Train tasks sent -> checkpoint written: the round as the job experiences it."""


def _stamp(text: str) -> float:
    return datetime.strptime(text.replace("T", " ").replace(".", ","), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def round_times(server_log: Path) -> RoundTimes:
    """Parse the round boundaries out of the server's log."""
    sent: dict[int, float] = {}
    aggregated: dict[int, float] = {}
    checkpointed: dict[int, float] = {}
    for line in server_log.read_text(encoding="utf-8", errors="replace").splitlines():
        for pattern, into in ((_SENT, sent), (_AGGREGATED, aggregated), (_CHECKPOINTED, checkpointed)):
            m = pattern.search(line)
            if m:
                # A task re-sent to a reconnected client logs "sent" again: the round starts at the first.
                into.setdefault(int(m.group(2)), _stamp(m.group(1)))
    return RoundTimes(
        round_s={r: round(aggregated[r] - sent[r], 3) for r in sorted(aggregated) if r in sent},
        with_checkpoint_s={r: round(checkpointed[r] - sent[r], 3) for r in sorted(checkpointed) if r in sent},
    )


def wait_exit(proc: psutil.Popen, timeout_s: float) -> int | None:
    """The exit code of ``proc`` within ``timeout_s``, None when it is still running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return int(code)
        time.sleep(0.1)
    return None
