"""What an HTTP/2 per-connection stream cap does to a real gRPC client (docs/networking.md, "Streams per connection").

The job server could advertise ``SETTINGS_MAX_CONCURRENT_STREAMS`` (``grpc.max_concurrent_streams``). gRFC A6
says a client transparently retries a stream the server refused with ``REFUSED_STREAM``; this measures whether
grpcio does so for calls above the cap, in two cases:

* ``burst``: ``--burst`` unary calls at once on one connection to handlers that hold each for ``--hold-s``,
  on a fresh connection and on one that already answered a call (so the server's SETTINGS are known);
* ``abandoned``: calls the client cancels while their handlers keep running (a handler that does not notice
  its cancellation), ``--abandon`` of them in batches of 8, then 8 quick calls on the same connection.

Prints one JSON line: each case's outcome counts (``OK`` or the status code) per ``--repeats`` connections.
Not a timed benchmark: it answers a yes/no question with counts.

    python bench/stream_cap.py --cap 32 --burst 100
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from concurrent import futures

import grpc


def _server(cap: int, workers: int, hold_s: float) -> tuple[grpc.Server, int]:
    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(hold_s)  # ignores cancellation, like a handler blocked elsewhere
        return b"ok"

    def quick(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"ok"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), maximum_concurrent_rpcs=workers,
                         options=[("grpc.max_concurrent_streams", cap)])  # fmt: skip
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Cap", {
        "Slow": grpc.unary_unary_rpc_method_handler(slow), "Quick": grpc.unary_unary_rpc_method_handler(quick),
    })])  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _outcome(call: grpc.Future) -> str:
    try:
        call.result()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _channel(port: int) -> grpc.Channel:
    # A connection of its own per channel (equal channel arguments would share one).
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def burst(port: int, n: int, repeats: int, *, warm: bool) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for _ in range(repeats):
        with _channel(port) as channel:
            if warm:
                channel.unary_unary("/bench.Cap/Quick")(b"", timeout=5)
            slow = channel.unary_unary("/bench.Cap/Slow")
            calls = [slow.future(b"", timeout=30) for _ in range(n)]
            counts.update(_outcome(c) for c in calls)
        time.sleep(0.2)
    return dict(counts)


def abandoned(port: int, n: int, repeats: int, hold_s: float) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for _ in range(repeats):
        with _channel(port) as channel:
            channel.unary_unary("/bench.Cap/Quick")(b"", timeout=5)
            slow = channel.unary_unary("/bench.Cap/Slow")
            for _ in range(n // 8):
                batch = [slow.future(b"", timeout=30) for _ in range(8)]
                time.sleep(0.02)
                for call in batch:
                    call.cancel()
            quick = channel.unary_unary("/bench.Cap/Quick")
            counts.update(_outcome(quick.future(b"", timeout=5)) for _ in range(8))
        time.sleep(hold_s + 0.5)  # the abandoned handlers end, so the next repeat finds the server's workers free
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=32, help="the server's grpc.max_concurrent_streams")
    parser.add_argument("--burst", type=int, default=100, help="calls at once in the burst case")
    parser.add_argument("--abandon", type=int, default=48, help="cancelled calls whose handlers keep running")
    parser.add_argument("--hold-s", type=float, default=0.2, help="how long each slow handler runs")
    parser.add_argument("--repeats", type=int, default=5, help="connections per case")
    args = parser.parse_args()
    workers = max(args.burst, args.abandon) + 16
    server, port = _server(args.cap, workers, args.hold_s)
    try:
        result = {
            "grpcio": grpc.__version__, "cap": args.cap, "burst": args.burst, "abandon": args.abandon,
            "hold_s": args.hold_s, "repeats": args.repeats,
            "burst_fresh_connection": burst(port, args.burst, args.repeats, warm=False),
            "burst_after_a_round_trip": burst(port, args.burst, args.repeats, warm=True),
            "quick_calls_after_abandoned": abandoned(port, args.abandon, args.repeats, args.hold_s),
        }  # fmt: skip
    finally:
        server.stop(0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
