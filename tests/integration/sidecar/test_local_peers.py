"""The sidecar's trainer port (gRPC on 127.0.0.1) serves only processes of the pod's user, and counts the others."""

from __future__ import annotations

import grpc
import pytest

from fedkube.sidecar.app import Sidecar
from fedkube.transfer import peercred
from fedkube.wire.v1 import trainer_pb2, trainer_pb2_grpc
from tests.integration.sidecar.conftest import JOB, SITE

pytestmark = pytest.mark.timeout(60)


def test_a_trainer_link_call_from_another_user_is_denied_and_counted(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    metric = "fedkube_sidecar_rejected_local_connections_total"
    labels = {"fljob": JOB, "site": SITE, "reason": peercred.PEER_UID_MISMATCH}
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        link = trainer_pb2_grpc.TrainerLinkStub(channel)
        request = trainer_pb2.NextTaskRequest(wait_ms=0)
        link.NextTask(request, timeout=5)  # this process's user: served
        # The sidecar now runs as "another user" than the caller: what a process of another uid meets.
        monkeypatch.setattr(peercred.os, "geteuid", lambda: 4242)
        with pytest.raises(grpc.RpcError) as info:
            link.NextTask(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert peercred.PEER_UID_MISMATCH in (info.value.details() or "")
    assert sidecar.registry.get_sample_value(metric, labels) == 1
