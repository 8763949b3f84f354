"""A TLS 1.3 stream between two processes: the floor that fedkube's mTLS bulk path is compared with.

Not fedkube's protocol, fedkube's TLS: the source serves with the job server's ``ServerTls`` context (mutual TLS,
a site certificate required) and the receiver dials with :func:`fedkube.transfer.endpoints.dial` and a site's
``ClientTls``, so both negotiate what a sidecar and the server negotiate (the cipher is reported). The source
``sendall``s memoryview slices from memory; the receiver ``recv_into``s a resident buffer with xxh3 per block,
as bench/transfer.py's raw-socket pair does in plaintext. The receiver's clock runs from before the dial (TCP
and TLS handshakes included, as in a fetch) to the last byte.
"""

from __future__ import annotations

import socket
import time
from multiprocessing.connection import Connection

import numpy as np
from _common import cpu_s
from _tls import client_tls, server_tls
from transfer import _RAW_IO, _child_setup, _make_tensors


def tls_source_main(conn: Connection, size: int, serves: int, tls_dir: str) -> None:
    _child_setup()
    import xxhash

    from fedkube.transfer.endpoints import accept_tls

    tls = server_tls(tls_dir)
    view = _make_tensors(size, 1)["layer0.weight"].view(np.uint8).data.cast("B")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn.send({"port": listener.getsockname()[1], "checksum": xxhash.xxh3_64_hexdigest(view.toreadonly())})
        for _ in range(serves):
            raw, _ = listener.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with accept_tls(raw, tls) as sock:
                sock.do_handshake()
                cpu0 = cpu_s()
                for pos in range(0, size, _RAW_IO):
                    sock.sendall(view[pos : pos + _RAW_IO])
                sock.recv(1)  # the receiver has everything: closing earlier could cut the last records
                conn.send(cpu_s() - cpu0)


def tls_receiver_main(conn: Connection, port: int, size: int, tls_dir: str, site: str) -> None:
    _child_setup()
    import xxhash

    from fedkube.transfer.endpoints import dial

    tls = client_tls(tls_dir, site)
    out = np.empty(size, dtype=np.uint8)
    out.fill(0)
    view = out.data.cast("B")
    conn.recv()  # go
    start = time.perf_counter()
    cpu0 = cpu_s()
    digest = xxhash.xxh3_64()
    with dial(f"127.0.0.1:{port}", 60, tls) as sock:
        cipher = sock.cipher()
        got = 0
        while got < size:
            block_start, block_end = got, min(size, got + _RAW_IO)
            while got < block_end:
                n = sock.recv_into(view[got:block_end])
                if n == 0:
                    raise ConnectionError(f"TLS source closed after {got} of {size} bytes")
                got += n
            digest.update(view[block_start:block_end].toreadonly())
        seconds = time.perf_counter() - start
        sock.sendall(b"k")
    conn.send((seconds, cpu_s() - cpu0, digest.hexdigest(), cipher))


def model_receiver_main(
    conn: Connection, relay: str, grpc_port: int, site: str, refs: list[bytes], chunk: int, width: int
) -> None:
    """A trainer's download of the global model: the SDK's ``ModelFetch`` through its sidecar's bulk relay.

    Into preallocated resident arrays (as the streams' receivers), every tensor's checksum verified, the
    completion reported; ``width`` fetches at once (1: one tensor after another, as before issue 16).
    """
    _child_setup()
    import functools

    from fedkube.trainer_sdk import _receive
    from fedkube.trainer_sdk._link import Ids
    from fedkube.trainer_sdk._task import Task
    from fedkube.transfer import FetchSettings, insecure_channel, numpy_dtype, parallel
    from fedkube.wire.v1 import control_pb2, tensor_pb2, trainer_pb2

    _receive.run_bounded = functools.partial(parallel.run_bounded, width=width)  # type: ignore[assignment]
    task = Task(control_pb2.Task(task_id="bench", round=1, refs=[tensor_pb2.TensorRef.FromString(r) for r in refs]))
    into = {r.name: np.empty(r.shape, dtype=numpy_dtype(r.dtype)) for r in task.refs}
    for arr in into.values():
        arr.reshape(-1).view(np.uint8).fill(0)
    channel = insecure_channel(f"127.0.0.1:{grpc_port}")  # the gRPC fallback: not taken unless bulk fails
    settings = FetchSettings(chunk_timeout_s=60, idle_timeout_s=300, backoff_max_s=5, max_chunk_bytes=chunk)
    fetch = _receive.ModelFetch(channel, Ids(site=site, job="bench"), settings, handoff_ok=False)
    fetch.use_route(trainer_pb2.HelloResponse(bulk_address=relay))
    conn.recv()  # go
    start = time.perf_counter()
    got = fetch.fetch(task, into)
    seconds = time.perf_counter() - start
    if fetch.bulk_fetcher is None or any(got[name] is not arr for name, arr in into.items()):
        raise AssertionError(f"{site}: the model did not arrive over bulk into the given arrays")
    channel.close()
    conn.send({"seconds": seconds})
