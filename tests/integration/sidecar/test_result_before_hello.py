"""A restarted sidecar refuses a result until the trainer said Hello again; the SDK waits for that and re-announces.

Found by the suite under load: the trainer's send() reached a freshly
restarted sidecar before the SDK's session thread had attached again, the
sidecar passed the announcement on, and the server's download then failed
because the sidecar did not know where the trainer serves its tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from fedkube.sidecar.app import Sidecar
from fedkube.trainer_sdk._session import Session
from fedkube.wire.v1 import control_pb2, trainer_pb2, trainer_pb2_grpc
from tests.integration.sidecar.conftest import JOB, SETTINGS, SITE, make_sidecar
from tests.integration.sidecar.fake_server import FakeServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sidecars(server: FakeServer) -> Iterator[list[Sidecar]]:
    started: list[Sidecar] = []
    yield started
    for sc in started:
        sc.stop(grace=0.5)


def _announcement(task_id: str) -> control_pb2.ResultAnnouncement:
    return control_pb2.ResultAnnouncement(task_id=task_id, round=1, num_examples=3)


def test_a_result_before_any_hello_is_refused_as_retryable(server: FakeServer, sidecars: list[Sidecar]) -> None:
    sc = make_sidecar(server.address)
    sc.start()
    sidecars.append(sc)
    server.wait_registered(SITE)
    with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        link = trainer_pb2_grpc.TrainerLinkStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            link.SubmitResult(trainer_pb2.SubmitResultRequest(result=_announcement("t1")), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no trainer has said Hello to this sidecar yet" in (err.value.details() or "")
    assert not server.of_kind("result", SITE)  # nothing the server could not download was passed on


def test_send_waits_for_the_new_hello_before_announcing_again(server: FakeServer, sidecars: list[Sidecar]) -> None:
    first = make_sidecar(server.address)
    first.start()
    sidecars.append(first)
    server.wait_registered(SITE)
    session = Session(f"127.0.0.1:{first.port}", site=SITE, job=JOB, settings=SETTINGS)
    session.connect()
    # Hold the session thread's re-attach until the result was refused once, forcing the order the
    # suite hit by chance: announce to the restarted sidecar first, Hello second.
    refused = threading.Event()
    reattach = session.sidecar.reattach

    def late_reattach() -> bool:
        assert refused.wait(20), "send() never reached the restarted sidecar"
        return reattach()

    session.sidecar.reattach = late_reattach  # type: ignore[method-assign]
    original_wait = session.sidecar.wait_attached_after

    def note_refusal(generation: int, timeout_s: float) -> bool:
        refused.set()
        return original_wait(generation, timeout_s)

    session.sidecar.wait_attached_after = note_refusal  # type: ignore[method-assign]
    try:
        port = first.port
        first.stop(grace=0.2)
        second = make_sidecar(server.address, trainer_port=port)
        second.start()
        sidecars.append(second)
        server.wait_registered(SITE, n=2)
        session.sender.submit(_announcement("t1"), timeout_s=10)
        assert refused.is_set()  # the first try was refused, not silently passed on
        got = server.wait_message("result", lambda r: r.task_id == "t1", timeout=10)
        assert got.num_examples == 3
        assert session.sidecar.attach_gen == 2  # announced again only after the new Hello
    finally:
        session.close()


class _StreamRemoved(grpc.RpcError):
    """What a call made on a dead sidecar's half-closed connection fails with, at once."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Stream removed (injected)"


def test_a_hello_that_fails_at_once_is_tried_again_until_the_restart_answers(
    server: FakeServer, sidecars: list[Sidecar]
) -> None:
    # Seen in the fault suite: the re-attach's Hello went out on the killed sidecar's connection before gRPC
    # noticed it was gone, failed at once instead of waiting for the restart, and the trainer never attached
    # again (its next result then waited for an attach that never came).
    first = make_sidecar(server.address)
    first.start()
    sidecars.append(first)
    server.wait_registered(SITE)
    session = Session(f"127.0.0.1:{first.port}", site=SITE, job=JOB, settings=SETTINGS)
    session.connect()
    hello = session.link.Hello
    failures = [1]

    def flaky_hello(*args: object, **kwargs: object) -> object:
        if failures:
            failures.pop()
            raise _StreamRemoved()
        return hello(*args, **kwargs)

    session.link.Hello = flaky_hello  # type: ignore[method-assign]
    try:
        port = first.port
        first.stop(grace=0.2)
        second = make_sidecar(server.address, trainer_port=port)
        second.start()
        sidecars.append(second)
        assert session.sidecar.wait_attached_after(1, 10), "the trainer never attached to the restarted sidecar"
        assert not failures  # the injected failure was met, and tried past
        session.sender.submit(_announcement("t1"), timeout_s=10)
        assert server.wait_message("result", lambda r: r.task_id == "t1", timeout=10).num_examples == 3
    finally:
        session.close()
