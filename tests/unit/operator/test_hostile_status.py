"""The operator reads the server's status over HTTP and its termination message: a hostile one costs nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fedkube.operator import kube as kubeops
from fedkube.operator import status as st
from fedkube.server.http import StatusServer
from fedkube.status import STATUS_LIMIT, Phase

_VALID = {"job": "job", "phase": "Running", "round": 1, "rounds": 3, "clients": [{"name": "a", "state": "Training"}]}


@pytest.fixture
def serve() -> Iterator[list[str]]:
    """A real status endpoint on 127.0.0.1 answering with whatever the test puts in the list."""
    body = [json.dumps(_VALID)]
    server = StatusServer(lambda: body[0], lambda: True)
    server.start()
    body.append(f"http://127.0.0.1:{server.port}/status")
    try:
        yield body
    finally:
        server.stop()


@pytest.mark.parametrize(
    "hostile",
    [
        "[" * 100_000,  # the stdlib parser raised RecursionError on this
        json.dumps(_VALID | {"message": "x" * STATUS_LIMIT}),
        json.dumps(_VALID | {"clients": [{"name": "a", "state": "Zombie"}]}),
        json.dumps(_VALID | {"round": -3}),
    ],
    ids=["nesting", "oversized", "unknown-state", "negative-round"],
)
def test_a_hostile_status_answer_reads_as_no_answer(serve: list[str], hostile: str) -> None:
    url = serve[1]
    assert kubeops.fetch_server_status(url, timeout=5) is not None  # the endpoint itself works
    serve[0] = hostile
    assert kubeops.fetch_server_status(url, timeout=5) is None


def test_a_hostile_termination_message_fails_the_job_clearly() -> None:
    out = st.outcome_from_server(1, "[" * 4000)  # Kubernetes keeps 4096 bytes; deep enough for the stdlib parser
    assert out.phase is Phase.FAILED and out.reason == "ServerExited" and out.summary is None
    assert "not valid JSON" in out.message and "kubectl logs" in out.message
