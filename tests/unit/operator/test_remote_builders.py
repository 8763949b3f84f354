"""Remote sites in the builders: no pod or key for them, join bundles and the enrollment mount for the server."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
from typing import Any

import pytest
from cryptography import x509

from fedkube import envvars
from fedkube.operator import builders, certificates, joins, naming
from fedkube.security import enroll
from fedkube.spec import FLJob, SpecError, parse_job
from tests.unit.operator.kvalidate import K8S_VERSIONS, assert_valid
from tests.unit.spec.manifests import example_manifest

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def _remote_job(expose: dict[str, Any] | None = None) -> FLJob:
    data = example_manifest()
    clients = data["spec"]["clients"]
    clients[-1]["remote"] = True
    data["spec"].setdefault("server", {})["expose"] = expose if expose is not None else {
        "type": "LoadBalancer", "annotations": {"example.com/lb": "internal"},
        "externalAddresses": ["fl.example.org", "203.0.113.7"],
    }  # fmt: skip
    return parse_job(data)


@functools.cache
def _built() -> tuple[FLJob, certificates.JobTls, dict[tuple[str, str], dict[str, Any]]]:
    job = _remote_job()
    tls = certificates.provision(job, certificates.StoredTls(), now=NOW, rotate=False)
    objs = builders.build_all(job, tokens={c.name: f"t-{c.name}" for c in job.spec.clients}, tls=tls)
    return job, tls, {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _data(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def test_a_remote_site_gets_no_pod_token_or_key_but_a_join_bundle() -> None:
    job, tls, objs = _built()
    remote = job.spec.clients[-1].name
    local = [c.name for c in job.spec.clients if not c.remote]
    assert local, "the example must keep an in-cluster site"
    assert ("Pod", naming.client_pod_name(job.name, remote)) not in objs
    assert ("Secret", naming.client_token_secret_name(job.name, remote)) not in objs
    assert ("Secret", naming.client_tls_secret_name(job.name, remote)) not in objs
    assert remote not in tls.sites  # its key is made at the site
    for site in local:
        assert ("Pod", naming.client_pod_name(job.name, site)) in objs
        assert ("Secret", naming.client_tls_secret_name(job.name, site)) in objs
    # The server still holds the site's bearer token: it hands it over at enrollment.
    assert remote in objs[("Secret", naming.server_tokens_secret_name(job.name))]["stringData"]

    bundle = enroll.JoinBundle.from_text(_data(objs[("Secret", joins.join_secret_name(job.name, remote))],
                                               joins.BUNDLE_FILE))
    assert (bundle.namespace, bundle.job, bundle.site) == (job.namespace, job.name, remote)
    assert bundle.server_name == "fl.example.org"
    assert bundle.addresses == ("fl.example.org", "203.0.113.7")
    assert bundle.ca_sha256 == enroll.fingerprint(tls.ca.cert)
    assert enroll.parse_token(bundle.token).site == remote

    # The server side holds only the token's hash, valid joinTokenSeconds from the certificates' making.
    table = json.loads(_data(objs[("Secret", joins.enroll_secret_name(job.name))], joins.ENROLL_TOKENS))
    assert set(table) == {remote}
    record = enroll.TokenRecord.from_dict(table[remote])
    assert record.sha256 == enroll.token_hash(bundle.token)
    assert bundle.token not in json.dumps(table)
    made = tls.server.cert.not_valid_before_utc + dt.timedelta(minutes=5)
    assert record.expires_at == (made + dt.timedelta(seconds=24 * 3600)).timestamp()


def test_the_server_is_exposed_with_its_external_names_and_the_enrollment_port() -> None:
    job, tls, objs = _built()
    inside = objs[("Service", naming.server_name(job.name))]
    assert inside["spec"]["type"] == "ClusterIP" and "annotations" not in inside["metadata"]
    service = objs[("Service", joins.remote_service_name(job.name))]
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == {"example.com/lb": "internal"}
    assert service["spec"]["selector"] == inside["spec"]["selector"]
    # Only what remote sites use goes public: never the status or metrics port.
    assert [p["port"] for p in service["spec"]["ports"]] == [7070, 8471, 8472]
    san = tls.server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["203.0.113.7"]

    pod = objs[("Pod", naming.server_name(job.name))]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[envvars.ENROLL_DIR] == joins.ENROLL_DIR and env[envvars.ENROLL_PORT] == "8472"
    assert {"name": "enroll", "containerPort": 8472, "protocol": "TCP"} in container["ports"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == joins.VOLUME_ENROLL)
    secrets = [s["secret"]["name"] for s in volume["projected"]["sources"]]
    assert secrets == [naming.ca_secret_name(job.name), joins.enroll_secret_name(job.name)]
    for obj in objs.values():
        for version in K8S_VERSIONS:
            assert_valid(obj, version)


def test_the_enrollment_ledger_outlives_the_server_pod_on_a_claim() -> None:
    # Without a checkpoint claim: a small claim of its own, mounted where FEDKUBE_ENROLL_LEDGER_DIR says.
    job, _, objs = _built()
    assert not job.spec.server.checkpoint.enabled
    claim = objs[("PersistentVolumeClaim", joins.ledger_claim_name(job.name))]
    assert claim["spec"]["resources"]["requests"]["storage"] == joins.LEDGER_SIZE
    assert claim["metadata"]["labels"] == objs[("Pod", naming.server_name(job.name))]["metadata"]["labels"]
    pod = objs[("Pod", naming.server_name(job.name))]
    container = pod["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}[envvars.ENROLL_LEDGER_DIR] == joins.LEDGER_DIR
    assert {"name": joins.VOLUME_LEDGER, "mountPath": joins.LEDGER_DIR} in container["volumeMounts"]
    assert {"name": joins.VOLUME_LEDGER, "persistentVolumeClaim": {"claimName": joins.ledger_claim_name(job.name)}} \
        in pod["spec"]["volumes"]
    # With a checkpoint claim the ledger stays beside the checkpoints (a resumed job reads it there): no second claim.
    data = _remote_job().model_dump(by_alias=True, exclude_none=True)
    data["spec"]["server"]["checkpoint"] = {"enabled": True}
    with_ckpt = parse_job(data)
    tls = certificates.provision(with_ckpt, certificates.StoredTls(), now=NOW, rotate=False)
    built = builders.build_all(with_ckpt, tokens={c.name: "t" for c in with_ckpt.spec.clients}, tls=tls)
    assert joins.ledger_claim_name(job.name) not in [o["metadata"]["name"] for o in built]
    assert envvars.ENROLL_LEDGER_DIR not in json.dumps(built)


def test_reconcile_keeps_the_server_certificate_and_tokens_while_a_new_address_reissues_it() -> None:
    job, tls, _ = _built()
    stored = certificates.StoredTls(
        ca={k: v.decode() for k, v in certificates.ca_files(tls).items()},
        server={k: v.decode() for k, v in tls.for_server().files().items()},
    )
    again = certificates.provision(job, stored, now=NOW + dt.timedelta(hours=1), rotate=False)
    assert again.server.cert == tls.server.cert
    assert joins.join_tokens(job, again) == joins.join_tokens(job, tls)
    moved = _remote_job({"type": "NodePort", "externalAddresses": ["fl.example.org", "198.51.100.9"]})
    changed = certificates.provision(moved, stored, now=NOW + dt.timedelta(hours=1), rotate=False)
    assert changed.server.cert != tls.server.cert
    assert joins.join_tokens(moved, changed) != joins.join_tokens(job, tls)  # a new server cert, new tokens


def test_a_job_without_remote_sites_builds_no_enrollment_objects() -> None:
    job = parse_job(example_manifest())
    tls = certificates.provision(job, certificates.StoredTls(), now=NOW, rotate=False)
    objs = builders.build_all(job, tokens={c.name: "t" for c in job.spec.clients}, tls=tls)
    assert not [o for o in objs if o["metadata"]["name"].startswith(f"{job.name}-join-")]
    assert all(joins.VOLUME_ENROLL not in json.dumps(o) for o in objs)
    assert not [o for o in objs if o["metadata"]["name"] == joins.ledger_claim_name(job.name)]
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Service"] == [naming.server_name(job.name)]


@pytest.mark.parametrize("address", ["https://fl.example.org", "fl.example.org:443", "FL.example.org", ""])
def test_external_addresses_are_host_names_or_ips(address: str) -> None:
    with pytest.raises(SpecError, match="externalAddresses"):
        _remote_job({"externalAddresses": [address]})


@pytest.mark.parametrize(("security", "what"), [({"tls": "disabled"}, "tls is disabled"),
                                                ({"issuerRef": {"name": "ca"}}, "issuerRef")])
def test_a_remote_site_needs_tls_from_the_job_ca(security: dict[str, Any], what: str) -> None:
    data = _remote_job().to_manifest()
    data["spec"]["security"] = security
    with pytest.raises(SpecError, match=what):
        parse_job(data)


def test_a_remote_site_behind_a_cluster_ip_is_warned_about() -> None:
    from fedkube.spec.checks import check_job

    errors, warnings = check_job(_remote_job({}))
    assert not errors
    assert any(w.path == "spec.server.expose" for w in warnings)
    assert not any(w.path == "spec.server.expose" for w in check_job(_remote_job())[1])


def test_the_server_network_policy_opens_the_site_ports_to_remote_sites_only_when_there_are_some() -> None:
    from fedkube.operator.netpol import NetworkPolicyConfig

    def server_ingress(job: FLJob) -> list[dict[str, Any]]:
        tls = certificates.provision(job, certificates.StoredTls(), now=NOW, rotate=False)
        objs = builders.build_all(job, tokens={c.name: "t" for c in job.spec.clients}, tls=tls,
                                  network=NetworkPolicyConfig("ops"))
        policy = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-server"))
        return list(policy["spec"]["ingress"])

    anywhere = [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]
    remote = [rule for rule in server_ingress(_remote_job()) if rule["from"] == anywhere]
    assert [{p["port"] for p in rule["ports"]} for rule in remote] == [{7070, 8471, 8472}]
    assert not [rule for rule in server_ingress(parse_job(example_manifest())) if rule["from"] == anywhere]


def test_a_remote_site_without_a_pod_is_shown_waiting_to_join() -> None:
    from fedkube.operator.status import judge_site
    from fedkube.operator.views import ServerWord

    job = _remote_job()
    verdict = judge_site(job, job.spec.clients[-1].name, None, None, ServerWord.of(None, None), now=0.0)
    assert verdict.status.state.value == "Pending" and verdict.delete_pod is None
    assert f"{job.name}-join-" in (verdict.status.message or "")


def test_render_shows_no_token_or_hash() -> None:
    job = _remote_job()
    objs = builders.build_all(job, tokens={c.name: naming.TOKEN_PLACEHOLDER for c in job.spec.clients},
                              tls=certificates.TlsPlaceholder())
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    remote = job.spec.clients[-1].name
    assert _data(secrets[joins.join_secret_name(job.name, remote)], joins.BUNDLE_FILE) == naming.TOKEN_PLACEHOLDER
    assert json.loads(_data(secrets[joins.enroll_secret_name(job.name)], joins.ENROLL_TOKENS)) == {
        remote: naming.TOKEN_PLACEHOLDER}
