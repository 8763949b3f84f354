"""Fault 7: a client that never registers (its sidecar dials a port where no server listens).

DESIGN.md §5: "client never registered when round 1 starts → excluded from the
round; job proceeds if ≥ minClients registered", and LESSONS.md 17: a client
never seen is never declared Lost. Round 1 waits ``registrationSeconds`` for it,
then starts without it; every round it is not in counts one exclusion under
``fedkube_server_client_failures_total{reason="NotRegistered"}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedkube import envvars
from tests.faults.support import CLIENTS, FAILURES, LocalJob, clients_of, container_env, job_doc, pod_named

pytestmark = pytest.mark.timeout(90)

WRONG_ADDRESS = "localhost:7999"  # inside the pod; nothing listens there


def _wrong_server_address(manifests: list[dict[str, Any]]) -> None:
    env = container_env(pod_named(manifests, "f07-client-site-c"), "sidecar")
    entry = next(e for e in env if e["name"] == envvars.SERVER_ADDRESS)
    entry["value"] = WRONG_ADDRESS


def test_client_that_never_registers_is_excluded_never_lost_and_the_job_succeeds(tmp_path: Path) -> None:
    doc = job_doc("f07", ("site-a", "site-b", "site-c"), rounds=2, min_clients=2,
                  # heartbeatSeconds far below the job's length: a never-seen client must still not become Lost
                  timeouts={"registrationSeconds": 8, "heartbeatSeconds": 4})
    with LocalJob(doc, tmp_path, mutate=_wrong_server_address, client_grace_s=2.0) as job:
        # Round 2 is held at the gate: site-c was excluded from rounds 1 and 2 by then.
        m = job.until_metrics(lambda m: m.value(FAILURES, reason="NotRegistered") == 2,
                              "site-c's exclusion from two rounds counted on the server's /metrics")
        assert {r: v for r, v in m.by(FAILURES, "reason").items() if v} == {"NotRegistered": 2.0}
        assert m.value(CLIENTS, state="Pending") == 1
        assert m.value(CLIENTS, state="Lost") == 0 and m.value(CLIENTS, state="Failed") == 0
        status = job.status()
        assert status["round"] == 2 and status["phase"] == "Running"
        live = clients_of(status)["site-c"]
        assert (live["state"], live["reason"]) == ("Pending", "NotRegistered"), live
        assert "round 2" in live["message"], live
        # The sidecar keeps trying (with backoff) and says where it cannot get to.
        sidecar = job.scrape("site-c")
        assert sidecar.value("fedkube_sidecar_upstream_connected", site="site-c") == 0
        assert sidecar.value("fedkube_sidecar_upstream_state", site="site-c", state="connected") == 0
        job.open_gate()
        outcome, summary = job.succeeded(rounds=2)

    clients = clients_of(summary)
    assert (clients["site-c"]["state"], clients["site-c"]["reason"]) == ("Pending", "NotRegistered")
    assert {clients[s]["state"] for s in ("site-a", "site-b")} == {"Done"}
    server_log = job.log("server", "server")
    assert "client site-c excluded: NotRegistered (not connected when round 1 started)" in server_log
    assert "client site-c lost" not in server_log
    # The runtime says what it did with the pod that never got the job's Stop.
    assert any(n.startswith("site-c sidecar: still running after the job ended") for n in outcome.notes), outcome.notes
