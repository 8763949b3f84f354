"""A client pod deleted mid-job is created again within spec.clientRestartLimit and the job still succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import FL, NAMESPACE, quickstart_job
from tests.e2e.test_lifecycle import _knobbed, _rounds_seen

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_client_pod_deleted_mid_job_is_created_again_and_the_job_succeeds(fl: FL, tmp_path: Path) -> None:
    log = tmp_path / "rounds.log"
    knobs = {"E2E_ROUND_SLEEP": "0.5", "E2E_ROUNDS_LOG": str(log)}
    job = _knobbed(quickstart_job("evict", rounds=5, clientRestartLimit=2), site_a=knobs, site_b=knobs)
    fl.apply(job)
    fl.wait("evict", lambda s: s.get("phase") == "Running" and int(s.get("round") or 0) >= 2, 60, "in round 2")

    fl.core.delete_namespaced_pod("evict-client-site-a", NAMESPACE)
    status = fl.wait_phase("evict", "Succeeded", timeout=90)

    site_a = status["clients"]["site-a"]
    assert (site_a["state"], site_a.get("restarts")) == ("Done", 1), site_a
    assert "restarts" not in status["clients"]["site-b"]
    assert status["round"] == 5
    assert fl.pods_started.count("evict-client-site-a") == 2 and fl.pods_started.count("evict-client-site-b") == 1
    # The new pod trained the rounds after the deletion: the server took it back as a restarted site.
    assert max(r for s, r in _rounds_seen(log) if s == "site-a") == 5
    recreated = [m for t, r, m in fl.events("evict") if r == "ClientPodRecreated"]
    assert len(recreated) == 1 and "client site-a" in recreated[0] and "restart 1 of clientRestartLimit 2" in (
        recreated[0]), fl.events("evict")
    expected_warnings = ("ClientPodRecreated", "ModelNotPersisted")  # the job has no durable output: by design
    assert not [e for e in fl.events("evict") if e[0] == "Warning" and e[1] not in expected_warnings]
