"""Entry points run as separate processes by test_processes.py.

publisher: publishes a seeded model, prints {"port", "refs"} as one JSON line,
exits 0 once every receiver finished (LESSONS.md 1: exit only after the download),
3 if the TTL expired first. relay: serves a RelayServicer, prints {"port"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent import futures

import grpc
import numpy as np

from fedkube.transfer import DownloadService, RelayServicer, serve
from fedkube.transfer.wire import relay_channel_options, server_options


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((700, 300)).astype(np.float32),
        "b": rng.standard_normal(300).astype(np.float16),
        "steps": np.array([seed], dtype=np.int64),
    }


def publisher(seed: int, receivers: list[str], ttl_s: float) -> int:
    service = DownloadService("site-p", chunk_bytes=64 << 10)
    server, port = serve(service, max_workers=8)
    txn = service.publish(model(seed), receivers=receivers, ttl_s=ttl_s)
    refs = [r.to_proto().SerializeToString().hex() for r in txn.refs]
    print(json.dumps({"port": port, "refs": refs}), flush=True)
    finished = txn.wait(timeout=ttl_s + 5)
    server.stop(grace=1).wait(5)
    service.close()
    return 0 if finished else 3


def relay(upstream: str) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=server_options())
    upstream_channel = grpc.insecure_channel(upstream, options=relay_channel_options())
    RelayServicer(upstream_channel, window_chunks=4).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    # Run until the parent closes our stdin (or kills us).
    sys.stdin.read()
    server.stop(grace=1).wait(5)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["publisher", "relay"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--receivers", default="c1")
    parser.add_argument("--ttl", type=float, default=30)
    parser.add_argument("--upstream", default="")
    args = parser.parse_args()
    if args.role == "publisher":
        return publisher(args.seed, args.receivers.split(","), args.ttl)
    return relay(args.upstream)


if __name__ == "__main__":
    sys.exit(main())
