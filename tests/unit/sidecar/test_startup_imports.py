"""The sidecar starts in every client pod and on every reconnect of `fedkube join`: its imports stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_sidecar_import_loads_neither_pydantic_nor_the_spec_model() -> None:
    """pydantic and the FLJob spec model cost about 0.3 s of a 0.8 s start-up; the sidecar validates no spec.

    The job's terms (fedkube.terms), the site view (fedkube.siteview, clipping) and the metrics package (whose
    ServerMetrics needs fedkube.status) are what pulled them in.
    """
    code = (
        "import sys, fedkube.sidecar.app\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core', 'yaml')\n"
        "             or m == 'fedkube.status' or m.startswith('fedkube.spec')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported at sidecar start-up: {out.stdout.strip()}"
