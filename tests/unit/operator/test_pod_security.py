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
from fedkube.spec import SpecError, parse_job
from fedkube.spec.layout import RESERVED_VOLUME_PREFIX
from fedkube.spec.model import ALLOWED_VOLUME_KINDS
from tests.unit.operator.podsecurity import restricted_violations
from tests.unit.operator.test_fuzz import FUZZ, OWNER, manifests, valid_manifests
from tests.unit.spec.manifests import full_manifest

policies = st.builds(
    lambda prefixes, kinds, tolerations: parse_policy(
        {"allowedImagePrefixes": prefixes, "allowedVolumeKinds": kinds, "allowedTolerations": tolerations}),
    st.lists(st.sampled_from(["python", "registry.example:5000/team", "ghcr.io/fedkube/fedkube", "sidecar"]),
             max_size=3),
    st.lists(st.sampled_from(ALLOWED_VOLUME_KINDS), max_size=5, unique=True),
    st.lists(st.sampled_from([{"key": "nvidia.com/gpu"}, {"key": "dedicated", "value": "fl"},
                              {"operator": "Exists"}, {}]), max_size=2),
)


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
