"""How run_pod maps a pod manifest onto this machine (no process is started here)."""

from __future__ import annotations

import base64
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.runtime.pod import ManifestObjects, PodOptions, PodRun
from fedkube.runtime.process import NullSink
from fedkube.runtime.resolver import LocalResolver


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "ns"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _client_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "job-client-site-a", "namespace": "ns", "labels": {"fedkube.dev/site": "site-a"}},
        "spec": {
            "volumes": [
                {"name": "fedkube-token", "secret": {"secretName": "job-site-a-token", "defaultMode": 0o400}},
                {"name": "fedkube-work", "emptyDir": {}},
            ],
            "initContainers": [
                {
                    "name": "sidecar",
                    "restartPolicy": "Always",
                    "command": ["fedkube", "sidecar"],
                    "env": [
                        {"name": envvars.SERVER_ADDRESS, "value": "job-server.ns.svc:7070"},
                        {"name": envvars.TRAINER_PORT, "value": "7071"},
                        {"name": envvars.TOKEN_FILE, "value": "/var/run/secrets/fedkube/token/token"},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    ],
                    "volumeMounts": [{"name": "fedkube-token", "mountPath": "/var/run/secrets/fedkube/token"}],
                }
            ],
            "containers": [
                {
                    "name": "trainer",
                    "command": ["python", "train.py"],
                    "args": ["--data", "/var/lib/fedkube/work/data", "missing.py"],
                    "workingDir": "/var/lib/fedkube/work",
                    "env": [
                        {"name": envvars.SIDECAR_ADDRESS, "value": "127.0.0.1:7071"},
                        {"name": envvars.WORKDIR, "value": "/var/lib/fedkube/work"},
                    ],
                    "volumeMounts": [{"name": "fedkube-work", "mountPath": "/var/lib/fedkube/work"}],
                }
            ],
        },
    }


def _server_pod_and_service() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {
        "kind": "Pod",
        "metadata": {"name": "job-server", "namespace": "ns", "labels": {"fedkube.dev/role": "server"}},
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "command": ["fedkube", "server"],
                    "ports": [{"name": "grpc", "containerPort": 7070}],
                    "env": [{"name": envvars.GRPC_PORT, "value": "7070"}],
                }
            ]
        },
    }
    service = {
        "kind": "Service",
        "metadata": {"name": "job-server", "namespace": "ns"},
        "spec": {"ports": [{"port": 7070, "targetPort": "grpc"}]},
    }
    return pod, service


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    base = tmp_path / "example"
    base.mkdir()
    (base / "train.py").write_text("print('hi')\n")
    return base


def test_client_pod_gets_local_ports_files_and_its_own_workdir(tmp_path: Path, base_dir: Path) -> None:
    resolver = LocalResolver()
    server, service = _server_pod_and_service()
    resolver.add_service(service, server)
    options = PodOptions(
        run_dir=tmp_path / "run",
        resolver=resolver,
        objects=ManifestObjects([_secret("job-site-a-token", {"token": "s3cret"})]),
        sink=NullSink(),
        base_dir=base_dir,
        extra_env={"FEDKUBE_SIDECAR_EXIT_ON_STOP": "1"},
    )
    run = PodRun(_client_pod(), options)
    sidecar, trainer = run._prepare()

    grpc_local = resolver.local_port("ns/job-server", 7070)
    trainer_local = resolver.local_port("ns/job-client-site-a", 7071)
    assert grpc_local != trainer_local
    assert sidecar.kind == "sidecar" and trainer.kind == "main"
    assert sidecar.spec.env[envvars.SERVER_ADDRESS] == f"127.0.0.1:{grpc_local}"
    assert sidecar.spec.env[envvars.TRAINER_PORT] == str(trainer_local)
    assert trainer.spec.env[envvars.SIDECAR_ADDRESS] == f"127.0.0.1:{trainer_local}"
    assert sidecar.spec.env["POD"] == "job-client-site-a"
    assert sidecar.spec.env["FEDKUBE_SIDECAR_EXIT_ON_STOP"] == "1"

    token = Path(sidecar.spec.env[envvars.TOKEN_FILE])
    assert token.read_text() == "s3cret"
    assert stat.S_IMODE(token.stat().st_mode) == 0o400
    assert token.is_relative_to(tmp_path / "run")

    workdir = Path(trainer.spec.env[envvars.WORKDIR])
    assert trainer.spec.cwd == workdir
    assert workdir.is_dir() and workdir.is_relative_to(tmp_path / "run" / "pods" / "job-client-site-a")
    assert envvars.TOKEN_FILE not in trainer.spec.env  # trainers hold no credentials
    assert trainer.spec.argv[0] == sys.executable
    assert trainer.spec.argv[1] == str((base_dir / "train.py").resolve())
    assert trainer.spec.argv[3] == str(workdir / "data")
    assert trainer.spec.argv[4] == "missing.py"  # not a file of the example: left alone
    assert str(base_dir) in trainer.spec.env["PYTHONPATH"].split(":")


def test_two_client_pods_never_share_ports_or_workdirs(tmp_path: Path, base_dir: Path) -> None:
    resolver = LocalResolver()
    options = PodOptions(
        run_dir=tmp_path,
        resolver=resolver,
        objects=ManifestObjects([_secret("job-site-a-token", {"token": "x"})]),
        sink=NullSink(),
        base_dir=base_dir,
    )
    pod_a = _client_pod()
    pod_b = _client_pod()
    pod_b["metadata"]["name"] = "job-client-site-b"
    _, trainer_a = PodRun(pod_a, options)._prepare()
    _, trainer_b = PodRun(pod_b, options)._prepare()
    assert trainer_a.spec.env[envvars.SIDECAR_ADDRESS] != trainer_b.spec.env[envvars.SIDECAR_ADDRESS]
    assert trainer_a.spec.cwd != trainer_b.spec.cwd
    assert trainer_a.spec.log_path != trainer_b.spec.log_path


def test_missing_secret_is_a_config_error_naming_it(tmp_path: Path) -> None:
    options = PodOptions(run_dir=tmp_path, resolver=LocalResolver(), objects=ManifestObjects([]), sink=NullSink())
    with pytest.raises(ConfigError, match="job-site-a-token"):
        PodRun(_client_pod(), options)._prepare()


def test_unsupported_volume_and_missing_command_are_config_errors(tmp_path: Path) -> None:
    options = PodOptions(run_dir=tmp_path, resolver=LocalResolver(), objects=ManifestObjects([]), sink=NullSink())
    pod = {
        "metadata": {"name": "p"},
        "spec": {"volumes": [{"name": "v", "csi": {}}], "containers": [{"name": "c", "command": ["true"]}]},
    }
    with pytest.raises(ConfigError, match=r"volume 'v'.*csi"):
        PodRun(pod, options)._prepare()
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
    with pytest.raises(ConfigError, match="has no command"):
        PodRun(pod, options)._prepare()


def test_termination_log_and_pvc_paths_are_local(tmp_path: Path) -> None:
    pod = {
        "metadata": {"name": "job-server", "namespace": "ns"},
        "spec": {
            "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "job-checkpoint"}}],
            "containers": [
                {
                    "name": "server",
                    "command": ["fedkube", "server"],
                    "terminationMessagePath": "/dev/termination-log",
                    "env": [
                        {"name": envvars.TERMINATION_LOG, "value": "/dev/termination-log"},
                        {"name": envvars.CHECKPOINT_DIR, "value": "/var/lib/fedkube/checkpoint"},
                        {"name": envvars.METRICS_PORT, "value": "0"},
                    ],
                    "volumeMounts": [{"name": "ckpt", "mountPath": "/var/lib/fedkube/checkpoint"}],
                }
            ],
        },
    }
    options = PodOptions(run_dir=tmp_path, resolver=LocalResolver(), objects=ManifestObjects([]), sink=NullSink())
    (server,) = PodRun(pod, options)._prepare()
    assert server.spec.env[envvars.TERMINATION_LOG] == str(tmp_path / "pods" / "job-server" / "server.termination-log")
    # The claim outlives the pod, so a restarted server finds its checkpoint.
    assert server.spec.env[envvars.CHECKPOINT_DIR] == str(tmp_path / "volumes" / "ns-job-checkpoint")
    assert server.spec.env[envvars.METRICS_PORT] == "0"  # 0 means off, and stays off


def test_resolver_maps_every_service_spelling_and_leaves_external_hosts() -> None:
    resolver = LocalResolver()
    server, service = _server_pod_and_service()
    resolver.add_service(service, server)
    local = resolver.local_port("ns/job-server", 7070)
    for host in ("job-server", "job-server.ns", "job-server.ns.svc", "job-server.ns.svc.cluster.local"):
        assert resolver.resolve("ns/other", f"{host}:7070") == f"127.0.0.1:{local}"
    assert resolver.resolve("ns/other", "example.org:443") == "example.org:443"
    assert resolver.resolve("ns/other", "localhost:7070") != f"127.0.0.1:{local}"  # loopback stays in the pod


def test_service_with_unknown_named_port_is_rejected() -> None:
    server, service = _server_pod_and_service()
    service["spec"]["ports"][0]["targetPort"] = "nope"
    with pytest.raises(ConfigError, match="'nope'"):
        LocalResolver().add_service(service, server)


def test_every_allowed_volume_kind_of_an_fljob_runs_locally(tmp_path: Path) -> None:
    from fedkube.operator import builders
    from fedkube.spec import parse_job
    from tests.unit.spec.manifests import full_manifest

    data = full_manifest()
    data["spec"]["trainer"]["volumes"] = [
        {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "cfg", "configMap": {"name": "c", "items": [{"key": "k", "path": "k.txt"}]}},
        {"name": "creds", "secret": {"secretName": "s", "defaultMode": 0o400}},
        {"name": "models", "persistentVolumeClaim": {"claimName": "m", "readOnly": True}},
        {"name": "mix", "projected": {"defaultMode": 0o440, "sources": [
            {"configMap": {"name": "c"}},
            {"secret": {"name": "s", "items": [{"key": "password", "path": "pw", "mode": 0o400}]}},
            {"secret": {"name": "absent", "optional": True}},
            {"downwardAPI": {"items": [{"path": "pod", "fieldRef": {"fieldPath": "metadata.name"}}]}},
        ]}},
    ]  # fmt: skip
    data["spec"]["trainer"]["volumeMounts"] = []
    job = parse_job(data)
    site = job.spec.clients[0].name
    pod = builders.build_client_pod(job, site)
    configmap = {"kind": "ConfigMap", "metadata": {"name": "c", "namespace": job.namespace}, "data": {"k": "v"}}

    def in_job_ns(obj: dict[str, Any]) -> dict[str, Any]:
        return obj | {"metadata": {**obj["metadata"], "namespace": job.namespace}}

    secret = in_job_ns(_secret("s", {"password": "hunter2"}))
    # fedkube's own token Secret, which the operator creates beside the pod
    tokens = [in_job_ns(_secret(v["secret"]["secretName"], {"token": "t"})) for v in pod["spec"]["volumes"]
              if v["name"].startswith("fedkube-") and "secret" in v]  # fmt: skip
    objects = ManifestObjects([configmap, secret, *tokens])
    options = PodOptions(run_dir=tmp_path, resolver=LocalResolver(), objects=objects, sink=NullSink())
    run = PodRun(pod, options)
    run._prepare()
    vols = run._mapping.volumes
    assert (vols["cfg"] / "k.txt").read_text() == "v"
    assert (vols["creds"] / "password").read_text() == "hunter2"
    assert vols["scratch"].is_dir() and vols["models"].is_dir()
    mix = vols["mix"]
    assert (mix / "k").read_text() == "v" and stat.S_IMODE((mix / "k").stat().st_mode) == 0o440
    assert (mix / "pw").read_text() == "hunter2" and stat.S_IMODE((mix / "pw").stat().st_mode) == 0o400
    assert (mix / "pod").read_text() == pod["metadata"]["name"]


def test_a_pod_that_cannot_start_leaves_no_secret_file_behind(tmp_path: Path) -> None:
    """The token volume is written before a later volume fails: start() removes it again (item 4 of issue 12)."""
    objects = ManifestObjects([_secret("job-site-a-token", {"token": "s3cret"}), _secret("tls", {"tls.key": "k"})])
    options = PodOptions(run_dir=tmp_path, resolver=LocalResolver(), objects=objects, sink=NullSink())
    pod = _client_pod()
    pod["spec"]["volumes"] += [
        {"name": "tls", "projected": {"sources": [{"secret": {"name": "tls"}}]}},
        {"name": "config", "configMap": {"name": "nowhere"}},
    ]
    run = PodRun(pod, options)
    with pytest.raises(ConfigError, match="nowhere"):
        run.start()
    volumes = tmp_path / "pods" / "job-client-site-a" / "volumes"
    assert not (volumes / "fedkube-token").exists() and not (volumes / "tls").exists()
    assert (volumes / "fedkube-work").is_dir()  # not a Secret: left as it is
