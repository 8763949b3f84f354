"""The operator's job CA and certificates against the emulated API: made once, reused, rotated on resume."""

from __future__ import annotations

import time
from typing import Any

import kubernetes
import pytest
from cryptography import x509

from fedkube.operator import handlers
from fedkube.operator import kube as kubeops
from fedkube.security import pki
from fedkube.spec import parse_job
from tests.support import fixtures
from tests.support.waiting import until
from tests.unit.operator.test_handlers import _crd, _doc, _Labelled, _operator, _status

kube = fixtures.kube

pytestmark = pytest.mark.timeout(90)

HOUR = 3600.0
SECRETS = ("j-ca", "j-server-tls", "j-client-a-tls", "j-client-b-tls")
CERT_MANAGER_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "certificates.cert-manager.io"},
    "spec": {
        "group": "cert-manager.io",
        "names": {"plural": "certificates", "singular": "certificate", "kind": "Certificate"},
        "scope": "Namespaced",
        "versions": [{"name": "v1", "served": True, "storage": True,
                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}  # fmt: skip


class Clock:
    """The operator's clock, moved on by the test (days pass between a suspend and a resume)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _secrets(api: kubeops.Kube) -> dict[str, dict[str, str] | None]:
    return {name: api.secret_data("default", name) for name in SECRETS}


def _cert(data: dict[str, str] | None) -> x509.Certificate:
    assert data is not None
    return x509.load_pem_x509_certificate(data["tls.crt"].encode())


def _stamp(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def _suspend(custom: Any, value: bool) -> None:
    custom.patch_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "j",
                                          {"spec": {"suspend": value}})


def test_the_job_ca_is_made_once_kept_across_reconciles_and_resume_rotates_the_leaves(
    kube: fixtures.KubeHandle,
) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    clock = Clock()
    with _operator(kube, clock=clock):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", _doc("j"))
        until(lambda: _status(custom, "j").get("certificates"), "status.certificates of job j")
        first = _secrets(api)
        assert all(first.values()), first
        ca = _cert(first["j-ca"])
        leaves = {name: _cert(first[name]) for name in SECRETS[1:]}
        for name, leaf in leaves.items():
            leaf.verify_directly_issued_by(ca)
            assert first[name]["ca.crt"] == first["j-ca"]["tls.crt"]  # type: ignore[index]
        uris = leaves["j-client-a-tls"].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [pki.site_uri("default", "j", "a")]
        earliest = min([ca, *leaves.values()], key=lambda c: c.not_valid_after_utc)
        assert _status(custom, "j")["certificates"] == {"notAfter": _stamp(earliest), "issuer": "job-ca"}
        assert "j-ca" not in str(api.job_pods("default", "j"))  # the CA key is mounted nowhere
    resumed: set[str] = set()
    with _operator(kube, resumed, clock=clock):  # a restarted operator reconciles again: nothing changes
        until(lambda: "j" in resumed, "the restarted operator to resume job j")
        assert _secrets(api) == first
        _suspend(custom, True)
        until(lambda: _status(custom, "j").get("phase") == "Suspended", "job j Suspended")
        assert _secrets(api) == first
        clock.offset = 2 * HOUR  # the old leaves are still valid: only the resume makes new ones
        _suspend(custom, False)
        until(lambda: api.secret_data("default", "j-server-tls") != first["j-server-tls"], "rotated server cert")
        until(lambda: _status(custom, "j").get("phase") not in (None, "Suspended"), "job j resumed")
        rotated = _secrets(api)
    assert rotated["j-ca"] == first["j-ca"]  # same CA: what the sites and the server trust stays
    for name in SECRETS[1:]:
        new = _cert(rotated[name])
        new.verify_directly_issued_by(ca)
        assert new.serial_number != leaves[name].serial_number
        assert rotated[name]["tls.key"] != first[name]["tls.key"]  # type: ignore[index]
        assert new.not_valid_after_utc > leaves[name].not_valid_after_utc
    earliest = min((_cert(rotated[n]) for n in SECRETS), key=lambda c: c.not_valid_after_utc)
    assert _status(custom, "j")["certificates"]["notAfter"] == _stamp(earliest)


def test_a_job_without_tls_gets_no_certificates_and_a_tls_disabled_condition(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)
    with _operator(kube, clock=Clock()):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("j", security={"tls": "disabled"}))
        until(lambda: len(api.job_pods("default", "j")) == 3, "the 3 pods of job j")
        conds = until(lambda: {c["type"]: c for c in _status(custom, "j").get("conditions") or []}.get("TLSDisabled"),
                      "the TLSDisabled condition")
        assert conds["status"] == "True" and conds["reason"] == "TLSDisabledBySpec" and "plaintext" in conds["message"]
        assert "certificates" not in _status(custom, "j")
        assert _secrets(api) == dict.fromkeys(SECRETS)
        for pod in api.job_pods("default", "j"):
            assert "fedkube-tls" not in str(pod["spec"]["volumes"])


def test_with_an_issuer_ref_cert_manager_gets_certificates_and_no_key_is_made(kube: fixtures.KubeHandle) -> None:
    _crd(kube)
    kubernetes.client.ApiextensionsV1Api(kube.api_client).create_custom_resource_definition(CERT_MANAGER_CRD)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    api = _Labelled(kube)

    def certs() -> dict[str, dict[str, Any]]:
        items = custom.list_namespaced_custom_object("cert-manager.io", "v1", "default", "certificates")["items"]
        return {c["metadata"]["name"]: c for c in items}

    with _operator(kube, clock=Clock()):
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs",
                                               _doc("j", security={"issuerRef": {"name": "org-ca"}}))
        until(lambda: len(certs()) == 3, "three Certificates")
        assert sorted(certs()) == ["j-client-a-tls", "j-client-b-tls", "j-server-tls"]
        fljob = custom.get_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "j")
        for cert in certs().values():
            assert cert["metadata"]["ownerReferences"][0]["uid"] == fljob["metadata"]["uid"]
            assert cert["spec"]["issuerRef"]["name"] == "org-ca"
        assert _secrets(api) == dict.fromkeys(SECRETS)  # cert-manager writes them; we made no key, no CA
        until(lambda: _status(custom, "j").get("certificates"), "status.certificates")
        assert _status(custom, "j")["certificates"] == {"issuer": "Issuer/org-ca"}
        ref = kubeops.JobRef.of(fljob)
        assert kubeops.Kube(kube.api_client).delete_children(ref, handlers._children(parse_job(fljob))) >= 3
        assert certs() == {}
