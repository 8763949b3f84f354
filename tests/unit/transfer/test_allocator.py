"""The opt-in allocator tuning (run in a child process: it changes process-wide malloc behaviour)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from fedkube.transfer.allocator import ALLOCATOR_ENV, MMAP_THRESHOLD, TRIM_THRESHOLD


def test_env_form_matches_the_function_defaults() -> None:
    expected = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    assert expected == ALLOCATOR_ENV


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_allocator_applies_on_glibc() -> None:
    code = "from fedkube.transfer.allocator import tune_allocator; print(tune_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"
