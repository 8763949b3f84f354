"""Issue 12's capture test: a proxy on the path between a sidecar and its server records both planes of a whole job.

With mutual TLS (the default) nothing it records gives away the site's token, the site's name or any tensor's
bytes (the global model going down, the update coming up). The same job with ``security.tls: disabled`` shows
all three in the capture, so the test is able to see them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fedkube.trainer_sdk import FLModel
from fedkube.trainer_sdk._session import Session
from tests.integration.server.conftest import token_of
from tests.integration.sidecar.one_site import SITE, OneSite

pytestmark = pytest.mark.timeout(90)


class RecordingProxy:
    """Forwards every connection to ``upstream`` and keeps every byte it saw, both ways."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._seen: list[bytes] = []
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def captured(self) -> bytes:
        with self._lock:
            return b"".join(self._seen)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                return
            server.settimeout(None)
            with self._lock:
                self._socks += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                with self._lock:
                    self._seen.append(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


def _model() -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(7).standard_normal((300, 257)).astype(np.float32)}


def _train(session: Session, index: int, _: Any) -> None:
    model = session.receive()
    assert model.params is not None
    session.send(FLModel(params={k: v + 1 for k, v in model.params.items()}, num_examples=3))


@pytest.fixture
def capture() -> Iterator[tuple[OneSite, list[RecordingProxy]]]:
    stack, proxies = OneSite(_model, rounds=1), []
    try:
        yield stack, proxies
    finally:
        stack.close()
        for p in proxies:
            p.close()


def _run(capture: tuple[OneSite, list[RecordingProxy]], tls: bool) -> bytes:
    stack, proxies = capture

    def via(address: str) -> str:
        proxies.append(RecordingProxy(address))
        return proxies[-1].address

    stack.start(_train, "on", tls=tls, via=via)
    stack.finish()
    return b"".join(p.captured() for p in proxies)


def _secrets() -> dict[str, bytes]:
    w = _model()["w"]
    mid = w.nbytes // 2
    return {
        "token": token_of(SITE).encode(),
        "site name": SITE.encode(),
        "global model bytes": w.tobytes()[mid : mid + 64],
        "update bytes": (w + 1).tobytes()[mid : mid + 64],
    }


def test_a_capture_of_a_whole_job_over_mtls_shows_no_token_site_or_tensor(
    capture: tuple[OneSite, list[RecordingProxy]],
) -> None:
    captured = _run(capture, tls=True)
    assert len(captured) > 2 * _model()["w"].nbytes  # both tensors crossed the proxies (as ciphertext)
    leaked = [what for what, secret in _secrets().items() if secret in captured]
    assert not leaked, f"readable on the wire: {leaked}"


def test_without_tls_the_same_capture_shows_all_of_them(capture: tuple[OneSite, list[RecordingProxy]]) -> None:
    captured = _run(capture, tls=False)
    assert [what for what, secret in _secrets().items() if secret not in captured] == []
