"""NodePort exposure: the join bundles carry the nodePorts the API server gave ``{job}-remote`` (issue 16)."""

from __future__ import annotations

import base64
import copy
from typing import Any

import kopf
import kubernetes

from fedkube.operator import builders, certificates, handlers, joins
from fedkube.security import enroll
from fedkube.spec import FLJob, parse_job
from tests.support import fixtures
from tests.unit.operator.test_remote_builders import NOW, _remote_job
from tests.unit.spec.manifests import example_manifest

kube = fixtures.kube
NODE_PORT = {"type": "NodePort", "externalAddresses": ["198.51.100.4", "198.51.100.5"]}


def _bundle(secret: dict[str, Any]) -> enroll.JoinBundle:
    return enroll.JoinBundle.from_text(base64.b64decode(secret["data"][joins.BUNDLE_FILE]).decode())


def _objects(job: FLJob) -> list[dict[str, Any]]:
    tls = certificates.provision(job, certificates.StoredTls(), now=NOW, rotate=False)
    return builders.build_all(job, tokens={c.name: f"t-{c.name}" for c in job.spec.clients}, tls=tls)


def test_the_assigned_node_ports_replace_the_bundles_ports_and_nothing_else() -> None:
    job = _remote_job(NODE_PORT)
    objs = _objects(job)
    service = next(o for o in objs if o["metadata"]["name"] == joins.remote_service_name(job.name))
    assert joins.node_ports(job, service) is None  # as rendered: the API server has not chosen yet
    assigned = copy.deepcopy(service)
    for number, port in zip((31001, 31002, 31003), assigned["spec"]["ports"], strict=True):
        port["nodePort"] = number
    ports = joins.node_ports(job, assigned)
    assert ports == {"grpc": 31001, "bulk": 31002, "enroll": 31003}
    rewritten = [joins.with_node_ports(o, job, ports) for o in objs]
    changed = [new for old, new in zip(objs, rewritten, strict=True) if new is not old]
    site = next(c.name for c in job.spec.clients if c.remote)
    assert [o["metadata"]["name"] for o in changed] == [joins.join_secret_name(job.name, site)]
    bundle = _bundle(changed[0])
    assert (bundle.grpc_port, bundle.bulk_port, bundle.enroll_port) == (31001, 31002, 31003)
    assert bundle.addresses == ("198.51.100.4", "198.51.100.5") and bundle.token == _bundle(
        next(o for o in objs if o is not changed[0] and o["metadata"]["name"] == changed[0]["metadata"]["name"])
    ).token  # fmt: skip
    # A LoadBalancer forwards the Service ports as they are: its bundles keep 7070/8471/8472.
    lb = _remote_job()
    assert joins.node_ports(lb, assigned) is None


def test_the_operator_reads_the_node_ports_back_into_the_join_bundle(kube: fixtures.KubeHandle) -> None:
    core = kubernetes.client.CoreV1Api(kube.api_client)
    # The children's owner must exist or the emulated garbage collector removes them; any object's uid does
    # (registering the FLJob CRD would cost seconds of YAML parsing).
    owner = core.create_namespaced_config_map("default", {"metadata": {"name": "owner"}})
    body = example_manifest()
    body["spec"]["clients"][-1]["remote"] = True
    body["spec"].setdefault("server", {})["expose"] = NODE_PORT
    body["metadata"].update(namespace="default", uid=owner.metadata.uid)
    job = parse_job(body)
    memo = kopf.Memo()
    memo[handlers.Memo.API_CLIENT] = kube.api_client
    site = next(c.name for c in job.spec.clients if c.remote)

    def bundle_and_ports() -> tuple[enroll.JoinBundle, list[int]]:
        service = core.read_namespaced_service(joins.remote_service_name(job.name), "default")
        secret = core.read_namespaced_secret(joins.join_secret_name(job.name, site), "default")
        return _bundle({"data": secret.data}), [p.node_port for p in service.spec.ports]

    patch = kopf.Patch()
    handlers._ensure(job, kopf.Body(body), memo, patch, pods=False)
    assert not patch, patch  # no child refused or taken
    bundle, node_ports = bundle_and_ports()
    assert all(30000 <= p <= 32767 for p in node_ports)
    assert [bundle.grpc_port, bundle.bulk_port, bundle.enroll_port] == node_ports
    handlers._ensure(job, kopf.Body(body), memo, kopf.Patch(), pods=False)  # a later reconcile: the same ports
    assert bundle_and_ports() == (bundle, node_ports)
