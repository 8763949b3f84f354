"""The admin policy: parsed strictly, and every way an FLJob author tries to get past it is named and refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import main
from fedkube.operator.netpol import ENV_NETWORK_POLICY, NetworkPolicyConfig
from fedkube.operator.policy import ENV_POLICY, AdminPolicy, PolicyError, parse_policy, policy_from_env
from fedkube.spec import FLJob, SpecError, parse_job


def _job(**spec: Any) -> FLJob:
    base: dict[str, Any] = {"rounds": 1, "clients": [{"name": "a"}],
                            "trainer": {"image": "registry.example.com/ml/train:1", "command": ["python", "t.py"]},
                            "server": {"image": "ghcr.io/fedkube/fedkube:1"},
                            "sidecar": {"image": "ghcr.io/fedkube/fedkube:1"}}
    for key, value in spec.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return parse_job({"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob",
                      "metadata": {"name": "j", "namespace": "team"}, "spec": base})


IMAGES = parse_policy({"allowedImagePrefixes": ["registry.example.com/ml", "ghcr.io/fedkube/fedkube"]})


@pytest.mark.parametrize("image", [
    "registry.example.com/ml/train:1", "registry.example.com/ml:2", "registry.example.com/ml@sha256:" + "a" * 64,
    "ghcr.io/fedkube/fedkube:0.1.0"])
def test_images_under_an_allowed_prefix_pass(image: str) -> None:
    assert IMAGES.violations(_job(trainer={"image": image})) == []


@pytest.mark.parametrize("image", [
    "registry.example.com/ml-evil/miner:1",  # a sibling repository sharing the prefix's first letters
    "registry.example.com/mlx",
    "evil.io/registry.example.com/ml/train:1",
    "python:3.12",
    "docker.io/library/python",
])
def test_an_image_that_only_looks_allowed_is_refused_with_path_value_and_rule(image: str) -> None:
    [problem] = IMAGES.violations(_job(trainer={"image": image}))
    assert problem.path == "spec.trainer.image"
    assert repr(image) in problem.message and "allowedImagePrefixes" in problem.message
    assert "registry.example.com/ml" in problem.message and "policy.allowedImagePrefixes" in problem.fix


@pytest.mark.parametrize(("prefix", "image", "allowed"), [
    ("registry.example.com", "registry.example.com/any/thing:1", True),
    ("registry.example.com", "registry.example.com.evil.io/x:1", False),  # a host that merely starts the same
    ("registry.example.com", "registry.example.com:5000/x:1", False),  # another registry on another port
    ("registry.example.com:5000/", "registry.example.com:5000/x", True),
    ("python", "python:3.12", True),  # a one-word prefix is an image name, and its tags belong to it
    ("python", "python@sha256:" + "a" * 64, True),
    ("python", "python:3.12/../x", False),
])
def test_a_bare_host_prefix_admits_only_that_host(prefix: str, image: str, allowed: bool) -> None:
    assert parse_policy({"allowedImagePrefixes": [prefix]}).allows_image(image) is allowed


def test_server_and_sidecar_images_are_checked_too() -> None:
    job = _job(server={"image": "evil.io/server:1"}, sidecar={"image": "evil.io/sidecar:1"})
    assert [p.path for p in IMAGES.violations(job)] == ["spec.server.image", "spec.sidecar.image"]


def test_no_prefixes_admit_any_image() -> None:
    assert AdminPolicy().violations(_job(trainer={"image": "anything:1"})) == []


def test_volume_kinds_outside_the_policy_are_refused() -> None:
    policy = parse_policy({"allowedVolumeKinds": ["emptyDir", "configMap"]})
    job = _job(trainer={"volumes": [{"name": "ok", "emptyDir": {}},
                                    {"name": "claim", "persistentVolumeClaim": {"claimName": "someone-elses"}}]},
               server={"volumes": [{"name": "creds", "secret": {"secretName": "db-password"}}]})
    problems = policy.violations(job)
    assert [p.path for p in problems] == ["spec.server.volumes[0]", "spec.trainer.volumes[1]"]
    assert "'secret'" in problems[0].message and "'claim'" in problems[1].message
    assert "allowedVolumeKinds ['emptyDir', 'configMap']" in problems[1].message


def test_a_projected_volume_cannot_smuggle_in_a_secret_the_policy_keeps_out() -> None:
    policy = parse_policy({"allowedVolumeKinds": ["projected", "configMap"]})
    job = _job(trainer={"volumes": [{"name": "mix", "projected": {"sources": [
        {"configMap": {"name": "c"}}, {"downwardAPI": {"items": []}}, {"secret": {"name": "db-password"}}]}}]})
    [problem] = policy.violations(job)
    assert problem.path == "spec.trainer.volumes[0].projected.sources[2]" and "'secret'" in problem.message


def test_by_default_every_kind_the_spec_admits_is_allowed() -> None:
    job = _job(trainer={"volumes": [{"name": "s", "secret": {"secretName": "x"}},
                                    {"name": "p", "persistentVolumeClaim": {"claimName": "data"}}]})
    assert AdminPolicy().violations(job) == []


def test_by_default_no_toleration_is_allowed_least_of_all_the_one_that_tolerates_every_taint() -> None:
    job = _job(trainer={"tolerations": [{"operator": "Exists"}]},
               clients=[{"name": "a", "tolerations": [{"key": "node-role.kubernetes.io/control-plane",
                                                       "operator": "Exists", "effect": "NoSchedule"}]}])
    problems = AdminPolicy().violations(job)
    assert [p.path for p in problems] == ["spec.trainer.tolerations[0]", "spec.clients[0].tolerations[0]"]
    assert '{"operator": "Exists"}' in problems[0].message and "(none)" in problems[0].message


def test_allowed_tolerations_match_every_field_they_give() -> None:
    policy = parse_policy({"allowedTolerations": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]})
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert policy.violations(_job(trainer={"tolerations": [gpu]})) == []
    assert policy.violations(_job(server={"tolerations": [{**gpu, "effect": "NoExecute"}]}))
    # A key-less toleration is not the GPU one: it tolerates every taint.
    assert policy.violations(_job(trainer={"tolerations": [{"operator": "Exists", "effect": "NoSchedule"}]}))


def test_check_raises_a_spec_error_naming_every_violation() -> None:
    with pytest.raises(SpecError) as err:
        IMAGES.check(_job(trainer={"image": "evil.io/x", "tolerations": [{"operator": "Exists"}]}))
    assert [p.path for p in err.value.problems] == ["spec.trainer.image", "spec.trainer.tolerations[0]"]
    assert "admin policy" in str(err.value)


@pytest.mark.parametrize(("data", "match"), [
    ({"allowedImages": []}, "unknown admin policy fields \\['allowedImages'\\]"),
    ({"allowedImagePrefixes": "ghcr.io"}, "must be a list"),
    ({"allowedImagePrefixes": [""]}, r"allowedImagePrefixes\[0\] must be a non-empty string"),
    ({"allowedImagePrefixes": ["x"] * 257}, "more than 256"),
    ({"allowedVolumeKinds": ["hostPath"]}, "never allows"),
    ({"allowedVolumeKinds": ["csi"]}, "does not admit yet"),
    ({"allowedVolumeKinds": ["nfs"]}, "not a volume kind the FLJob spec knows"),
    ({"allowedTolerations": [{"key": "a", "tolerationSeconds": 5}]}, "unknown fields"),
    ({"allowedTolerations": [{"operator": "Maybe"}]}, "Exists or Equal"),
    ({"allowedTolerations": ["nvidia.com/gpu"]}, "must be an object"),
])
def test_a_malformed_policy_is_a_clear_error(data: dict[str, Any], match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        parse_policy(data)


def test_policy_from_the_environment() -> None:
    assert policy_from_env({}) == AdminPolicy()
    text = json.dumps({"allowedImagePrefixes": ["a.io/x"], "allowedVolumeKinds": [], "allowedTolerations": []})
    assert policy_from_env({ENV_POLICY: text}).image_prefixes == ("a.io/x",)
    with pytest.raises(PolicyError, match="is not JSON"):
        policy_from_env({ENV_POLICY: "{nope"})
    with pytest.raises(PolicyError, match="more than"):
        policy_from_env({ENV_POLICY: json.dumps({"allowedImagePrefixes": ["x" * 500] * 200})})


def test_the_operator_reads_its_policy_and_network_settings_from_the_environment() -> None:
    env = {ENV_POLICY: json.dumps({"allowedImagePrefixes": ["a.io/x"]}),
           ENV_NETWORK_POLICY: json.dumps({"enabled": True}), envvars.NAMESPACE: "ops"}
    config = main.parse_config([], env)
    assert config.policy.image_prefixes == ("a.io/x",)
    assert config.network == NetworkPolicyConfig("ops")
    bare = main.parse_config([], {})
    assert bare.policy == AdminPolicy() and bare.network is None
    with pytest.raises(ConfigError, match="allowedVolumeKinds"):
        main.parse_config([], {ENV_POLICY: json.dumps({"allowedVolumeKinds": ["hostPath"]})})
