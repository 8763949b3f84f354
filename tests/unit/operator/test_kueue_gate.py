"""A pod Kueue holds behind its scheduling gate is queued, not failing: no pending or deploy timeout fires for it."""

from __future__ import annotations

from typing import Any

from fedkube.operator import views

CREATED = "2030-01-01T00:00:00Z"
T0 = views.parse_time(CREATED) or 0.0
HOUR = 3600.0


def _pod(*, scheduled: dict[str, Any], managed: bool) -> dict[str, Any]:
    labels = {"kueue.x-k8s.io/managed": "true"} if managed else {}
    return {"metadata": {"name": "j-client-a", "creationTimestamp": CREATED, "labels": labels},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", **scheduled}]}}


GATED = {"status": "False", "reason": "SchedulingGated", "message": "Scheduling is blocked due to non-empty gates"}


def test_a_gated_pod_never_times_out_however_long_it_queues() -> None:
    for managed in (True, False):  # a gate is a gate, whoever set it
        view = views.pod_view(_pod(scheduled=GATED, managed=managed), "trainer")
        assert view.gated and view.phase == views.POD_PENDING
        assert views.timeout_failure(view, T0 + 10 * HOUR, deploy_seconds=60, pending_seconds=20) is None


def test_a_kueue_pod_deploys_from_its_admission_not_from_its_creation() -> None:
    admitted = {"status": "True", "lastTransitionTime": "2030-01-01T02:00:00Z"}  # two hours in the queue
    view = views.pod_view(_pod(scheduled=admitted, managed=True), "trainer")
    assert not view.gated and view.queued and view.scheduled_at == T0 + 2 * HOUR
    assert views.timeout_failure(view, T0 + 2 * HOUR + 30, deploy_seconds=60, pending_seconds=20) is None
    late = views.timeout_failure(view, T0 + 2 * HOUR + 61, deploy_seconds=60, pending_seconds=20)
    assert late is not None and late.reason == "DeployTimeout"
    # Without Kueue the deploy time still counts from creation.
    plain = views.pod_view(_pod(scheduled=admitted, managed=False), "trainer")
    failure = views.timeout_failure(plain, T0 + 2 * HOUR + 30, deploy_seconds=60, pending_seconds=20)
    assert failure is not None and failure.reason == "DeployTimeout"


def test_an_unschedulable_pod_still_times_out_pending() -> None:
    unschedulable = {"status": "False", "reason": "Unschedulable", "message": "0/3 nodes have a GPU"}
    view = views.pod_view(_pod(scheduled=unschedulable, managed=True), "trainer")
    failure = views.timeout_failure(view, T0 + 21, deploy_seconds=60, pending_seconds=20)
    assert failure is not None and failure.reason == "PendingTimeout" and "0/3 nodes" in failure.message
