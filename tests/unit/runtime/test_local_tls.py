"""`fedkube run`'s TLS material: one job CA per run, and each process's FEDKUBE_TLS_DIR is its local bundle."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path
from typing import Any

from cryptography import x509

from fedkube import envvars
from fedkube.operator import certificates
from fedkube.runtime.local import new_tls, new_tokens, render_job
from fedkube.runtime.pod import ManifestObjects, PodOptions, PodRun
from fedkube.runtime.process import NullSink
from fedkube.runtime.resolver import LocalResolver, pod_key_of
from fedkube.security import pki
from fedkube.security.material import files_in
from fedkube.spec import FLJob, parse_job

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def _job(**security: Any) -> FLJob:
    return parse_job({
        "apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "loc"},
        "spec": {"rounds": 2, "clients": [{"name": "a"}, {"name": "b"}],
                 "trainer": {"image": "t", "command": ["python", "train.py"]},
                 **({"security": security} if security else {})},
    })  # fmt: skip


def test_new_tls_is_fresh_per_run_valid_for_the_job_and_off_when_the_job_says_so() -> None:
    job = _job()
    one, two = new_tls(job, NOW), new_tls(job, NOW)
    assert one is not None and two is not None
    assert one.ca.cert.serial_number != two.ca.cert.serial_number
    assert one.server.cert.not_valid_after_utc == certificates.job_validity(job, NOW).not_after
    san = one.server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"loc-server.default.svc", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert new_tls(_job(tls="disabled"), NOW) is None
    assert new_tls(_job(issuerRef={"name": "org-ca"}), NOW) is not None  # no cert-manager on one machine


def test_render_job_makes_material_itself_rather_than_run_in_plaintext() -> None:
    objs = render_job(_job(issuerRef={"name": "org-ca"}), new_tokens(["a", "b"]))
    assert not [o for o in objs if o["kind"] == "Certificate"]
    assert sorted(o["metadata"]["name"] for o in objs if o.get("type") == "kubernetes.io/tls") == [
        "loc-ca", "loc-client-a-tls", "loc-client-b-tls", "loc-server-tls"]


def test_the_server_and_the_sidecar_find_their_bundle_the_trainer_nothing(tmp_path: Path) -> None:
    job = _job()
    manifests = render_job(job, new_tokens(["a", "b"]), new_tls(job))
    pods = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Pod"}
    resolver = LocalResolver()
    service = next(m for m in manifests if m["kind"] == "Service")
    resolver.add_service(service, pods["loc-server"])
    options = PodOptions(run_dir=tmp_path, resolver=resolver, objects=ManifestObjects(manifests), sink=NullSink())
    (server,) = PodRun(pods["loc-server"], options)._prepare()
    sidecar, trainer = PodRun(pods["loc-client-a"], options)._prepare()
    for proc, name in ((server, "loc-server"), (sidecar, "loc-client-a")):
        directory = Path(proc.spec.env[envvars.TLS_DIR])
        assert proc.spec.env[envvars.TLS] == "enabled"
        assert directory == tmp_path / "pods" / name / "volumes" / "fedkube-tls", pod_key_of(pods[name])
        files = files_in(directory)
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o400
        leaf = pki.load_issued(files.cert.read_bytes(), files.key.read_bytes())
        leaf.cert.verify_directly_issued_by(x509.load_pem_x509_certificate(files.ca.read_bytes()))
    assert sidecar.spec.env[envvars.TLS_SERVER_NAME] == "loc-server.default.svc"
    assert not {envvars.TLS, envvars.TLS_DIR, envvars.TLS_SERVER_NAME} & set(trainer.spec.env)
