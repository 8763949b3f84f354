"""Pod-template fields, job pod defaults, label propagation and Kueue pod groups, as the rendered pods show them."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from fedkube.errors import ConfigError
from fedkube.operator import builders, podspec
from fedkube.operator.certificates import TlsPlaceholder
from fedkube.operator.podspec import PodDefaults, parse_defaults
from fedkube.operator.policy import parse_policy
from fedkube.spec import DEFAULT_IMAGE, SpecError, parse_job
from fedkube.spec.model import Resources
from tests.unit.operator.kvalidate import K8S_VERSIONS, assert_valid
from tests.unit.operator.podsecurity import restricted_violations
from tests.unit.spec.manifests import full_manifest

UID = "0b6c1d4e-1111-2222-3333-444455556666"
OWNER = {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "mnist", "uid": UID}}
AFFINITY = {
    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["eu-1", "eu-2"]}]}]}},
    "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                           "labelSelector": {"matchLabels": {"fedkube.dev/job": "mnist"}}}}]},
}
FETCH = {"name": "fetch-data", "image": "registry.example/tools:1", "command": ["sh", "-c", "cp -r /src /data"],
         "env": [{"name": "BUCKET", "value": "b"}], "envFrom": [{"secretRef": {"name": "s3"}}],
         "resources": {"limits": {"memory": "256Mi"}}, "volumeMounts": [{"name": "data", "mountPath": "/data"}],
         "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": True}}
DEFAULTS = PodDefaults(image="mirror.example/fedkube:1", image_pull_secrets=("mirror-cred",),
                       server_resources=Resources(requests={"cpu": "250m", "memory": "512Mi"}),
                       copy_labels=("team", "fedkube.dev/role"))


def _manifest() -> dict[str, Any]:
    """The full manifest with every pod-template field on the trainer, the server and site-b."""
    data = full_manifest()
    data["metadata"]["uid"] = UID
    data["metadata"]["labels"] = {"team": "vision", "fedkube.dev/role": "spoof", "app.kubernetes.io/name": "x",
                                  "kueue.x-k8s.io/pod-group-name": "other"}
    data["metadata"]["annotations"] = {"owner": "ana", "kubectl.kubernetes.io/last-applied-configuration": "{}",
                                       "prometheus.io/port": "1"}
    spec = data["spec"]
    spec["trainer"].update({
        "serviceAccountName": "dataset-reader", "imagePullSecrets": [{"name": "team-cred"}], "affinity": AFFINITY,
        "priorityClassName": "fl-high", "runtimeClassName": "gvisor", "schedulerName": "volcano",
        "envFrom": [{"configMapRef": {"name": "hparams"}, "prefix": "HP_"}], "initContainers": [copy.deepcopy(FETCH)],
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "capabilities": {"add": ["NET_BIND_SERVICE"]}},
        "podSecurityContext": {"fsGroup": 2000, "supplementalGroups": [3000]},
    })
    spec["server"].update({"priorityClassName": "fl-server", "serviceAccountName": "model-reader"})
    spec["clients"][1].update({
        "image": "registry.example/mnist-trainer:gpu", "serviceAccountName": "site-b-reader",
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "site-b-data"}},
                    {"name": "extra", "emptyDir": {}}],
        "volumeMounts": [{"name": "extra", "mountPath": "/extra"}],
        "initContainers": [],
    })
    return data


def _pods(data: dict[str, Any], defaults: PodDefaults | None = None) -> dict[str, dict[str, Any]]:
    job = parse_job(data)
    objs = builders.build_all(job, tokens={c.name: "t" for c in job.spec.clients}, tls=TlsPlaceholder(),
                              owner=OWNER, defaults=defaults)
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == "Pod"}


def test_template_fields_reach_every_client_pod_under_fedkubes_own() -> None:
    pods = _pods(_manifest(), DEFAULTS)
    a, b = pods["mnist-client-site-a"]["spec"], pods["mnist-client-site-b"]["spec"]
    assert a["serviceAccountName"] == "dataset-reader" and b["serviceAccountName"] == "site-b-reader"
    assert a["automountServiceAccountToken"] is False and a["restartPolicy"] == "Never"
    assert a["imagePullSecrets"] == [{"name": "mirror-cred"}, {"name": "team-cred"}]
    assert a["affinity"] == AFFINITY
    assert (a["priorityClassName"], a["runtimeClassName"], a["schedulerName"]) == ("fl-high", "gvisor", "volcano")
    [trainer] = a["containers"]
    assert trainer["envFrom"] == [{"configMapRef": {"name": "hparams"}, "prefix": "HP_"}]
    assert trainer["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}, "seccompProfile": {"type": "RuntimeDefault"},
        "runAsUser": 1000, "runAsGroup": 1000}
    assert a["securityContext"]["fsGroup"] == 2000 and a["securityContext"]["supplementalGroups"] == [3000]
    assert a["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    # The user's init container runs before the sidecar, so the data is there before the site registers.
    assert [c["name"] for c in a["initContainers"]] == ["fetch-data", "sidecar"]
    fetch = a["initContainers"][0]
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3"}}] and fetch["securityContext"]["runAsUser"] == 1000
    assert fetch["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert a["initContainers"][1]["image"] == "mirror.example/fedkube:1"
    # site-b: its own image, its initContainers: [] removes the trainer's, its data volume replaces the trainer's.
    assert b["containers"][0]["image"] == "registry.example/mnist-trainer:gpu"
    assert a["containers"][0]["image"] == "registry.example/mnist-trainer:1.2"
    assert [c["name"] for c in b["initContainers"]] == ["sidecar"]
    volumes = {v["name"]: v for v in b["volumes"]}
    assert volumes["data"] == {"name": "data", "persistentVolumeClaim": {"claimName": "site-b-data"}}
    assert "extra" in volumes and {"name": "extra", "mountPath": "/extra"} in b["containers"][0]["volumeMounts"]
    server = pods["mnist-server"]["spec"]
    assert server["priorityClassName"] == "fl-server" and server["serviceAccountName"] == "model-reader"
    assert server["containers"][0]["image"] == "mirror.example/fedkube:1"
    assert server["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert "affinity" not in server and server["imagePullSecrets"] == [{"name": "mirror-cred"}]
    for pod in pods.values():
        assert restricted_violations(pod) == [], pod["metadata"]["name"]
        for version in K8S_VERSIONS:
            assert_valid(pod, version)


def test_job_labels_and_annotations_reach_pods_except_reserved_prefixes() -> None:
    for name, pod in _pods(_manifest()).items():
        # By default no label of the FLJob: its author could otherwise label the pods into another Service.
        assert "team" not in pod["metadata"]["labels"] and pod["metadata"]["annotations"]["owner"] == "ana", name
    for name, pod in _pods(_manifest(), DEFAULTS).items():  # copyLabels: [team, fedkube.dev/role]
        labels, notes = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels["team"] == "vision" and notes["owner"] == "ana", name
        assert labels["fedkube.dev/role"] in ("server", "client") and labels["app.kubernetes.io/name"] == "fedkube"
        assert "kueue.x-k8s.io/pod-group-name" not in labels  # no queue: no pod group, and the copy is not taken
        assert "kubectl.kubernetes.io/last-applied-configuration" not in notes
        assert notes["prometheus.io/port"] != "1"  # fedkube's own annotation wins
    job = parse_job(_manifest())
    spec_cm = builders.build_spec_configmap(job)
    assert "last-applied" not in spec_cm["data"]["job.json"]
    assert "annotations" not in json.loads(spec_cm["data"]["job.json"]).get("metadata", {})
    # Other children are not labelled by the job's author: a Service or Secret is selected by its labels.
    secret = builders.build_server_tokens_secret(job, tokens={c.name: "t" for c in job.spec.clients})
    assert "team" not in secret["metadata"]["labels"]


@pytest.mark.parametrize("how", ["spec", "label"])
def test_a_queued_job_makes_every_pod_one_kueue_group_counting_all_its_pods(how: str) -> None:
    data = _manifest()
    if how == "spec":
        data["spec"]["queueName"] = "gpu-queue"
    else:
        data["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "gpu-queue"
    pods = _pods(data)
    assert len(pods) == 4 == podspec.pod_count(parse_job(data))  # the server and three sites
    for pod in pods.values():
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "mnist-0b6c1d"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "4"
        # fedkube never gates its pods itself: Kueue's webhook adds (and removes) its own gate.
        assert "schedulingGates" not in pod["spec"]


def test_queue_name_and_queue_label_must_agree() -> None:
    data = _manifest()
    data["spec"]["queueName"] = "a"
    data["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "b"
    with pytest.raises(SpecError, match=r"spec\.queueName"):
        parse_job(data)


@pytest.mark.parametrize(("context", "complaint"), [
    ({"privileged": True}, "privileged is outside the Pod Security restricted profile"),
    ({"runAsUser": 0}, "runAsUser: 0 is root"),
    ({"runAsNonRoot": False}, "runAsNonRoot: false is outside"),
    ({"allowPrivilegeEscalation": True}, "allowPrivilegeEscalation: true is outside"),
    ({"capabilities": {"add": ["SYS_ADMIN"]}}, "capabilities.add ['SYS_ADMIN'] is outside"),
    ({"capabilities": {"drop": []}}, "fedkube drops ALL capabilities itself"),
    ({"seccompProfile": {"type": "Unconfined"}}, "'Unconfined' is outside"),
    ({"seLinuxOptions": {"type": "spc_t"}}, "seLinuxOptions is outside"),
])
@pytest.mark.parametrize("where", ["trainer", "init", "site"])
def test_security_contexts_outside_the_restricted_profile_are_refused_by_name(
        context: dict[str, Any], complaint: str, where: str) -> None:
    data = _manifest()
    if where == "trainer":
        data["spec"]["trainer"]["securityContext"] = context
    elif where == "init":
        data["spec"]["trainer"]["initContainers"][0]["securityContext"] = context
    else:
        data["spec"]["clients"][0]["securityContext"] = context
    with pytest.raises(SpecError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        parse_job(data)


def test_pod_security_context_refuses_root_group() -> None:
    data = _manifest()
    data["spec"]["trainer"]["podSecurityContext"] = {"fsGroup": 0}
    with pytest.raises(SpecError, match="fsGroup: 0 is root"):
        parse_job(data)


@pytest.mark.parametrize(("edit", "path"), [
    (lambda t: t["initContainers"][0].__setitem__("name", "sidecar"), "spec.trainer.initContainers[0].name"),
    (lambda t: t["initContainers"].append(copy.deepcopy(FETCH)), "spec.trainer.initContainers[1].name"),
    (lambda t: t["initContainers"][0]["volumeMounts"].append({"name": "ghost", "mountPath": "/g"}),
     "spec.trainer.initContainers[0].volumeMounts[1].name"),
    (lambda t: t["initContainers"][0]["volumeMounts"].append({"name": "data", "mountPath": "/tmp/x"}),
     "spec.trainer.initContainers[0].volumeMounts[1].mountPath"),
    (lambda t: t.__setitem__("envFrom", [{"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}]),
     "spec.trainer.envFrom[0]"),
    (lambda t: t.__setitem__("imagePullSecrets", [{"name": f"s{i}"} for i in range(33)]),
     "spec.trainer.imagePullSecrets"),
])
def test_template_mistakes_name_their_field(edit: Any, path: str) -> None:
    data = _manifest()
    edit(data["spec"]["trainer"])
    with pytest.raises(SpecError) as err:
        parse_job(data)
    assert any(p.path == path for p in err.value.problems), err.value.problems


def test_site_mounts_may_name_site_volumes_only_when_declared() -> None:
    data = _manifest()
    data["spec"]["clients"][0]["volumeMounts"] = [{"name": "extra", "mountPath": "/extra"}]  # declared on site-b only
    with pytest.raises(SpecError) as err:
        parse_job(data)
    assert [p.path for p in err.value.problems] == ["spec.clients[0].volumeMounts[0].name"]


def test_job_defaults_fill_only_what_the_job_leaves_unset() -> None:
    data = full_manifest()  # its server sets resources; the example's does not
    pods = _pods(data, DEFAULTS)
    assert pods["mnist-server"]["spec"]["containers"][0]["resources"]["limits"] == {"memory": "4Gi"}
    del data["spec"]["server"]["resources"]
    data["spec"]["server"]["image"] = "registry.example/own-server:2"
    server = _pods(data, DEFAULTS)["mnist-server"]["spec"]["containers"][0]
    assert server["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"}}
    assert server["image"] == "registry.example/own-server:2"
    plain = _pods(data)["mnist-server"]["spec"]
    assert "resources" not in plain["containers"][0] and "imagePullSecrets" not in plain
    assert _pods(full_manifest())["mnist-client-site-a"]["spec"]["initContainers"][0]["image"] == DEFAULT_IMAGE


def test_job_defaults_parse_and_name_mistakes() -> None:
    got = parse_defaults({"image": "m/f:1", "imagePullSecrets": [{"name": "a"}, {"name": "a"}],
                          "serverResources": {"requests": {"cpu": 1}}, "copyLabels": ["team", "fedkube.dev/job"]})
    assert got == PodDefaults("m/f:1", ("a",), Resources(requests={"cpu": "1"}), ("team",))  # never a reserved key
    assert parse_defaults({}) == PodDefaults()
    with pytest.raises(ConfigError, match=r"jobDefaults.*imagePullSecrets"):
        parse_defaults({"imagePullSecrets": ["a"]})


def test_the_admin_policy_checks_every_new_image_volume_and_service_account() -> None:
    job = parse_job(_manifest())
    policy = parse_policy({"allowedImagePrefixes": ["registry.example/mnist-trainer"],
                           "allowedVolumeKinds": ["emptyDir", "configMap", "persistentVolumeClaim"],
                           "allowedServiceAccounts": ["dataset-reader"], "allowedTolerations": [{}]})
    paths = sorted(p.path for p in policy.violations(job))
    assert paths == [
        "spec.clients[1].serviceAccountName",  # site-b-reader
        "spec.server.serviceAccountName",  # model-reader
        "spec.trainer.initContainers[0].image",  # registry.example/tools:1
    ]
    data = _manifest()
    data["spec"]["clients"][1]["volumes"].append({"name": "creds", "secret": {"secretName": "x"}})
    data["spec"]["clients"][1]["image"] = "evil.example/miner:1"
    paths = sorted(p.path for p in policy.violations(parse_job(data)))
    assert "spec.clients[1].volumes[2]" in paths and "spec.clients[1].image" in paths
    # Without allowedServiceAccounts no job may name one: the default is the namespace's default account.
    assert any("allowedServiceAccounts []" in p.message for p in parse_policy({}).violations(job))


def test_a_job_without_template_fields_builds_what_it_built_before() -> None:
    data = copy.deepcopy(full_manifest())
    pod = _pods(data)["mnist-client-site-a"]
    assert set(pod["spec"]) == {"restartPolicy", "automountServiceAccountToken", "enableServiceLinks",
                                "securityContext", "containers", "volumes", "nodeSelector", "tolerations",
                                "initContainers"}
