"""Shared benchmark helpers: the loopback-TCP floor and peak-RSS measurement.

Benchmarks report ratios against a floor measured in the same run on the same
machine, never absolute wall-clock targets. ``tcp_floor`` is that floor for
moving bytes between two processes: a plain socket on loopback, the sender
writing from memory, the receiver reading into a preallocated buffer of the
full size (what a tensor receiver must do too).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import psutil

_SEND_BLOCK = 64 << 20  # the sender repeats one 64 MiB block (keeps the floor's memory small)
_IO_BYTES = 4 << 20


def vm_hwm(pid: int | str = "self") -> int | None:
    """Peak resident set size (VmHWM) of a process in bytes, from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss(pid: int | None = None) -> int:
    """Resident set size now, in bytes."""
    return int(psutil.Process(pid or os.getpid()).memory_info().rss)


class PeakRss:
    """Peak RSS of a process: psutil sampling, combined with /proc VmHWM where available.

    Usage::

        with PeakRss(pid) as peak:
            ...
        print(peak.peak_bytes)

    VmHWM is exact but only readable while the process lives; sampling (every
    ``interval_s``) covers other platforms and processes that exit first.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.05) -> None:
        self.pid = pid or os.getpid()
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peak-rss-{self.pid}", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error, OSError):
            self.peak_bytes = max(self.peak_bytes, current_rss(self.pid), vm_hwm(self.pid) or 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        self._sample()
        return self.peak_bytes

    def __enter__(self) -> PeakRss:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cpu_s() -> float:
    """CPU seconds (user + system) this process used so far, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _floor_receiver(conn: Connection, nbytes: int) -> None:
    buf = bytearray(nbytes)  # zero-filled: its pages are resident before timing starts
    view = memoryview(buf)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn.send(listener.getsockname()[1])
        sock, _ = listener.accept()
        with sock:
            start = time.perf_counter()
            cpu0 = cpu_s()
            got = 0
            while got < nbytes:
                n = sock.recv_into(view[got : got + _IO_BYTES])
                if n == 0:
                    raise ConnectionError(f"floor sender closed after {got} of {nbytes} bytes")
                got += n
            elapsed = time.perf_counter() - start
            cpu = cpu_s() - cpu0
            sock.sendall(b"k")
    conn.send((elapsed, cpu))


def _floor_sender(conn: Connection, port: int, nbytes: int) -> None:
    block = memoryview(bytes(range(256)) * (_SEND_BLOCK // 256))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        cpu0 = cpu_s()
        sent = 0
        while sent < nbytes:
            n = min(nbytes - sent, len(block))
            sock.sendall(block[:n])
            sent += n
        sock.recv(1)
        conn.send(cpu_s() - cpu0)


def tcp_floor(nbytes: int, repeats: int = 1) -> float:
    """Seconds to move ``nbytes`` over loopback TCP between two fresh processes (best of ``repeats``)."""
    return tcp_floor_detail(nbytes, repeats)[0]


def tcp_floor_detail(nbytes: int, repeats: int = 1) -> tuple[float, float, float]:
    """(seconds, receiver CPU seconds, sender CPU seconds) of the fastest of ``repeats`` floor runs."""
    ctx = mp.get_context("spawn")
    best = (float("inf"), 0.0, 0.0)
    for _ in range(repeats):
        parent, child = ctx.Pipe()
        receiver = ctx.Process(target=_floor_receiver, args=(child, nbytes))
        receiver.start()
        if not parent.poll(120):
            raise TimeoutError("floor receiver did not start")
        port = parent.recv()
        sender_parent, sender_child = ctx.Pipe()
        sender = ctx.Process(target=_floor_sender, args=(sender_child, port, nbytes))
        sender.start()
        if not parent.poll(600):
            raise TimeoutError("floor transfer did not finish in 600 s")
        elapsed, receiver_cpu = parent.recv()
        sender_cpu = float(sender_parent.recv()) if sender_parent.poll(60) else float("nan")
        if elapsed < best[0]:
            best = (float(elapsed), float(receiver_cpu), sender_cpu)
        sender.join(60)
        receiver.join(60)
    return best


def mib(nbytes: float) -> float:
    return round(nbytes / (1 << 20), 1)


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's one JSON line."""
    import json

    print(json.dumps(result, sort_keys=True), flush=True)
