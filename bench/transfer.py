"""Transfer-layer benchmark: throughput vs the loopback-TCP floor, and peak memory.

    python bench/transfer.py --size-mib 1024 --receivers 2

Runs, in one invocation and each in its own process (spawn): a publisher
(DownloadService served on gRPC and on the bulk protocol), a relay, and
receivers (Fetcher into a preallocated buffer, checksum verified). With
``--transport bulk`` (the default: what fedkube's processes use) receivers
fetch over plain TCP (``fedkube.transfer.bulk``) and the relay is a
``BulkRelay``; with ``--transport grpc`` they use ``Download.Fetch`` and a
``RelayServicer``. Phases:

1. floor: the same bytes over a plain loopback socket between two processes;
2. direct: one receiver alone, one stream (per tensor) from the publisher;
3. relay: one receiver alone, through the relay process;
4. fan-out: ``--receivers`` receivers at once, direct (serve once, serve many).

``--tls on`` (the default: what fedkube's pods do) serves the bulk port with mutual TLS 1.3 (fedkube's
material and contexts, bench/_tls.py): receivers and the relay dial it with a site certificate each, and
the relay hands plaintext to its receiver (the sidecar's relay). ``--tls both`` runs every phase with TLS
and then without, each against floors measured in its own interleaved loop, and reports ``tls_over_plain``.
TLS applies to ``--transport bulk`` (gRPC TLS is measured by ``bench/round.py --tls``).

Prints one JSON line: seconds and MiB/s of each phase, their ratios to the
floor, and the peak RSS (VmHWM) of the publisher, the relay and each receiver.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_s, current_rss, emit, mib, tcp_floor_detail, vm_hwm
from _tls import client_tls, server_tls, write_material

WAIT_S = 1800.0
#: --tls choice -> the modes run, in this order.
TLS_CHOICES = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}
_TUNE_ENV = "FEDKUBE_BENCH_TUNE_ALLOCATOR"
_OPTIONS_ENV = "FEDKUBE_BENCH_GRPC_OPTIONS"


def _child_setup() -> None:
    """Per-process setup: the allocator choice (inherited from the parent's environment)."""
    if os.environ.get(_TUNE_ENV) == "1":
        from fedkube.transfer.allocator import tune_allocator

        tune_allocator()


def _make_tensors(total: int, count: int) -> dict[str, np.ndarray]:
    """``count`` uint8-backed float32 tensors summing to ``total`` bytes (a cheap, non-constant pattern)."""
    per = (total // count) // 4 * 4
    tensors = {}
    for i in range(count):
        words = np.arange(per // 4, dtype=np.uint32)
        words *= 2654435761  # Knuth's multiplicative hash: not compressible, not all zeros
        words += i
        tensors[f"layer{i}.weight"] = words.view(np.float32)
    return tensors


def _extra(frame_kib: int) -> list[tuple[str, Any]]:
    """Extra gRPC options for every server and channel: the frame size, then ``--grpc-option``s."""
    extra: list[tuple[str, Any]] = [("grpc.http2.max_frame_size", frame_kib << 10)] if frame_kib else []
    return extra + [(k, v) for k, v in json.loads(os.environ.get(_OPTIONS_ENV, "[]"))]


def _grpc_option(text: str) -> tuple[str, int | str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, int(value) if value.lstrip("-").isdigit() else value


def publisher_main(
    conn: Connection, size: int, tensors: int, receivers: list[str], chunk: int, frame_kib: int, tls_dir: str | None
) -> None:
    _child_setup()
    from fedkube.transfer import DownloadService, serve
    from fedkube.transfer.bulk import BulkServer

    baseline = current_rss()
    service = DownloadService("server", chunk_bytes=chunk)
    server, port = serve(service, max_workers=max(16, 2 * len(receivers) + 4), extra_options=_extra(frame_kib))
    bulk = BulkServer(service, tls=server_tls(tls_dir)).start()
    model = _make_tensors(size, tensors)
    txn = service.publish(model, receivers=receivers, ttl_s=WAIT_S)
    conn.send(
        {
            "port": port,
            "bulk_port": bulk.port,
            "refs": [r.to_proto().SerializeToString() for r in txn.refs],
            "baseline": baseline,
        }
    )
    # Answer CPU probes (the parent reads them around each phase) until told to finish.
    while conn.recv() == "cpu":
        conn.send(cpu_s())
    ok = txn.wait(WAIT_S)
    peak = vm_hwm() or current_rss()
    server.stop(grace=1).wait(5)
    bulk.stop()
    service.close()
    conn.send({"ok": ok, "peak": peak, "published": txn.nbytes, "failed": txn.failed_receivers})


def relay_main(conn: Connection, upstream: str, window: int, frame_kib: int, lookahead_kib: int) -> None:
    _child_setup()
    from concurrent import futures

    import grpc

    from fedkube.transfer import RelayServicer
    from fedkube.transfer.wire import channel_options, relay_channel_options, server_options

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=server_options(_extra(frame_kib)))
    if lookahead_kib:
        options = relay_channel_options([("grpc.http2.lookahead_bytes", lookahead_kib << 10), *_extra(frame_kib)])
    else:  # gRPC's default: a receive window grown by BDP probing
        options = channel_options(_extra(frame_kib))
    upstream_channel = grpc.insecure_channel(upstream, options=options)
    RelayServicer(upstream_channel, window_chunks=window).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send({"port": port, "baseline": current_rss()})
    while conn.recv() == "cpu":  # until "stop"
        conn.send(cpu_s())
    peak = vm_hwm() or current_rss()
    server.stop(grace=1).wait(5)
    conn.send({"peak": peak})


def bulk_relay_main(
    conn: Connection, upstream: str, site: str, buffer_kib: int, tls_dir: str | None, unix: bool = False
) -> None:
    _child_setup()
    from fedkube.transfer import handoff
    from fedkube.transfer.bulk import BulkRelay

    host = handoff.new_name(f"relay-{site}") if unix else "127.0.0.1"
    relay = BulkRelay(upstream, site=site, token="", host=host, buffer_bytes=buffer_kib << 10,
                      tls=client_tls(tls_dir, site))  # fmt: skip
    relay.start()
    address = handoff.UNIX_PREFIX + relay.address if unix else relay.address
    conn.send({"port": relay.port, "address": address, "baseline": current_rss()})
    while conn.recv() == "cpu":  # until "stop"
        conn.send(cpu_s())
    peak = vm_hwm() or current_rss()
    relay.stop()
    conn.send({"peak": peak})


def receiver_main(
    conn: Connection, address: str, name: str, refs: list[bytes], chunk: int, frame_kib: int, transport: str,
    tls_dir: str | None,
) -> None:
    _child_setup()
    from fedkube.transfer import Fetcher, FetchSettings, GrpcChunkSource, TensorRef, insecure_channel, numpy_dtype
    from fedkube.wire.v1 import tensor_pb2

    parsed = [TensorRef.from_proto(tensor_pb2.TensorRef.FromString(r)) for r in refs]
    # Preallocated, resident output (as the floor's receiver has): allocation is not timed.
    outs = [np.empty(r.shape, dtype=numpy_dtype(r.dtype)) for r in parsed]
    for out in outs:
        out.reshape(-1).view(np.uint8).fill(0)
    from fedkube.transfer.bulk import BulkChunkSource

    channel = insecure_channel(address, _extra(frame_kib))
    settings = FetchSettings(chunk_timeout_s=60, idle_timeout_s=300, backoff_max_s=5, max_chunk_bytes=chunk)
    source: Any = (
        BulkChunkSource(address, name, chunk_timeout_s=60, site=name if tls_dir else "", tls=client_tls(tls_dir, name))
        if transport == "bulk"
        else GrpcChunkSource(channel, name, chunk_timeout_s=60)
    )
    fetcher = Fetcher(source, settings)
    conn.recv()  # go
    start = time.perf_counter()
    cpu0 = cpu_s()
    for ref, out in zip(parsed, outs, strict=True):
        fetcher.fetch_array(ref, out)  # checksum verified inside
    elapsed = time.perf_counter() - start
    cpu = cpu_s() - cpu0
    source.complete(parsed[0].transaction_id, ok=True)
    # Spot-check content independently of the checksum (without rebuilding the model here).
    for i, out in enumerate(outs):
        words = out.reshape(-1).view(np.uint32)
        idx = np.linspace(0, words.size - 1, 1000).astype(np.uint64)
        expect = ((idx * np.uint64(2654435761) + np.uint64(i)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        assert np.array_equal(words[idx.astype(np.int64)], expect), f"{name}: wrong data in tensor {i}"
    channel.close()
    conn.send({"seconds": elapsed, "cpu_s": cpu, "peak": vm_hwm() or current_rss(), "attempts": fetcher.attempts})


# --- raw-socket prototype (--raw) -------------------------------------------------
# Not fedkube code: what the same transfers cost over a plain TCP data plane
# (sendall from the tensor's memory, recv_into the destination, xxh3 per block;
# a relay that forwards through one fixed buffer). It bounds what a bulk path
# outside gRPC-Python could reach on this machine (bench/README.md).
_RAW_IO = 4 << 20


def raw_source_main(conn: Connection, size: int, serves: int) -> None:
    _child_setup()
    import xxhash

    view = _make_tensors(size, 1)["layer0.weight"].view(np.uint8).data.cast("B")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn.send({"port": listener.getsockname()[1], "checksum": xxhash.xxh3_64_hexdigest(view.toreadonly())})
        for _ in range(serves):
            sock, _ = listener.accept()
            with sock:
                cpu0 = cpu_s()
                for pos in range(0, size, _RAW_IO):
                    sock.sendall(view[pos : pos + _RAW_IO])
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)
                conn.send(cpu_s() - cpu0)


def raw_relay_main(conn: Connection, upstream_port: int, serves: int, window: int) -> None:
    _child_setup()
    buf = memoryview(bytearray(window))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn.send(listener.getsockname()[1])
        for _ in range(serves):
            down, _ = listener.accept()
            with down, socket.create_connection(("127.0.0.1", upstream_port)) as up:
                cpu0 = cpu_s()
                while n := up.recv_into(buf):
                    down.sendall(buf[:n])
                down.shutdown(socket.SHUT_WR)
                up.sendall(down.recv(1))  # the receiver's ack travels back to the source
                conn.send(cpu_s() - cpu0)


def raw_receiver_main(conn: Connection, port: int, size: int) -> None:
    _child_setup()
    import xxhash

    out = np.empty(size, dtype=np.uint8)
    out.fill(0)
    view = out.data.cast("B")
    conn.recv()  # go
    start = time.perf_counter()
    cpu0 = cpu_s()
    digest = xxhash.xxh3_64()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        got = 0
        while got < size:
            block_start, block_end = got, min(size, got + _RAW_IO)
            while got < block_end:
                n = sock.recv_into(view[got:block_end])
                if n == 0:
                    raise ConnectionError(f"raw source closed after {got} of {size} bytes")
                got += n
            digest.update(view[block_start:block_end].toreadonly())
        sock.sendall(b"k")
        sock.recv(1)
    conn.send((time.perf_counter() - start, cpu_s() - cpu0, digest.hexdigest()))


def bare_grpc_server_main(conn: Connection, chunk: int, frame_kib: int) -> None:
    """gRPC-Python alone: a unary-stream method that yields one prebuilt ``chunk``-byte message ``count`` times."""
    _child_setup()
    from concurrent import futures

    import grpc

    from fedkube.transfer.wire import server_options

    message = os.urandom(chunk)

    def stream(count: int, context: grpc.ServicerContext) -> Any:
        for _ in range(count):
            yield message

    handler = grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=lambda raw: int(raw), response_serializer=lambda m: m
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options(_extra(frame_kib)))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bare", {"Stream": handler}),))
    conn.send(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    while conn.recv() == "cpu":  # until "stop"
        conn.send(cpu_s())
    server.stop(grace=1).wait(5)


def bare_grpc_receiver_main(conn: Connection, port: int, size: int, chunk: int, frame_kib: int) -> None:
    """Receives ``size`` bytes from :func:`bare_grpc_server_main` and drops each message (no copy, no hash)."""
    _child_setup()
    from fedkube.transfer import insecure_channel

    channel = insecure_channel(f"127.0.0.1:{port}", _extra(frame_kib))
    call = channel.unary_stream(
        "/bench.Bare/Stream", request_serializer=lambda n: str(n).encode(), response_deserializer=lambda m: m
    )
    for _ in call(2):  # connect and warm up outside the timed part
        pass
    conn.recv()  # go
    start = time.perf_counter()
    cpu0 = cpu_s()
    got = sum(len(message) for message in call(size // chunk))
    conn.send((time.perf_counter() - start, cpu_s() - cpu0, got))
    channel.close()


def _bare_grpc_phase(ctx: Any, size: int, chunk: int, repeats: int, frame_kib: int) -> dict[str, Any]:
    """Best seconds and median CPU/GiB of gRPC-Python alone moving ``size`` bytes in ``chunk`` messages."""
    gib = size / (1 << 30)
    server, server_conn = _start(ctx, bare_grpc_server_main, chunk, frame_kib)
    port = _recv(server_conn, "bare gRPC server")
    seconds: list[float] = []
    cpu: dict[str, list[float]] = {}
    for _ in range(repeats):
        receiver, conn = _start(ctx, bare_grpc_receiver_main, port, size, chunk, frame_kib)
        time.sleep(0.5)
        server_conn.send("cpu")
        server0 = float(_recv(server_conn, "bare gRPC server"))
        conn.send("go")
        elapsed, receiver_cpu, got = _recv(conn, "bare gRPC receiver")
        server_conn.send("cpu")
        server1 = float(_recv(server_conn, "bare gRPC server"))
        if got != size // chunk * chunk:
            raise AssertionError(f"bare gRPC receiver got {got} bytes, expected {size // chunk * chunk}")
        seconds.append(elapsed)
        cpu.setdefault("bare_grpc_receiver", []).append(receiver_cpu / gib)
        cpu.setdefault("bare_grpc_sender", []).append((server1 - server0) / gib)
        receiver.join(60)
    server_conn.send("stop")
    server.join(60)
    return {"seconds": seconds, "cpu": cpu}


def _raw_phase(ctx: Any, size: int, repeats: int, window: int) -> dict[str, Any]:
    """Best seconds and median CPU/GiB of the raw-socket prototype, direct and through a relay."""
    gib = size / (1 << 30)
    source, source_conn = _start(ctx, raw_source_main, size, 2 * repeats)
    info = _recv(source_conn, "raw source")
    relay, relay_conn = _start(ctx, raw_relay_main, info["port"], repeats, window)
    relay_port = _recv(relay_conn, "raw relay")
    seconds: dict[str, list[float]] = {"direct": [], "relay": []}
    cpu: dict[str, list[float]] = {}
    for _ in range(repeats):
        for phase, port in (("direct", info["port"]), ("relay", relay_port)):
            receiver, conn = _start(ctx, raw_receiver_main, port, size)
            time.sleep(0.3)
            conn.send("go")
            elapsed, receiver_cpu, checksum = _recv(conn, "raw receiver")
            if checksum != info["checksum"]:
                raise AssertionError(f"raw {phase}: checksum {checksum} != {info['checksum']}")
            seconds[phase].append(elapsed)
            cpu.setdefault(f"raw_{phase}_receiver", []).append(receiver_cpu / gib)
            cpu.setdefault(f"raw_{phase}_source", []).append(_recv(source_conn, "raw source") / gib)
            if phase == "relay":
                cpu.setdefault("raw_relay_relay", []).append(_recv(relay_conn, "raw relay") / gib)
            receiver.join(60)
    source.join(60)
    relay.join(60)
    return {"seconds": seconds, "cpu": cpu}


def _start(ctx: Any, target: Any, *args: Any) -> tuple[Any, Connection]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    return proc, parent


def _recv(conn: Connection, what: str) -> Any:
    if not conn.poll(WAIT_S):
        raise TimeoutError(f"{what} did not answer within {WAIT_S}s")
    return conn.recv()


def _run_receivers(
    ctx: Any, address: str, names: list[str], refs: list[bytes], chunk: int, frame_kib: int, transport: str,
    tls_dir: str | None,
) -> list[dict[str, Any]]:
    procs = [_start(ctx, receiver_main, address, n, refs, chunk, frame_kib, transport, tls_dir) for n in names]
    time.sleep(0.5)
    for _, conn in procs:
        conn.send("go")
    results = [_recv(conn, f"receiver {n}") for (_, conn), n in zip(procs, names, strict=True)]
    for proc, _ in procs:
        proc.join(60)
    return results


def run_mode(args: argparse.Namespace, ctx: Any, size: int, chunk: int, tls_dir: str | None) -> dict[str, Any]:
    """Every phase once, with the bulk port on mutual TLS (material in ``tls_dir``) or plaintext (None)."""
    result: dict[str, Any] = {"tls": tls_dir is not None}
    fan = [f"fan-{i}" for i in range(args.receivers)]
    singles = [f"single-{r}" for r in range(args.repeats)]
    # A BulkRelay serves one site (the pod's), so bulk relayed fetches share one receiver name.
    relay_names = ["relayed"] if args.transport == "bulk" else [f"relayed-{r}" for r in range(args.repeats)]
    relayed = [] if args.no_relay else relay_names
    pub, pub_conn = _start(
        ctx, publisher_main, size, args.tensors, singles + relayed + fan, chunk, args.frame_kib, tls_dir
    )
    info = _recv(pub_conn, "publisher")
    address = f"127.0.0.1:{info['bulk_port'] if args.transport == 'bulk' else info['port']}"
    receivers: dict[str, dict[str, Any]] = {}
    relay_address = None
    relay_conn: Connection | None = None
    if relayed and args.transport == "bulk":
        unix = args.relay_socket == "unix" or (args.relay_socket == "auto" and tls_dir is not None)
        relay, relay_conn = _start(ctx, bulk_relay_main, address, "relayed", args.relay_buffer_kib, tls_dir, unix)
    elif relayed:
        relay, relay_conn = _start(ctx, relay_main, address, args.window, args.frame_kib, args.relay_lookahead_kib)
    if relay_conn is not None:
        relay_info = _recv(relay_conn, "relay")
        relay_address = relay_info.get("address") or f"127.0.0.1:{relay_info['port']}"
        result["relay_address"] = relay_address.split(":", 1)[0]
        result["relay_baseline_mib"] = mib(relay_info["baseline"])

    gib = size / (1 << 30)
    cpu_per_gib: dict[str, list[float]] = {}

    def probe(conn: Connection | None) -> float:
        if conn is None:
            return 0.0
        conn.send("cpu")
        return float(_recv(conn, "cpu probe"))

    def fetch(addr: str, names: list[str], phase: str) -> list[dict[str, Any]]:
        relay_conn_now = relay_conn if phase == "relay" else None
        pub0, relay0 = probe(pub_conn), probe(relay_conn_now)
        # Through the relay the receiver is the trainer: plaintext on the pod-local hop.
        runs = _run_receivers(ctx, addr, names, info["refs"], chunk, args.frame_kib, args.transport,
                              None if phase == "relay" else tls_dir)
        pub1, relay1 = probe(pub_conn), probe(relay_conn_now)
        # CPU seconds per GiB moved, per process role (getrusage: every thread of the process).
        moved = gib * len(names)
        cpu_per_gib.setdefault(f"{phase}_receiver", []).extend(r["cpu_s"] / gib for r in runs)
        cpu_per_gib.setdefault(f"{phase}_publisher", []).append((pub1 - pub0) / moved)
        if relay_conn_now is not None:
            cpu_per_gib.setdefault("relay_relay", []).append((relay1 - relay0) / moved)
        for label, r in zip(names, runs, strict=True):
            receivers[label] = {
                "peak_mib": mib(r["peak"]),
                "seconds": round(r["seconds"], 3),
                "attempts": r["attempts"],
            }
        return runs

    # The machine may be shared: interleave floor and fetches, and keep the best of each.
    floors: list[float] = []
    floor_cpu: list[tuple[float, float]] = []
    direct: list[float] = []
    via_relay: list[float] = []
    for r in range(args.repeats):
        if not args.no_floor:
            seconds, receiver_cpu, sender_cpu = tcp_floor_detail(size)
            floors.append(seconds)
            floor_cpu.append((receiver_cpu / gib, sender_cpu / gib))
        direct.append(fetch(address, [singles[r]], "direct")[0]["seconds"])
        if relay_address is not None:
            via_relay.append(fetch(relay_address, [relayed[r % len(relayed)]], "relay")[0]["seconds"])
    floor_s = min(floors) if floors else None
    if floor_s is not None:
        result["floor_s"] = round(floor_s, 3)
        result["floor_mib_s"] = round(size / floor_s / (1 << 20))
        result["floor_runs_s"] = [round(x, 3) for x in floors]

    def record(phase: str, seconds: float, streams: int, runs: list[float]) -> None:
        result[f"{phase}_s"] = round(seconds, 3)
        result[f"{phase}_mib_s"] = round(streams * size / seconds / (1 << 20))
        result[f"{phase}_runs_s"] = [round(x, 3) for x in runs]
        if floor_s is not None:
            # Aggregate bytes/s over the floor's bytes/s.
            result[f"{phase}_ratio"] = round(streams * floor_s / seconds, 3)

    record("direct", min(direct), 1, direct)
    if relay_address is not None and relay_conn is not None:
        record("relay", min(via_relay), 1, via_relay)
        relay_conn.send("stop")
        result["relay_peak_mib"] = mib(_recv(relay_conn, "relay")["peak"])
        relay.join(60)
    if fan:
        fan_seconds = [r["seconds"] for r in fetch(address, fan, "fanout")]
        record("fanout", max(fan_seconds), len(fan), fan_seconds)
    if args.bare_grpc:
        bare = _bare_grpc_phase(ctx, size, chunk, args.repeats, args.frame_kib)
        cpu_per_gib.update(bare["cpu"])
        record("bare_grpc", min(bare["seconds"]), 1, bare["seconds"])
    if args.raw:
        raw = _raw_phase(ctx, size, args.repeats, args.window * chunk)
        cpu_per_gib.update(raw["cpu"])
        for phase, runs in raw["seconds"].items():
            record(f"raw_{phase}", min(runs), 1, runs)
    if floor_cpu:
        cpu_per_gib["floor_receiver"] = [c[0] for c in floor_cpu]
        cpu_per_gib["floor_sender"] = [c[1] for c in floor_cpu]
    # Median over runs: CPU per GiB is what load distorts least (bench/README.md).
    result["cpu_s_per_gib"] = {k: round(sorted(v)[len(v) // 2], 3) for k, v in sorted(cpu_per_gib.items())}
    pub_conn.send("finish")
    final = _recv(pub_conn, "publisher")
    pub.join(60)
    result["all_verified"] = bool(final["ok"]) and not final["failed"]
    result["publisher_peak_mib"] = mib(final["peak"])
    result["publisher_baseline_mib"] = mib(info["baseline"])
    result["publisher_peak_over_published"] = round(final["peak"] / final["published"], 3)
    result["receiver_peaks"] = receivers
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="published bytes, in MiB")
    parser.add_argument("--tensors", type=int, default=1, help="split the bytes into this many tensors")
    parser.add_argument("--receivers", type=int, default=2, help="concurrent receivers in the fan-out phase")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="chunk size asked by receivers and served")
    parser.add_argument("--window", type=int, default=4, help="relay window, in chunks")
    parser.add_argument("--frame-kib", type=int, default=0, help="HTTP/2 max frame size to advertise (0: default)")
    parser.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: every fedkube process calls fedkube.transfer.allocator.tune_allocator() (the recommended setup)",
    )
    parser.add_argument(
        "--relay-lookahead-kib",
        type=int,
        default=4096,
        help="fixed HTTP/2 receive window upstream of the relay (relay_channel_options); 0: gRPC's BDP-grown window",
    )
    parser.add_argument("--repeats", type=int, default=3, help="floor/direct/relay rounds; the best of each is kept")
    parser.add_argument(
        "--grpc-option",
        type=_grpc_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra gRPC option for every server and channel (repeatable; integers are passed as ints)",
    )
    parser.add_argument(
        "--transport",
        choices=["bulk", "grpc"],
        default="bulk",
        help="bulk: plain-TCP data plane (what fedkube's processes use); grpc: Download.Fetch and RelayServicer",
    )
    parser.add_argument(
        "--relay-buffer-kib", type=int, default=1024, help="the BulkRelay's one buffer per connection (bulk transport)"
    )
    parser.add_argument(
        "--tls", choices=sorted(TLS_CHOICES), default="on",
        help="mutual TLS on the bulk port: on (fedkube's default), off, or both, one after the other",
    )  # fmt: skip
    parser.add_argument(
        "--relay-socket", choices=["auto", "tcp", "unix"], default="auto",
        help="the bulk relay's pod-local leg: auto (what the sidecar does: an abstract Unix socket with TLS, "
             "127.0.0.1 TCP without), tcp or unix",
    )  # fmt: skip
    parser.add_argument("--no-relay", action="store_true")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument(
        "--bare-grpc",
        action="store_true",
        help="also time gRPC-Python alone (prebuilt messages, receiver drops them): the ceiling of any gRPC design",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="also run the raw-socket prototype (no gRPC): what a plain TCP data plane costs, direct and relayed",
    )
    args = parser.parse_args()
    if args.transport == "grpc" and args.tls != "off":
        parser.error("--tls applies to --transport bulk; with --transport grpc pass --tls off (bench/round.py --tls "
                     "measures gRPC with TLS)")

    os.environ[_TUNE_ENV] = "1" if args.allocator == "tuned" else "0"
    os.environ[_OPTIONS_ENV] = json.dumps(args.grpc_option)
    size = args.size_mib << 20
    chunk = args.chunk_kib << 10
    ctx = mp.get_context("spawn")
    result: dict[str, Any] = {
        "size_mib": args.size_mib,
        "tensors": args.tensors,
        "receivers": args.receivers,
        "chunk_kib": args.chunk_kib,
        "window": args.window,
        "repeats": args.repeats,
        "frame_kib": args.frame_kib,
        "allocator": args.allocator,
        "relay_lookahead_kib": args.relay_lookahead_kib,
        "grpc_options": dict(args.grpc_option),
        "transport": args.transport,
        "relay_buffer_kib": args.relay_buffer_kib,
        "cpus": os.cpu_count(),
        "tls_modes": TLS_CHOICES[args.tls],
    }
    tls_dir = tempfile.mkdtemp(prefix="fedkube-bench-tls-")
    names = [f"single-{r}" for r in range(args.repeats)] + ["relayed"] + [f"fan-{i}" for i in range(args.receivers)]
    write_material(Path(tls_dir), names)
    try:
        modes = {mode: run_mode(args, ctx, size, chunk, tls_dir if mode == "on" else None)
                 for mode in TLS_CHOICES[args.tls]}  # fmt: skip
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)
    if len(modes) == 1:
        result.update(next(iter(modes.values())))
    else:
        result["modes"] = modes
        # Each mode's ratio is against its own floors; their quotient is what TLS costs in throughput.
        on, off = modes["on"], modes["off"]
        result["tls_over_plain"] = {
            key: round(on[key] / off[key], 3) for key in ("direct_ratio", "relay_ratio", "fanout_ratio")
            if key in on and key in off
        }  # fmt: skip
        result["tls_cpu_s_per_gib"] = {m: r["cpu_s_per_gib"] for m, r in modes.items()}
    emit(result)


if __name__ == "__main__":
    main()
