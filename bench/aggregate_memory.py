"""Peak memory of the server's aggregation, as a multiple of the model size S.

Drives the server's own strategies (fedkube.server.strategies) the way the
round loop does: each round begins with the global model, every client's result
arrives tensor by tensor with the clients interleaved (as concurrent downloads
deliver them), each client commits, and ``finish()`` gives the next global
model. A streaming round reuses one receive buffer per client, as the server's
download loop does; a staged round hands over a fresh array per tensor (the
aggregator keeps it until ``commit``).

Each configuration runs in a fresh child process, so its peak (the kernel's
VmHWM, which also catches transient peaks inside ``add``/``finish``) is its own.
The floor is the memory of the global model itself, measured in the same
process: RSS after building the global model minus RSS before. Printed per
configuration, one JSON line: peak above the baseline as a multiple of S and of
that floor, seconds per round, and a check of the result (FedAvg: every
element equals the expected mean; FedAdam: finite and moved).

Usage::

    python bench/aggregate_memory.py                       # fedavg/fedadam x stream/staged, S = 1024 MiB, 2 clients
    python bench/aggregate_memory.py --strategy fedavg --mode stream --size-mib 256 --clients 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import current_rss, emit, mib, vm_hwm

MODES = ("stream", "staged")
STRATEGIES = ("fedavg", "fedadam")
INITIAL = 1.0


def offset(client: int) -> float:
    """What client ``client`` adds to every parameter (as in bench/round.py)."""
    return 0.5 * (client + 1)


def measure(strategy_name: str, mode: str, size_mib: int, clients: int, rounds: int, array_mib: int) -> dict[str, Any]:
    """One configuration, in this process; call it in a fresh process."""
    from fedkube.server.strategies import build_strategy

    per = array_mib * (1 << 20) // 4
    total = size_mib * (1 << 20) // 4
    sizes = [per] * (total // per) + ([total % per] if total % per else [])
    s_bytes = total * 4
    staged = mode == "staged"
    strategy = build_strategy(strategy_name, {"staged": staged})

    base = current_rss()
    model = {f"t{i}": np.full(n, INITIAL, np.float32) for i, n in enumerate(sizes)}
    floor = current_rss() - base  # the global model's own memory: the floor every ratio is read against
    value = INITIAL  # every element of the global model holds this value (FedAvg keeps it uniform)
    buffers: dict[int, np.ndarray] = {}
    fold_s = 0.0
    start = time.perf_counter()
    for _ in range(rounds):
        agg = strategy.begin_round(model)
        for i, n in enumerate(sizes):
            for c in range(clients):
                x: np.ndarray | None
                if staged:
                    x = np.empty(n, np.float32)  # the aggregator keeps it until commit: no reuse possible
                else:
                    x = buffers.get(c) if n == per else None
                    if x is None or x.size != n:
                        x = np.empty(n, np.float32)
                        if n == per:
                            buffers[c] = x
                x.fill(value + offset(c))  # stands for the client's downloaded tensor
                t0 = time.perf_counter()
                agg.add(f"c{c}", f"t{i}", x, 1.0)
                fold_s += time.perf_counter() - t0
                del x
        for c in range(clients):
            agg.commit(f"c{c}")
        new = agg.finish()
        del agg
        model = new
        del new
        value = value + sum(offset(c) for c in range(clients)) / clients
    per_round = (time.perf_counter() - start) / rounds
    peak = (vm_hwm() or current_rss()) - base

    first = model["t0"]
    if strategy_name == "fedavg":
        worst = max(float(np.max(np.abs(a - np.float32(value)))) for a in model.values())
        check: dict[str, Any] = {"ok": worst <= 1e-5, "expected": value, "max_abs_err": worst}
    else:
        finite = all(bool(np.isfinite(a).all()) for a in model.values())
        check = {"ok": finite and float(first[0]) != INITIAL, "first": float(first[0])}
    return {
        "bench": "aggregate_memory",
        "strategy": strategy_name,
        "mode": mode,
        "size_mib": size_mib,
        "tensors": len(sizes),
        "clients": clients,
        "rounds": rounds,
        "floor_mib": mib(floor),
        "peak_mib": mib(peak),
        "peak_x_s": round(peak / s_bytes, 3),
        "peak_x_floor": round(peak / floor, 3),
        "sec_per_round": round(per_round, 3),
        "fold_gbps": round(rounds * clients * s_bytes / fold_s / 1e9, 2),
        "verified": check,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--strategy", choices=STRATEGIES, action="append", help="repeatable (default: both)")
    parser.add_argument("--mode", choices=MODES, action="append", help="repeatable (default: both)")
    parser.add_argument("--size-mib", type=int, default=1024, help="model size S in MiB (default 1024)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--array-mib", type=int, default=64, help="tensor size in MiB (default 64)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("size_mib", "clients", "rounds", "array_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.strategy = args.strategy or list(STRATEGIES)
    args.mode = args.mode or list(MODES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = ["--size-mib", str(args.size_mib), "--clients", str(args.clients), "--rounds", str(args.rounds)]
    common += ["--array-mib", str(args.array_mib)]
    if args.child:
        result = measure(args.strategy[0], args.mode[0], args.size_mib, args.clients, args.rounds, args.array_mib)
        emit(result)
        return 0 if result["verified"]["ok"] else 1
    failed = False
    for strategy in args.strategy:
        for mode in args.mode:
            argv_child = [sys.executable, os.path.abspath(__file__), "--child", "--strategy", strategy]
            proc = subprocess.run([*argv_child, "--mode", mode, *common], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                print(f"aggregate_memory: {strategy}/{mode} failed (exit {proc.returncode}):\n{proc.stderr}",
                      file=sys.stderr)  # fmt: skip
                failed = True
                continue
            print(lines[-1], flush=True)
            failed |= proc.returncode != 0 or not json.loads(lines[-1])["verified"]["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
