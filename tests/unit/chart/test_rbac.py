"""The chart grants the operator exactly the API rights its code uses: a missing rule fails, and so does an unused one.

The used rights are derived, not listed: a static scan of the operator package
for the ``kubernetes`` client methods it names (``create_namespaced_pod`` is
pods/create), plus what kopf does for the resource the handlers are registered
on, plus ``fljobs/finalizers`` update when the builders set
``blockOwnerDeletion``. A static scan rather than recording the calls the
emulated API receives during the operator tests: a recording only sees the
paths those tests happen to run (an unexercised delete path would lose its
rule, or a slow test left out would), while the scan sees every call in the
code. It cannot be fooled by names built at run time, because
:func:`test_the_operator_names_every_api_method_literally` fails on any
``getattr`` with a computed name in the package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from fedkube.operator import builders, certapi, handlers
from fedkube.operator.certificates import TlsPlaceholder
from fedkube.spec import parse_job
from tests.support import fixtures
from tests.unit.chart.test_chart import NAMESPACE, _one, _render, _rules

k8s_tools = fixtures.k8s_tools

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)

OPERATOR = fixtures.ROOT / "fedkube" / "operator"
GROUP, _, PLURAL = handlers.RESOURCE
_NAMESPACED = re.compile(r"^(create|read|get|list|patch|replace|delete|delete_collection)_namespaced_([a-z_]+)$")
_VERBS = {"create": "create", "read": "get", "get": "get", "list": "list", "patch": "patch", "replace": "update",
          "delete": "delete", "delete_collection": "deletecollection"}

# What kopf itself does, which no line of ours shows: for the resource the handlers are registered on, it lists
# and watches it, patches its progress annotations (handlers.configure keeps progress in annotations) and
# patches the status subresource with what the handlers put in ``patch.status``; kopf.event() creates Events.
KOPF_NAMESPACED = {(GROUP, PLURAL, "list"), (GROUP, PLURAL, "watch"), (GROUP, PLURAL, "patch"),
                   (GROUP, f"{PLURAL}/status", "patch"), ("", "events", "create")}
# kopf's resource observer lists and watches CRDs (cluster-scoped, so a ClusterRole in either scope). It would
# also list namespaces when not cluster-wide, but falls back to the given ones when that is forbidden.
KOPF_CLUSTER = {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
# kopf peering (replicas > 1, fedkube.operator.main): each replica reads and watches the peering object and patches
# its keep-alive into it; a KopfPeering per watched namespace, or the ClusterKopfPeering of a cluster-wide operator.
PEERING_VERBS = ("get", "list", "watch", "patch")
KOPF_PEERING = {("kopf.dev", "kopfpeerings", v) for v in PEERING_VERBS}
KOPF_CLUSTER_PEERING = {("kopf.dev", "clusterkopfpeerings", v) for v in PEERING_VERBS}
# The chart configs of tests/unit/chart/test_chart.py that run two replicas.
PEERED = {"two-namespaces", "cluster-scope"}


def _operator_sources() -> list[Path]:
    return sorted(OPERATOR.glob("*.py"))


# The one module whose custom-object calls are cert-manager's Certificates, not FLJobs (fedkube.operator.certapi).
CERTAPI = OPERATOR / "certapi.py"


def _rule(method: str, custom: tuple[str, str] = (GROUP, PLURAL)) -> Rule | None:
    """The rule a ``kubernetes`` client method needs, or None for a name that is no API call.

    ``custom``: (group, plural) of the custom resource the module's custom-object calls address."""
    m = _NAMESPACED.match(method)
    if m is None:
        return None
    verb, what = _VERBS[m.group(1)], m.group(2)
    sub = ""
    if what.endswith("_status"):
        what, sub = what[: -len("_status")], "/status"
    if what == "custom_object":
        return (custom[0], custom[1] + sub, verb)
    if what == "network_policy":  # fedkube.operator.netpol
        return ("networking.k8s.io", "networkpolicies" + sub, verb)
    if what == "pod_disruption_budget":  # fedkube.operator.disruption
        return ("policy", "poddisruptionbudgets" + sub, verb)
    return ("", what.replace("_", "") + "s" + sub, verb)


def code_rules() -> set[Rule]:
    """Every rule the operator package's own API calls need (the client methods it names)."""
    out: set[Rule] = set()
    for path in _operator_sources():
        custom = (certapi.GROUP, certapi.PLURAL) if path == CERTAPI else (GROUP, PLURAL)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = node.attr if isinstance(node, ast.Attribute) else None
            rule = _rule(name, custom) if name else None
            if rule is not None:
                out.add(rule)
    return out


def owner_rules() -> set[Rule]:
    """``fljobs/finalizers`` update when children set blockOwnerDeletion (OwnerReferencesPermissionEnforcement)."""
    owner = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "FLJob", "metadata": {"name": "j", "uid": "u"}}
    job = parse_job({"apiVersion": f"{GROUP}/v1alpha1", "kind": "FLJob", "metadata": {"name": "j", "namespace": "n"},
                     "spec": {"rounds": 1, "clients": [{"name": "a"}],
                              "trainer": {"image": "t", "command": ["python"]}}})
    children = builders.build_all(job, tokens={"a": "t"}, tls=TlsPlaceholder(), owner=owner)
    blocking = any(ref.get("blockOwnerDeletion") for c in children for ref in c["metadata"]["ownerReferences"])
    return {(GROUP, f"{PLURAL}/finalizers", "update")} if blocking else set()


def used_in_namespace() -> set[Rule]:
    return code_rules() | owner_rules() | KOPF_NAMESPACED


def _same(granted: set[Rule], used: set[Rule], where: str) -> None:
    missing, unused = sorted(used - granted), sorted(granted - used)
    assert not missing and not unused, (
        f"{where}: missing {missing} (the operator needs them: add them to charts/fedkube/templates/rbac.yaml); "
        f"unused {unused} (nothing in fedkube/operator or kopf uses them: remove them from the chart)")


def test_the_operator_names_every_api_method_literally() -> None:
    """The scan above sees every call only if no method name is computed: no getattr with a non-literal name."""
    computed = []
    for path in _operator_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and not (len(node.args) > 1 and isinstance(node.args[1], ast.Constant))):
                computed.append(f"{path.name}:{node.lineno}")
    assert not computed, (f"getattr with a computed name at {computed}: the RBAC test cannot see which API call it "
                          "makes; name the client method literally (see the tables in fedkube/operator/kube.py)")


def test_the_scan_finds_the_calls_of_the_api_module() -> None:
    """The scan reads what kube.py really calls (a scan that finds nothing would make the chart tests vacuous)."""
    rules = code_rules()
    assert {("", "pods", "create"), ("", "pods", "list"), ("", "secrets", "get"), (GROUP, PLURAL, "get")} <= rules
    assert _rule("patch_namespaced_pod_status") == ("", "pods/status", "patch")
    assert _rule("delete_collection_namespaced_persistent_volume_claim") == (
        "", "persistentvolumeclaims", "deletecollection")
    assert _rule("patch_namespaced_custom_object_status") == (GROUP, f"{PLURAL}/status", "patch")
    assert _rule("to_dict") is None


def _env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize(("config", "namespaces"), [("default", [NAMESPACE]), ("two-namespaces", ["ml", "research"])])
def test_namespace_scope_grants_what_the_operator_uses_in_each_watched_namespace_only(
    k8s_tools: fixtures.KubeTools, config: str, namespaces: list[str],
) -> None:
    docs = _render(k8s_tools, config)
    account = _one(docs, "ServiceAccount")["metadata"]["name"]
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert sorted(roles) == sorted(bindings) == sorted(namespaces)
    peering = KOPF_PEERING if config in PEERED else set()
    for ns in namespaces:
        _same(_rules([roles[ns]], "Role"), used_in_namespace() | peering, f"Role in namespace {ns}")
        assert bindings[ns]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                           "name": roles[ns]["metadata"]["name"]}
        assert bindings[ns]["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    # CRDs are cluster-scoped; nothing else is cluster-wide.
    _same(_rules(docs, "ClusterRole"), KOPF_CLUSTER, "the ClusterRole of a namespace-scoped operator")
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == _one(docs, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert _env(docs)["FEDKUBE_WATCH_NAMESPACES"] == ",".join(namespaces)


def test_cluster_scope_grants_what_the_operator_uses(k8s_tools: fixtures.KubeTools) -> None:
    docs = _render(k8s_tools, "cluster-scope")
    _same(_rules(docs, "ClusterRole"), used_in_namespace() | KOPF_CLUSTER | KOPF_CLUSTER_PEERING, "the ClusterRole")
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": _one(docs, "ServiceAccount")["metadata"]["name"], "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == _one(docs, "ClusterRole")["metadata"]["name"]
    assert _env(docs)["FEDKUBE_WATCH_NAMESPACES"] == ""
