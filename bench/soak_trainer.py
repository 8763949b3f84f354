"""The trainer of the soak benchmark (bench/soak.py): adds a known per-site value, and straggles on request.

Site ``<anything>-<i>`` adds ``0.5 * (i + 1)`` to every element and reports the
same ``num_examples`` as every other site, so a FedAvg round moves the model by
the plain mean of its participants' offsets. The soak's initial model holds
multiples of 1/1024 and the offsets are multiples of 0.5, so every value stays
exactly representable in float32 and the harness can check the final model
exactly from the list of participants per round.

Straggling: when the file ``<FEDKUBE_SOAK_CONTROL>/straggle-<site>`` exists at
the start of a round, the trainer removes it, sleeps the number of seconds it
holds (the harness writes more than the round deadline), then sends anyway, as
a slow site would. It writes ``straggled-<site>-r<round>`` so the harness
knows which round the delay hit.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import fedkube.trainer_sdk as fk

CONTROL_ENV = "FEDKUBE_SOAK_CONTROL"
# Not FEDKUBE_-prefixed: the pod runner strips those from the host environment.
DEBUG_ENV = "SOAK_TRAINER_DEBUG_DIR"
TRACEMALLOC_ENV = "SOAK_TRAINER_TRACEMALLOC"
TRIM_ENV = "SOAK_TRAINER_MALLOC_TRIM"
NUM_EXAMPLES = 1000


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class MemoryProbe:
    """Debug hook for the RSS-creep hunt (issue 4): one JSON line per round with what could accumulate.

    Enabled only when ``SOAK_TRAINER_DEBUG_DIR`` is set; ``SOAK_TRAINER_TRACEMALLOC=1`` adds the top
    tracemalloc growth since the first probe (it slows the trainer and costs memory of its own);
    ``SOAK_TRAINER_MALLOC_TRIM=1`` calls glibc's ``malloc_trim(0)`` after each probe and records the RSS
    after it, which tells free-but-retained heap (fragmentation) from live objects.
    """

    def __init__(self, out_dir: Path, site: str) -> None:
        self.path = out_dir / f"trainer-{site}.jsonl"
        self.trace = os.environ.get(TRACEMALLOC_ENV) == "1"
        self.trim = os.environ.get(TRIM_ENV) == "1"
        self.libc: Any = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = _MallInfo2
            self.libc = libc
        except (OSError, AttributeError):
            pass
        self.first_types: Counter[str] | None = None
        self.first_snapshot: tracemalloc.Snapshot | None = None
        if self.trace:
            tracemalloc.start(10)

    @staticmethod
    def rss_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def heap_count(self) -> int:
        """How many malloc arenas exist (one ``<heap nr=`` per arena in ``malloc_info``'s XML)."""
        path = self.path.with_suffix(".malloc_info.xml")
        self.libc.fopen.restype = ctypes.c_void_p
        fp = self.libc.fopen(str(path).encode(), b"w")
        if not fp:
            return -1
        self.libc.malloc_info(0, ctypes.c_void_p(fp))
        self.libc.fclose(ctypes.c_void_p(fp))
        return path.read_text().count("<heap nr=")

    def probe(self, round_: int) -> None:
        gc.collect()
        rss_kib = self.rss_kib()
        fds: Counter[str] = Counter()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            fds[target.split(":", 1)[0] if ":" in target else "file"] += 1
        types = Counter(type(o).__name__ for o in gc.get_objects())
        if self.first_types is None:
            self.first_types = types
        grown = {k: v - self.first_types.get(k, 0) for k, v in types.items() if v - self.first_types.get(k, 0) > 20}
        rec: dict[str, Any] = {
            "round": round_, "rss_kib": rss_kib,
            "threads": sorted(t.name for t in threading.enumerate()),
            "fds": dict(fds), "gc_objects": sum(types.values()),
            "types_grown": dict(sorted(grown.items(), key=lambda kv: -kv[1])[:10]),
        }
        if self.libc is not None:
            mi = self.libc.mallinfo2()
            rec["malloc"] = {f[0]: getattr(mi, f[0]) for f in _MallInfo2._fields_}
            rec["malloc_heaps"] = self.heap_count()
            if self.trim:
                self.libc.malloc_trim(0)
                rec["rss_kib_after_trim"] = self.rss_kib()
        if self.trace:
            snap = tracemalloc.take_snapshot()
            if self.first_snapshot is None:
                self.first_snapshot = snap
            rec["traced_kib"] = tracemalloc.get_traced_memory()[0] // 1024
            rec["trace_top"] = [
                f"{st.size_diff // 1024:+d} KiB {st.count_diff:+d} {st.traceback.format()[-1].strip()}"
                for st in snap.compare_to(self.first_snapshot, "traceback")[:8]
            ]
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def site_offset(site: str) -> np.float32:
    """0.5·(i+1) for the site named ``...-<i>``."""
    suffix = site.rsplit("-", 1)[-1]
    if not suffix.isdigit():
        raise SystemExit(f"soak_trainer: site name {site!r} must end in -<index> (e.g. site-0)")
    return np.float32(0.5 * (int(suffix) + 1))


def straggle(control: Path | None, site: str, round_: int) -> None:
    """Sleep once if the harness asked this site to straggle."""
    if control is None:
        return
    order = control / f"straggle-{site}"
    try:
        seconds = float(order.read_text().strip())
        order.unlink()
    except (OSError, ValueError):
        return
    (control / f"straggled-{site}-r{round_}").write_text(f"{seconds}\n")
    print(f"soak_trainer: site {site} round {round_}: straggling for {seconds:g} s", flush=True)
    time.sleep(seconds)


def main() -> int:
    control_dir = os.environ.get(CONTROL_ENV)
    control = Path(control_dir) if control_dir else None
    site = fk.site()
    offset = site_offset(site)
    debug_dir = os.environ.get(DEBUG_ENV)
    memprobe = MemoryProbe(Path(debug_dir), site) if debug_dir else None
    fk.init()
    while fk.is_running():
        model = fk.receive()
        if model.params is None:
            raise SystemExit("soak_trainer: got an init task; the soak's FLJob must use model source file")
        params = model.params
        for arr in params.values():
            np.add(arr, offset, out=arr)
        round_ = model.round
        straggle(control, site, round_)
        fk.send(fk.FLModel(params=params, num_examples=NUM_EXAMPLES))
        del model, params  # the next receive() must not overlap with this round's arrays (LESSONS.md 8)
        if memprobe is not None:
            memprobe.probe(round_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
