"""Test helpers for the transfer integration tests: real servers with injected faults, a TCP proxy."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from fedkube.transfer import DownloadService
from fedkube.transfer.bulk import read_fetch_response
from fedkube.transfer.service import DownloadServicer
from fedkube.transfer.wire import add_download_servicer, server_options
from fedkube.wire.v1 import tensor_pb2


@dataclass
class Faults:
    """Faults a FaultyServicer injects into the first calls of Fetch.

    ``drop_calls`` calls abort with UNAVAILABLE after ``drop_after`` chunks;
    ``corrupt_calls`` calls flip a byte of their first chunk; ``stall_calls``
    calls stop before chunk ``stall_after`` until ``unstall`` is set (bounded).
    """

    drop_calls: int = 0
    drop_after: int = 2
    corrupt_calls: int = 0
    stall_calls: int = 0
    stall_after: int = 1
    unstall: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultyServicer(DownloadServicer):
    """The real DownloadServicer, with faults injected between it and the wire."""

    def __init__(self, service: DownloadService, faults: Faults) -> None:
        super().__init__(service)
        self.faults = faults

    def Fetch(self, request: tensor_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        f = self.faults
        with f.lock:
            call = f.calls
            f.calls += 1
        for index, raw in enumerate(super().Fetch(request, context)):
            if call < f.drop_calls and index == f.drop_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault: stream dropped mid-tensor")
            if call < f.stall_calls and index == f.stall_after:
                f.unstall.wait(30)
            if call < f.corrupt_calls and index == 0:
                raw = raw[:-1] + bytes([raw[-1] ^ 0xFF])
            yield raw


def start_server(servicer: object, max_workers: int = 16) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=server_options())
    add_download_servicer(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that cuts every open connection once ``cut_after`` bytes
    flowed from the server, ``cuts`` times: a real broken stream (RST), not a status."""

    def __init__(self, target_port: int, *, cut_after: int, cuts: int = 1) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._downstream_bytes = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server stopped listening: its client sees the connection closed, as without us
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if from_server:
                    cut = False
                    with self._lock:
                        self._downstream_bytes += len(data)
                        if self.cuts_left > 0 and self._downstream_bytes >= self.cut_after:
                            self.cuts_left -= 1
                            self._downstream_bytes = 0
                            cut = True
                    if cut:
                        self.cut_all()
                        return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def cut_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut_all()


class Uploads:
    """What the server does with pushed bulk uploads: read the answer to ``up-1`` into a buffer.

    The reverse path without its control stream: pass ``on_upload`` to a
    ``BulkServer``; any other upload id is refused with NOT_FOUND.
    """

    def __init__(self, ref: object, nbytes: int) -> None:
        self.ref = ref
        self.buf = memoryview(bytearray(nbytes))
        self.error: Exception | None = None
        self.done = threading.Event()
        self.sites: list[str] = []

    def on_upload(self, site: str, upload_id: str, sock: socket.socket) -> tuple[grpc.StatusCode | None, str]:
        if upload_id != "up-1":
            return grpc.StatusCode.NOT_FOUND, f"no upload {upload_id!r} is pending"
        self.sites.append(site)

        def consume() -> None:
            try:
                for _ in read_fetch_response(sock, self.ref, 0, self.buf, chunk_timeout_s=5, receiver="server"):  # type: ignore[arg-type]
                    pass
            except Exception as exc:
                self.error = exc
            finally:
                sock.close()
                self.done.set()

        threading.Thread(target=consume, daemon=True).start()
        return None, ""
