"""Server CPU per received result: receive + verify + NaN check + fold, through the real Fetcher (issue 5).

Two receiver threads (the server's downloads of two clients' results) pull
S bytes each, in float32 tensors of ``--tensor-mib``, from an in-process
``DownloadService`` over real bulk (plain-TCP, loopback) sockets, and fold them
into one ``WeightedMean`` whose accumulators are recycled through an
``ArrayPool`` as the server's are. Three ways of doing it run back to back,
round-robin, in the same process:

* ``copy``: the previous server path: each tensor into the download's reused
  receive buffer, then ``WeightedMean.add`` (a cold ``isfinite`` pass over the
  tensor, then a copy (first contribution) or the blocked fold);
* ``check``: ``WeightedMean.intake(claim=False)``: the NaN/Inf check runs per
  received frame inside ``Fetcher.fetch_into`` (bytes hot in cache), no
  separate pass; still a receive buffer and a copy;
* ``claim``: the server path now: ``intake`` as well, and a tensor no client has
  contributed to yet is received straight into its accumulator (no copy);
* ``claim_cold`` (only with ``--modes``): ``claim`` without the per-frame check
  (``add`` then makes its cold pass), to price the check alone.

Printed per mode: CPU-s of the two receiver threads per GiB received (their
own thread time: kernel receive copy, xxh3, NaN check, fold), the process's
CPU-s per GiB (including the in-process publisher's sends), and the round's
wall time against the loopback floor of the same bytes, measured in the same
run. Every round's result is checked against a float64 reference.

    python bench/fold.py --size-mib 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import cpu_s, emit, tcp_floor
from fedkube.server.aggregate import WeightedMean
from fedkube.server.model import ModelSpec
from fedkube.server.pool import ArrayPool
from fedkube.transfer import DownloadService, Fetcher, FetchSettings, TensorRef
from fedkube.transfer.bulk import BulkChunkSource, BulkServer
from fedkube.transfer.refs import array_from_buffer

MODES = ("copy", "check", "claim")
SETTINGS = FetchSettings(chunk_timeout_s=30.0, idle_timeout_s=120.0)


def _pull(mode: str, wm: WeightedMean, address: str, client: str, refs: list[TensorRef], cpu: dict[str, float],
          errors: list[BaseException]) -> None:  # fmt: skip
    t0 = time.thread_time()
    try:
        fetcher = Fetcher(BulkChunkSource(address, client, chunk_timeout_s=30.0), SETTINGS)
        buffer: bytearray | None = None
        for ref in refs:
            if mode == "copy":
                if buffer is None or len(buffer) != ref.nbytes:
                    buffer = bytearray(ref.nbytes)
                data = fetcher.fetch_into(ref, buffer)
                wm.add(client, ref.name, array_from_buffer(data, ref.dtype, ref.shape), 1.0)
                continue
            claim = mode.startswith("claim")
            with wm.intake(client, ref.name, ref.dtype, ref.shape, 1.0, claim=claim) as intake:
                out: Any = intake.target
                if out is None:
                    if buffer is None or len(buffer) != ref.nbytes:
                        buffer = bytearray(ref.nbytes)
                    out = buffer
                data = fetcher.fetch_into(ref, out, inspect=None if mode == "claim_cold" else intake.check)
                intake.add(array_from_buffer(data, ref.dtype, ref.shape))
    except BaseException as exc:
        errors.append(exc)
    cpu[client] = time.thread_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="bytes per client result (S)")
    ap.add_argument("--tensor-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode (after one warm-up round)")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = args.modes.split(",")
    n_tensors = max(1, args.size_mib // args.tensor_mib)
    per = args.tensor_mib * (1 << 20) // 4
    rng = np.random.default_rng(0)
    base = {f"t{i:03d}": rng.random(per, dtype=np.float32) * 4 - 2 for i in range(n_tensors)}
    other = {k: v + np.float32(1.0) for k, v in base.items()}
    spec = ModelSpec.of(base)
    nbytes = sum(a.nbytes for a in base.values())
    gib = 2 * nbytes / (1 << 30)
    service = DownloadService("server")
    server = BulkServer(service).start()
    refs = {
        "c0": service.publish(base, receivers=["c0"], ttl_s=3600).refs,
        "c1": service.publish(other, receivers=["c1"], ttl_s=3600).refs,
    }
    floor = tcp_floor(2 * nbytes)
    pool = ArrayPool()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    schedule = ["copy"] + [m for _ in range(args.rounds) for m in modes]  # the first round is a warm-up
    for i, mode in enumerate(schedule):
        wm = WeightedMean(spec, pool=pool)
        cpu: dict[str, float] = {}
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_pull, args=(mode, wm, server.address, c, refs[c], cpu, errors)) for c in refs
        ]
        p0, w0 = cpu_s(), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, proc = time.perf_counter() - w0, cpu_s() - p0
        if errors:
            raise errors[0]
        for c in refs:
            wm.commit(c)
        means = wm.means()
        err = max(float(np.abs(means[k] - (base[k].astype(np.float64) + 0.5)).max()) for k in base)
        assert err < 1e-6, f"round {i} ({mode}): max abs error {err}"
        pool.retire(list(means.values()))
        del means, wm
        if i == 0:
            continue
        row = {"receiver_cpu_s_per_gib": sum(cpu.values()) / gib, "process_cpu_s_per_gib": proc / gib,
               "wall_over_floor": wall / floor, "wall_s": wall}  # fmt: skip
        results[mode].append(row)
        print(f"round {i}: {mode:5s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), file=sys.stderr, flush=True)
    server.stop()
    service.close()
    summary: dict[str, object] = {
        "size_mib": args.size_mib, "tensor_mib": args.tensor_mib, "clients": 2, "floor_s": round(floor, 3),
        "pool_reused": pool.reused, "pool_allocated": pool.allocated,
    }  # fmt: skip
    for mode, rows in results.items():
        for key in rows[0] if rows else ():
            vals = sorted(r[key] for r in rows)
            summary[f"{mode}_{key}_median"] = round(vals[len(vals) // 2], 3)
            summary[f"{mode}_{key}_all"] = [round(v, 3) for v in (r[key] for r in rows)]
    emit(summary)


if __name__ == "__main__":
    main()
