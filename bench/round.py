"""Round benchmark of issue 5: a real FedAvg job through ``fedkube run``, timed and memory-profiled.

The peer workload: FedAvg, 2 clients, 3 rounds, a random float32 model of S MiB
in 64 MiB tensors (``--tensor-mib``; one smaller tensor when S < 64). Client ``site-i`` adds
0.5·(i+1) to every parameter (bench/round_trainer.py), both report the same
num_examples, so each round moves the model by exactly 0.75. The job is an
ordinary FLJob (model source ``file``: an .npz written to a temporary
directory) run by the local runtime as a subprocess, so the server, the
sidecars and the trainers are separate processes exactly as in production.
With ``--model-source firstClient`` the server gets no file: it asks the first
client (site-0) for its initial weights, and that trainer sends the same .npz,
so everything after the init task, the final model included, is the same.

Measured in the same run, per size:

* the floor: loopback TCP between two processes for 4·S bytes (each round the
  server sends S to each of two clients and pulls S back from each), from
  bench/_common.tcp_floor. Above ``--floor-cap-mib`` the floor is measured for
  S bytes and multiplied by 4 (its receiver holds the whole payload in memory);
  the line says so in ``floor_scaled``;
* per-round seconds from the server's ``/status`` (``roundSeconds``: round
  start -> aggregate finished and the checkpoint handed to the background
  writer, what ``fedkube_server_round_seconds`` measures; ``round_source``
  says "status"), or from its log (train tasks sent -> aggregate finished,
  ``round_source`` "log") when the status could not be read; and from the log,
  round start up to "checkpoint written" (the background write's end). The
  time targets are judged on rounds 2..R: round 1 also holds the trainers'
  start-up (the server sends its tasks as soon as the sidecars registered);
* peak RSS (VmHWM) of every process under the runtime, sampled every 50 ms
  (bench/round_procs.py), and the server's peak/current RSS at the end of
  each round (is it flat over rounds?) and when it sends round 1's tasks
  (``server_at_start_mib``: what the initial model cost it);
* the final model, read from the server's last checkpoint, against the
  initial model + 0.75 per round (every element, shapes and dtypes).

One JSON line per size. Usage::

    python bench/round.py --size-mib 16 --size-mib 1024 --trainer-mode inplace
    python bench/round.py --size-mib 1024 --trainer-mode copy
    python bench/round.py --size-mib 1024 --receive fresh   # plain fk.receive(), no buffers handed back
    python bench/round.py --size-mib 1024 --model-source firstClient   # the initial model comes from site-0
    python bench/round.py --size-mib 1024 --tls both   # spec.security.tls enabled, then disabled (the default)

``--tls both`` runs the job twice against one floor, with ``spec.security.tls: enabled`` and ``disabled``: the
line holds each run's whole report under ``modes`` and, under ``tls``, each mode's worst steady round over
the floor and its server/sidecar/trainer peaks side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, mib, tcp_floor
from round_procs import SERVER, SIDECAR, TRAINER, TreeSampler, round_times, wait_exit

TRAINER_SCRIPT = Path(__file__).resolve().with_name("round_trainer.py")
MODE_ENV = "FEDKUBE_BENCH_TRAINER_MODE"  # read by round_trainer.py
RECEIVE_ENV = "FEDKUBE_BENCH_TRAINER_RECEIVE"  # read by round_trainer.py: "into" or "fresh"
INITIAL_MODEL_ENV = "FEDKUBE_BENCH_INITIAL_MODEL"  # read by round_trainer.py: what it answers an init task with
MODEL_SOURCES = ("file", "firstClient")
ARRAY_MIB = 64
ROW = 1024  # tensors are (n // ROW, ROW): 2-D, so a shape mix-up would show
CLIENTS = 2
SEED = 20261122
JOB = "round-bench"

# Targets of issue 5 (S = 1 GiB unless said otherwise).
TARGET_ROUND_OVER_FLOOR = 3.0
TARGET_ROUND_OVER_FLOOR_TLS = 3.5  # issue 12: with mutual TLS on every connection
TARGET_SIDECAR_MIB = 120.0
TARGET_TRAINER_X = {"inplace": 1.2, "copy": 2.1}
TARGET_SERVER_X = 2.5
TARGET_SMALL_ROUND_S = 0.2  # at S = 16 MiB
TARGET_FLAT_X = 0.1  # server peak growth from round 1 to the last, as a multiple of S
LARGE_MIB = 1024  # the multiples-of-S targets are judged from this size up (below, fixed costs dominate)
#: --tls choice -> the spec.security.tls values run, in this order, against one floor.
TLS_CHOICES = {"on": ("enabled",), "off": ("disabled",), "both": ("enabled", "disabled")}


def tensor_sizes(size_mib: int, tensor_mib: int = ARRAY_MIB) -> list[int]:
    """Element counts of the model's tensors: ``tensor_mib`` (64) MiB each, the remainder in one smaller tensor."""
    total = size_mib * (1 << 20) // 4
    per = tensor_mib * (1 << 20) // 4
    sizes = [per] * (total // per)
    if total % per:
        sizes.append(total % per)
    return sizes


def initial_tensor(index: int, elements: int) -> np.ndarray:
    """Tensor ``index`` of the initial model, regenerated identically for the check."""
    rng = np.random.default_rng([SEED, index])
    return rng.random(elements, dtype=np.float32).reshape(elements // ROW, ROW)


def tensor_name(index: int) -> str:
    return f"layer{index:04d}.weight"


def write_model(path: Path, sizes: list[int]) -> None:
    """An uncompressed .npz, one tensor at a time (np.savez would need the whole model in memory)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, n in enumerate(sizes):
            with zf.open(tensor_name(i) + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, initial_tensor(i, n), allow_pickle=False)


def expected_final(initial: np.ndarray, rounds: int) -> np.ndarray:
    """What FedAvg of the two clients gives, step by step in float32 as the trainers compute."""
    e = initial.copy()
    for _ in range(rounds):
        total = np.zeros(e.shape, dtype=np.float64)
        for i in range(CLIENTS):
            total += e + np.float32(0.5 * (i + 1))  # the trainer's float32 sum, then widened
        e = (total / CLIENTS).astype(np.float32)
    return e


def cpu_by_round(marks: list[Any]) -> list[dict[str, Any]]:
    """CPU seconds each process spent in each round after the first (between two round-completed marks)."""
    out = []
    for before, after in itertools.pairwise(marks):
        spent = {k: round(v - before.cpu_s.get(k, 0.0), 2) for k, v in after.cpu_s.items() if k in before.cpu_s}
        out.append({"round": after.round, "total": round(sum(spent.values()), 2), **spent})
    return out


def job_manifest(
    model_path: Path,
    rounds: int,
    mode: str,
    chunk_mib: int | None = None,
    receive: str = "into",
    model_source: str = "file",
    tls: str = "enabled",
    clip_norm: float | None = None,
) -> dict[str, Any]:
    model: dict[str, Any] = {"source": "file", "path": str(model_path)}
    if model_source == "firstClient":
        model = {"source": "firstClient"}
    manifest: dict[str, Any] = {
        "apiVersion": "fedkube.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": JOB},
        "spec": {
            "rounds": rounds,
            "minClients": CLIENTS,
            "strategy": {"name": "fedavg"},
            "model": model,
            "clients": [{"name": f"site-{i}"} for i in range(CLIENTS)],
            "trainer": {
                "image": "local",
                "command": [sys.executable, str(TRAINER_SCRIPT)],
                "env": [
                    {"name": MODE_ENV, "value": mode},
                    {"name": RECEIVE_ENV, "value": receive},
                    {"name": INITIAL_MODEL_ENV, "value": str(model_path)},
                ],
            },
            "timeouts": {"roundSeconds": 3600},
            "security": {"tls": tls},
        },
    }
    if chunk_mib is not None:
        manifest["spec"]["transfer"] = {"chunkBytes": chunk_mib << 20}
    if clip_norm is not None:
        manifest["spec"]["strategy"]["clipNorm"] = clip_norm
    return manifest


def verify(run_dir: Path, sizes: list[int], rounds: int) -> dict[str, Any]:
    """Compare the server's last checkpoint with the expected model: every element, shape and dtype."""
    from fedkube.server import checkpoint

    manifests = sorted(run_dir.glob(f"pods/*/volumes/*/{JOB}/round-*/manifest.json"))
    if not manifests:
        return {"ok": False, "problem": f"no checkpoint under {run_dir}"}
    ck = checkpoint.load(manifests[-1].parent)
    if ck.round != rounds:
        return {"ok": False, "problem": f"last checkpoint is of round {ck.round}, expected {rounds}"}
    if sorted(ck.model) != [tensor_name(i) for i in range(len(sizes))]:
        return {"ok": False, "problem": f"tensor names differ: {sorted(ck.model)[:4]}..."}
    worst = 0.0
    for i, n in enumerate(sizes):
        got = ck.model[tensor_name(i)]
        want = expected_final(initial_tensor(i, n), rounds)
        if got.dtype != np.float32 or got.shape != want.shape:
            return {"ok": False, "problem": f"{tensor_name(i)}: {got.dtype}{got.shape}, expected float32{want.shape}"}
        worst = max(worst, float(np.max(np.abs(got - want))))
    # The server's accumulator may round differently from the float64 reference by an ulp or so (~2.4e-7 here).
    return {"ok": worst <= 1e-6, "max_abs_err": worst, "round": ck.round, "tensors": len(sizes)}


def floor_seconds(size_bytes: int, cap_bytes: int) -> tuple[float, bool]:
    """The 4·S loopback floor, best of 3 (other work on the box only ever slows it); scaled from S above the cap."""
    nbytes = 4 * size_bytes
    repeats = 3
    if nbytes <= cap_bytes:
        return tcp_floor(nbytes, repeats), False
    return 4 * tcp_floor(size_bytes, repeats), True


def run_job(
    workdir: Path, job_file: Path, timeout_s: float, *, bulk: bool = True
) -> tuple[int | None, dict[str, Any], TreeSampler, float]:
    run_dir = workdir / "run"
    out = open(workdir / "run.stdout", "wb")  # noqa: SIM115 - closed below, after the process
    err = open(workdir / "run.stderr", "wb")  # noqa: SIM115
    argv = [sys.executable, "-m", "fedkube.cli", "run", str(job_file), "--json", "--no-progress"]
    argv += ["--run-dir", str(run_dir)]
    if not bulk:
        argv.append("--no-bulk")
    start = time.perf_counter()
    proc = psutil.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    sampler = TreeSampler(proc.pid, TRAINER_SCRIPT.name, run_dir / "logs").start()
    try:
        code = wait_exit(proc, timeout_s)
        if code is None:
            proc.terminate()  # fedkube run stops every pod on SIGTERM
            proc.wait(60)
    finally:
        sampler.stop()
        out.close()
        err.close()
    wall = time.perf_counter() - start
    try:
        outcome = json.loads((workdir / "run.stdout").read_text())
    except ValueError:
        outcome = {}
    return code, outcome, sampler, wall


def measure(size_mib: int, args: argparse.Namespace) -> dict[str, Any]:
    """One line for one size: the job once per TLS mode of ``--tls``, each after a floor; every mode is judged
    against the best floor of the run (the load can change between the modes: a floor is a best-of)."""
    sizes = tensor_sizes(size_mib, args.tensor_mib)
    s_bytes = sum(sizes) * 4
    floors: dict[str, float] = {}
    pending: dict[str, Callable[[float, bool], dict[str, Any]]] = {}
    scaled = False
    for tls in TLS_CHOICES[args.tls]:
        floors[tls], scaled = floor_seconds(s_bytes, args.floor_cap_mib << 20)
        pending[tls] = run_mode(size_mib, sizes, tls, args)
    floor_s = min(floors.values())
    modes = {tls: finish(floor_s, scaled) for tls, finish in pending.items()}
    return {
        "bench": "round",
        "size_mib": size_mib,
        "floor_4s_s": round(floor_s, 3),
        "floor_4s_before_mode_s": {tls: round(f, 3) for tls, f in floors.items()},
        "floor_scaled": scaled,
        "tls_modes": list(modes),
        "tls": {tls: summary(r) for tls, r in modes.items()},
        "modes": modes,
        "pass": all(r["pass"] for r in modes.values()),
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the TLS comparison looks at: the worst steady round over the floor, and each role's peak."""
    steady = report["round_over_floor"][1:] or report["round_over_floor"]
    return {
        "round_over_floor": max(steady, default=None),
        "round_s": max(report["round_s"][1:] or report["round_s"], default=None),
        "peak_mib": report["peak_by_role_mib"],
        "peak_x_s": report["peak_by_role_x_s"],
        "verified": bool(report["verified"].get("ok")),
        "tls_env": sorted({str(v) for k, v in report["tls_env"].items() if not k.startswith(TRAINER)}),
        "pass": report["pass"],
    }


def run_mode(
    size_mib: int, sizes: list[int], tls: str, args: argparse.Namespace
) -> Callable[[float, bool], dict[str, Any]]:
    """Runs the job with ``spec.security.tls: <tls>``; returns its report, to be made once the floor is known."""
    s_bytes = sum(sizes) * 4
    keep = args.keep_dir is not None
    base = (
        Path(args.keep_dir) / f"{size_mib}MiB-{args.trainer_mode}-{args.receive}{'-grpc' if args.no_bulk else ''}"
        f"{'-first-client' if args.model_source == 'firstClient' else ''}"
        f"{f'-t{args.tensor_mib}' if args.tensor_mib != ARRAY_MIB else ''}-tls-{tls}"
        if keep
        else None
    )
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    with _workdir(base) as workdir:
        model_path = workdir / "initial.npz"
        write_model(model_path, sizes)
        job_file = workdir / "fljob.json"
        manifest = job_manifest(
            model_path, args.rounds, args.trainer_mode, args.chunk_mib, args.receive, args.model_source, tls,
            args.clip_norm,
        )
        job_file.write_text(json.dumps(manifest, indent=2))
        code, outcome, sampler, wall = run_job(workdir, job_file, args.timeout, bulk=not args.no_bulk)
        server_logs = sorted((workdir / "run" / "logs").glob("*-server.server.log"))
        times = round_times(server_logs[0] if server_logs else Path("/dev/null"))
        from_status = sampler.round_seconds()
        round_source = "status" if len(from_status) == args.rounds else "log"
        check = verify(workdir / "run", sizes, args.rounds) if code == 0 else {"ok": False, "problem": "job failed"}
        if not keep:
            model_path.unlink()
    rounds_s = from_status if round_source == "status" else times.round_s

    def finish(floor_s: float, scaled: bool) -> dict[str, Any]:
        return report(
            size_mib,
            s_bytes,
            floor_s,
            scaled,
            code,
            outcome,
            sampler,
            rounds_s,
            round_source,
            times.with_checkpoint_s,
            check,
            wall,
            args,
            tls,
        )

    return finish


def report(
    size_mib: int,
    s_bytes: int,
    floor_s: float,
    scaled: bool,
    code: int | None,
    outcome: dict[str, Any],
    sampler: TreeSampler,
    rounds_s: dict[int, float],
    round_source: str,
    with_ck_s: dict[int, float],
    check: dict[str, Any],
    wall: float,
    args: argparse.Namespace,
    tls: str = "enabled",
) -> dict[str, Any]:
    peaks: dict[str, int] = {}
    cpu: dict[str, list[float]] = {}
    tls_env: dict[str, str | None] = {}
    for p in sampler.procs.values():
        key = p.role if p.role == SERVER else f"{p.role}:{p.site}"
        peaks[key] = max(peaks.get(key, 0), p.peak_bytes)
        tls_env[key] = p.tls_env
        user_sys = cpu.setdefault(key, [0.0, 0.0])
        user_sys[0] += p.cpu_user_s
        user_sys[1] += p.cpu_system_s
    if sampler.root_peak_bytes:
        peaks["runtime"] = sampler.root_peak_bytes  # `fedkube run` itself: not a production process
    by_role = {
        role: max((v for k, v in peaks.items() if k.split(":")[0] == role), default=0)
        for role in (SERVER, SIDECAR, TRAINER)
    }
    # Round 1 starts when the sidecars registered, while the trainer processes are still importing
    # numpy and grpc (~1 s here): the time targets are judged on the steady rounds 2..R.
    steady = [t for r, t in rounds_s.items() if r >= 2] or list(rounds_s.values())
    worst_round = max(steady, default=math.nan)
    targets: dict[str, dict[str, Any]] = {}

    def target(name: str, value: float, limit: float) -> None:
        targets[name] = {"value": round(value, 3), "limit": limit, "pass": bool(value <= limit)}

    target("sidecar_peak_mib", by_role[SIDECAR] / (1 << 20), TARGET_SIDECAR_MIB)
    if size_mib == 16:
        target("round_s", worst_round, TARGET_SMALL_ROUND_S)
    if size_mib >= LARGE_MIB:
        limit = TARGET_ROUND_OVER_FLOOR_TLS if tls == "enabled" else TARGET_ROUND_OVER_FLOOR
        target("round_over_floor", worst_round / floor_s, limit)
        target("trainer_peak_x_s", by_role[TRAINER] / s_bytes, TARGET_TRAINER_X[args.trainer_mode])
        target("server_peak_x_s", by_role[SERVER] / s_bytes, TARGET_SERVER_X)
        if len(sampler.rounds) >= 2:
            growth = sampler.rounds[-1].server_peak_bytes - sampler.rounds[0].server_peak_bytes
            target("server_peak_growth_x_s", growth / s_bytes, TARGET_FLAT_X)
    expected_procs = 1 + 2 * CLIENTS  # a server, and a sidecar + a trainer per client
    seen = len([k for k in peaks if k != "runtime"])
    ok = code == 0 and bool(check.get("ok")) and len(rounds_s) == args.rounds and seen == expected_procs
    return {
        "bench": "round",
        "size_mib": size_mib,
        "tensors": len(tensor_sizes(size_mib, args.tensor_mib)),
        "tensor_mib": args.tensor_mib,
        "clients": CLIENTS,
        "rounds": args.rounds,
        "trainer_mode": args.trainer_mode,
        "receive": args.receive,
        "model_source": args.model_source,
        "clip_norm": args.clip_norm,
        "chunk_mib": args.chunk_mib,
        "bulk": not args.no_bulk,
        "security_tls": tls,
        # FEDKUBE_TLS as each process got it: the spec's choice must reach the server and the sidecars.
        "tls_env": dict(sorted(tls_env.items())),
        "exit_code": code,
        "outcome": outcome.get("outcome"),
        "outcome_reason": (outcome.get("summary") or {}).get("reason") or None,
        "outcome_message": (outcome.get("summary") or {}).get("message") or None,
        "verified": check,
        "floor_4s_s": round(floor_s, 3),
        "floor_scaled": scaled,
        "round_s": [rounds_s[r] for r in sorted(rounds_s)],
        "round_source": round_source,
        "round_with_checkpoint_s": [with_ck_s[r] for r in sorted(with_ck_s)],
        "round_targets_on": "rounds 2..R" if args.rounds >= 2 else "round 1",
        "round_over_floor": [round(rounds_s[r] / floor_s, 2) for r in sorted(rounds_s)],
        "wall_s": round(wall, 2),
        "processes_sampled": f"{seen}/{expected_procs}",
        "peak_mib": {k: mib(v) for k, v in sorted(peaks.items())},
        "peak_x_s": {k: round(v / s_bytes, 3) for k, v in sorted(peaks.items())},
        "peak_by_role_mib": {k: mib(v) for k, v in by_role.items()},
        "peak_by_role_x_s": {k: round(v / s_bytes, 3) for k, v in by_role.items()},
        "cpu_user_sys_s": {k: [round(u, 1), round(s, 1)] for k, (u, s) in sorted(cpu.items())},
        "cpu_by_round_s": cpu_by_round(sampler.rounds),
        "server_at_start_mib": (
            {"peak": mib(sampler.first_round.server_peak_bytes), "rss": mib(sampler.first_round.server_rss_bytes)}
            if sampler.first_round is not None
            else None
        ),
        "server_by_round_mib": [
            {"round": m.round, "peak": mib(m.server_peak_bytes), "rss": mib(m.server_rss_bytes)} for m in sampler.rounds
        ],
        "targets": targets,
        "pass": ok and all(t["pass"] for t in targets.values()),
    }


class _workdir:
    """A temporary directory, or ``keep`` when given (left in place for inspection)."""

    def __init__(self, keep: Path | None) -> None:
        self._keep = keep
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if self._keep is not None:
            return self._keep
        self._tmp = tempfile.TemporaryDirectory(prefix="fedkube-round-bench-")
        return Path(self._tmp.name)

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, action="append", help="model size S in MiB (repeatable; default 16)")
    parser.add_argument(
        "--trainer-mode",
        choices=("inplace", "copy"),
        default="inplace",
        help="inplace: the trainer updates the received arrays; copy: it builds new ones",
    )
    parser.add_argument(
        "--receive",
        choices=("into", "fresh"),
        default="into",
        help="into: the trainer hands last round's arrays back (fk.receive(into=...)); fresh: plain fk.receive()",
    )
    parser.add_argument(
        "--model-source",
        choices=MODEL_SOURCES,
        default="file",
        help="spec.model.source: file (the server loads the .npz) or firstClient (site-0's trainer sends it)",
    )
    parser.add_argument(
        "--tensor-mib",
        type=int,
        default=ARRAY_MIB,
        help="size of the model's tensors in MiB (the server's peak grows with its largest tensor)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--chunk-mib", type=int, default=None, help="spec.transfer.chunkBytes in MiB (default: the spec's default)"
    )
    parser.add_argument(
        "--no-bulk", action="store_true", help="tensors over gRPC only (fedkube run --no-bulk), for comparing"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the job is stopped")
    parser.add_argument(
        "--floor-cap-mib",
        type=int,
        default=8192,
        help="largest floor payload measured directly (the floor's receiver holds all of it)",
    )
    parser.add_argument(
        "--tls",
        choices=sorted(TLS_CHOICES),
        default="both",
        help="spec.security.tls of the job: on (enabled), off (disabled), or both, one after the other",
    )
    parser.add_argument(
        "--clip-norm", type=float, default=None,
        help="spec.strategy.clipNorm (above the updates' norms, so the model check still holds: the pre-pass's cost)",
    )
    parser.add_argument("--keep-dir", default=None, help="keep the run directories here instead of a temp dir")
    args = parser.parse_args(argv)
    args.size_mib = args.size_mib or [16]
    for s in args.size_mib:
        if s < 1:
            parser.error(f"--size-mib {s}: must be at least 1")
    if args.tensor_mib < 1:
        parser.error(f"--tensor-mib {args.tensor_mib}: must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = False
    for size in args.size_mib:
        result = measure(size, args)
        emit(result)
        failed |= not result["pass"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
