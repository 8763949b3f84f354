"""Editing a running job (issue 14): the edit is refused visibly, the job runs on, observedGeneration tells the truth.

The emulated API runs no CEL, like an API server without the CRD's transition rules: the operator itself keeps
the job on the spec it started with (fedkube.operator.edits).
"""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest

from fedkube.operator import edits
from tests.support import fixtures
from tests.support.waiting import until
from tests.unit.operator.test_handlers import _crd, _doc, _operator, _status

kube = fixtures.kube

pytestmark = pytest.mark.timeout(60)

READY = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_an_edit_while_running_is_rejected_visibly_and_never_freezes_the_status(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    core = kubernetes.client.CoreV1Api(kube.api_client)

    def status() -> dict[str, Any]:
        return _status(custom, "edit")

    def patch(spec: dict[str, Any]) -> None:
        custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "edit", {"spec": spec})

    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _doc("edit"))
        until(lambda: status().get("phase") in ("Pending", "Deploying"), "job edit Pending or Deploying")
        started = status()
        assert started["observedGeneration"] == 1 and started["acceptedSpec"]["rounds"] == 2

        # minClients 5 on a 2-site job used to freeze the status for good; rounds 12 used to mix into it ("x/12").
        patch({"minClients": 5, "rounds": 12})
        rejected = until(lambda: _condition(status(), "SpecChangeRejected"), "a SpecChangeRejected condition")
        assert rejected["status"] == "True"
        assert "spec.minClients" in rejected["message"] and "spec.rounds" in rejected["message"]
        assert "generation 2" in rejected["message"]
        events = core.list_namespaced_event("default", field_selector="involvedObject.name=edit").items
        assert [e.type for e in events if e.reason == "SpecChangeRejected"] == ["Warning"]

        # The job runs on its old spec and its status keeps moving.
        for pod in ("edit-server", "edit-client-a", "edit-client-b"):
            core.patch_namespaced_pod_status(pod, "default", READY)
        until(lambda: status().get("clientsReady") == 2, "both clients Ready in the status")
        now = status()
        assert now["observedGeneration"] == 1 and now["rounds"] == 2 and now["roundDisplay"].endswith("/2")
        assert now["phase"] in ("Deploying", "Running"), now["phase"]

        patch({"minClients": None, "rounds": 2})  # reverted: the job runs on generation 3 again
        until(lambda: _condition(status(), "SpecChangeRejected").get("status") == "False", "the rejection cleared")
        until(lambda: status().get("observedGeneration") == 3, "observedGeneration 3")

        patch({"suspend": True})  # a field a running job may change
        until(lambda: status().get("phase") == "Suspended", "job edit Suspended")
        until(lambda: status().get("observedGeneration") == 4, "observedGeneration 4")
        assert _condition(status(), "SpecChangeRejected")["status"] == "False"


def test_effective_spec_keeps_the_accepted_fields_and_takes_suspend_and_ttl() -> None:
    accepted = {"rounds": 2, "clients": [{"name": "a"}], "suspend": False}
    status = {edits.ACCEPTED_SPEC: accepted}
    edited = {"rounds": 9, "clients": [{"name": "a"}], "suspend": True, "ttlSecondsAfterFinished": 5}
    assert edits.effective_spec(edited, status) == {"rounds": 2, "clients": [{"name": "a"}], "suspend": True,
                                                    "ttlSecondsAfterFinished": 5}
    assert edits.rejected_fields(edited, status) == ["rounds"]
    assert edits.effective_spec(edited, {}) == edited and edits.rejected_fields(edited, {}) == []
    invalid = {**status, "conditions": [{"type": "Invalid", "status": "True"}]}
    assert edits.effective_spec(edited, invalid) == edited  # a stopped, Invalid job is fixed by editing it
