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


_TRIM_CHILD = """
import os
from fedkube.transfer.allocator import release_free_memory, tune_allocator

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

# Keep freed heap (as a busy process with the tuned allocator does), then fill and free 256 MiB of 1 MiB buffers.
assert tune_allocator(64 << 20, 1 << 30)
blocks = [bytearray(1 << 20) for _ in range(256)]
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])  # touch every page
del blocks, b
held = rss_mib()
ok = release_free_memory()
print(ok, held, rss_mib())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_free_memory_returns_freed_heap_on_glibc() -> None:
    out = subprocess.run([sys.executable, "-c", _TRIM_CHILD], capture_output=True, text=True, timeout=60, check=True)
    ok, held, after = out.stdout.split()
    assert ok == "True"
    # The freed 256 MiB stayed resident until the trim, and the trim gave most of it back.
    assert float(held) - float(after) > 200, out.stdout
