"""The chart's CRD copy matches crds/, and scripts/sync_chart_crds.py detects and repairs drift."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.fixtures import ROOT

SCRIPT = ROOT / "scripts" / "sync_chart_crds.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_chart_crds_are_in_sync_with_crds_dir() -> None:
    proc = _run("--check")
    assert proc.returncode == 0, proc.stderr


def test_drift_is_reported_with_the_fix_and_repaired(tmp_path: Path) -> None:
    src, dest = tmp_path / "crds", tmp_path / "chart-crds"
    shutil.copytree(ROOT / "crds", src)
    shutil.copytree(ROOT / "crds", dest)
    paths = ["--src", str(src), "--dest", str(dest)]
    assert _run("--check", *paths).returncode == 0

    crd = next(src.glob("*.yaml"))
    crd.write_text(crd.read_text() + "# regenerated\n")
    (dest / "old-thing.yaml").write_text("kind: Stale\n")
    proc = _run("--check", *paths)
    assert proc.returncode == 1
    assert f"{dest / crd.name} differs" in proc.stderr and "old-thing.yaml has no source" in proc.stderr
    assert "Fix: python scripts/sync_chart_crds.py" in proc.stderr
    assert (dest / crd.name).read_text() != crd.read_text(), "--check must not change anything"

    assert _run(*paths).returncode == 0
    assert (dest / crd.name).read_text() == crd.read_text() and not (dest / "old-thing.yaml").exists()
    assert _run("--check", *paths).returncode == 0


def test_missing_source_says_how_to_generate_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = _run("--check", "--src", str(tmp_path / "empty"), "--dest", str(tmp_path / "dest"))
    assert proc.returncode != 0 and "scripts/gen_crd.py" in proc.stderr
