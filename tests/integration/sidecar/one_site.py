"""A real server, a real sidecar and a trainer session of one site, in one process, for data-plane tests.

The trainer loop runs a test-given ``script`` in a thread, once per task:
``script(session, index, handed_back) -> handed_back`` (``index`` counts the
tasks from 0; what it returns is passed to the next call). A failing script
stops the server at once, so the test fails with the script's error instead
of waiting for the round deadline.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from fedkube.security.settings import TlsSettings
from fedkube.server.app import FedkubeServer
from fedkube.server.config import TransferSettings
from fedkube.sidecar.app import Sidecar
from fedkube.sidecar.config import SidecarConfig
from fedkube.spec.evaluation import Evaluation
from fedkube.trainer_sdk._session import Session
from tests.integration.server.conftest import JOB, make_config, token_of
from tests.integration.sidecar.conftest import SETTINGS
from tests.support.tls import session_pki

SITE = "site-a"

Script = Callable[[Session, int, Any], Any]


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


class OneSite:
    """Server, sidecar and a trainer loop (in a thread) of one site; ``close()`` ends them all."""

    def __init__(
        self, model: Callable[[], dict[str, np.ndarray]], rounds: int, evaluation: Evaluation | None = None
    ) -> None:
        self.model = model
        self.rounds = rounds
        self.evaluation = evaluation  # spec.evaluation of the job
        self.server: FedkubeServer | None = None
        self.sidecar: Sidecar | None = None
        self.session: Session | None = None
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None

    def start(
        self, script: Script, bulk: str = "on", handoff: bool = True, tls: bool = True,
        via: Callable[[str], str] = lambda address: address,
    ) -> OneSite:  # fmt: skip
        """``bulk``: "on" (the server's bulk port), "off" (no bulk address: gRPC) or "dead" (nothing listens);
        ``handoff``: whether the sidecar hands its server connections to the trainer (else it relays; never with
        TLS); ``tls``: mutual TLS between sidecar and server on both planes (the default, as in the product);
        ``via(address)``: the address the sidecar dials for a server address (e.g. a proxy's in front of it)."""
        config = make_config(
            (SITE,), rounds=self.rounds,
            transfer=TransferSettings(chunk_bytes=64 * 1024, chunk_timeout_s=5.0, idle_timeout_s=10.0, max_attempts=3),
            tls=tls,
        )  # fmt: skip
        config = dataclasses.replace(config, settings=dataclasses.replace(config.settings, evaluation=self.evaluation))
        self.server = FedkubeServer(dataclasses.replace(config, bulk_port=0), model_loader=self.model)
        self.server.start()
        address = {"on": via(f"127.0.0.1:{self.server.bulk_port}"), "off": "", "dead": dead_address()}[bulk]
        self.sidecar = Sidecar(SidecarConfig(
            job=JOB, site=SITE, server_address=via(f"127.0.0.1:{self.server.grpc_port}"), token=token_of(SITE),
            trainer_port=0, backoff_base_s=0.1, backoff_max_s=0.5, server_bulk_address=address,
            bulk_handoff=handoff, tls=session_pki().site_settings(SITE) if tls else TlsSettings.disabled(),
        ))  # fmt: skip
        self.sidecar.start()
        self.session = Session(f"127.0.0.1:{self.sidecar.port}", site=SITE, job=JOB, settings=SETTINGS)
        self.session.connect()
        self.thread = threading.Thread(target=self._train, args=(script,), daemon=True)
        self.thread.start()
        return self

    def finish(self, timeout_s: float = 30.0) -> None:
        """Wait for the job's end; raise the script's error, or fail unless the job succeeded."""
        assert self.server is not None and self.thread is not None
        outcome = self.server.wait(timeout_s)
        self.thread.join(10)
        if self.errors:
            raise self.errors[0]
        assert outcome is not None and outcome.success, outcome

    def _train(self, script: Script) -> None:
        assert self.session is not None
        handed_back: Any = None
        try:
            index = 0
            while self.session.is_running():
                handed_back = script(self.session, index, handed_back)
                index += 1
        except BaseException as exc:
            self.errors.append(exc)
            if self.server is not None:
                self.server.request_stop("the trainer script failed")

    def close(self) -> None:
        if self.server is not None:
            self.server.request_stop("test ended")
            self.server.wait(10)
            self.server.shutdown(grace_s=0.5)
        if self.sidecar is not None:
            self.sidecar.stop(grace=0.5)
        if self.thread is not None:
            self.thread.join(5)
        if self.session is not None:
            self.session.close()
