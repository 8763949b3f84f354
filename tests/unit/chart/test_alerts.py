"""The chart's PrometheusRule and PodMonitor: promtool-style checks of the rules, done here (no PyPI library does).

Every alert expression parses as PromQL and names only metrics the code exports (the dashboard test's scan);
the rule file has the structure promtool checks (groups, unique alert names, durations) plus ours: a severity
label, summary/description annotations and a runbook_url whose anchor is a section of docs/observability.md.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import fixtures
from tests.unit.chart.test_chart import _one, _render
from tests.unit.chart.test_dashboard import exported_sample_names, metric_names, parse
from tests.unit.metrics.observations import exercised

k8s_tools = fixtures.k8s_tools

DOCS = fixtures.ROOT / "docs" / "observability.md"
WANTED = {"FedkubeJobFailed", "FedkubeRoundStalled", "FedkubeClientLost", "FedkubeTransferRetriesClimbing",
          "FedkubeOperatorReconcileErrors"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
SEVERITIES = {"critical", "warning", "info"}


def _rules(tools: fixtures.KubeTools) -> list[dict[str, Any]]:
    rule = _one(_render(tools, "servicemonitor"), "PrometheusRule")
    groups = rule["spec"]["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    assert len({g["name"] for g in groups}) == len(groups), "group names must be unique"
    return [r for g in groups for r in g["rules"]]


def _anchors() -> set[str]:
    # GitHub's anchor of a heading: lower case, spaces to dashes, punctuation dropped.
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", DOCS.read_text(), re.M)}


def test_the_rules_alert_on_what_the_issue_asks_for_with_the_structure_promtool_checks(
        k8s_tools: fixtures.KubeTools) -> None:
    rules = _rules(k8s_tools)
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    assert set(names) == WANTED
    anchors = _anchors()
    for r in rules:
        where = r["alert"]
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, where
        assert isinstance(r["expr"], str) and r["expr"].strip(), where
        if "for" in r:
            assert DURATION.match(r["for"]), (where, r["for"])
        assert r["labels"]["severity"] in SEVERITIES, where
        notes = r["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), where
        url, _, anchor = notes["runbook_url"].partition("#")
        assert url.startswith("https://") and url.endswith("docs/observability.md"), where
        assert anchor == where.lower() and anchor in anchors, f"{where}: docs/observability.md needs a section {where}"
        for text in notes.values():  # Prometheus templates in annotations must be balanced
            assert text.count("{{") == text.count("}}"), (where, text)


def test_every_alert_expression_is_promql_on_exported_metrics(k8s_tools: fixtures.KubeTools) -> None:
    exported = exported_sample_names()
    for r in _rules(k8s_tools):
        try:
            tree = parse(r["expr"])
        except Exception as exc:  # the parser's error type is not part of its API
            pytest.fail(f"{r['alert']}: {r['expr']!r} is not valid PromQL: {exc}")
        names = metric_names(tree)
        assert names and names <= exported, f"{r['alert']} names metrics no registry exports: {names - exported}"


def test_thresholds_come_from_the_values(k8s_tools: fixtures.KubeTools) -> None:
    rules = {r["alert"]: r for r in _rules(k8s_tools)}
    assert "[75m]" in rules["FedkubeRoundStalled"]["expr"] and "offset 75m" in rules["FedkubeRoundStalled"]["expr"]
    assert rules["FedkubeTransferRetriesClimbing"]["expr"].endswith("> 20")


def test_the_pod_monitor_scrapes_the_job_pods_of_the_watched_namespaces(k8s_tools: fixtures.KubeTools) -> None:
    from fedkube.operator import naming

    monitor = _one(_render(k8s_tools, "servicemonitor"), "PodMonitor")["spec"]
    job_pod_labels = naming.labels("j", naming.ROLE_SERVER)
    assert monitor["selector"]["matchLabels"].items() <= job_pod_labels.items()
    assert monitor["namespaceSelector"] == {"matchNames": ["fedkube-system"]}
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"]
    assert not [d for d in _render(k8s_tools) if d["kind"] in ("PodMonitor", "PrometheusRule")]  # off by default


def test_the_job_failed_alert_names_the_fljobs_namespace_which_the_operators_gauge_carries(
        k8s_tools: fixtures.KubeTools) -> None:
    # The gauge is scraped from the operator's pod: the target's `namespace` is the operator's, so the FLJob's
    # namespace must be a label of the gauge itself, under a name the scrape does not rename or override.
    families = text_string_to_metric_families(generate_latest(exercised()["operator"]).decode())
    labels = {k for f in families for smp in f.samples if smp.name == "fedkube_operator_fljobs" for k in smp.labels}
    assert labels == {"fljob_namespace", "phase"}, labels
    rule = {r["alert"]: r for r in _rules(k8s_tools)}["FedkubeJobFailed"]
    expr = " ".join(rule["expr"].split())
    parse(expr)
    # The alert's `namespace` is the FLJob's (routed like the job pods' alerts), copied from fljob_namespace.
    assert expr == ('sum by (namespace) (label_replace(delta(fedkube_operator_fljobs{phase="Failed"}[10m]), '
                    '"namespace", "$1", "fljob_namespace", "(.+)")) > 0'), expr
    assert "$labels.namespace" in rule["annotations"]["description"]
