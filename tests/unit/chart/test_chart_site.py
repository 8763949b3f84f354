"""Chart site mode: the operator runs the FLSite handlers with exactly the rights fedkube/operator/site uses."""

from __future__ import annotations

import re

from tests.support import fixtures
from tests.unit.chart.test_chart import _render, _rules

k8s_tools = fixtures.k8s_tools

SITE = fixtures.ROOT / "fedkube" / "operator" / "site"
_CALL = re.compile(r"\.(create|read|patch|delete)_namespaced_(secret|pod)\(")
_VERB = {"create": "create", "read": "get", "patch": "patch", "delete": "delete"}
# kopf on the FLSite resource (list/watch, progress annotations, status), Events, and blockOwnerDeletion children.
KOPF = {("fedkube.dev", "flsites", "list"), ("fedkube.dev", "flsites", "watch"), ("fedkube.dev", "flsites", "patch"),
        ("fedkube.dev", "flsites/status", "patch"), ("fedkube.dev", "flsites/finalizers", "update"),
        ("", "events", "create")}


def _used() -> set[tuple[str, str, str]]:
    calls = {m for path in SITE.glob("*.py") for m in _CALL.findall(path.read_text())}
    return {("", f"{kind}s", _VERB[verb]) for verb, kind in calls} | KOPF


def test_site_mode_grants_what_the_site_operator_uses(k8s_tools: fixtures.KubeTools) -> None:
    """helm lint --strict and kubernetes-validate run on this config with the others (test_chart.CONFIGS)."""
    docs = _render(k8s_tools, "site")
    assert _rules(docs, "Role") == _used()
    env = {e["name"]: e.get("value") for d in docs if d["kind"] == "Deployment"
           for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FEDKUBE_OPERATOR_MODE"] == "site"
    default = {e["name"]: e.get("value") for d in _render(k8s_tools) if d["kind"] == "Deployment"
               for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert default["FEDKUBE_OPERATOR_MODE"] == "server"
