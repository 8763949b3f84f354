"""spec.revokedSites on a running server: the attacker holds a revoked site's valid certificate, token and key.

The server re-reads its spec file (the operator's ConfigMap) for ``revokedSites``; ``srv.revocation.poll()`` is
that read, called here instead of waiting for the watch's next tick. What a revoked site then gets: its live
stream cut (even by a sidecar that ignores Stop), its in-flight result excluded exactly, every new connection
refused on gRPC and on the bulk port (``Revoked``, counted), no renewal and no second enrollment; the other
sites go on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedkube.protocol import REVOKED
from fedkube.security import enroll
from fedkube.security.enroll_wire import EnrollmentError, enroll_site, renew_site
from fedkube.server.app import FedkubeServer
from fedkube.server.config import ServerConfig
from fedkube.server.enrollment import EnrollSettings
from tests.integration.server.conftest import JOB, Harness, make_config, rejected
from tests.integration.server.fakes import add_value
from tests.integration.server.test_supersede import _bulk, _bundle, _grpc, _save
from tests.support.tls import NAMESPACE, session_pki

pytestmark = pytest.mark.timeout(60)


def _spec_file(path: Path, revoked: list[str]) -> Path:
    path.write_text(json.dumps({"kind": "FLJob", "spec": {"revokedSites": revoked}}))
    return path


def _with_spec(config: ServerConfig, path: Path) -> ServerConfig:
    return dataclasses.replace(config, bulk_port=0, spec_file=path)


def _revoke(srv: FedkubeServer, path: Path, revoked: list[str]) -> list[str]:
    _spec_file(path, revoked)
    assert srv.revocation is not None
    return srv.revocation.poll()


def test_a_revoked_site_is_cut_off_mid_round_refused_everywhere_and_excluded_exactly(
    harness: Harness, tmp_path: Path
) -> None:  # fmt: skip
    spec = _spec_file(tmp_path / "job.json", [])
    clients = ("site-a", "site-b", "site-c")
    config = make_config(clients, rounds=2, min_clients=2, heartbeat_timeout_s=30.0)
    srv = harness.server(_with_spec(config, spec), {"w": np.zeros((3000,), np.float32)})
    a = harness.sidecar(srv, "site-a", add_value(1.0))
    harness.sidecar(srv, "site-b", add_value(3.0))
    # The thief's sidecar: site-c's real certificate and token, its result announced and stalled mid-upload, and
    # it ignores Stop, so only the server closing the stream ends it.
    c = harness.sidecar(srv, "site-c", add_value(100.0))
    c.hang_up_on_stop = False
    c.push_mode = lambda req: "stall"
    c.wait_for(lambda: bool(c.upload_requests), what="c's upload requested")

    assert _revoke(srv, spec, ["site-c"]) == ["site-c"]
    c.wait_for(lambda: c.finished or c.error is not None, what="the server closing c's stream")
    tls = session_pki().client_tls("site-c")
    assert _grpc(srv, tls, "site-c") == grpc.StatusCode.PERMISSION_DENIED
    assert _bulk(srv, tls, "site-c") == grpc.StatusCode.PERMISSION_DENIED
    again = harness.sidecar(srv, "site-c", add_value(100.0))
    again.wait_for(lambda: again.error is not None, what="c's new stream refused")
    assert again.error is not None and again.error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in str(again.error.details())
    # (the cut sidecar may also try a call of its own before the new stream: at least these two)
    assert rejected(srv, REVOKED, "grpc") >= 2 and rejected(srv, REVOKED, "bulk") == 1
    # A name dropped from the file later re-admits nobody.
    assert _revoke(srv, spec, []) == []
    assert _bulk(srv, tls, "site-c") == grpc.StatusCode.PERMISSION_DENIED

    outcome = srv.wait(20)
    assert outcome is not None and outcome.success, outcome
    status = {s.name: s for s in srv.workflow.status().clients}
    assert (status["site-c"].state, status["site-c"].reason) == ("Failed", REVOKED), status["site-c"]
    assert {status[s].state for s in ("site-a", "site-b")} == {"Done"}
    # Both rounds are exactly the mean of a and b: nothing of c's half-uploaded result.
    np.testing.assert_array_equal(a.globals[2]["w"], np.full((3000,), 2.0, np.float32))
    assert srv.metrics_registry.get_sample_value(
        "fedkube_server_client_failures_total", {"fljob": JOB, "reason": REVOKED}) == 1.0  # fmt: skip


def test_revoking_below_min_clients_fails_the_job_with_quorum_lost(harness: Harness, tmp_path: Path) -> None:
    # Revoked before the server starts (a new server pod): refused before anyone is admitted.
    spec = _spec_file(tmp_path / "job.json", ["site-b"])
    config = make_config(rounds=1, registration_timeout_s=2.0)
    srv = harness.server(_with_spec(config, spec), {"w": np.zeros((4,), np.float32)})
    harness.sidecar(srv, "site-a", add_value(1.0))
    b = harness.sidecar(srv, "site-b", add_value(1.0))
    b.wait_for(lambda: b.error is not None, what="b refused")
    outcome = srv.wait(20)
    assert outcome is not None and not outcome.success and outcome.reason == "QuorumLost", outcome
    status = {s.name: s for s in srv.workflow.status().clients}
    assert (status["site-b"].state, status["site-b"].reason) == ("Failed", REVOKED)


def test_a_revoked_remote_site_can_neither_renew_nor_enroll_again(harness: Harness, tmp_path: Path) -> None:
    ca = session_pki().tls.ca
    token = enroll.derive_token(ca, NAMESPACE, JOB, "site-b", "1")
    record = enroll.TokenRecord(enroll.token_hash(token), time.time() + 600)
    settings = EnrollSettings(ca=ca, records={"site-b": record}, port=0, ledger_dir=tmp_path / "ledger")
    spec = _spec_file(tmp_path / "job.json", [])
    config = dataclasses.replace(_with_spec(make_config(registration_timeout_s=30.0), spec), enroll=settings)
    srv = harness.server(config, {"w": np.zeros(4, np.float32)})
    assert srv.enrollment is not None
    address, bundle = ("127.0.0.1", srv.enrollment.port), _bundle(token)
    key = enroll.new_site_key()
    tls = _save(tmp_path / "b", key, enroll_site(bundle, key, address, timeout_s=5.0))
    assert _grpc(srv, tls) == grpc.StatusCode.NOT_FOUND  # enrolled: past authentication

    _revoke(srv, spec, ["site-b"])
    assert _grpc(srv, tls) == _bulk(srv, tls) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(EnrollmentError) as renewal:
        renew_site(bundle, enroll.new_site_key(), tmp_path / "b" / "tls.crt", tmp_path / "b" / "tls.key", address,
                   timeout_s=5.0)  # fmt: skip
    assert renewal.value.reason == enroll.SITE_REVOKED
    with pytest.raises(EnrollmentError) as replay:
        enroll_site(bundle, enroll.new_site_key(), address, timeout_s=5.0)
    assert replay.value.reason == enroll.TOKEN_REPLAYED
    site_a = session_pki().client_tls("site-a")  # the in-cluster site is unaffected
    assert _grpc(srv, site_a, "site-a") == _bulk(srv, site_a, "site-a") == grpc.StatusCode.NOT_FOUND
