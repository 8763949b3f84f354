"""Refused children are visible (issue 14): a quota's 403 shows as FailedCreate and a Warning Event, then clears."""

from __future__ import annotations

from typing import Any

import kopf
import kubernetes
import pytest

from fedkube.operator import handlers
from fedkube.operator import status as lifecycle
from tests.support import fixtures
from tests.support.kopfrun import running_operator
from tests.support.kubeapi import ApiError, KubeAPI
from tests.support.waiting import until
from tests.unit.operator.test_handlers import _crd, _doc, _Labelled, _status

kube = fixtures.kube

pytestmark = pytest.mark.timeout(60)

QUOTA = ('pods "{name}" is forbidden: exceeded quota: compute-resources, requested: limits.cpu=1, '
         "used: limits.cpu=4, limited: limits.cpu=4")


class _Quota:
    """Admission that refuses every pod as an exhausted ResourceQuota does, counting the attempts."""

    def __init__(self) -> None:
        self.refused = 0

    def __call__(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "Pod":
            self.refused += 1
            name = obj["metadata"]["name"]
            raise ApiError(403, "Forbidden", QUOTA.format(name=name), {"name": name, "kind": "pods"})


def _admission(k: fixtures.KubeHandle, hook: Any) -> None:
    # One attribute store: atomic, so the API's thread sees the old or the new hook, never half of one.
    api: KubeAPI | None = k.cluster.api
    assert api is not None
    api.admission = hook


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_a_refused_pod_shows_the_api_servers_message_and_the_job_proceeds_once_allowed(
    kube: fixtures.KubeHandle,
) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    core = kubernetes.client.CoreV1Api(kube.api_client)
    memo = kopf.Memo()
    memo[handlers.Memo.API_CLIENT] = kube.api_client
    memo[handlers.Memo.RETRY_DELAY] = 0.1
    memo[handlers.Memo.MAX_RETRY_DELAY] = 0.4  # the backoff grows, but the test need not wait for it
    quota = _Quota()
    _admission(kube, quota)
    with running_operator(kube.url, handlers.register(kopf.OperatorRegistry(), interval=0.2), memo=memo):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _doc("quota"))
        refused = until(lambda: _condition(_status(custom, "quota"), "FailedCreate"), "a FailedCreate condition")
        assert refused["status"] == "True" and refused["reason"] == "FailedCreate"
        # The object the quota refused, and the API server's own words.
        assert "Pod default/quota-server" in refused["message"], refused
        assert "exceeded quota: compute-resources" in refused["message"] and "403" in refused["message"]

        def warnings() -> list[Any]:
            return [e for e in core.list_namespaced_event("default", field_selector="involvedObject.name=quota").items
                    if e.reason == "FailedCreate"]

        event = until(warnings, "a FailedCreate Event")[0]
        assert event.type == "Warning" and "exceeded quota: compute-resources" in event.message
        assert "quota-server" in event.message
        # Retried (with backoff), and the same refusal is reported once, not at every retry.
        until(lambda: quota.refused >= 3, "two retries of the refused create")
        assert len(warnings()) == 1

        _admission(kube, None)  # the quota was raised
        until(lambda: len(_Labelled(kube).job_pods("default", "quota")) == 3, "the 3 pods of job quota")
        cleared = until(lambda: (c := _condition(_status(custom, "quota"), "FailedCreate")).get("status") == "False"
                        and c, "FailedCreate False")
        assert cleared["reason"] == "Created"
        assert _status(custom, "quota").get("phase") in ("Pending", "Deploying")


def test_failed_create_reports_a_refusal_once_and_clears_after_success() -> None:
    fields, events = lifecycle.failed_create({}, "Pod ns/p: quota", 1.0)
    assert [(e.type, e.reason) for e in events] == [("Warning", "FailedCreate")]
    again, repeated = lifecycle.failed_create(fields, "Pod ns/p: quota", 2.0)
    assert repeated == [] and again["conditions"][0]["lastTransitionTime"] == fields["conditions"][0][
        "lastTransitionTime"]
    _, changed = lifecycle.failed_create(fields, "Pod ns/q: webhook said no", 3.0)
    assert [e.message for e in changed] == ["Pod ns/q: webhook said no"]
    assert lifecycle.create_succeeded({}, 4.0) == {}
    cleared = lifecycle.create_succeeded(fields, 4.0)["conditions"][0]
    assert (cleared["status"], cleared["reason"]) == ("False", "Created")
