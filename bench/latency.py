"""fedkube over a link with latency: a download's throughput at added RTTs against plain TCP on the same link.

    python bench/latency.py --size-mib 256 --rtt-ms 0 --rtt-ms 20 --rtt-ms 100

A remote site reaches the server across a WAN. Here the WAN is the fault suite's link proxy
(``tests.faults.support.TcpProxy`` with ``delay_s`` = RTT/2 each way and at most ``--in-flight-mib`` on the way
per direction: the path's bandwidth-delay capacity, which bounds any TCP stream on it). For each RTT, S bytes
cross it twice over, interleaved, best of ``--repeats``:

* ``plain``: one TCP stream (sendall from memory, recv_into a resident buffer, xxh3 per block: bench/transfer.py's
  raw-socket pair) through the proxy: the most any protocol gets from this link;
* ``tls``: what a remote site does to download the global model: the server's bulk port on mutual TLS 1.3
  (a ``DownloadService`` + ``BulkServer``), the site's sidecar (a ``BulkRelay`` with its site certificate) dialing
  it through the proxy, and the trainer fetching from the sidecar's pod-local port into a preallocated buffer,
  checksum verified (bench/transfer.py's publisher, relay and receiver processes);
* ``plaintext``: the same with ``security.tls: disabled``, which separates what latency costs from what TLS
  costs on this CPU.

Prints one JSON line: per RTT the best seconds and MiB/s of each, and ``fedkube_<mode>_over_plain_tcp`` (ratio;
the goal of issue 16 is >= 0.85 at 1 GiB). The proxy runs in this process (threads), the others each in their
own (spawn). The upload direction and a whole round behind the proxy are not measured here.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit
from _tls import write_material
from transfer import (
    _recv,
    _run_receivers,
    _start,
    bulk_relay_main,
    publisher_main,
    raw_receiver_main,
    raw_source_main,
)

#: How the server's bulk port runs: mutual TLS (fedkube's default) and plaintext (``security.tls: disabled``).
MODES = ("tls", "plaintext")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per transfer, in MiB")
    parser.add_argument("--rtt-ms", type=float, action="append", help="added round-trip time (repeatable)")
    parser.add_argument("--repeats", type=int, default=2, help="transfers of each kind per RTT; the best is kept")
    parser.add_argument("--in-flight-mib", type=int, default=8, help="bytes the link holds per direction")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="chunk size asked by the trainer")
    args = parser.parse_args()
    rtts = args.rtt_ms or [0.0, 20.0, 100.0]
    size, chunk = args.size_mib << 20, args.chunk_kib << 10

    from tests.faults.support import TcpProxy

    ctx = mp.get_context("spawn")
    tls_dir = tempfile.mkdtemp(prefix="fedkube-bench-latency-")
    serves = len(rtts) * args.repeats
    # One site per download (its own sidecar relay and certificate): a transaction is released once every
    # receiver completed, and a relay serves only its own site.
    names = {mode: [f"{mode}-site-{i}" for i in range(serves)] for mode in MODES}
    write_material(Path(tls_dir), names["tls"])
    publishers = {mode: _start(ctx, publisher_main, size, 1, names[mode], chunk, 0, tls_dir if mode == "tls" else None)
                  for mode in MODES}  # fmt: skip
    infos = {mode: _recv(conn, f"{mode} publisher") for mode, (_, conn) in publishers.items()}
    raw, raw_conn = _start(ctx, raw_source_main, size, serves)
    raw_info = _recv(raw_conn, "raw source")
    result: dict[str, Any] = {"size_mib": args.size_mib, "in_flight_mib": args.in_flight_mib,
                              "repeats": args.repeats, "cpus": os.cpu_count(), "rtt": {}}  # fmt: skip
    with open("/proc/loadavg") as f:
        result["load_before"] = f.read().split()[:3]
    try:
        for rtt in rtts:
            link = {"delay_s": rtt / 2000, "in_flight_bytes": args.in_flight_mib << 20}
            to_raw = TcpProxy(("127.0.0.1", raw_info["port"]), name=f"raw-{rtt}", **link).start()
            to_server = {mode: TcpProxy(("127.0.0.1", infos[mode]["bulk_port"]), name=f"{mode}-{rtt}", **link).start()
                         for mode in MODES}  # fmt: skip
            runs: dict[str, list[float]] = {"plain_tcp": [], **{mode: [] for mode in MODES}}
            try:
                for _ in range(args.repeats):  # interleaved: the box is shared
                    receiver, conn = _start(ctx, raw_receiver_main, to_raw.port, size)
                    time.sleep(0.3)
                    conn.send("go")
                    seconds, _, checksum = _recv(conn, "raw receiver")
                    _recv(raw_conn, "raw source")  # its CPU seconds: not reported here
                    receiver.join(60)
                    if checksum != raw_info["checksum"]:
                        raise AssertionError(f"plain TCP at {rtt} ms: checksum {checksum} != {raw_info['checksum']}")
                    runs["plain_tcp"].append(seconds)
                    for mode in MODES:
                        site = names[mode].pop()
                        relay, relay_conn = _start(ctx, bulk_relay_main, to_server[mode].address, site, 1024,
                                                   tls_dir if mode == "tls" else None)  # fmt: skip
                        port = _recv(relay_conn, "relay")["port"]
                        got = _run_receivers(ctx, f"127.0.0.1:{port}", [site], infos[mode]["refs"], chunk, 0, "bulk",
                                             None)  # fmt: skip
                        runs[mode].append(got[0]["seconds"])
                        relay_conn.send("stop")
                        _recv(relay_conn, "relay")
                        relay.join(60)
            finally:
                to_raw.close()
                for proxy in to_server.values():
                    proxy.close()
            best = {kind: min(times) for kind, times in runs.items()}
            result["rtt"][f"{rtt:g}ms"] = {
                **{f"{kind}_s": round(b, 3) for kind, b in best.items()},
                **{f"{kind}_mib_s": round(size / b / (1 << 20)) for kind, b in best.items()},
                **{f"fedkube_{mode}_over_plain_tcp": round(best["plain_tcp"] / best[mode], 3) for mode in MODES},
                "runs_s": {kind: [round(x, 3) for x in times] for kind, times in runs.items()},
            }
    finally:
        finals = {}
        for mode, (proc, conn) in publishers.items():
            conn.send("finish")
            finals[mode] = _recv(conn, f"{mode} publisher")
            proc.join(60)
        raw.join(60)
        shutil.rmtree(tls_dir, ignore_errors=True)
    result["all_verified"] = all(bool(f["ok"]) and not f["failed"] for f in finals.values())
    with open("/proc/loadavg") as f:
        result["load_after"] = f.read().split()[:3]
    emit(result)


if __name__ == "__main__":
    main()
