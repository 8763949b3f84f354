"""Run a kopf operator against the emulated API, in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import kopf

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def running_operator(
    url: str,
    registry: kopf.OperatorRegistry,
    *,
    namespaces: tuple[str, ...] = (),
    settings: kopf.OperatorSettings | None = None,
    memo: Any = None,
    ready_timeout: float = 15.0,
    stop_timeout: float = 15.0,
) -> Iterator[threading.Thread]:
    """Run ``kopf.operator`` with ``registry`` against ``url`` until the block ends.

    Cluster-wide unless ``namespaces`` is given; standalone (no peering).
    A login handler pointing at ``url`` is added to ``registry``. Raises when
    the operator does not become ready in time or fails while running.
    """

    @kopf.on.login(registry=registry)
    def _login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    # Ours, so that its executor (kopf runs sync handlers there and never shuts it down) can be shut down below:
    # its idle threads would outlive the operator and the test otherwise.
    own_settings = settings if settings is not None else kopf.OperatorSettings()
    ready = threading.Event()
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(kopf.operator(
                registry=registry, settings=own_settings, standalone=True, memo=memo,
                clusterwide=not namespaces, namespaces=list(namespaces),
                ready_flag=ready, stop_flag=stop,
            ))
        except BaseException as e:  # surfaced to the test thread below
            failure.append(e)
            ready.set()
        finally:
            loop.close()
            own_settings.execution.executor.shutdown(wait=True)

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    if not ready.wait(ready_timeout):
        stop.set()
        raise RuntimeError(f"kopf did not become ready within {ready_timeout} s against {url}")
    if failure:
        raise RuntimeError("kopf failed to start") from failure[0]
    try:
        yield thread
    finally:
        stop.set()
        thread.join(stop_timeout)
        if thread.is_alive():
            raise RuntimeError(f"kopf did not stop within {stop_timeout} s")
        if failure:
            raise RuntimeError("kopf failed while running") from failure[0]
