"""FLSite: the spec, the policy's refusals, the site's client pod, and a refused CA never enrolling."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fedkube import envvars
from fedkube.operator.site import builders, handlers, policy
from fedkube.security.enroll import JoinBundle
from fedkube.spec.site import FLSite, SitePolicy

CA = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def _bundle(ca: str = CA) -> JoinBundle:
    return JoinBundle(namespace="ml", job="mnist", site="hospital-b", server_name="fl.example.org",
                      addresses=("fl.example.org",), grpc_port=7070, bulk_port=8471, enroll_port=8472,
                      ca_pem="", ca_sha256=ca, token="fkj1.ml.mnist.hospital-b.x",
                      expires_at="2030-01-01T00:00:00Z")  # fmt: skip


def _site(**policy_: Any) -> FLSite:
    return FLSite.model_validate({
        "metadata": {"name": "mnist-b", "namespace": "site-ns", "uid": "u1"},
        "spec": {
            "joinBundleSecretRef": {"name": "mnist-join"},
            "trainer": {"image": "hospital/train:1", "command": ["python", "train.py"],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "scans"}}],
                        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
                        "resources": {"limits": {"nvidia.com/gpu": "1"}}},
            "sidecar": {"image": "registry.hospital/fedkube:1"},
            "policy": {"acceptedCaFingerprints": [CA.upper().replace("SHA256", "sha256")], **policy_},
        },
    })  # fmt: skip


def test_policy_needs_fingerprints_of_the_right_shape() -> None:
    with pytest.raises(ValidationError, match="not a CA fingerprint"):
        SitePolicy.model_validate({"acceptedCaFingerprints": ["3f1c"]})
    with pytest.raises(ValidationError):
        SitePolicy.model_validate({"acceptedCaFingerprints": []})


def test_bundle_of_an_unaccepted_ca_is_refused() -> None:
    assert policy.check_bundle(_site().spec.policy, _bundle()) is None  # case-insensitive match
    refusal = policy.check_bundle(_site().spec.policy, _bundle(OTHER))
    assert refusal is not None and refusal.reason == policy.CA_NOT_ACCEPTED and OTHER in refusal.message


@pytest.mark.parametrize(("rounds", "strategy", "reason"), [
    (10, "fedavg", None), (11, "fedavg", policy.ROUNDS_NOT_ACCEPTED), (5, "krum", policy.STRATEGY_NOT_ACCEPTED),
    (None, None, None),
])  # fmt: skip
def test_task_policy(rounds: int | None, strategy: str | None, reason: str | None) -> None:
    site = _site(maxRounds=10, allowedStrategies=["fedavg", "median"])
    got = policy.check_task(site.spec.policy, total_rounds=rounds, strategy=strategy)
    assert (got.reason if got else None) == reason


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_site_pod_dials_the_remote_server_with_the_sites_own_trainer() -> None:
    site = _site()
    owner = {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLSite", "metadata": {"name": "mnist-b", "uid": "u1"}}
    pod = builders.build_site_pod(site, _bundle(), owner=owner)
    assert pod["metadata"]["name"] == "mnist-b-client" and pod["metadata"]["namespace"] == "site-ns"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "FLSite"
    sidecar, trainer = pod["spec"]["initContainers"][0], pod["spec"]["containers"][0]
    assert sidecar["image"] == "registry.hospital/fedkube:1"
    env = _env(sidecar)
    assert env[envvars.SERVER_ADDRESS] == "fl.example.org:7070"
    assert env[envvars.SERVER_BULK_ADDRESS] == "fl.example.org:8471"
    assert env[envvars.TLS_SERVER_NAME] == "fl.example.org" and env[envvars.TLS] == "enabled"
    assert (env[envvars.JOB], env[envvars.NAMESPACE], env[envvars.SITE]) == ("mnist", "ml", "hospital-b")
    assert env[envvars.TOKEN_FILE].startswith(env[envvars.TLS_DIR])
    secrets = {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    assert secrets == {"mnist-b-tls"}  # the enrolled Secret only: no operator token Secret, no job's TLS Secret
    assert trainer["image"] == "hospital/train:1" and trainer["command"] == ["python", "train.py"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in trainer["volumeMounts"]
    assert _env(trainer)[envvars.JOB] == "mnist"
    assert not any(m["name"] == "fedkube-tls" for m in trainer["volumeMounts"])  # the key is the sidecar's only


def test_tls_secret_is_a_kubernetes_tls_secret_with_the_token() -> None:
    secret = builders.build_tls_secret(_site(), _bundle(), key_pem=b"k", cert_pem=b"c", ca_pem=b"a", token="t")
    assert secret["type"] == "kubernetes.io/tls" and secret["metadata"]["name"] == "mnist-b-tls"
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key", "token"}


class _Kube:
    def __init__(self, bundle: JoinBundle) -> None:
        self.bundle_text = bundle.to_json().encode()
        self.created: list[str] = []

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return {"bundle.json": self.bundle_text} if name == "mnist-join" else None

    def create(self, manifest: dict[str, Any]) -> bool:
        self.created.append(manifest["metadata"]["name"])
        return True

    def pod(self, namespace: str, name: str) -> None:
        return None


def test_refused_ca_never_enrolls(monkeypatch: pytest.MonkeyPatch) -> None:
    site, kube, enrolled = _site(), _Kube(_bundle(OTHER)), []
    monkeypatch.setattr(handlers, "SiteKube", lambda _client: kube)
    monkeypatch.setattr(handlers.enroll.JoinBundle, "from_text", classmethod(lambda cls, text: _bundle(OTHER)))
    monkeypatch.setattr(handlers, "enroll_site", lambda *a, **k: enrolled.append(a))
    monkeypatch.setattr(handlers.kopf, "warn", lambda *a, **k: None)
    body = {"metadata": site.metadata.model_dump(by_alias=True), "apiVersion": "fedkube.dev/v1alpha1",
            "kind": "FLSite"}
    patch: Any = type("P", (), {"status": {}})()
    handlers.reconcile(body=body, spec=site.spec.model_dump(by_alias=True), status={}, patch=patch,  # type: ignore[arg-type]
                       memo={handlers.Memo.API_CLIENT: None})  # type: ignore[arg-type]
    assert patch.status["phase"] == "Refused" and not enrolled and not kube.created
    cond = patch.status["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Refused", "True", policy.CA_NOT_ACCEPTED)
    assert patch.status["caSha256"] == OTHER
    # Not final: once the admin accepts the CA, the next look enrolls.
    monkeypatch.setattr(handlers.enroll.JoinBundle, "from_text", classmethod(lambda cls, text: _bundle(CA)))
    monkeypatch.setattr(handlers, "_enroll", lambda *a: "2030-01-01T00:00:00Z")
    monkeypatch.setattr(handlers.kopf, "event", lambda *a, **k: None)
    again: Any = type("P", (), {"status": {}})()
    handlers.reconcile(body=body, spec=site.spec.model_dump(by_alias=True), status=patch.status, patch=again,  # type: ignore[arg-type]
                       memo={handlers.Memo.API_CLIENT: None})  # type: ignore[arg-type]
    assert again.status["phase"] == "Joined" and kube.created == ["mnist-b-client"]
    assert again.status["lastError"] is None


@pytest.mark.parametrize(("phase", "want"), [(None, "Joined"), ("Pending", "Joined"), ("Running", "Running"),
                                             ("Succeeded", "Succeeded"), ("Failed", "Failed")])  # fmt: skip
def test_site_phase_follows_the_pod(phase: str | None, want: str) -> None:
    assert handlers.site_phase(None if phase is None else {"status": {"phase": phase}}) == want


def test_operator_mode_picks_the_flsite_handlers() -> None:
    from fedkube.errors import ConfigError
    from fedkube.operator.main import parse_config

    assert parse_config(["--mode", "site"], {}).mode == "site"
    assert parse_config([], {"FEDKUBE_OPERATOR_MODE": "site"}).mode == "site"
    assert parse_config([], {}).mode == "server"
    with pytest.raises(ConfigError, match="server or site"):
        parse_config([], {"FEDKUBE_OPERATOR_MODE": "edge"})


class _Stored(_Kube):
    def __init__(self, bundle: JoinBundle, tls: dict[str, bytes]) -> None:
        super().__init__(bundle)
        self.tls, self.patched = tls, []  # type: ignore[var-annotated]

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.tls if name == "mnist-b-tls" else super().secret_data(namespace, name)

    def patch_secret(self, manifest: dict[str, Any]) -> None:
        self.patched.append(manifest)


def _stored_identity() -> tuple[JoinBundle, dict[str, bytes], str]:
    import datetime as dt

    from fedkube.security import enroll, pki

    now = dt.datetime.now(dt.timezone.utc)
    ca = pki.make_job_ca("ml", "mnist", pki.Validity(now - dt.timedelta(days=1), now + dt.timedelta(days=30)))
    leaf = pki.issue_site_cert(ca, "ml", "mnist", "hospital-b",
                               pki.Validity(now - dt.timedelta(days=6), now + dt.timedelta(days=1)))
    tls = {"ca.crt": ca.cert_pem(), "tls.crt": leaf.cert_pem(), "tls.key": leaf.key_pem(), "token": b"t"}
    stamp = leaf.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return _bundle(enroll.fingerprint(ca.cert)), tls, stamp


def test_a_certificate_near_its_end_is_renewed_with_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedkube.security.enroll_wire import EnrollmentError, Issued

    bundle, tls, stamp = _stored_identity()
    kube, seen = _Stored(bundle, tls), []
    monkeypatch.setattr(handlers.kopf, "event", lambda *a, **k: None)

    def renew(b: JoinBundle, key: Any, cert: Any, key_file: Any, address: Any, **_: Any) -> Issued:
        seen.append((cert.read_bytes(), key_file.read_bytes(), oct(key_file.stat().st_mode & 0o777)))
        return Issued(certificate=b"new", ca=tls["ca.crt"], site_token="t2", not_after="2031-01-01T00:00:00Z")

    monkeypatch.setattr(handlers, "renew_site", renew)
    monkeypatch.setattr(handlers, "enroll_site", lambda *a, **k: pytest.fail("a spent token must not be used again"))
    body = {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLSite", "metadata": {"name": "mnist-b", "uid": "u1"}}
    got = handlers._enroll(kube, _site(), bundle, body, ("127.0.0.1", 1))  # type: ignore[arg-type]
    assert got == "2031-01-01T00:00:00Z" and seen == [(tls["tls.crt"], tls["tls.key"], "0o600")]
    assert kube.patched[0]["data"]["tls.crt"] == "bmV3"  # base64("new")

    def refused(*a: Any, **k: Any) -> Issued:
        raise EnrollmentError("unreachable", "no route")

    monkeypatch.setattr(handlers, "renew_site", refused)
    assert handlers._enroll(kube, _site(), bundle, body, ("127.0.0.1", 1)) == stamp  # type: ignore[arg-type]


def test_an_unchanged_status_is_not_patched_again() -> None:
    first: Any = type("P", (), {"status": {}})()
    handlers._status(first, {}, "Running", "Enrolled", True, "Enrolled", "ok", pod="p")
    again: Any = type("P", (), {"status": {}})()
    handlers._status(again, dict(first.status), "Running", "Enrolled", True, "Enrolled", "ok", pod="p")
    assert first.status["phase"] == "Running" and again.status == {}


def test_the_site_pod_carries_the_sites_policy_and_reports_its_view() -> None:
    from fedkube.operator.site import view
    from fedkube.siteview import SiteView
    from fedkube.terms import TermsPolicy

    pod = builders.build_site_pod(_site(maxRounds=4, allowedStrategies=["fedavg"]), _bundle())
    sidecar = pod["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    policy_ = TermsPolicy.from_json(env[envvars.SITE_POLICY], name=envvars.SITE_POLICY)
    assert (policy_.max_rounds, policy_.allowed_strategies) == (4, ("fedavg",))
    assert policy_.origin == "FLSite site-ns/mnist-b spec.policy"
    assert envvars.SITE_CONTROLLED not in env  # an FLSite's pod leaves through its operator, not on SIGTERM
    assert env[envvars.TERMINATION_LOG] == sidecar["terminationMessagePath"]
    assert {"name": "site-status", "containerPort": envvars.DEFAULT_SITE_STATUS_PORT, "protocol": "TCP"} in (
        sidecar["ports"])
    trainer_env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    assert envvars.SITE_POLICY not in trainer_env
    # Read back: the pod's address and, once the sidecar ended, its termination message; garbage is no view.
    pod["status"] = {"podIP": "10.0.0.7", "initContainerStatuses": [
        {"name": "sidecar", "state": {"terminated": {"message": SiteView("Refused", 0, "PolicyRefused", "m",
                                                                           "RoundsNotAccepted").to_json()}}}]}
    assert view.default_sidecar_url(pod) == f"http://10.0.0.7:{envvars.DEFAULT_SITE_STATUS_PORT}"
    got = view.final_view(pod)
    assert got is not None and (got.state, got.term) == ("Refused", "RoundsNotAccepted")
    pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["message"] = "panic: out of memory"
    assert view.final_view(pod) is None
