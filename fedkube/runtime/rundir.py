"""Run directories of ``fedkube run``: unique by default, and locked while a run uses one.

Two runs sharing a run dir share the server's checkpoint volume: the second
"resumes" from the first's checkpoint and prunes the first's newer ones. So a
default run dir is created exclusively (a second run started in the same
second gets its own), and a run holds an ``flock`` on ``<run dir>/.lock`` for
as long as it runs; the kernel drops the lock when the process ends, however
it ends, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from datetime import datetime, timezone
from pathlib import Path

from fedkube.errors import ConfigError

LOCK_NAME = ".lock"


class RunDirInUse(ConfigError):
    """Another live ``fedkube run`` holds the run dir's lock."""


def default_run_dir(job_name: str, root: Path | None = None) -> Path:
    """Create and return a fresh ``runs/<job>-<UTC timestamp>[-N]`` under ``root`` (the current directory).

    The directory is made with an exclusive ``mkdir``, so two runs started in
    the same second never get the same one, and mode 0700: only this user may
    enter it while the pods' Secret files are in it.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent = (root or Path.cwd()) / "runs"
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = parent / (f"{job_name}-{stamp}" if n == 1 else f"{job_name}-{stamp}-{n}")
        try:
            path.mkdir(mode=0o700)  # the pods' Secrets (tokens, TLS keys) are written under it
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"no free run dir for job {job_name} under {parent}; fix: pass --run-dir")


class RunDirLock:
    """An exclusive, non-blocking ``flock`` on a run dir; ``acquire()`` raises ``RunDirInUse`` naming the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock (idempotent) and write this process's pid into the lock file."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one is the run's alone; an old one is kept
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise RunDirInUse(
                f"run dir {self.run_dir} is in use by another fedkube run ({who}); running a second job in it "
                "would resume from that run's checkpoint and delete its newer ones; fix: wait for that run to end "
                "(or stop it), or pass another --run-dir (leave --run-dir out for a fresh one)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a run that just opened it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
