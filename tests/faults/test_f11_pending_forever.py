"""Fault 11: a client pod stays Pending forever (emulated cluster, real operator).

DESIGN.md §5 and LESSONS.md 20: "client pod Pending past pendingTimeout → client
Failed (PendingTimeout) as an execution exception", quoting the scheduler's
message, so the job cannot look "running" forever; above minClients it goes
on and succeeds. The operator counts the timeout under
``fedkube_operator_timeouts_total{reason="PendingTimeout"}``.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import quickstart_job
from tests.faults.conftest import OperatorCluster
from tests.faults.support import OPERATOR_TIMEOUTS, Metrics, scrape, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SCHEDULER = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."


def test_pod_pending_forever_fails_that_client_with_the_schedulers_reason(operator_cluster: OperatorCluster) -> None:
    fl = operator_cluster.fl
    fl.holds["f11-client-site-c"] = SCHEDULER  # the kubelet never runs it: unschedulable
    job = quickstart_job("f11", sites=("site-a", "site-b", "site-c"), min_clients=2, rounds=1)
    job["spec"]["timeouts"].update(pendingSeconds=1.5, registrationSeconds=8)
    fl.apply(job)

    status = fl.wait("f11", lambda s: (s.get("clients") or {}).get("site-c", {}).get("state") == "Failed", 30,
                     "site-c failed")
    site_c = status["clients"]["site-c"]
    assert site_c["reason"] == "PendingTimeout", site_c
    assert "Unschedulable" in site_c["message"] and "Insufficient nvidia.com/gpu" in site_c["message"], site_c
    assert status["phase"] != "Failed", status

    def counted() -> Metrics | None:
        m = scrape(operator_cluster.metrics_url)
        return m if m.value(OPERATOR_TIMEOUTS, reason="PendingTimeout") == 1 else None

    m = until(counted, "the operator's /metrics to count the PendingTimeout", 10)
    assert m.value(OPERATOR_TIMEOUTS, reason="DeployTimeout") == 0

    status = fl.wait_phase("f11", "Succeeded", timeout=60)
    assert (status["clients"]["site-c"]["state"], status["clients"]["site-c"]["reason"]) == ("Failed",
                                                                                          "PendingTimeout")
    assert {s: status["clients"][s]["state"] for s in ("site-a", "site-b")} == {"site-a": "Done", "site-b": "Done"}
    assert status["clientsDisplay"] == "2/3"
    warnings = [(r, msg) for t, r, msg in fl.events("f11") if t == "Warning"]
    assert any(r == "PendingTimeout" and "site-c" in msg and "Insufficient nvidia.com/gpu" in msg
               for r, msg in warnings), warnings
    assert "f11-client-site-c" not in fl.children("f11")["Pod"]  # removed: it cannot join late
    after = scrape(operator_cluster.metrics_url)
    assert after.value(OPERATOR_TIMEOUTS, reason="PendingTimeout") == 1  # counted once, not at every look
    assert after.value("fedkube_operator_fljobs", fljob_namespace="default", phase="Succeeded") == 1
