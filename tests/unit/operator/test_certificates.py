"""The job's TLS objects: Secrets or cert-manager Certificates, mounts, env, reuse and rotation, status."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
import yaml
from cryptography import x509

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.operator import builders, certificates, naming
from fedkube.operator.certificates import StoredTls, provision, with_tls_status
from fedkube.security import pki
from fedkube.security.material import CERT_FILE, KEY_FILE, MOUNT_PATH, JobTls
from fedkube.spec import FLJob, SpecError, layout, parse_job
from tests.unit.operator.certmanager import assert_valid_certificate
from tests.unit.operator.kvalidate import K8S_VERSIONS, assert_valid

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
OWNER = {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "j", "uid": "u-1"}}
SITES = ("a", "server")  # a site may be called "server": its Secret must not be the server's


def _job(**security: Any) -> FLJob:
    return parse_job({
        "apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "j", "namespace": "team"},
        "spec": {"rounds": 3, "clients": [{"name": s} for s in SITES],
                 "trainer": {"image": "t", "command": ["python", "train.py"]},
                 "timeouts": {"roundSeconds": 600}, **({"security": security} if security else {})},
    })  # fmt: skip


def _tls(job: FLJob, now: dt.datetime = NOW) -> JobTls:
    return provision(job, StoredTls(), now=now, rotate=False)


def _build(job: FLJob, tls: JobTls | None) -> dict[tuple[str, str], dict[str, Any]]:
    objs = builders.build_all(job, tokens=dict.fromkeys(SITES, "t"), tls=tls, owner=OWNER)
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _files(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def load_pem_files(files: dict[str, bytes]) -> pki.Issued:
    return pki.load_issued(files[CERT_FILE], files[KEY_FILE])


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.UniformResourceIdentifier)


# --- our own CA ----------------------------------------------------------------------------------------------


def test_tls_secrets_carry_the_identities_pki_defines_and_validate() -> None:
    job = _job()
    objs = _build(job, _tls(job))
    names = {"server": "j-server-tls", "a": "j-client-a-tls", "server-site": "j-client-server-tls", "ca": "j-ca"}
    for name in names.values():
        secret = objs[("Secret", name)]
        assert secret["type"] == "kubernetes.io/tls"
        assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"
        assert secret["metadata"]["labels"][naming.LABEL_JOB] == "j"
        for version in K8S_VERSIONS:
            assert_valid(secret, version)
    ca = load_pem_files(_files(objs[("Secret", "j-ca")]))
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = load_pem_files(_files(objs[("Secret", "j-server-tls")]))
    server.cert.verify_directly_issued_by(ca.cert)
    assert _sans(server.cert) == (pki.server_dns_names("team", "j"), [])
    for site in SITES:
        secret = objs[("Secret", naming.client_tls_secret_name("j", site))]
        assert secret["metadata"]["labels"][naming.LABEL_SITE] == site
        files = _files(secret)
        assert files["ca.crt"] == ca.cert_pem()
        leaf = load_pem_files(files)
        leaf.cert.verify_directly_issued_by(ca.cert)
        assert _sans(leaf.cert) == ([], [pki.site_uri("team", "j", site)])


def test_only_the_server_and_the_sidecars_mount_tls_never_the_trainer() -> None:
    job = _job()
    objs = _build(job, _tls(job))
    server = _containers(objs[("Pod", "j-server")])["server"]
    assert {"name": "fedkube-tls", "mountPath": MOUNT_PATH, "readOnly": True} in server["volumeMounts"]
    assert _env(server)[envvars.TLS] == "enabled" and _env(server)[envvars.TLS_DIR] == MOUNT_PATH
    assert envvars.TLS_SERVER_NAME not in _env(server)
    volumes = {v["name"]: v for v in objs[("Pod", "j-server")]["spec"]["volumes"]}
    assert volumes["fedkube-tls"]["secret"] == {"secretName": "j-server-tls", "defaultMode": 0o400}
    for site in SITES:
        pod = objs[("Pod", naming.client_pod_name("j", site))]
        sidecar, trainer = _containers(pod)["sidecar"], _containers(pod)["trainer"]
        assert [m["mountPath"] for m in sidecar["volumeMounts"] if m["name"] == "fedkube-tls"] == [MOUNT_PATH]
        assert _env(sidecar).items() >= {envvars.TLS: "enabled", envvars.TLS_DIR: MOUNT_PATH,
                                         envvars.TLS_SERVER_NAME: "j-server.team.svc"}.items()
        assert not [m for m in trainer["volumeMounts"] if m["name"] == "fedkube-tls"]
        assert not {envvars.TLS, envvars.TLS_DIR, envvars.TLS_SERVER_NAME} & set(_env(trainer))
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["fedkube-tls"]["secret"]["secretName"] == f"j-client-{site}-tls"


def test_disabled_tls_renders_no_material_and_says_so_in_the_env() -> None:
    job = _job(tls="disabled")
    objs = _build(job, None)
    assert not [k for k in objs if k[1].endswith("-tls") or k[1] == "j-ca"]
    for pod in (o for (kind, _), o in objs.items() if kind == "Pod"):
        assert "fedkube-tls" not in {v["name"] for v in pod["spec"]["volumes"]}
        for name, container in _containers(pod).items():
            if name != "trainer":
                assert _env(container)[envvars.TLS] == "disabled"
            assert envvars.TLS_DIR not in _env(container)


def test_enabled_tls_without_material_is_a_clear_error_not_plaintext() -> None:
    with pytest.raises(ConfigError, match=r"spec\.security\.tls enabled but no TLS material.*fix:"):
        _build(_job(), None)


def test_users_cannot_set_the_tls_variables_or_mount_over_the_bundle() -> None:
    assert MOUNT_PATH == layout.TLS_DIR and any(MOUNT_PATH.startswith(r + "/") for r in layout.RESERVED_MOUNT_ROOTS)
    doc = _job().to_manifest()
    doc["spec"]["trainer"]["env"] = [{"name": envvars.TLS, "value": "disabled"}]
    with pytest.raises(SpecError, match=r"spec\.trainer\.env\[0\]\.name.*FEDKUBE_TLS is set by fedkube"):
        builders.validate_job(parse_job(doc))  # parse_job refuses it already; validate_job would too


# --- cert-manager --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Issuer", "ClusterIssuer"])
def test_issuer_ref_renders_certificates_for_the_same_secrets_and_no_key(kind: str) -> None:
    job = _job(issuerRef={"name": "org-ca", "kind": kind})
    objs = _build(job, None)
    assert not [k for k in objs if k[0] == "Secret" and k[1].endswith(("-tls", "-ca"))]
    assert "PRIVATE KEY" not in yaml.safe_dump(list(objs.values()))
    certs = {name: o for (k, name), o in objs.items() if k == "Certificate"}
    assert sorted(certs) == ["j-client-a-tls", "j-client-server-tls", "j-server-tls"]
    duration = certificates.job_validity(job, NOW)
    hours = int((duration.not_after - NOW).total_seconds()) // 3600
    for name, cert in certs.items():
        assert_valid_certificate(cert)
        spec = cert["spec"]
        assert spec["secretName"] == name and cert["metadata"]["ownerReferences"][0]["uid"] == "u-1"
        assert spec["issuerRef"] == {"name": "org-ca", "kind": kind, "group": "cert-manager.io"}
        assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
        assert spec["duration"].startswith(f"{hours}h")
        assert spec["secretTemplate"]["labels"][naming.LABEL_JOB] == "j"
    assert certs["j-server-tls"]["spec"]["dnsNames"] == pki.server_dns_names("team", "j")
    assert certs["j-server-tls"]["spec"]["usages"] == ["digital signature", "server auth"]
    assert "uris" not in certs["j-server-tls"]["spec"]
    for site in SITES:
        spec = certs[f"j-client-{site}-tls"]["spec"]
        assert spec["uris"] == [pki.site_uri("team", "j", site)] and "dnsNames" not in spec
        assert spec["usages"] == ["digital signature", "client auth"]
    # The pods mount what cert-manager writes, by the same names.
    volumes = {v["name"]: v for v in objs[("Pod", "j-client-a")]["spec"]["volumes"]}
    assert volumes["fedkube-tls"]["secret"]["secretName"] == "j-client-a-tls"


def test_the_certificate_schema_catches_a_misspelt_field() -> None:
    cert = certificates.build_certificate(_job(issuerRef={"name": "x"}), "a", lambda n, r, s: {
        "name": n, "namespace": "team", "labels": naming.labels("j", r, s)})
    assert_valid_certificate(cert)
    cert["spec"]["uri"] = cert["spec"].pop("uris")
    with pytest.raises(AssertionError, match="uri"):
        assert_valid_certificate(cert)


def test_go_duration() -> None:
    assert certificates.go_duration(26 * 3600 + 20 * 60 + 5.9) == "26h20m5s"


# --- reuse and rotation ---------------------------------------------------------------------------------------


def _stored(objs: dict[tuple[str, str], dict[str, Any]]) -> StoredTls:
    def data(name: str) -> dict[str, str] | None:
        secret = objs.get(("Secret", name))
        return None if secret is None else {k: v.decode() for k, v in _files(secret).items()}

    return StoredTls(ca=data("j-ca"), server=data("j-server-tls"),
                     sites={s: data(naming.client_tls_secret_name("j", s)) for s in SITES})


def _serials(tls: JobTls) -> list[int]:
    return [tls.ca.cert.serial_number, tls.server.cert.serial_number,
            *(tls.sites[s].cert.serial_number for s in SITES)]


def test_a_later_reconcile_reuses_every_stored_certificate() -> None:
    job = _job()
    first = _tls(job)
    again = provision(job, _stored(_build(job, first)), now=NOW + dt.timedelta(hours=2), rotate=False)
    assert _serials(again) == _serials(first)


def test_a_missing_site_secret_gets_a_new_certificate_and_nothing_else_changes() -> None:
    job = _job()
    first = _tls(job)
    stored = _stored(_build(job, first))
    stored = StoredTls(ca=stored.ca, server=stored.server, sites={"a": stored.sites["a"]})
    again = provision(job, stored, now=NOW, rotate=False)
    assert _serials(again)[:3] == _serials(first)[:3]
    assert again.sites["server"].cert.serial_number != first.sites["server"].cert.serial_number
    again.sites["server"].cert.verify_directly_issued_by(first.ca.cert)


def test_resume_rotates_every_leaf_from_the_same_ca() -> None:
    job = _job()
    first = _tls(job)
    later = NOW + dt.timedelta(days=3)
    rotated = provision(job, _stored(_build(job, first)), now=later, rotate=True)
    assert rotated.ca.cert.serial_number == first.ca.cert.serial_number
    for old, new in zip(_serials(first)[1:], _serials(rotated)[1:], strict=True):
        assert old != new
    assert rotated.server.key_pem() != first.server.key_pem()
    assert rotated.server.cert.not_valid_after_utc == certificates.job_validity(job, later).not_after
    assert rotated.not_after > first.not_after


def test_a_ca_that_would_expire_before_the_new_leaves_is_replaced_on_resume() -> None:
    job = _job()
    first = _tls(job)
    late = first.ca.cert.not_valid_after_utc - dt.timedelta(hours=1)  # still valid, but not for the new leaves
    rotated = provision(job, _stored(_build(job, first)), now=late, rotate=True)
    assert rotated.ca.cert.serial_number != first.ca.cert.serial_number
    rotated.server.cert.verify_directly_issued_by(rotated.ca.cert)
    # Without a resume the CA stays (running pods trust it), and the leaves it signed stay too.
    kept = provision(job, _stored(_build(job, first)), now=late, rotate=False)
    assert kept.ca.cert.serial_number == first.ca.cert.serial_number


@pytest.mark.parametrize("damage", ["garbage-ca", "expired", "foreign-leaf"])
def test_unusable_stored_material_is_replaced(damage: str) -> None:
    job = _job()
    first = _tls(job)
    stored = _stored(_build(job, first))
    now = NOW
    if damage == "garbage-ca":
        stored = StoredTls(ca={"tls.crt": "nope", "tls.key": "nope"}, server=stored.server, sites=stored.sites)
    elif damage == "expired":
        now = first.ca.cert.not_valid_after_utc + dt.timedelta(seconds=1)
    else:  # a leaf of another CA (another job's, say) sits in our Secret
        other = _tls(job)
        foreign = {CERT_FILE: other.sites["a"].cert_pem().decode(), KEY_FILE: other.sites["a"].key_pem().decode()}
        stored = StoredTls(ca=stored.ca, server=stored.server, sites={**stored.sites, "a": foreign})
    again = provision(job, stored, now=now, rotate=False)
    again.sites["a"].cert.verify_directly_issued_by(again.ca.cert)
    assert again.sites["a"].cert.serial_number != first.sites["a"].cert.serial_number
    if damage == "foreign-leaf":
        assert again.ca.cert.serial_number == first.ca.cert.serial_number
        assert again.sites["server"].cert.serial_number == first.sites["server"].cert.serial_number


# --- status --------------------------------------------------------------------------------------------------


def test_status_says_when_the_first_certificate_expires() -> None:
    job = _job()
    tls = _tls(job)
    out = with_tls_status(job, {}, {"phase": "Pending"}, tls, "2030-01-01T00:00:00Z")
    expected = min(c.not_valid_after_utc for c in (tls.ca.cert, tls.server.cert, tls.sites["a"].cert))
    assert out["certificates"] == {"notAfter": expected.strftime("%Y-%m-%dT%H:%M:%SZ"), "issuer": "job-ca"}
    assert out["phase"] == "Pending" and "conditions" not in out
    assert with_tls_status(job, out, {}, tls, "later") == {}  # unchanged: nothing to write


def test_disabled_tls_is_a_condition_and_turning_it_on_again_clears_it() -> None:
    off = with_tls_status(_job(tls="disabled"), {"certificates": {"notAfter": "x"}}, {}, None, "t1")
    (cond,) = off["conditions"]
    assert cond["type"] == "TLSDisabled" and cond["status"] == "True" and "plaintext" in cond["message"]
    assert off["certificates"] is None
    assert with_tls_status(_job(tls="disabled"), off, {}, None, "t2") == {}
    job = _job()
    on = with_tls_status(job, off, {}, _tls(job), "t3")
    assert [(c["type"], c["status"], c["lastTransitionTime"]) for c in on["conditions"]] == [
        ("TLSDisabled", "False", "t3")]
