"""Run dirs: a default one is never shared, and one in use is refused (issue 11 §2.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedkube.errors import ConfigError
from fedkube.runtime.local import default_run_dir
from fedkube.runtime.rundir import RunDirInUse, RunDirLock


def test_default_run_dirs_of_one_job_in_one_second_differ_and_exist(tmp_path: Path) -> None:
    dirs = [default_run_dir("job", tmp_path) for _ in range(3)]
    assert len(set(dirs)) == 3
    assert all(d.is_dir() and d.parent == tmp_path / "runs" for d in dirs)


def test_a_locked_run_dir_is_refused_naming_the_holder_pid_and_the_fix(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from fedkube.runtime.rundir import RunDirLock; RunDirLock(Path(sys.argv[1])).acquire(); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse) as err:
            RunDirLock(tmp_path).acquire()
        assert isinstance(err.value, ConfigError)  # fedkube run exits 2 for it
        assert f"pid {holder.pid}" in str(err.value) and "--run-dir" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: no stale lock file blocks the next run.
    RunDirLock(tmp_path).acquire().release()


def test_a_run_dir_the_run_makes_is_private_to_its_user(tmp_path: Path) -> None:
    assert (default_run_dir("job", tmp_path).stat().st_mode & 0o777) == 0o700
    given = tmp_path / "given" / "run"
    lock = RunDirLock(given).acquire()
    try:
        assert (given.stat().st_mode & 0o777) == 0o700
    finally:
        lock.release()
