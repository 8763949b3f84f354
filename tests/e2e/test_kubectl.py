"""The quickstart as a person runs it: the real kubectl binary against the emulated API, the real operator."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import CRD, FL, quickstart_job
from tests.support import fixtures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _kubectl(tools: fixtures.KubeTools, kubeconfig: Path, *args: str) -> str:
    proc = subprocess.run([str(tools.kubectl), "--kubeconfig", str(kubeconfig), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def test_kubectl_apply_get_describe(fl: FL, kubeconfig: Path, k8s_tools: fixtures.KubeTools, tmp_path: Path) -> None:
    manifest = tmp_path / "fljob.yaml"
    manifest.write_text(yaml.safe_dump(quickstart_job("quickstart-numpy")))
    # The CRD is already registered by the fixture; applying it again is what a person's install step does.
    assert "fljobs.fedkube.dev" in _kubectl(k8s_tools, kubeconfig, "apply", "--validate=false", "-f", str(CRD))
    assert "created" in _kubectl(k8s_tools, kubeconfig, "apply", "--validate=false", "-f", str(manifest))

    # The CRD's printer columns, by their jsonPaths (the emulator does not render server-side Tables).
    columns = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["additionalPrinterColumns"]
    spec = ",".join(f"{c['name'].upper()}:{c['jsonPath']}" for c in columns if c["name"] != "Age")
    deadline = time.monotonic() + 60
    row = ""
    while time.monotonic() < deadline:
        row = _kubectl(k8s_tools, kubeconfig, "get", "flj", "quickstart-numpy", "-o", f"custom-columns={spec}",
                       "--no-headers")
        if row.split()[:1] == ["Succeeded"]:
            break
        time.sleep(0.2)
    assert row.split() == ["Succeeded", "3/3", "2/2"], row

    doc = yaml.safe_load(_kubectl(k8s_tools, kubeconfig, "get", "flj", "quickstart-numpy", "-o", "yaml"))
    status = doc["status"]
    assert status["phase"] == "Succeeded" and status["clients"]["site-a"]["state"] == "Done"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    names = json.loads(_kubectl(k8s_tools, kubeconfig, "get", "pods", "-l", "fedkube.dev/job=quickstart-numpy",
                                "-o", "json"))
    assert sorted(p["metadata"]["name"] for p in names["items"]) == [
        "quickstart-numpy-client-site-a", "quickstart-numpy-client-site-b", "quickstart-numpy-server"]

    described = _kubectl(k8s_tools, kubeconfig, "describe", "flj", "quickstart-numpy")
    assert "Phase:" in described and "Succeeded" in described
    assert "Round Display:" in described and "3/3" in described
    events = described[described.index("Events:"):]
    assert "-> Succeeded: completed 3 round(s)" in events and "New -> Pending" in events
    assert "Message:" not in described[described.index("Clients:"):described.index("Clients Display:")], (
        "a Done client carries no stale message from an earlier state")
