"""The upload direction for bench/latency.py: the server pulls a site's result over the reverse path.

The server cannot dial a site, so a result travels as fedkube.server.reverse describes: for each tensor the
server's ``Downloader`` sends an ``UploadRequest`` down the site's control stream, the sidecar's ``Pusher``
dials the server's bulk port with the request's id (TCP, TLS, request and status: the link's round trips) and
pumps the trainer's bulk answer up. Here, as in production, except:

* the control stream is a TCP connection carrying length-prefixed ``ServerMessage``s (the ``UploadRequest``s
  and ``CancelUpload``s the server's fetcher sends), dialed by the site through the same link proxy: what the
  server asks reaches the site half a round trip later, as on the gRPC control stream;
* the server's sink receives each tensor in place into a preallocated array (``ReceivesInPlace``): the transfer
  is measured, not the fold (bench/round.py measures whole rounds);
* the trainer's result is published in the site's process (a ``DownloadService`` and a pod-local
  ``BulkServer``, what the SDK's ``send()`` runs) next to the sidecar's ``Pusher``, which takes its bulk
  route (the one a TLS server hop always takes; plaintext jobs may hand the socket to the trainer instead).

Every tensor is verified against its checksum by the server's fetcher, as in a round.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from _tls import client_tls, server_tls
from transfer import WAIT_S, _child_setup, _make_tensors

_LEN = struct.Struct("<I")


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            return None
        data += piece
    return bytes(data)


class _InPlace:
    """A sink that receives every tensor into its own preallocated, resident array and keeps nothing else."""

    def __init__(self, refs: list[Any]) -> None:
        self.arrays = {r.name: np.zeros(r.nbytes, np.uint8) for r in refs}  # zeros: touched, no faults on receive

    def target(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.arrays[name]

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        return True

    def discard(self, client: str) -> Any:
        return None


class _Measured(_InPlace):
    """``_InPlace`` behind the clipping pre-pass (``--clip``): every result's update norm is measured first.

    A ``MeasuresFirst`` (fedkube.server.prepass) against a global model of zeros with a bound of 1: the server's
    ``Downloader`` pulls each tensor twice, first through a ``FiniteCheck`` that sums ``‖x - g‖²`` and looks for
    NaN/Inf, then into its array, as a round with ``clipNorm`` does for a site it pre-passes.
    """

    measures_first = True

    def __init__(self, refs: list[Any]) -> None:
        super().__init__(refs)
        self.refs = refs
        self._zeros = {(r.dtype, r.nbytes): np.zeros(r.nbytes // np.dtype(r.dtype).itemsize, r.dtype) for r in refs}

    def prepasses(self, client: str, site: str) -> bool:
        return True

    def norm_check(self, client: str, name: str, dtype: str, shape: tuple[int, ...], *,
                   scratch: tuple[np.ndarray, np.ndarray] | None = None) -> Any:  # fmt: skip
        from fedkube.server.accumulator import FiniteCheck

        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        mask, widened = scratch if scratch is not None else (None, None)
        return FiniteCheck(np.dtype(dtype), nbytes, mask=mask, widened=widened, reference=self._zeros[(dtype, nbytes)])

    def prescale(self, client: str, checks: Any) -> float:
        if not all(checks[r.name].complete and checks[r.name].finite for r in self.refs):
            raise AssertionError(f"{client}: a tensor was not measured whole or is not finite")
        return min(1.0, 1.0 / max(math.sqrt(sum(checks[r.name].sq for r in self.refs)), 1e-30))


def upload_server_main(conn: Connection, tls_dir: str | None, width: int, clip: bool = False) -> None:
    """The server's side: bulk port, control listener, and one ``Downloader`` pull per ``("pull", ...)``."""
    _child_setup()
    from fedkube.server.downloads import Download, Downloader
    from fedkube.server.reverse import ClaimRefused, UploadBroker
    from fedkube.transfer.bulk import BulkServer
    from fedkube.transfer.fetch import FetchSettings
    from fedkube.transfer.refs import TensorRef
    from fedkube.wire.v1 import tensor_pb2

    broker = UploadBroker()

    def on_upload(site: str, upload_id: str, sock: socket.socket) -> tuple[Any, str]:
        try:
            broker.claim(site, upload_id, sock)
        except ClaimRefused as exc:
            return exc.code, exc.message
        return None, ""

    bulk = BulkServer(None, on_upload=on_upload, tls=server_tls(tls_dir), name="bench bulk").start()
    control = socket.create_server(("127.0.0.1", 0))
    conn.send({"bulk_port": bulk.port, "control_port": control.getsockname()[1]})
    fetch = FetchSettings(chunk_timeout_s=60.0, idle_timeout_s=120.0, max_attempts=3, max_chunk_bytes=4 << 20)
    while True:
        msg = conn.recv()
        if msg == "finish":
            break
        _, site, raw_refs = msg
        refs = [TensorRef.from_proto(tensor_pb2.TensorRef.FromString(b)) for b in raw_refs]
        sink = _Measured(refs) if clip else _InPlace(refs)
        ctl, _ = control.accept()  # the site dialed it through the proxy before the parent sent "pull"
        ctl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lock = threading.Lock()

        def send(to: str, message: Any, ctl: socket.socket = ctl, lock: threading.Lock = lock) -> bool:
            data = message.SerializeToString()
            with lock:
                ctl.sendall(_LEN.pack(len(data)) + data)
            return True

        widths = {"width": width} if width else {}  # 0: the Downloader's own default
        downloader = Downloader("bench", broker, send, fetch, clock=time.monotonic, **widths)
        done = threading.Event()
        outcome: list[Any] = []

        def finished(d: Any, ok: bool, reason: str, message: str, done: threading.Event = done,
                     outcome: list[Any] = outcome) -> None:  # fmt: skip
            outcome.append((ok, reason, message))
            done.set()

        dl = Download(site=site, task_id="t1", key=f"{site}#1", num_examples=1, metrics={},
                      bytes_total=sum(r.nbytes for r in refs), started=time.monotonic())  # fmt: skip
        t0 = time.perf_counter()
        downloader.start(1, dl, refs, sink, {site: None}, finished)
        done.wait(WAIT_S)
        seconds = time.perf_counter() - t0
        ctl.close()
        ok, reason, message = outcome[0] if outcome else (False, "Timeout", "no outcome")
        conn.send({"seconds": seconds, "ok": ok, "error": f"{reason}: {message}" if not ok else "",
                   "bytes": dl.bytes_pulled})  # fmt: skip
    bulk.stop()
    control.close()


def upload_site_main(conn: Connection, size: int, tensors: int, site: str, control: str, bulk: str,
                     tls_dir: str | None, clip: bool = False) -> None:  # fmt: skip
    """The site's side: the trainer's published result and the sidecar's ``Pusher`` behind ``control``/``bulk``."""
    _child_setup()
    import grpc

    from fedkube.protocol import SERVER
    from fedkube.sidecar.reverse import Pusher
    from fedkube.transfer import DownloadService
    from fedkube.transfer.bulk import BulkServer
    from fedkube.wire.v1 import control_pb2

    service = DownloadService(site)
    trainer = BulkServer(service, name="bench trainer").start()
    result = _make_tensors(size, tensors)
    if clip:  # finite values (sign and top exponent bit cleared), so the pre-pass measures every element
        for array in result.values():
            array.view(np.uint32)[:] &= 0x3FFFFFFF
    txn = service.publish(result, receivers=[SERVER], ttl_s=WAIT_S)
    unused = grpc.insecure_channel("127.0.0.1:9")  # the gRPC push fallback: never taken while bulk works
    pusher = Pusher(unused, site=site, trainer_channel=lambda: None, relayed=lambda ref, end: None,
                    bulk_address=bulk, token="", trainer_bulk=lambda: f"127.0.0.1:{trainer.port}",
                    tls=client_tls(tls_dir, site))  # fmt: skip
    host, port = control.rsplit(":", 1)
    ctl = socket.create_connection((host, int(port)))
    ctl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.send({"refs": [r.to_proto().SerializeToString() for r in txn.refs]})
    while True:
        head = _recv_exact(ctl, _LEN.size)
        if head is None:
            break  # the server closed the control stream: its pull is over
        body = _recv_exact(ctl, _LEN.unpack(head)[0])
        if body is None:
            break
        msg = control_pb2.ServerMessage.FromString(body)
        kind = msg.WhichOneof("msg")
        if kind == "upload":
            pusher.request(msg.upload)
        elif kind == "cancel_upload":
            pusher.cancel(msg.cancel_upload.request_id)
    pusher.shutdown()
    ctl.close()
    trainer.stop()
    service.close()
    unused.close()
    conn.send("done")
