"""What a server checkpoint costs per GiB, and where that cost goes.

Saves the same model (S MiB of float32 in 64 MiB tensors) ``--repeat`` times
through ``fedkube.server.checkpoint.save`` with the default retention, the way
the server's background writer does every round, then loads the newest one.
Per save it reports wall seconds and this process's user/system CPU seconds
(``getrusage``), and, measured in the same run on the same data, the parts:
checksumming alone (xxh3 over S), a plain buffered write of S without fsync
(the kernel's copy into the page cache), and ``fsync`` of that write. One JSON
line; CPU per GiB is what competes with the round for the box's cores.

``variants`` compares, in the same run and on the same values, the four ways a
save can go (each ``--repeat`` saves, steady-state mean per GiB):

* ``buffered_hashed``: tensors whose memory is not page-aligned (``np.empty``,
  16 bytes past a page), so the write goes through the page cache and is
  dropped with ``posix_fadvise``; xxh3 computed by the save. What the server
  did before its accumulators were page-aligned and checksums reused;
* ``buffered_given``: the same, with the checksums passed in (as the server
  passes those its publish computed);
* ``direct_hashed``: page-aligned tensors (what ``ArrayPool.take`` hands out),
  written with ``O_DIRECT`` from their own memory;
* ``direct_given``: both, what the server does now.

    python bench/checkpoint_cost.py --size-mib 1024 --repeat 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedkube.server import checkpoint
from fedkube.server.pool import ArrayPool
from fedkube.server.strategy_api import StrategyState
from fedkube.transfer.refs import as_bytes, checksum_of

TENSOR = 64 << 20


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _timed(fn: object) -> dict[str, float]:
    u0, s0 = _cpu()
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    wall = time.perf_counter() - t0
    u1, s1 = _cpu()
    return {"wall_s": round(wall, 3), "user_s": round(u1 - u0, 3), "sys_s": round(s1 - s0, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    size = args.size_mib << 20
    rng = np.random.default_rng(0)
    model = {}
    left = size
    i = 0
    while left > 0:
        n = min(TENSOR, left)
        model[f"t{i:04d}"] = rng.standard_normal(n // 4, dtype=np.float32).reshape(-1, 1024)
        left -= n
        i += 1
    pool = ArrayPool()
    aligned = {}
    for name, a in model.items():
        aligned[name] = pool.take(a.shape, a.dtype)
        aligned[name][...] = a
    if any(a.ctypes.data % checkpoint.DIRECT_ALIGN for a in aligned.values()):
        print("warning: ArrayPool.take did not return page-aligned arrays; direct_* variants are buffered",
              file=sys.stderr)
    published = {name: checksum_of(as_bytes(a)) for name, a in model.items()}
    root = Path(tempfile.mkdtemp(prefix="fedkube-ckbench-", dir=args.dir))
    try:
        state = StrategyState("fedavg", {"staged": False})
        variants: dict[str, dict[str, float]] = {}
        gib = size / (1 << 30)
        for variant, tensors, checksums in (
            ("buffered_hashed", model, None),
            ("buffered_given", model, published),
            ("direct_hashed", aligned, None),
            ("direct_given", aligned, published),
        ):
            job = variant.replace("_", "-")
            runs = [
                _timed(lambda r=r, t=tensors, c=checksums, j=job: checkpoint.save(root, j, r, t, state, checksums=c))
                for r in range(1, args.repeat + 1)
            ]
            shutil.rmtree(root / job, ignore_errors=True)
            tail = runs[1:] or runs
            variants[variant] = {
                k: round(sum(x[k] for x in tail) / len(tail) / gib, 3) for k in ("wall_s", "user_s", "sys_s")
            }
            variants[variant]["cpu_s"] = round(variants[variant]["user_s"] + variants[variant]["sys_s"], 3)
        del aligned
        saves = [
            _timed(lambda r=r: checkpoint.save(root, "bench", r, model, state))
            for r in range(1, args.repeat + 1)
        ]
        loaded = _timed(lambda: checkpoint.load_latest(root, "bench"))
        parts: dict[str, dict[str, float]] = {}
        parts["checksum"] = _timed(lambda: [checksum_of(as_bytes(a)) for a in model.values()])
        raw = root / "raw.bin"

        def write_only() -> None:
            with open(raw, "wb") as f:
                for a in model.values():
                    f.write(as_bytes(a))

        parts["write_no_fsync"] = _timed(write_only)
        with open(raw, "rb+") as f:
            parts["fsync"] = _timed(lambda: os.fsync(f.fileno()))
        parts["unlink"] = _timed(lambda: raw.unlink())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    steady = saves[1:] or saves
    per_gib = {k: round(sum(s[k] for s in steady) / len(steady) / gib, 3) for k in ("wall_s", "user_s", "sys_s")}
    print(json.dumps({"bench": "checkpoint_cost", "size_mib": args.size_mib, "saves": saves,
                      "save_per_gib_steady": per_gib, "variants_per_gib_steady": variants,
                      "load": loaded, "parts": parts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
