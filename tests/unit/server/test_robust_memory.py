"""The robust strategies keep staged results on disk: N results cost disk, not resident memory.

Measured in a fresh process (its peak RSS, VmHWM, is its own): the peak grows
by the new model plus the block buffers (fedkube.server.robust's stated bound),
not by N x S. Not timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 1 << 20
S_MIB = 32
N = 8
BLOCK_MIB = 2

CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
from fedkube.server.robust import Krum, Median, TrimmedMean

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

which, spill, s_mib, n, block_mib = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
kw = {"spill_dir": spill, "block_bytes": block_mib << 20}
strategy = {"median": lambda: Median(**kw), "trimmedmean": lambda: TrimmedMean(trim_fraction=0.2, **kw),
            "krum": lambda: Krum(byzantine=1, krum_select=2, **kw)}[which]()
# One tensor of S: the worst case for a rule that would hold N copies of a tensor.
model = {"w": np.ones(s_mib << 18, np.float32)}
result = np.empty_like(model["w"])
result[...] = 0
agg = strategy.begin_round(model)
# Warm up the code paths (imports, scratch buffers) on a throwaway round before taking the baseline.
warm = strategy.begin_round({"w": np.ones(1 << 16, np.float32)})
for i in range(n):
    warm.add(f"c{i}", "w", np.full(1 << 16, i, np.float32), 1.0); warm.commit(f"c{i}")
warm.finish(); del warm
base = hwm()
for i in range(n):
    np.add(model["w"], np.float32(i), out=result)
    agg.add(f"c{i}", "w", result, 1.0)
    agg.commit(f"c{i}")
staged = agg.staged_bytes()
after_staging = hwm()
new = agg.finish()
assert new["w"].dtype == np.float32
print(json.dumps({"base": base, "after_staging": after_staging, "end": hwm(), "staged": staged,
                  "left": [str(p) for p in agg.directory.parent.iterdir()]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("which", ["median", "trimmedmean", "krum"])
def test_staged_results_live_on_disk_not_in_rss(tmp_path: Path, which: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(tmp_path), str(S_MIB), str(N), str(BLOCK_MIB)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    s = S_MIB * MIB
    assert m["staged"] >= N * s  # the N results are on disk...
    assert m["after_staging"] - m["base"] < 8 * MIB  # ...and staging them added nothing resident
    # The stated bound: the new model (S) plus ~3 block buffers, whatever N; N x S would be 256 MiB here.
    growth = m["end"] - m["base"]
    assert growth <= s + 3 * BLOCK_MIB * MIB + 8 * MIB, f"peak RSS grew by {growth / MIB:.1f} MiB"
    assert m["left"] == []  # the round's files are removed
