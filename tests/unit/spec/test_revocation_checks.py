"""spec.revokedSites as `fedkube validate` sees it: warnings (a running job's typo must not stop it)."""

from __future__ import annotations

from typing import Any

from fedkube.spec import parse_job
from fedkube.spec.checks import check_job


def _job(**spec: Any) -> Any:
    return parse_job({"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "j"}, "spec": {
        "rounds": 2, "clients": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
        "trainer": {"image": "t", "command": ["python", "train.py"]}, **spec}})  # fmt: skip


def test_revoked_sites_are_explained_and_mistakes_are_warned_about_not_refused() -> None:
    errors, warnings = check_job(_job(minClients=2, revokedSites=["b", "zz", "b"]))
    assert errors == []
    by_path = {w.path: w.message for w in warnings}
    assert "not a site of this job" in by_path["spec.revokedSites[1]"]
    assert "listed twice" in by_path["spec.revokedSites[2]"]
    assert "final for the FLJob" in by_path["spec.revokedSites"]
    _, below = check_job(_job(revokedSites=["a"]))  # minClients defaults to every site: 2 left of 3
    assert any("fewer than minClients (3)" in w.message for w in below)
    assert not [w for w in check_job(_job())[1] if "revokedSites" in w.path]
