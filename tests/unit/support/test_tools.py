"""scripts/get-k8s-tools.sh: pinned helm/kubectl, idempotent, loud when it cannot work."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support import fixtures

k8s_tools = fixtures.k8s_tools
SCRIPT = fixtures.ROOT / "scripts" / "get-k8s-tools.sh"


def test_pinned_versions_are_installed(k8s_tools: fixtures.KubeTools) -> None:
    helm = subprocess.run([str(k8s_tools.helm), "version", "--template", "{{.Version}}"], capture_output=True,
                          text=True, timeout=30, check=True)
    kubectl = subprocess.run([str(k8s_tools.kubectl), "version", "--client"], capture_output=True, text=True,
                             timeout=30, check=True)
    assert helm.stdout.strip() == "v4.1.4"
    assert "v1.35.2" in kubectl.stdout


def test_rerun_is_a_quiet_no_op(k8s_tools: fixtures.KubeTools) -> None:
    before = k8s_tools.helm.stat().st_mtime_ns
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert k8s_tools.helm.stat().st_mtime_ns == before, "the binaries were reinstalled although present"


def test_missing_npm_fails_with_the_fix(tmp_path: Path) -> None:
    # A PATH with the basics the script needs but no npm.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "grep", "mkdir", "cat"):
        found = shutil.which(tool)
        assert found, f"{tool} is needed on this machine"
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "FEDKUBE_TOOLS_DIR": str(tmp_path / "tools"), "HOME": os.environ.get("HOME", "/")}
    proc = subprocess.run([str(bin_dir / "bash"), str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "npm is not installed" in proc.stderr and "Fix:" in proc.stderr
