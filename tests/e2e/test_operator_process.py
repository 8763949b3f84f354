"""``fedkube operator`` as its own process, configured the way the chart configures it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fedkube.metrics.operator import PHASES
from fedkube.runtime.resolver import free_port
from tests.e2e.conftest import CRD
from tests.support import fixtures

kube = fixtures.kube
kubeconfig = fixtures.kubeconfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status)
    except OSError:
        return 0


def _scrape(port: int) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _phases(port: int, namespace: str = "default") -> dict[str, float]:
    """The FLJob counts of ``namespace`` by phase; all 0 when it has no series (no FLJob there now)."""
    counts = dict.fromkeys(PHASES, 0.0)
    for s in _scrape(port).get("fedkube_operator_fljobs", []):
        if s.labels["fljob_namespace"] == namespace:
            counts[s.labels["phase"]] = s.value
    return counts


def test_operator_process_serves_liveness_and_reconciles(kube: fixtures.KubeHandle, kubeconfig: Path,
                                                         tmp_path: Path) -> None:
    kubernetes.client.ApiextensionsV1Api(kube.api_client).create_custom_resource_definition(
        yaml.safe_load(CRD.read_text()))
    port, metrics = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "FEDKUBE_WATCH_NAMESPACES": "default",
           "FEDKUBE_HEALTH_PORT": str(port), "FEDKUBE_METRICS_PORT": str(metrics), "FEDKUBE_LOG_FORMAT": "json"}
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "fedkube.operator.main", "--interval", "0.5"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60  # a loaded 2-core CI box needs seconds just to import kopf
        while time.monotonic() < deadline and _get(f"http://127.0.0.1:{port}/healthz") != 200:
            assert proc.poll() is None, (tmp_path / "operator.log").read_text()
            time.sleep(0.2)
        assert _get(f"http://127.0.0.1:{port}/healthz") == 200, (tmp_path / "operator.log").read_text()
        assert _get(f"http://127.0.0.1:{metrics}/metrics") == 200

        custom = kubernetes.client.CustomObjectsApi(kube.api_client)
        job: dict[str, Any] = {
            "apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "proc", "namespace": "default"},
            "spec": {"rounds": 1, "suspend": True, "clients": [{"name": "a"}],
                     "trainer": {"image": "t", "command": ["python", "train.py"]}},
        }
        custom.create_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", job)
        phase = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and phase != "Suspended":
            obj: Any = custom.get_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "proc")
            phase = (obj.get("status") or {}).get("phase")
            time.sleep(0.2)
        assert phase == "Suspended", (tmp_path / "operator.log").read_text()
        secrets: list[Any] = kubernetes.client.CoreV1Api(kube.api_client).list_namespaced_secret(
            "default", label_selector="fedkube.dev/job=proc").items
        assert sorted(s.metadata.name for s in secrets) == [
            "proc-ca", "proc-client-a-tls", "proc-client-a-token", "proc-server-tls", "proc-server-tokens"]

        # The operator's own registry on /metrics: the job counts in its phase.
        assert _phases(metrics)["Suspended"] == 1
        custom.delete_namespaced_custom_object("fedkube.dev", "v1alpha1", "default", "fljobs", "proc")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _phases(metrics)["Suspended"] != 0:
            time.sleep(0.2)
        assert _phases(metrics) == dict.fromkeys(PHASES, 0.0), (tmp_path / "operator.log").read_text()[-3000:]
        assert "fedkube_operator_fljobs" not in _scrape(metrics)  # the namespace's last FLJob took its series along
        assert "process_resident_memory_bytes" in _scrape(metrics)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
    assert proc.returncode == 0, (tmp_path / "operator.log").read_text()[-3000:]
    # One format (fedkube's JSON lines, kopf's own lines included), each line printed once.
    lines = [ln for ln in (tmp_path / "operator.log").read_text().splitlines() if ln.strip()]
    docs = [json.loads(ln) for ln in lines]
    assert all(d["component"] == "operator" for d in docs), lines[:5]
    assert sum("reconciling FLJobs" in d["msg"] for d in docs) == 1, lines[:10]


def test_operator_logging_names_kopfs_object_and_prints_each_line_once(capsys: pytest.CaptureFixture[str]) -> None:
    from fedkube.logs import unconfigure_logging
    from fedkube.operator.main import setup_logging

    quieted = [logging.getLogger(n) for n in ("kopf.objects", "asyncio", "aiohttp.access")]
    levels = [lg.level for lg in quieted]
    try:
        setup_logging("json")
        setup_logging("json")  # configuring again replaces the handler, it does not add one
        ref = {"namespace": "ml", "name": "mnist", "kind": "FLJob"}
        logging.getLogger("kopf.objects").warning("Handler 'observe' failed", extra={"k8s_ref": ref})
        logging.getLogger("fedkube.operator.handlers").info("plain line")
    finally:
        unconfigure_logging()
        for lg, level in zip(quieted, levels, strict=True):
            lg.setLevel(level)
    lines = [json.loads(ln) for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert [(d["msg"], d.get("job")) for d in lines] == [("Handler 'observe' failed", "ml/mnist"), ("plain line", None)]
    assert {d["component"] for d in lines} == {"operator"}


def test_handlers_count_phases_errors_and_each_timeout_once() -> None:
    import kopf

    from fedkube.metrics import OperatorMetrics, new_registry
    from fedkube.operator import handlers
    from fedkube.spec.status import ClientState, SiteStatus

    reg = new_registry()
    memo = kopf.Memo()
    memo[handlers.Memo.METRICS] = OperatorMetrics(reg)

    def running(patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Running"

    def refused(**_: Any) -> None:
        raise kopf.TemporaryError("the API server refused a child", delay=1) from ConnectionRefusedError()

    handlers._instrumented(running, "observe")(memo=memo, status={}, patch=kopf.Patch(), name="a", namespace="ns")
    with pytest.raises(kopf.TemporaryError):
        handlers._instrumented(refused, "reconcile")(memo=memo, status={"phase": "Deploying"}, patch=kopf.Patch(),
                                                     name="b", namespace="ns")
    # Every call is timed by its handler, a failed one too (a slow refusal is what an operator wants to see).
    for handler in ("observe", "reconcile"):
        assert reg.get_sample_value("fedkube_operator_reconcile_seconds_count", {"handler": handler}) == 1
    assert reg.get_sample_value("fedkube_operator_reconcile_seconds_count", {"handler": "spec"}) == 0
    assert reg.get_sample_value("fedkube_operator_fljobs", {"fljob_namespace": "ns", "phase": "Running"}) == 1
    assert reg.get_sample_value("fedkube_operator_fljobs", {"fljob_namespace": "ns", "phase": "Deploying"}) == 1
    assert reg.get_sample_value("fedkube_operator_reconcile_errors_total",
                                {"reason": "ConnectionRefusedError"}) == 1

    failed = SiteStatus(state=ClientState.FAILED, reason="PendingTimeout", message="stayed Pending").to_dict()
    before: dict[str, Any] = {"clients": {"x": {"state": "Running"}}}
    after = {"clients": {"x": failed}}
    handlers._timeouts_fired(memo, before, after)
    handlers._timeouts_fired(memo, after, after)  # the next look sees it already failed: not counted again
    assert reg.get_sample_value("fedkube_operator_timeouts_total", {"reason": "PendingTimeout"}) == 1
    assert reg.get_sample_value("fedkube_operator_timeouts_total", {"reason": "DeployTimeout"}) == 0

    handlers.watched(memo, "DELETED", "a", "ns")
    assert reg.get_sample_value("fedkube_operator_fljobs", {"fljob_namespace": "ns", "phase": "Running"}) == 0
    # A late handler call with the deleted job's stale status does not count it again.
    handlers._instrumented(running)(memo=memo, status={"phase": "Running"}, patch=kopf.Patch(), name="a",
                                    namespace="ns")
    assert reg.get_sample_value("fedkube_operator_fljobs", {"fljob_namespace": "ns", "phase": "Running"}) == 0
