"""A remote site's own decisions in its sidecar: refusing the job's terms before any task, and leaving the job."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedkube.sidecar.app import EXIT_REFUSED, Sidecar
from fedkube.siteview import SiteView
from fedkube.terms import TermsPolicy
from fedkube.wire.v1 import control_pb2
from tests.integration.sidecar.conftest import SITE, TOKEN, make_sidecar
from tests.integration.sidecar.fake_server import FakeServer


def _status(sc: Sidecar) -> SiteView:
    assert sc.status_server is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{sc.status_server.port}/status", timeout=2) as resp:
        return SiteView.from_json(resp.read())


def _leave(sc: Sidecar, token: str, message: str) -> int:
    assert sc.status_server is not None
    req = urllib.request.Request(f"http://127.0.0.1:{sc.status_server.port}/leave", data=message.encode(),
                                 headers={"Authorization": f"Bearer {token}"}, method="POST")  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_terms_outside_the_policy_are_refused_before_any_task_reaches_the_trainer(
        server: FakeServer, tmp_path: Path) -> None:  # fmt: skip
    server.terms = control_pb2.JobTerms(strategy="fedavg", total_rounds=10)
    log = tmp_path / "termination-log"
    sc = make_sidecar(server.address, policy=TermsPolicy.of(["fedavg"], 5, "FLSite hospital/far spec.policy"),
                      status_port=0, termination_log=log, exit_on_stop=True, final_state_grace_s=0.2)
    sc.start()
    try:
        server.wait_registered(SITE)
        server.publish_task(SITE, {}, task_id="t1", total_rounds=10)  # the server's task races the refusal
        leave = server.wait_message("leave")
        assert leave.reason == "PolicyRefused"
        assert "10 rounds" in leave.message and "maxRounds (FLSite hospital/far spec.policy) is 5" in leave.message
        assert sc.wait(5) == EXIT_REFUSED
        # The trainer gets the Stop with the site's reason, never the task.
        first = sc.tasks.take(0)
        assert isinstance(first, control_pb2.Stop) and first.reason == "PolicyRefused"
        view = SiteView.from_json(log.read_bytes())
        assert (view.state, view.reason, view.term) == ("Refused", "PolicyRefused", "RoundsNotAccepted")
        assert _status(sc).state == "Refused"
        assert len(server.registrations) == 1, "a refusing site must not reconnect"
    finally:
        sc.stop(grace=0.5)


def test_the_site_controller_leaves_with_the_site_token_only_and_the_view_follows_the_rounds(
        server: FakeServer, tmp_path: Path) -> None:  # fmt: skip
    server.terms = control_pb2.JobTerms(strategy="fedavg", total_rounds=3)
    log = tmp_path / "termination-log"
    sc = make_sidecar(server.address, policy=TermsPolicy.of(["fedavg"], 5), status_port=0, termination_log=log)
    sc.start()
    try:
        server.wait_registered(SITE)
        server.wait_for(lambda: _status(sc).state == "Registered")
        server.publish_task(SITE, {}, task_id="t2", round=2, total_rounds=3)
        server.wait_for(lambda: _status(sc) == SiteView("Training", 2))
        assert _leave(sc, "not-the-token", "x") == 401
        assert not server.of_kind("leave")
        assert _leave(sc, TOKEN, "FLSite hospital/far deleted by the site admin") == 202
        leave = server.wait_message("leave")
        assert (leave.reason, leave.message) == ("Withdrawn", "FLSite hospital/far deleted by the site admin")
        assert _leave(sc, TOKEN, "again") == 200  # once only
        assert sc.tasks.stopped is not None and sc.tasks.stopped.reason == "Withdrawn"
    finally:
        sc.stop(grace=0.5)
    view = json.loads(log.read_text())
    assert (view["state"], view["round"], view["reason"]) == ("Withdrawn", 2, "Withdrawn")


@pytest.mark.parametrize("controlled", [True, False])
def test_a_site_controlled_sidecar_stopped_mid_job_leaves_and_an_in_cluster_one_does_not(
        server: FakeServer, controlled: bool) -> None:  # fmt: skip
    sc = make_sidecar(server.address, site_controlled=controlled)
    sc.start()
    server.wait_registered(SITE)
    server.wait_for(lambda: sc.upstream.connected.is_set())
    sc.stop(grace=1.0)
    leaves = server.of_kind("leave")
    assert [m.reason for m in leaves] == (["Withdrawn"] if controlled else [])
