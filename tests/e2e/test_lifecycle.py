"""FLJob lifecycle end to end: the real operator, the emulated API, real fedkube processes for every pod."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import numpy as np
import pytest

from fedkube.server.checkpoint import load_latest
from tests.e2e.conftest import FL, QUICKSTART, quickstart_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


def _site_data(site: str) -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.spec_from_file_location("quickstart_train", QUICKSTART / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x, y = module.site_data(site)
    return x, y


def test_fljob_succeeds_with_a_trained_model_while_an_invalid_one_is_reported(fl: FL) -> None:
    bad = quickstart_job("broken", min_clients=5)  # more than its two clients
    bad["spec"]["clients"] = [{"name": "x"}, {"name": "x"}]  # and a duplicate site
    fl.apply(bad)
    fl.apply(quickstart_job("train", server={"checkpoint": {"enabled": True}}))

    status = fl.wait_phase("train", "Succeeded", timeout=60)
    assert status["round"] == 3 and status["rounds"] == 3 and status["roundDisplay"] == "3/3"
    assert status["clientsTotal"] == 2
    assert {site: c["state"] for site, c in status["clients"].items()} == {"site-a": "Done", "site-b": "Done"}
    conds = _conditions(status)
    assert conds["Succeeded"]["status"] == "True"
    assert conds["Deployed"]["status"] == "True", (status, fl.events("train"))
    assert conds["Running"]["status"] == "False"
    assert status["startTime"] <= status["completionTime"]
    reasons = [reason for _, reason, _ in fl.events("train")]
    for phase in ("Pending", "Running", "Succeeded"):
        assert phase in reasons, f"no Event for the transition to {phase}: {reasons}"

    # The trained model: the last checkpoint on the job's claim fits every site's data far better than the start.
    ckpt = load_latest(fl.run_dir / "volumes" / "default-train-checkpoint", "train")
    assert ckpt is not None and ckpt.round == 3
    w, b = ckpt.model["w"], ckpt.model["b"]
    for site in ("site-a", "site-b"):
        x, y = _site_data(site)
        trained = float(np.mean((x @ w + b - y) ** 2))
        untrained = float(np.mean(y**2))
        assert trained < 0.2 * untrained, (site, trained, untrained)

    # The invalid job failed on its own, with a condition naming each field and its fix.
    bad_status = fl.wait_phase("broken", "Failed", timeout=10)
    invalid = _conditions(bad_status)["Invalid"]
    assert invalid["status"] == "True" and invalid["reason"] == "InvalidSpec"
    assert "spec.clients" in invalid["message"] and "fix:" in invalid["message"]
    assert "minClients" in invalid["message"]
    assert any(t == "Warning" and r == "InvalidSpec" for t, r, _ in fl.events("broken"))
    assert fl.children("broken")["Pod"] == []


def test_delete_cascades_to_every_child(fl: FL) -> None:
    fl.holds["gone-server"] = "0/3 nodes are available: 3 Insufficient cpu."  # nothing needs to run here
    fl.apply(quickstart_job("gone", server={"checkpoint": {"enabled": True}}))
    fl.wait_phase("gone", "Pending", timeout=20)
    children = fl.children("gone")
    assert sorted(children["Pod"]) == ["gone-client-site-a", "gone-client-site-b", "gone-server"]
    assert children["Service"] == ["gone-server"]
    assert sorted(children["Secret"]) == ["gone-client-site-a-token", "gone-client-site-b-token",
                                          "gone-server-tokens"]
    assert children["ConfigMap"] == ["gone-spec"] and children["PersistentVolumeClaim"] == ["gone-checkpoint"]
    fl.delete("gone")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(fl.children("gone").values()):
        time.sleep(0.1)
    assert not any(fl.children("gone").values()), fl.children("gone")
