"""Aggregation cost of each strategy configuration of issue 17, against plain FedAvg measured in the same run.

Drives the server's own strategies (fedkube.server.strategies) the way a round
does: each client's result arrives tensor by tensor with the clients
interleaved; after a result's last tensor the round bounds it (``bound``:
measure the update norm, clip, refold what a clip emptied, as the server does
after pulling those tensors again) and commits it; ``finish()`` gives the next
global model. With clipping, the server's norm pre-pass (``fedkube.server.prepass``)
streams each result once through its check before the adds, for the sites its
hints say may need clipping (every site in the first round; where the code has
one; with PYTHONPATH at an older tree the bench drives that tree's refolds, so
both can be compared in one run). Streaming strategies get one reused receive buffer per client,
the robust ones (which stage every result on disk) a fresh array per tensor.

Configurations: ``fedavg`` (the floor), ``fedavg+clip`` (clipNorm fixed between
the two halves of the update norms: half the sites are clipped), ``fedavg+clip0``
(clipNorm above every norm: the norm is paid, nobody is clipped),
``fedavg+dp`` (weighting equal, the same clipNorm, Gaussian noise with
noiseMultiplier 1 and the RDP accountant), ``median``, ``trimmedmean`` (0.2)
and ``krum`` (byzantine 1, krumSelect 1), the robust ones staging under a
temporary directory. Each runs in a fresh child process: peak = VmHWM minus the
RSS before the global model was built, as a multiple of S; seconds per round
include the clip's refolds and pre-pass (on a server those tensors also travel
again: ``pulls_x_s`` counts what a server would pull per result, in S).
``best_x_fedavg`` (best round over FedAvg's best) and ``cpu_x_fedavg`` (CPU
seconds of the process) are steadier than the mean on a shared box.

Usage::

    python bench/strategies.py --size-mib 32 --clients 2 --clients 8 --clients 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import current_rss, emit, mib, vm_hwm

CONFIGS = ("fedavg", "fedavg+clip0", "fedavg+clip", "fedavg+dp", "median", "trimmedmean", "krum")
NEEDS = {"median": 3, "trimmedmean": 5, "krum": 5}  # fewest results each robust rule accepts (its defaults)


def offset(client: int) -> float:
    return 0.5 * (client + 1)


def build(config: str, clip: float, spill: Path) -> Any:
    from fedkube.server.influence import Influence
    from fedkube.server.strategies import build_strategy

    if config == "fedavg":
        return build_strategy("fedavg")
    if config == "fedavg+clip":
        return build_strategy("fedavg", {}, Influence(clip_norm=clip))
    if config == "fedavg+clip0":  # a bound above every update norm: the norm is paid, nobody is clipped
        return build_strategy("fedavg", {}, Influence(clip_norm=4 * clip))
    if config == "fedavg+dp":
        privacy = {"targetEpsilon": 1e3, "targetDelta": 1e-5, "noiseMultiplier": 1.0}
        return build_strategy("fedavg", {"privacy": privacy}, Influence("equal", None, clip))
    options = {"trimmedmean": {"trimFraction": 0.2}, "krum": {"byzantine": 1, "krumSelect": 1}}.get(config, {})
    return build_strategy(config, options, spill_dir=spill)


def measure(config: str, size_mib: int, clients: int, rounds: int, array_mib: int) -> dict[str, Any]:
    from fedkube.server.strategy_api import BoundsInfluence, StreamingAggregator

    try:
        from fedkube.server.prepass import MeasuresFirst
    except ImportError:  # the code before the pre-pass (run with PYTHONPATH at an older tree to compare)
        MeasuresFirst = type("MeasuresFirst", (), {})

    per = array_mib * (1 << 20) // 4
    total = size_mib * (1 << 20) // 4
    sizes = [per] * (total // per) + ([total % per] if total % per else [])
    s_bytes = total * 4
    clip = (offset(clients // 2 - 1) + 0.25) * float(np.sqrt(total))  # between the halves: half are clipped
    with tempfile.TemporaryDirectory(prefix="fedkube-bench-") as spill:
        strategy = build(config, clip, Path(spill))
        base = current_rss()
        model = {f"t{i}": np.full(n, 1.0, np.float32) for i, n in enumerate(sizes)}
        buffers: dict[int, np.ndarray] = {}
        refolds = prepassed = 0
        start = time.perf_counter()
        times: list[float] = []
        cpu: list[float] = []
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            agg = strategy.begin_round(model)
            streaming = isinstance(agg, StreamingAggregator)
            def result(c: int, i: int, n: int, reuse: bool, g: dict[str, np.ndarray] = model) -> np.ndarray:
                x = buffers.get(c) if reuse and n == per else None
                if x is None or x.size != n:
                    x = np.empty(n, np.float32)
                    if reuse and n == per:
                        buffers[c] = x
                np.add(g[f"t{i}"], np.float32(offset(c)), out=x)  # stands for the client's downloaded tensor
                return x

            if isinstance(agg, MeasuresFirst) and agg.measures_first:
                # The server's norm pre-pass: each result streamed once through the check, nothing kept;
                # with the strategy's hints (prepass.ClipHints) only for the sites that may need clipping.
                scratch = (np.empty(1 << 18, np.bool_), np.empty(1 << 18, np.float32))  # as norm_prepass shares it
                for c in range(clients):
                    if hasattr(agg, "prepasses") and not agg.prepasses(f"c{c}", f"c{c}"):
                        continue
                    checks = {}
                    for i, n in enumerate(sizes):
                        x = result(c, i, n, streaming)
                        checks[f"t{i}"] = check = agg.norm_check(f"c{c}", f"t{i}", "float32", (n,), scratch=scratch)
                        check.update(memoryview(x).cast("B"), 0, x.nbytes)
                        prepassed += 1
                    agg.prescale(f"c{c}", checks)
                    del checks, check  # they hold the global model: a round without pre-passes must not keep it
            for i, n in enumerate(sizes):
                for c in range(clients):
                    agg.add(f"c{c}", f"t{i}", result(c, i, n, streaming), 1.0)
            for c in range(clients):
                if isinstance(agg, BoundsInfluence):
                    for name, keys in agg.bound(f"c{c}").rebuild.items():
                        i = int(name[1:])
                        for key in keys:  # the server pulls these again; here they are made again
                            agg.refold(key, name, result(int(key[1:]), i, sizes[i], False))
                            refolds += 1
                agg.commit(f"c{c}")
            model = agg.finish()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            del agg
        per_round = (time.perf_counter() - start) / rounds
        peak = (vm_hwm() or current_rss()) - base
    finite = all(bool(np.isfinite(a).all()) for a in model.values())
    return {
        "bench": "strategies", "config": config, "size_mib": size_mib, "clients": clients, "rounds": rounds,
        "peak_mib": mib(peak), "peak_x_s": round(peak / s_bytes, 3), "sec_per_round": round(per_round, 3),
        "best_round_s": round(min(times), 3),
        "cpu_s_per_round": round(sum(cpu) / rounds, 3),  # steadier than wall time on a shared box
        "refolded_tensors": refolds, "prepassed_tensors": prepassed,
        # what a server would pull over the network, per result, in units of S
        "pulls_x_s": round((rounds * clients * len(sizes) + prepassed + refolds) / (rounds * clients * len(sizes)), 2),
        "verified": {"ok": finite, "first": float(model["t0"][0])},
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--config", choices=CONFIGS, action="append", help="repeatable (default: all)")
    parser.add_argument("--size-mib", type=int, default=32, help="model size S in MiB (default 32)")
    parser.add_argument("--clients", type=int, action="append", help="N, repeatable (default 2, 8, 16)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--array-mib", type=int, default=8, help="tensor size in MiB (default 8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = args.config or list(CONFIGS)
    args.clients = args.clients or [2, 8, 16]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = measure(args.config[0], args.size_mib, args.clients[0], args.rounds, args.array_mib)
        emit(result)
        return 0 if result["verified"]["ok"] else 1
    failed = False
    for n in args.clients:
        floor: float | None = None
        best = floor_cpu = 1.0
        for config in args.config:
            if n < NEEDS.get(config, 1):
                print(json.dumps({"bench": "strategies", "config": config, "clients": n,
                                  "skipped": f"{config} needs at least {NEEDS[config]} results"}), flush=True)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--config", config, "--clients", str(n),
                   "--size-mib", str(args.size_mib), "--rounds", str(args.rounds), "--array-mib", str(args.array_mib)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                print(f"strategies: {config} N={n} failed (exit {proc.returncode}):\n{proc.stderr}", file=sys.stderr)
                failed = True
                continue
            line = json.loads(lines[-1])
            if config == "fedavg":
                floor, best, floor_cpu = line["sec_per_round"], line["best_round_s"], line["cpu_s_per_round"]
            if floor:
                line["time_x_fedavg"] = round(line["sec_per_round"] / floor, 2)
                # the best round of each: on a shared box the mean carries other processes' bursts
                line["best_x_fedavg"] = round(line["best_round_s"] / best, 2)
                line["cpu_x_fedavg"] = round(line["cpu_s_per_round"] / floor_cpu, 2)
            print(json.dumps(line), flush=True)
            failed |= proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
