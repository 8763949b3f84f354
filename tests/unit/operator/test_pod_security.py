"""Hypothesis-fuzzed FLJobs under a fuzzed admin policy: what the operator would create is always "restricted".

Property: a job the spec and the policy admit builds only pods inside the Pod Security "restricted" profile,
and the only volumes its author added are of kinds the policy allows (projected sources included).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from fedkube.operator import builders
from fedkube.operator.certificates import TlsPlaceholder
from fedkube.operator.policy import AdminPolicy, parse_policy
from fedkube.spec import DEFAULT_IMAGE, SpecError, parse_job
from fedkube.spec.layout import RESERVED_VOLUME_PREFIX
from fedkube.spec.model import ALLOWED_VOLUME_KINDS
from tests.unit.operator.podsecurity import restricted_violations
from tests.unit.operator.test_fuzz import FUZZ, OWNER, manifests, valid_manifests
from tests.unit.spec.manifests import full_manifest

policies = st.builds(
    lambda prefixes, kinds, tolerations, accounts: parse_policy(
        {"allowedImagePrefixes": prefixes, "allowedVolumeKinds": kinds, "allowedTolerations": tolerations,
         "allowedServiceAccounts": accounts}),
    st.lists(st.sampled_from(["python", "registry.example:5000/team", "ghcr.io/fedkube/fedkube", "sidecar"]),
             max_size=3),
    st.lists(st.sampled_from(ALLOWED_VOLUME_KINDS), max_size=5, unique=True),
    st.lists(st.sampled_from([{"key": "nvidia.com/gpu"}, {"key": "dedicated", "value": "fl"},
                              {"operator": "Exists"}, {}]), max_size=2),
    st.lists(st.sampled_from(["reader", "default"]), max_size=2),
)

# The pod-template fields (fedkube.spec.podtemplate), mostly inside the restricted profile, the breaches people
# copy from other manifests mixed in: the spec must refuse those, and what it admits must build restricted pods.
security_contexts = st.fixed_dictionaries({}, optional={
    "runAsUser": st.sampled_from([0, 1, 1000, 65532]),
    "runAsGroup": st.sampled_from([0, 1000]),
    "runAsNonRoot": st.booleans(),
    "allowPrivilegeEscalation": st.booleans(),
    "privileged": st.booleans(),
    "readOnlyRootFilesystem": st.booleans(),
    "capabilities": st.sampled_from([{"add": ["NET_BIND_SERVICE"]}, {"add": ["SYS_ADMIN"]}, {"drop": []}, {}]),
    "seccompProfile": st.sampled_from([{"type": "RuntimeDefault"}, {"type": "Unconfined"},
                                       {"type": "Localhost", "localhostProfile": "fl.json"}]),
    "procMount": st.just("Unmasked"),
})
pod_security_contexts = st.fixed_dictionaries({}, optional={
    "fsGroup": st.sampled_from([0, 2000]),
    "supplementalGroups": st.lists(st.sampled_from([0, 3000]), max_size=2),
    "fsGroupChangePolicy": st.sampled_from(["OnRootMismatch", "Always"]),
    "sysctls": st.just([{"name": "kernel.shm_rmid_forced", "value": "1"}]),
})
init_containers = st.lists(st.fixed_dictionaries(
    {"name": st.sampled_from(["fetch", "sidecar", "prep"]),
     "image": st.sampled_from(["python:3.12", "registry.example:5000/team/tools:1", "evil.example/miner"])},
    optional={"command": st.just(["true"]), "securityContext": security_contexts,
              "envFrom": st.just([{"secretRef": {"name": "s3"}}])}), max_size=2)
template_fields = st.fixed_dictionaries({}, optional={
    "serviceAccountName": st.sampled_from(["reader", "writer"]),
    "securityContext": security_contexts,
    "podSecurityContext": pod_security_contexts,
    "initContainers": init_containers,
    "imagePullSecrets": st.just([{"name": "regcred"}]),
    "priorityClassName": st.just("fl"),
    "runtimeClassName": st.just("gvisor"),
    "affinity": st.just({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}}),
})
site_fields = st.fixed_dictionaries({}, optional={
    "image": st.sampled_from(["python:3.11", "evil.example/miner"]),
    "volumes": st.sampled_from([[{"name": "site-data", "persistentVolumeClaim": {"claimName": "d"}}],
                                [{"name": "site-creds", "secret": {"secretName": "c"}}],
                                [{"name": "root", "hostPath": {"path": "/"}}]]),
})


def _admitted_pods(data: dict[str, Any], policy: AdminPolicy) -> list[dict[str, Any]] | None:
    """The pods the operator would create for ``data`` under ``policy``, or None when it would refuse the job."""
    try:
        job = parse_job(data)
    except SpecError:
        event("refused by the spec")
        return None
    if policy.violations(job):
        event("refused by the policy")
        return None
    event("admitted")
    tokens = {c.name: "t0ken" for c in job.spec.clients}
    objs = builders.build_all(job, tokens=tokens, tls=TlsPlaceholder(), owner=OWNER)
    return [o for o in objs if o["kind"] == "Pod"]


def _check(data: dict[str, Any], policy: AdminPolicy) -> None:
    pods = _admitted_pods(data, policy)
    for pod in pods or []:
        assert restricted_violations(pod) == [], pod["metadata"]["name"]
        account = pod["spec"].get("serviceAccountName")
        assert account is None or account in policy.service_accounts, account
        assert pod["spec"]["automountServiceAccountToken"] is False
        for container in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
            # Images the job left unset are the operator's default (the admin's own choice), not checked.
            assert container["image"] == DEFAULT_IMAGE or policy.allows_image(container["image"]), container
        for vol in pod["spec"]["volumes"]:
            if vol["name"].startswith(RESERVED_VOLUME_PREFIX):
                continue  # the operator's own: its spec, tokens, work and tmp dirs, checkpoint
            [kind] = set(vol) - {"name"}
            assert kind in policy.effective_volume_kinds, vol
            for source in vol.get("projected", {}).get("sources", []):
                assert set(source) - {"downwardAPI"} <= set(policy.effective_volume_kinds), vol


@FUZZ
@example(full_manifest(), AdminPolicy())
@given(valid_manifests(), policies)
def test_admitted_valid_specs_build_only_restricted_pods(data: dict[str, Any], policy: AdminPolicy) -> None:
    _check(data, policy)


@FUZZ
@given(valid_manifests(), policies, template_fields, template_fields, site_fields)
def test_admitted_pod_template_fields_build_only_restricted_pods(
        data: dict[str, Any], policy: AdminPolicy, trainer: dict[str, Any], server: dict[str, Any],
        site: dict[str, Any]) -> None:
    data = copy.deepcopy(data)
    data["spec"]["trainer"].update(trainer)
    data["spec"].setdefault("server", {}).update(server)
    data["spec"]["clients"][0].update(site)
    _check(data, policy)


@FUZZ
@given(manifests, policies)
def test_admitted_generated_specs_build_only_restricted_pods(data: dict[str, Any], policy: AdminPolicy) -> None:
    _check(data, policy)


# --- the helper itself must catch what it claims to -----------------------------------------


def _pod() -> dict[str, Any]:
    job = parse_job(full_manifest())
    return builders.build_client_pod(job, job.spec.clients[0].name)


@pytest.mark.parametrize(("edit", "complaint"), [
    (lambda p: p["spec"].__setitem__("hostNetwork", True), "spec.hostNetwork"),
    (lambda p: p["spec"].__setitem__("hostPID", True), "spec.hostPID"),
    (lambda p: p["spec"].__setitem__("hostIPC", True), "spec.hostIPC"),
    (lambda p: p["spec"]["volumes"].append({"name": "root", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda p: p["spec"]["containers"][0]["securityContext"].__setitem__("allowPrivilegeEscalation", True),
     "allowPrivilegeEscalation"),
    (lambda p: p["spec"]["initContainers"][0]["securityContext"]["capabilities"].__setitem__("drop", []),
     "drop lacks ALL"),
    (lambda p: p["spec"]["containers"][0]["securityContext"]["capabilities"].__setitem__("add", ["SYS_ADMIN"]),
     "capabilities.add"),
    (lambda p: p["spec"]["containers"][0]["securityContext"].__setitem__("runAsNonRoot", False), "runAsNonRoot"),
    (lambda p: p["spec"]["containers"][0]["securityContext"].__setitem__("privileged", True), "privileged"),
    (lambda p: p["spec"]["containers"][0]["securityContext"].__setitem__("seccompProfile", {"type": "Unconfined"}),
     "seccompProfile"),
    (lambda p: p["spec"]["containers"][0].__setitem__("ports", [{"containerPort": 80, "hostPort": 80}]), "hostPort"),
])
def test_the_restricted_helper_catches_each_breach(edit: Any, complaint: str) -> None:
    pod = _pod()
    assert restricted_violations(pod) == []
    broken = copy.deepcopy(pod)
    edit(broken)
    assert any(complaint in v for v in restricted_violations(broken)), restricted_violations(broken)


def test_a_volume_whose_only_source_is_null_is_refused() -> None:
    # Found by the fuzzing above: `persistentVolumeClaim: null` counted as a source and built a pod volume with none.
    data = full_manifest()
    data["spec"]["trainer"]["volumes"] = [{"name": "models", "persistentVolumeClaim": None}]
    with pytest.raises(SpecError, match="exactly one source"):
        parse_job(data)
