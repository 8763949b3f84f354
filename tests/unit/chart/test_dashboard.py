"""The Grafana dashboard: well-formed, valid PromQL, only exported metrics, and shipped by the chart."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import fixtures
from tests.unit.metrics.observations import exercised

k8s_tools = fixtures.k8s_tools

CHART = fixtures.ROOT / "charts" / "fedkube"
DASHBOARD = CHART / "dashboards" / "fedkube.json"
# Grafana expands these before Prometheus sees the query; any valid duration stands in for them.
MACROS = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m"}
GRID_WIDTH = 24


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
           for p in all_panels(dash) if p["type"] != "row" for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            assert m, f"variable {var['name']}: expected label_values(<selector>, <label>), got {q!r}"
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def parse(expr: str) -> Any:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return promql_parser.parse(expr)


def metric_names(node: Any) -> set[str]:
    """Names of every vector selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        assert node.name, f"selector without a metric name: {node}"
        return {node.name}
    if isinstance(node, promql_parser.MatrixSelector):
        return metric_names(node.vector_selector)
    if isinstance(node, promql_parser.BinaryExpr):
        return metric_names(node.lhs) | metric_names(node.rhs)
    if isinstance(node, promql_parser.AggregateExpr):
        return metric_names(node.expr) | (metric_names(node.param) if node.param is not None else set())
    if isinstance(node, promql_parser.Call):
        return set().union(*(metric_names(a) for a in node.args))
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return metric_names(node.expr)
    if isinstance(node, promql_parser.NumberLiteral | promql_parser.StringLiteral):
        return set()
    raise AssertionError(f"unhandled PromQL node {type(node).__name__}: {node}")


def exported_sample_names() -> set[str]:
    names: set[str] = set()
    for registry in exercised().values():
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names.update(s.name for s in family.samples)
    return names


def missing(dash: dict[str, Any], exported: set[str]) -> list[str]:
    return [f"{where}: {name}" for where, expr in queries(dash) for name in sorted(metric_names(parse(expr)))
            if name not in exported]


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    dash = load()
    exported = exported_sample_names()
    assert not missing(dash, exported), "dashboard queries metrics no registry exports:\n" + "\n".join(
        missing(dash, exported))


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(parse(e)) for _, e in queries(load())))
    for name in ("fedkube_server_current_round", "fedkube_server_rounds_planned",  # round progress
                 "fedkube_server_clients", "fedkube_sidecar_trainer_state",  # per-client state
                 "fedkube_server_transfer_bytes_total", "fedkube_sidecar_relayed_bytes_total",  # throughput
                 "process_resident_memory_bytes", "fedkube_component_info",  # RSS per component
                 "fedkube_server_client_failures_total", "fedkube_operator_timeouts_total"):  # failures
        assert name in used, name


def test_the_check_catches_a_metric_that_does_not_exist() -> None:
    dash = load()
    first = next(p for p in all_panels(dash) if p["type"] != "row")
    first["targets"][0]["expr"] = 'sum(rate(fedkube_server_nonexistent_total{fljob=~"$fljob"}[$__rate_interval]))'
    assert missing(dash, exported_sample_names()) == [
        f"panel {first['id']} {first['title']!r} A: fedkube_server_nonexistent_total"]


def test_every_query_is_valid_promql() -> None:
    for where, expr in queries(load()):
        try:
            parse(expr)
        except Exception as exc:  # the parser raises a plain ValueError-like error with the position
            pytest.fail(f"{where}: {expr!r} is not valid PromQL: {exc}")
    with pytest.raises(Exception):  # noqa: B017 - the parser's error type is not part of its API
        parse("sum(rate(x[5m])")


def test_dashboard_structure() -> None:
    dash = load()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], int] = {}
    for p in all_panels(dash):
        g = p["gridPos"]
        assert set(g) == {"x", "y", "w", "h"} and all(isinstance(v, int) for v in g.values()), p["title"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= GRID_WIDTH and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[(x, y)]} at {(x, y)}"
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), f"panel {p['id']} needs a title and a description"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]


def test_queries_use_only_bounded_labels_and_never_the_scrape_job_for_fl_jobs() -> None:
    # `job` is Prometheus's scrape-job label; the FL job is `fljob`. Filtering on job="$fljob" would match nothing.
    for where, expr in queries(load()):
        assert not re.search(r"\bjob\s*=~?\s*\"\$", expr), f"{where}: filter the FL job with fljob, not job"


# --- the chart ships it --------------------------------------------------------------------------------------------


def _helm(tools: fixtures.KubeTools, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools.helm), *args], capture_output=True, text=True, timeout=60)


def _render(tools: fixtures.KubeTools, *args: str) -> list[dict[str, Any]]:
    proc = _helm(tools, "template", "fedkube", str(CHART), "--namespace", "fedkube-system", *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_chart_lints_strictly_with_the_dashboard_on(k8s_tools: fixtures.KubeTools) -> None:
    proc = _helm(k8s_tools, "lint", "--strict", str(CHART), "--set", "dashboards.enabled=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_configmap_is_off_by_default(k8s_tools: fixtures.KubeTools) -> None:
    assert not [d for d in _render(k8s_tools) if d["kind"] == "ConfigMap"]


def test_dashboard_configmap_carries_the_file_and_the_sidecar_label(k8s_tools: fixtures.KubeTools) -> None:
    docs = _render(k8s_tools, "--set", "dashboards.enabled=true", "--set", "dashboards.namespace=monitoring",
                   "--set", "dashboards.annotations.grafana_folder=fedkube")
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "fedkube"}
    assert json.loads(cm["data"]["fedkube.json"]) == load()
    kubernetes_validate.validate(cm, "1.35.0", strict=True)


def test_dashboard_namespace_defaults_to_the_release_namespace(k8s_tools: fixtures.KubeTools) -> None:
    [cm] = [d for d in _render(k8s_tools, "--set", "dashboards.enabled=true") if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["namespace"] == "fedkube-system"


@pytest.mark.parametrize(("args", "complaint"), [
    (["--set", "dashboards.enabled=yes"], "/dashboards/enabled"),
    (["--set", "dashboards.namespace=Not_A_Namespace"], "/dashboards/namespace"),
    (["--set", "dashboards.colour=blue"], "colour"),
])
def test_values_schema_checks_the_dashboard_block(k8s_tools: fixtures.KubeTools, args: list[str],
                                                  complaint: str) -> None:
    proc = _helm(k8s_tools, "template", "fedkube", str(CHART), *args)
    assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr


def test_the_namespace_variable_narrows_every_job_query() -> None:
    dash = load()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables)[:3] == ["datasource", "namespace", "fljob"]  # namespace first: it narrows the job list
    assert variables["namespace"]["query"]["query"].endswith(", namespace)")
    for where, expr in queries(dash):
        if '"$fljob"' in expr or where == "variable fljob":
            assert 'namespace=~"$namespace"' in expr, f"{where}: filter by the namespace variable too: {expr}"


def test_the_operators_job_counts_are_narrowed_by_the_fljobs_namespace_not_the_operators() -> None:
    # Scraped from the operator's pod, whose `namespace` target label is the operator's own (fedkube.metrics.operator).
    hits = [(w, e) for w, e in queries(load()) if "fedkube_operator_fljobs" in metric_names(parse(e))]
    assert hits
    for where, expr in hits:
        assert 'fljob_namespace=~"$namespace"' in expr, f"{where}: filter FLJob counts by fljob_namespace: {expr}"
        assert not re.search(r'[{,]\s*namespace\s*=', expr), f"{where}: `namespace` is the operator's here: {expr}"
