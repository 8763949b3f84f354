"""Child processes of the local runtime: output captured once, process groups, bounded shutdown.

Every container runs as a child in its own session (and therefore its own
process group), so one ``killpg`` reaches whatever the container spawned and a
Ctrl-C in the terminal reaches only the runtime, which then stops its children
in order. stdout and stderr share one pipe (ordering between them is kept) read
by one thread per process; each line goes once to the console sink and once to
the process's own log file (LESSONS.md 21).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from fedkube.errors import FedkubeError

logger = logging.getLogger(__name__)

# Every started process group, so that even an exit that skips the runtime's
# own shutdown (an unexpected exception, sys.exit in a handler) leaves no orphans.
_LIVE_GROUPS: set[int] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_live_groups() -> None:
    with _LIVE_LOCK:
        groups = list(_LIVE_GROUPS)
        _LIVE_GROUPS.clear()
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


class OutputSink(Protocol):
    """Where the prefixed lines of every child process go (the console, in practice)."""

    def emit(self, prefix: str, line: str) -> None:
        """Write one line of output of the process named ``prefix`` (no trailing newline)."""


class StreamSink:
    """Writes ``[prefix] line`` to a text stream; one lock keeps lines from interleaving."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, prefix: str, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        with self._lock:
            stream.write(f"[{prefix}] {line}\n")
            stream.flush()


# A routine log line of a fedkube process, in either of fedkube's log formats (text:
# "<time> LEVEL logger ...", with the stdlib's or ISO time; json: {"time": .., "level": ..}).
_ROUTINE_LOG_LINE = re.compile(
    r'^(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}[.,]\d{3}Z? (DEBUG|INFO) '
    r'|\{"time": "[^"]*", "level": "(DEBUG|INFO)")'
)


class QuietSink:
    """Passes on everything but routine (DEBUG/INFO) log lines of fedkube's processes.

    What the user's script prints, warnings, errors and tracebacks reach the
    console; the routine lines still go to each process's log file, and
    ``fedkube run --verbose`` shows them too.
    """

    def __init__(self, inner: OutputSink) -> None:
        self.inner = inner

    def emit(self, prefix: str, line: str) -> None:
        if not _ROUTINE_LOG_LINE.match(line):
            self.inner.emit(prefix, line)


class NullSink:
    """Drops output (it still reaches the per-process log file)."""

    def emit(self, prefix: str, line: str) -> None:
        return None


@dataclass(frozen=True)
class ProcessSpec:
    """What to start: argv, environment, working directory, and where its log goes."""

    name: str  # the console prefix, e.g. "site-a trainer"
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Path
    log_path: Path


@dataclass
class ManagedProcess:
    """One running child; ``stop()`` ends its whole process group."""

    spec: ProcessSpec
    sink: OutputSink
    _popen: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _pump: threading.Thread | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)
    # Set when the runtime itself decided to end the process (grace period
    # over, Ctrl-C): its exit code then tells nothing about the job.
    stopped_by_runtime: bool = field(default=False, init=False)

    def start(self) -> None:
        """Start the process in a new session with stdout+stderr piped to one reader thread."""
        spec = self.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec.cwd.mkdir(parents=True, exist_ok=True)
        try:
            self._popen = subprocess.Popen(
                list(spec.argv),
                env=dict(spec.env),
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            program = spec.argv[0] if spec.argv else ""
            why = {
                FileNotFoundError: f"program {program!r} not found",
                PermissionError: f"program {program!r} is not executable",
            }.get(type(exc), f"{type(exc).__name__}: {exc.strerror or exc}")
            raise ProcessStartError(
                f"could not start {spec.name}: {why} (command {' '.join(spec.argv)!r}, in {spec.cwd}); fix: set the "
                "container's command in the job spec to a program installed on this machine (on PATH, or a path; "
                "a relative script path resolves in the job file's directory)"
            ) from None
        self.started_at = time.monotonic()
        with _LIVE_LOCK:
            _LIVE_GROUPS.add(self._popen.pid)
        logger.debug("started %s pid=%s argv=%s cwd=%s", spec.name, self._popen.pid, list(spec.argv), spec.cwd)
        self._pump = threading.Thread(target=self._pump_output, name=f"out-{spec.name}", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        """The child's pid (also its process-group id)."""
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        """Exit code once the process ended (negative: killed by that signal), else None."""
        return self._require().poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds; return the exit code, or None if still running."""
        try:
            code = self._require().wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._join_output()
        return code

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (no-op when it is already gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the group, wait ``grace_s``, then SIGKILL; always reaps leftovers of the group."""
        popen = self._require()
        if popen.poll() is None:
            self.stopped_by_runtime = True
            logger.info("stopping %s (pid %s): SIGTERM, then SIGKILL after %.1f s", self.spec.name, popen.pid, grace_s)
            self.signal_group(signal.SIGTERM)
            if self.wait(grace_s) is None:
                logger.warning("%s did not stop within %.1f s of SIGTERM; sending SIGKILL", self.spec.name, grace_s)
                self.signal_group(signal.SIGKILL)
                popen.wait()
        # The leader may be gone while something it started still runs in the group.
        self.signal_group(signal.SIGKILL)
        with _LIVE_LOCK:
            _LIVE_GROUPS.discard(popen.pid)
        self._join_output()
        return popen.returncode

    def _require(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.spec.name} was not started")
        return self._popen

    def _join_output(self) -> None:
        # Bounded: a grandchild holding the pipe open must not hang the runtime.
        if self._pump is not None:
            self._pump.join(timeout=2.0)

    def _pump_output(self) -> None:
        popen = self._require()
        assert popen.stdout is not None
        with open(self.spec.log_path, "ab") as log:
            for raw in iter(popen.stdout.readline, b""):
                log.write(raw if raw.endswith(b"\n") else raw + b"\n")
                log.flush()
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                try:
                    self.sink.emit(self.spec.name, line)
                except Exception:  # a broken console must not stop the log file or block the child
                    logger.exception("could not write output of %s to the console", self.spec.name)
        popen.stdout.close()


class ProcessStartError(FedkubeError):
    """A container's program could not be started (not found, not executable)."""
