"""Pure manifest builders: one parametrized test group per builder, all output validated strictly."""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import builders, naming
from fedkube.security import pki
from fedkube.security.material import JobTls
from fedkube.spec import DEFAULT_IMAGE, FLJob, SpecError, layout, load_job, parse_job
from tests.unit.operator.kvalidate import K8S_VERSIONS, assert_valid
from tests.unit.spec.manifests import EXAMPLE, example_manifest, full_manifest

OWNER = {
    "apiVersion": "fedkube.dev/v1alpha1",
    "kind": "FLJob",
    "metadata": {"name": "mnist", "namespace": "ml", "uid": "0b6c1d4e-1111-2222-3333-444455556666"},
}
JOBS: dict[str, Callable[[], dict[str, Any]]] = {"example": example_manifest, "full": full_manifest}


def _job(which: str) -> FLJob:
    return parse_job(JOBS[which]())


def _tokens(job: FLJob) -> dict[str, str]:
    return {c.name: f"token-of-{c.name}" for c in job.spec.clients}


@functools.cache
def _material(namespace: str, name: str, sites: tuple[str, ...]) -> JobTls:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    validity = pki.Validity(start, start + dt.timedelta(days=30))
    return JobTls.generate(namespace, name, sites, validity)


def _tls(job: FLJob) -> JobTls:
    """One job's TLS material, made once per job (a key pair costs a millisecond; a test builds hundreds)."""
    return _material(job.namespace, job.name, tuple(c.name for c in job.spec.clients))


def _build(which: str, owner: dict[str, Any] | None = OWNER) -> list[dict[str, Any]]:
    job = _job(which)
    return builders.build_all(job, tokens=_tokens(job), tls=_tls(job), owner=owner)


def _by_name(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


# --- build_all --------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("which", JOBS)
def test_every_object_validates_strictly(which: str, version: str) -> None:
    for obj in _build(which):
        assert_valid(obj, version)


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        (
            "example",
            [
                ("ConfigMap", "quickstart-numpy-spec"),
                ("Secret", "quickstart-numpy-server-tokens"),
                ("Secret", "quickstart-numpy-client-site-a-token"),
                ("Secret", "quickstart-numpy-client-site-b-token"),
                ("Secret", "quickstart-numpy-ca"),
                ("Secret", "quickstart-numpy-server-tls"),
                ("Secret", "quickstart-numpy-client-site-a-tls"),
                ("Secret", "quickstart-numpy-client-site-b-tls"),
                ("Service", "quickstart-numpy-server"),
                ("PodDisruptionBudget", "quickstart-numpy-server"),
                ("Pod", "quickstart-numpy-server"),
                ("Pod", "quickstart-numpy-client-site-a"),
                ("Pod", "quickstart-numpy-client-site-b"),
            ],
        ),
        (
            "full",
            [
                ("ConfigMap", "mnist-spec"),
                ("Secret", "mnist-server-tokens"),
                ("Secret", "mnist-client-site-a-token"),
                ("Secret", "mnist-client-site-b-token"),
                ("Secret", "mnist-client-site-c-token"),
                ("Secret", "mnist-ca"),
                ("Secret", "mnist-server-tls"),
                ("Secret", "mnist-client-site-a-tls"),
                ("Secret", "mnist-client-site-b-tls"),
                ("Secret", "mnist-client-site-c-tls"),
                ("PersistentVolumeClaim", "mnist-checkpoint"),
                ("Service", "mnist-server"),
                ("PodDisruptionBudget", "mnist-server"),
                ("Pod", "mnist-server"),
                ("Pod", "mnist-client-site-a"),
                ("Pod", "mnist-client-site-b"),
                ("Pod", "mnist-client-site-c"),
            ],
        ),
    ],
)
def test_build_all_objects_in_creation_order(which: str, expected: list[tuple[str, str]]) -> None:
    objs = _build(which)
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == expected
    namespace = "ml" if which == "full" else "default"
    assert {o["metadata"]["namespace"] for o in objs} == {namespace}


@pytest.mark.parametrize("which", JOBS)
def test_labels_and_owner_references_on_every_object(which: str) -> None:
    job = _job(which)
    for obj in builders.build_all(job, tokens=_tokens(job), tls=_tls(job), owner=OWNER):
        labels = obj["metadata"]["labels"]
        assert labels[naming.LABEL_JOB] == job.name
        assert labels[naming.LABEL_ROLE] in ("server", "client", "ca")
        assert labels["app.kubernetes.io/instance"] == job.name
        assert (naming.LABEL_SITE in labels) == (labels[naming.LABEL_ROLE] == "client")
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "fedkube.dev/v1alpha1",
            "kind": "FLJob",
            "name": "mnist",
            "uid": OWNER["metadata"]["uid"],  # type: ignore[index]
            "controller": True,
            "blockOwnerDeletion": True,
        }
    for obj in builders.build_all(job, tokens=_tokens(job), tls=_tls(job), owner=None):
        assert "ownerReferences" not in obj["metadata"]


@pytest.mark.parametrize(
    "owner",
    [{"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "x"}}, {"metadata": {"uid": "u"}}],
    ids=["no-uid", "no-kind"],
)
def test_owner_without_identity_is_rejected(owner: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="owner object lacks"):
        _build("example", owner=owner)


def test_builders_are_pure() -> None:
    job = _job("full")
    before = job.model_dump()
    first = builders.build_all(job, tokens=_tokens(job), tls=_tls(job), owner=OWNER)
    snapshot = copy.deepcopy(first)
    first[-1]["spec"]["containers"][0]["env"].clear()  # callers may mutate what they get back
    assert builders.build_all(job, tokens=_tokens(job), tls=_tls(job), owner=OWNER) == snapshot
    assert job.model_dump() == before


def test_invalid_job_raises_spec_error() -> None:
    job = _job("example")
    job.spec.min_clients = 5
    with pytest.raises(SpecError, match=r"spec\.minClients"):
        builders.build_all(job, tokens=_tokens(job), tls=_tls(job), owner=None)


@pytest.mark.parametrize("tokens", [{"site-a": "t"}, {"site-a": "t", "site-b": ""}], ids=["missing", "empty"])
def test_missing_token_is_a_clear_error(tokens: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="no token for site 'site-b'"):
        builders.build_all(_job("example"), tokens=tokens, tls=_tls(_job("example")), owner=None)


@pytest.mark.parametrize("which", JOBS)
def test_every_pod_is_locked_down(which: str) -> None:
    for obj in _build(which):
        if obj["kind"] != "Pod":
            continue
        spec = obj["spec"]
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in _containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["runAsNonRoot"] is True
            assert sc["readOnlyRootFilesystem"] is (c["name"] != naming.TRAINER_CONTAINER)
        mounted = {m["name"] for c in _containers(obj) for m in c.get("volumeMounts", [])}
        declared = {v["name"] for v in spec["volumes"]}
        assert mounted <= declared, mounted - declared


# --- spec ConfigMap -----------------------------------------------------------------------


@pytest.mark.parametrize("which", JOBS)
def test_spec_configmap_holds_the_job_as_json(which: str) -> None:
    job = _job(which)
    cm = builders.build_spec_configmap(job)
    text = cm["data"][layout.SPEC_FILE_NAME]
    assert parse_job(json.loads(text)) == job.model_copy(
        update={"metadata": job.metadata.model_copy(update={"namespace": job.namespace})}
    )
    assert load_job(text).spec == job.spec  # what the server's FEDKUBE_SPEC_FILE reader sees


# --- secrets ----------------------------------------------------------------------------------


def test_server_tokens_secret_has_one_key_per_site() -> None:
    job = _job("full")
    secret = builders.build_server_tokens_secret(job, tokens=_tokens(job))
    assert secret["stringData"] == {s: f"token-of-{s}" for s in ("site-a", "site-b", "site-c")}
    assert secret["metadata"]["labels"][naming.LABEL_ROLE] == "server"


@pytest.mark.parametrize("site", ["site-a", "site-b", "site-c"])
def test_client_token_secret_holds_only_its_site(site: str) -> None:
    job = _job("full")
    secret = builders.build_client_token_secret(job, site, tokens=_tokens(job))
    assert secret["metadata"]["name"] == f"mnist-client-{site}-token"
    assert secret["stringData"] == {layout.TOKEN_FILE_NAME: f"token-of-{site}"}
    assert secret["metadata"]["labels"][naming.LABEL_SITE] == site


def test_unknown_site_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"no client site 'site-z'.*site-a, site-b"):
        builders.build_client_pod(_job("example"), "site-z")


# --- checkpoint PVC --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [
        ({"enabled": False}, None),
        (
            {"enabled": True},
            {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        ),
        (
            {"enabled": True, "storageSize": "20Gi", "storageClassName": "fast"},
            {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "20Gi"}},
                "storageClassName": "fast",
            },
        ),
    ],
    ids=["disabled", "default-size", "class-and-size"],
)
def test_checkpoint_pvc(checkpoint: dict[str, Any], expected: dict[str, Any] | None) -> None:
    data = example_manifest()
    data["spec"]["server"] = {"checkpoint": checkpoint}
    job = parse_job(data)
    pvc = builders.build_checkpoint_pvc(job)
    assert (pvc["spec"] if pvc else None) == expected
    volumes = {v["name"]: v for v in builders.build_server_pod(job)["spec"]["volumes"]}
    source = volumes[builders.VOLUME_CHECKPOINT]
    if expected is None:
        assert source["emptyDir"] == {}
    else:
        assert source["persistentVolumeClaim"] == {"claimName": "quickstart-numpy-checkpoint"}


# --- server Service and Pod -------------------------------------------------------------------------


def test_server_service_selects_the_server_pod() -> None:
    job = _job("full")
    svc = builders.build_server_service(job)
    pod = builders.build_server_pod(job)
    assert svc["metadata"]["name"] == "mnist-server"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {
        "grpc": envvars.DEFAULT_GRPC_PORT,
        "bulk": envvars.DEFAULT_BULK_PORT,
        "status": envvars.DEFAULT_STATUS_PORT,
        "metrics": envvars.DEFAULT_METRICS_PORT,
    }
    named = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named


@pytest.mark.parametrize("which", JOBS)
def test_server_pod(which: str) -> None:
    job = _job(which)
    pod = builders.build_server_pod(job)
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["fedkube", "server"] and c["image"] == (job.spec.server.image or DEFAULT_IMAGE)
    env = _env(c)
    assert env[envvars.JOB] == job.name
    assert env[envvars.SPEC_FILE] == f"{layout.SPEC_DIR}/{layout.SPEC_FILE_NAME}"
    assert env[envvars.GRPC_PORT] == str(envvars.DEFAULT_GRPC_PORT)
    assert env[envvars.BULK_PORT] == str(envvars.DEFAULT_BULK_PORT)
    assert env[envvars.STATUS_PORT] == str(envvars.DEFAULT_STATUS_PORT)
    assert env[envvars.METRICS_PORT] == str(envvars.DEFAULT_METRICS_PORT)
    assert env[envvars.TOKENS_DIR] == layout.TOKENS_DIR
    assert env[envvars.CHECKPOINT_DIR] == layout.CHECKPOINT_DIR
    assert env[envvars.TERMINATION_LOG] == c["terminationMessagePath"] == layout.TERMINATION_LOG
    assert c["readinessProbe"]["tcpSocket"]["port"] == "status"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[layout.SPEC_DIR] == builders.VOLUME_SPEC and mounts[layout.TOKENS_DIR] == builders.VOLUME_TOKENS
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[builders.VOLUME_TOKENS]["secret"]["secretName"] == f"{job.name}-server-tokens"
    assert volumes[builders.VOLUME_SPEC]["configMap"]["name"] == f"{job.name}-spec"
    assert pod["metadata"]["annotations"][naming.ANNOTATION_SPEC_HASH] == builders.spec_hash(job)


def test_server_pod_passes_user_settings_through() -> None:
    pod = builders.build_server_pod(_job("full"))
    (c,) = pod["spec"]["containers"]
    assert _env(c)["LOG_LEVEL"] == "debug"
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "init-models"}} in pod["spec"]["volumes"]
    assert pod["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert "tolerations" not in pod["spec"]


def test_spec_hash_follows_the_spec() -> None:
    a = _job("example")
    b = parse_job({**example_manifest(), "spec": {**example_manifest()["spec"], "rounds": 4}})
    assert builders.spec_hash(a) == builders.spec_hash(_job("example")) != builders.spec_hash(b)


# --- client Pods -------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["site-a", "site-b", "site-c"])
def test_client_pod_wiring(site: str) -> None:
    job = _job("full")
    pod = builders.build_client_pod(job, site)
    assert pod["metadata"]["name"] == f"mnist-client-{site}"
    (sidecar,) = pod["spec"]["initContainers"]
    (trainer,) = pod["spec"]["containers"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["command"] == ["fedkube", "sidecar"]
    assert sidecar["image"] == (job.spec.sidecar.image or DEFAULT_IMAGE)
    s_env = _env(sidecar)
    assert s_env[envvars.JOB] == "mnist" and s_env[envvars.SITE] == site
    assert s_env[envvars.SERVER_ADDRESS] == f"mnist-server.ml.svc:{envvars.DEFAULT_GRPC_PORT}"
    assert s_env[envvars.SERVER_BULK_ADDRESS] == f"mnist-server.ml.svc:{envvars.DEFAULT_BULK_PORT}"
    assert s_env[envvars.TOKEN_FILE] == f"{layout.TOKEN_DIR}/{layout.TOKEN_FILE_NAME}"
    assert s_env[envvars.TRAINER_PORT] == str(envvars.DEFAULT_TRAINER_PORT)
    t_env = _env(trainer)
    assert t_env[envvars.SIDECAR_ADDRESS] == f"127.0.0.1:{envvars.DEFAULT_TRAINER_PORT}"
    assert t_env[envvars.SITE] == site and t_env[envvars.JOB] == "mnist"
    assert t_env[envvars.WORKDIR] == layout.WORKDIR
    assert trainer["command"] == ["python", "train.py"] and trainer["args"] == ["--lr", "0.1"]
    assert trainer["workingDir"] == "/app"
    assert {"name": builders.VOLUME_WORKDIR, "mountPath": layout.WORKDIR} in trainer["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[builders.VOLUME_TOKEN]["secret"]["secretName"] == f"mnist-client-{site}-token"


@pytest.mark.parametrize("site", ["site-a", "site-b"])
def test_trainer_gets_no_token(site: str) -> None:
    pod = builders.build_client_pod(_job("full"), site)
    (trainer,) = pod["spec"]["containers"]
    assert envvars.TOKEN_FILE not in _env(trainer)
    assert builders.VOLUME_TOKEN not in {m["name"] for m in trainer["volumeMounts"]}
    assert all("token" not in str(e.get("value", "")).lower() for e in trainer["env"])
    (sidecar,) = pod["spec"]["initContainers"]
    assert builders.VOLUME_TOKEN in {m["name"] for m in sidecar["volumeMounts"]}


@pytest.mark.parametrize(
    ("site", "env", "resources", "node_selector", "tolerations"),
    [
        (
            "site-a",
            {"EPOCHS": "1"},
            {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
            {"pool": "train"},
            [{"key": "dedicated", "operator": "Equal", "value": "fl", "effect": "NoSchedule"}],
        ),
        (
            "site-b",
            {"EPOCHS": "3", "EXTRA": "1"},
            {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi", "nvidia.com/gpu": "2"}},
            {"pool": "train", "gpu": "a100"},
            [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ),
    ],
    ids=["template", "site-overrides"],
)
def test_site_overrides_merge_over_the_trainer_template(
    site: str,
    env: dict[str, str],
    resources: dict[str, Any],
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
) -> None:
    pod = builders.build_client_pod(_job("full"), site)
    (trainer,) = pod["spec"]["containers"]
    t_env = _env(trainer)
    assert {k: t_env[k] for k in env} == env
    assert t_env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    user = [e["name"] for e in trainer["env"] if not e["name"].startswith("FEDKUBE_") and e["name"] != "HOME"]
    assert user == ["EPOCHS", "POD_IP", *(["EXTRA"] if site == "site-b" else [])]
    assert trainer["resources"] == resources
    assert pod["spec"]["nodeSelector"] == node_selector
    assert pod["spec"]["tolerations"] == tolerations


def test_home_is_the_workdir_unless_the_user_sets_it() -> None:
    job = _job("example")
    (trainer,) = builders.build_client_pod(job, "site-a")["spec"]["containers"]
    assert _env(trainer)["HOME"] == layout.WORKDIR
    data = example_manifest()
    data["spec"]["trainer"]["env"] = [{"name": "HOME", "value": "/home/me"}]
    (trainer,) = builders.build_client_pod(parse_job(data), "site-a")["spec"]["containers"]
    assert [e["value"] for e in trainer["env"] if e["name"] == "HOME"] == ["/home/me"]


def test_quickstart_runs_train_py_in_its_workdir() -> None:
    job = load_job(EXAMPLE)
    assert [c.name for c in job.spec.clients] == ["site-a", "site-b"] and job.spec.rounds == 3
    (trainer,) = builders.build_client_pod(job, "site-a")["spec"]["containers"]
    assert trainer["command"] == ["python", "train.py"] and trainer["workingDir"] == "/app"


@pytest.mark.parametrize(
    "break_it",
    [
        lambda pod: pod["spec"].update(restartPolicy=["Never"]),
        lambda pod: pod["spec"]["containers"][0].update(bogusField=1),
        lambda pod: pod["spec"]["initContainers"][0]["env"].append({"name": "X", "value": 1}),
    ],
    ids=["list-for-string", "unknown-field", "int-for-string"],
)
def test_strict_validation_catches_broken_pods(break_it: Callable[[dict[str, Any]], None]) -> None:
    pod = builders.build_client_pod(_job("example"), "site-a")
    break_it(pod)
    with pytest.raises(AssertionError, match="invalid for Kubernetes"):
        assert_valid(pod, K8S_VERSIONS[0])


def test_cached_validator_agrees_with_kubernetes_validate() -> None:
    """The cache must not change the verdict: compare with the library's own entry point on a good and a bad pod."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
    }
    kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)
    assert_valid(pod, K8S_VERSIONS[0])
    pod["spec"]["containers"][0]["bogus"] = 1
    try:
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)
    except kubernetes_validate.ValidationError:
        pass
    else:
        raise AssertionError("kubernetes-validate accepted an unknown container field")
    try:
        assert_valid(pod, K8S_VERSIONS[0])
    except AssertionError as exc:
        assert "bogus" in str(exc) or "containers" in str(exc)
    else:
        raise AssertionError("the cached validator accepted an unknown container field")


# --- metrics and log format ---------------------------------------------------------------------------


def _scrape_target(pod: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The container whose named ``metrics`` port the pod's prometheus.io annotations point at."""
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    port = int(ann["prometheus.io/port"])
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    owners = [c for c in containers for p in c.get("ports", []) if p["name"] == "metrics"]
    assert len(owners) == 1, "exactly one container must expose the named metrics port"
    (c,) = owners
    assert {p["containerPort"] for p in c["ports"] if p["name"] == "metrics"} == {port}
    return c, port


@pytest.mark.parametrize("which", JOBS)
def test_server_pod_is_scraped_on_its_metrics_port(which: str) -> None:
    c, port = _scrape_target(builders.build_server_pod(_job(which)))
    assert c["name"] == naming.SERVER_CONTAINER and port == envvars.DEFAULT_METRICS_PORT
    assert _env(c)[envvars.METRICS_PORT] == str(port)


@pytest.mark.parametrize("which", JOBS)
def test_client_pod_is_scraped_on_the_sidecar(which: str) -> None:
    job = _job(which)
    pod = builders.build_client_pod(job, job.spec.clients[0].name)
    c, port = _scrape_target(pod)
    assert c["name"] == naming.SIDECAR_CONTAINER and port == builders.SIDECAR_METRICS_PORT == 9091
    assert _env(c)[envvars.METRICS_PORT] == "9091"
    # The trainer is user code: it is never scraped and serves nothing of ours.
    (trainer,) = pod["spec"]["containers"]
    assert envvars.METRICS_PORT not in _env(trainer) and not trainer.get("ports")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_format_reaches_server_and_sidecars(fmt: str) -> None:
    job = _job("full")
    objs = builders.build_all(job, tokens=_tokens(job), tls=_tls(job), owner=OWNER, log_format=fmt)
    pods = [o for o in objs if o["kind"] == "Pod"]
    assert len(pods) == 1 + len(job.spec.clients)
    for pod in pods:
        c, _ = _scrape_target(pod)
        assert _env(c)[envvars.LOG_FORMAT] == fmt, pod["metadata"]["name"]


def test_default_log_format_is_text_and_unknown_is_refused() -> None:
    job = _job("example")
    assert _env(builders.build_server_pod(job)["spec"]["containers"][0])[envvars.LOG_FORMAT] == "text"
    with pytest.raises(ConfigError, match=r"log format must be one of .*'yaml'"):
        builders.build_all(job, tokens=_tokens(job), tls=_tls(job), owner=None, log_format="yaml")
