"""The operator against the emulated API, attacked by an FLJob author: the admin policy holds on every path to a pod.

Also: with NetworkPolicies on, the operator creates the job's pair before its pods.
"""

from __future__ import annotations

from typing import Any

import kopf
import kubernetes
import pytest

from fedkube.operator import handlers
from fedkube.operator.netpol import NetworkPolicyConfig
from fedkube.operator.policy import parse_policy
from tests.support import fixtures
from tests.support.kopfrun import running_operator
from tests.support.waiting import until
from tests.unit.operator.test_handlers import _crd, _doc, _Labelled, _status

kube = fixtures.kube

pytestmark = pytest.mark.timeout(60)

POLICY = parse_policy({"allowedImagePrefixes": ["registry.example.com/ml", "ghcr.io/fedkube/fedkube"]})
GOOD = "registry.example.com/ml/train:1"
EVIL = "registry.example.com/ml-evil/miner:1"


def _operator(k: fixtures.KubeHandle, *, network: NetworkPolicyConfig | None = None) -> Any:
    registry = handlers.register(kopf.OperatorRegistry(), interval=0.2)
    memo = kopf.Memo()
    memo[handlers.Memo.API_CLIENT] = k.api_client
    memo[handlers.Memo.POLICY] = POLICY
    memo[handlers.Memo.NETWORK] = network
    return running_operator(k.url, registry, memo=memo)


def _trainer(image: str) -> dict[str, Any]:
    return {"image": image, "command": ["python", "train.py"]}


def _invalid(custom: Any, name: str) -> dict[str, Any]:
    until(lambda: _status(custom, name).get("phase") == "Failed", f"job {name} Failed")
    return {c["type"]: c for c in _status(custom, name)["conditions"]}["Invalid"]


def _rejected(custom: Any, name: str) -> dict[str, Any]:
    """The SpecChangeRejected condition, once True: an edit of a live job's spec is refused (issue 14)."""
    return until(lambda: next((c for c in _status(custom, name).get("conditions") or []
                               if c["type"] == "SpecChangeRejected" and c["status"] == "True"), None),
                 f"job {name}'s edit rejected")


def test_a_job_outside_the_policy_is_invalid_and_gets_no_pods(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    core = kubernetes.client.CoreV1Api(kube.api_client)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("miner", trainer=_trainer(EVIL)))
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("gpu", trainer={**_trainer(GOOD),
                                                                    "tolerations": [{"operator": "Exists"}]}))
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("fine", trainer=_trainer(GOOD)))
        message = _invalid(custom, "miner")["message"]
        assert "spec.trainer.image" in message and EVIL in message and "allowedImagePrefixes" in message
        message = _invalid(custom, "gpu")["message"]
        assert "spec.trainer.tolerations[0]" in message and "allowedTolerations" in message
        until(lambda: len(api.job_pods("default", "fine")) == 3, "the 3 pods of job fine")
        assert api.job_pods("default", "miner") == [] and api.job_pods("default", "gpu") == []
        assert core.list_namespaced_secret("default", label_selector="fedkube.dev/job=miner").items == []
        until(lambda: any(e.reason == "InvalidSpec" and EVIL in e.message for e in core.list_namespaced_event(
            "default", field_selector="involvedObject.name=miner").items), "an InvalidSpec event for job miner")


def test_suspend_edit_resume_cannot_slip_an_image_past_the_policy(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("swap", trainer=_trainer(GOOD)))
        until(lambda: len(api.job_pods("default", "swap")) == 3, "the 3 pods of job swap")
        custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "swap",
                                              {"spec": {"suspend": True}})
        until(lambda: _status(custom, "swap").get("phase") == "Suspended", "job swap Suspended")
        until(lambda: api.job_pods("default", "swap") == [], "the pods of job swap deleted")
        custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "swap",
                                              {"spec": {"trainer": _trainer(EVIL)}})
        custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "swap",
                                              {"spec": {"suspend": False}})
        # The edit is refused (the spec a job started with stays its spec): resumed pods run the admitted image.
        until(lambda: len(api.job_pods("default", "swap")) == 3, "the 3 pods of job swap again")
        assert "spec.trainer" in _rejected(custom, "swap")["message"]
        images = {c["image"] for p in api.job_pods("default", "swap") for c in p["spec"]["containers"]}
        assert EVIL not in images and GOOD in images


def test_a_lost_server_pod_is_not_recreated_from_an_edited_image(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    core = kubernetes.client.CoreV1Api(kube.api_client)
    with _operator(kube):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("edit", trainer=_trainer(GOOD)))
        until(lambda: len(api.job_pods("default", "edit")) == 3, "the 3 pods of job edit")
        until(lambda: _status(custom, "edit").get("phase") in ("Pending", "Deploying"), "job edit under way")
        custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "edit",
                                              {"spec": {"server": {"image": "evil.io/server:1"}}})
        first = next(p for p in api.job_pods("default", "edit") if p["metadata"]["name"] == "edit-server")
        core.delete_namespaced_pod("edit-server", "default")
        assert "spec.server" in _rejected(custom, "edit")["message"]
        until(lambda: any(p["metadata"]["name"] == "edit-server" and p["metadata"]["uid"] != first["metadata"]["uid"]
                          for p in api.job_pods("default", "edit")), "the server pod of job edit recreated")
        images = [c.image for p in core.list_namespaced_pod("default").items for c in p.spec.containers]
        assert "evil.io/server:1" not in images


def test_the_operator_creates_the_jobs_network_policies(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    net = kubernetes.client.NetworkingV1Api(kube.api_client)
    with _operator(kube, network=NetworkPolicyConfig("fedkube-system")):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("fenced", trainer=_trainer(GOOD)))
        until(lambda: len(api.job_pods("default", "fenced")) == 3, "the 3 pods of job fenced")
        policies = {p.metadata.name: p for p in net.list_namespaced_network_policy("default").items}
        assert set(policies) == {"fenced-server", "fenced-clients"}
        assert all(p.metadata.owner_references[0].name == "fenced" for p in policies.values())
        custom.delete_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "fenced")
        until(lambda: net.list_namespaced_network_policy("default").items == [],
              "the NetworkPolicies of job fenced gone with it")
