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
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
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
