"""FLJob lifecycle end to end: the real operator, the emulated API, real fedkube processes for every pod."""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedkube import formats
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
    x, y, _, _ = module.site_data(site)  # training data; the held-out part is for evaluations
    return x, y


def test_fljob_succeeds_with_a_trained_model_while_an_invalid_one_is_reported(fl: FL) -> None:
    bad = quickstart_job("broken", min_clients=5)  # more than its two clients
    bad["spec"]["clients"] = [{"name": "x"}, {"name": "x"}]  # and a duplicate site
    fl.apply(bad)
    fl.apply(quickstart_job("train", server={"checkpoint": {"enabled": True}}, output={"size": "1Gi"}))

    status = fl.wait_phase("train", "Succeeded", timeout=60)
    assert status["round"] == 3 and status["rounds"] == 3 and status["roundDisplay"] == "3/3"
    assert status["clientsTotal"] == 2
    assert {site: c["state"] for site, c in status["clients"].items()} == {"site-a": "Done", "site-b": "Done"}
    conds = _conditions(status)
    assert conds["Succeeded"]["status"] == "True"
    assert conds["Deployed"]["status"] == "True", (status, fl.events("train"))
    assert conds["Running"]["status"] == "False"
    assert status["startTime"] <= status["completionTime"]
    assert status["observedGeneration"] == fl.get("train")["metadata"]["generation"]
    # The server's aggregated metrics per round; the last one from its termination summary.
    assert status["roundMetrics"][-1]["round"] == 3 and "loss" in status["roundMetrics"][-1]["metrics"], status
    reasons = [reason for _, reason, _ in fl.events("train")]
    for phase in ("Pending", "Succeeded"):  # Running too, unless the job finished between two looks at it
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
    # ... and it was delivered to spec.output's claim, which the status names with the file's sha256.
    delivered = fl.run_dir / "volumes" / "default-train-output" / "train.safetensors"
    assert status["model"] == {"claimName": "train-output", "path": "/var/lib/fedkube/output/train.safetensors",
                               "sha256": hashlib.sha256(delivered.read_bytes()).hexdigest(), "round": 3}
    assert formats.load(delivered)["w"].tobytes() == w.tobytes()
    assert "ModelNotPersisted" not in conds

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
    assert sorted(children["Secret"]) == ["gone-ca", "gone-client-site-a-tls", "gone-client-site-a-token",
                                          "gone-client-site-b-tls", "gone-client-site-b-token", "gone-server-tls",
                                          "gone-server-tokens"]
    assert children["ConfigMap"] == ["gone-spec"] and children["PersistentVolumeClaim"] == ["gone-checkpoint"]
    fl.delete("gone")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(fl.children("gone").values()):
        time.sleep(0.1)
    assert not any(fl.children("gone").values()), fl.children("gone")


TRAINER = Path(__file__).with_name("trainer.py")


def _knobbed(job: dict[str, Any], **site_env: dict[str, str]) -> dict[str, Any]:
    """Run the knobbed test trainer; ``site_env`` maps a site (underscores for dashes) to its E2E_* env."""
    job["spec"]["trainer"]["command"] = ["python", str(TRAINER)]
    for client in job["spec"]["clients"]:
        env = site_env.get(client["name"].replace("-", "_"), {})
        if env:
            client["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return job


SCHEDULER = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."


def test_pending_client_times_out_and_the_job_continues_above_min_clients(fl: FL) -> None:
    fl.holds["above-client-site-c"] = SCHEDULER
    job = quickstart_job("above", sites=("site-a", "site-b", "site-c"), min_clients=2)
    job["spec"]["timeouts"].update(pendingSeconds=1.5, registrationSeconds=8)
    fl.apply(job)

    status = fl.wait(
        "above", lambda s: (s.get("clients") or {}).get("site-c", {}).get("state") == "Failed", 20,
        "site-c failed")
    site_c = status["clients"]["site-c"]
    assert site_c["reason"] == "PendingTimeout"
    assert "Unschedulable" in site_c["message"] and "Insufficient nvidia.com/gpu" in site_c["message"]
    assert status["phase"] in ("Pending", "Deploying", "Running"), (status["conditions"], fl.events("above"))

    status = fl.wait_phase("above", "Succeeded", timeout=60)
    assert status["clients"]["site-c"]["reason"] == "PendingTimeout"  # sticks after the job went on without it
    assert {s: status["clients"][s]["state"] for s in ("site-a", "site-b")} == {"site-a": "Done", "site-b": "Done"}
    assert status["clientsDisplay"] == "2/3"
    assert "above-client-site-c" not in fl.children("above")["Pod"]  # it can no longer join late
    warnings = [(r, m) for t, r, m in fl.events("above") if t == "Warning"]
    assert any(r == "PendingTimeout" and "site-c" in m for r, m in warnings), warnings


def test_pending_client_below_min_clients_fails_the_job_naming_it(fl: FL) -> None:
    fl.holds["below-client-site-b"] = SCHEDULER
    job = quickstart_job("below", min_clients=2)
    job["spec"]["timeouts"].update(pendingSeconds=1.5)
    fl.apply(job)

    status = fl.wait_phase("below", "Failed", timeout=20)
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["reason"] == "QuorumLost"
    assert "site-b (PendingTimeout" in failed["message"] and "minClients 2" in failed["message"]
    assert status["completionTime"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and fl.children("below")["Pod"]:
        time.sleep(0.1)
    assert fl.children("below")["Pod"] == []  # nothing is left running for a job that cannot succeed
    assert fl.children("below")["Secret"]  # but its objects stay for inspection until the FLJob goes


def test_client_crash_and_a_site_revoked_mid_job_fail_those_sites_and_the_job_proceeds(fl: FL) -> None:
    # site-d sleeps through round 1, so the job cannot finish before its revocation lands: it lands mid-job.
    job = _knobbed(quickstart_job("crash", sites=("site-a", "site-b", "site-c", "site-d"), min_clients=2),
                   site_c={"E2E_CRASH_AT_ROUND": "2"}, site_d={"E2E_ROUND_SLEEP": "60"})
    fl.apply(job)
    fl.wait("crash", lambda s: (s.get("clients") or {}).get("site-d", {}).get("state") == "Training", 30,
            "site-d training")
    # The whole path: the FLJob patch, the operator's ConfigMap patch, the kubelet's volume sync, the server's read.
    fl.patch_spec("crash", {"revokedSites": ["site-d"]})
    status = fl.wait_phase("crash", "Succeeded", timeout=60)
    site_c = status["clients"]["site-c"]
    # The server's word (the sidecar reported the exception), not just an exit code; and no "teardown" note.
    assert (site_c["state"], site_c["reason"]) == ("Failed", "Exception"), site_c
    assert "injected crash in round 2" in site_c["message"] and "teardown" not in site_c["message"]
    assert status["clients"]["site-a"]["state"] == "Done"
    assert any(t == "Warning" and "site-c" in m for t, _, m in fl.events("crash"))
    # The revoked site: failed by the server (only it says Revoked), its pod deleted and never created again.
    site_d = status["clients"]["site-d"]
    assert (site_d["state"], site_d["reason"]) == ("Failed", "Revoked"), site_d
    assert status["revokedSites"] == ["site-d"] and status["round"] == 3
    assert "crash-client-site-d" not in fl.children("crash")["Pod"]
    assert fl.pods_started.count("crash-client-site-d") == 1
    assert any(t == "Warning" and r == "SiteRevoked" and "site-d" in m for t, r, m in fl.events("crash"))


def _trainer_exit_codes(fl: FL, job: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    selector = f"fedkube.dev/job={job},fedkube.dev/role=client"
    for pod in fl.core.list_namespaced_pod("default", label_selector=selector).items:
        for cs in pod.status.container_statuses or []:
            if cs.name == "trainer":
                out[pod.metadata.name] = cs.state.terminated.exit_code if cs.state.terminated else None
    return out


def test_teardown_error_after_success_leaves_the_job_succeeded_and_ttl_cleans_up(fl: FL) -> None:
    job = _knobbed(quickstart_job("teardown", ttlSecondsAfterFinished=8),
                   site_a={"E2E_EXIT_AFTER": "3"}, site_b={"E2E_EXIT_AFTER": "3"})
    fl.apply(job)
    fl.wait_phase("teardown", "Succeeded", timeout=60)
    # Both trainers exit 3 after their results were delivered: teardown noise, not a failure (lesson 19).
    deadline = time.monotonic() + 8
    codes = _trainer_exit_codes(fl, "teardown")
    while time.monotonic() < deadline and set(codes.values()) != {3}:
        time.sleep(0.1)
        codes = _trainer_exit_codes(fl, "teardown")
    assert codes == {"teardown-client-site-a": 3, "teardown-client-site-b": 3}
    time.sleep(3 * 0.3)  # a few of the operator's looks at the job after the exits
    status = fl.status("teardown")
    assert status["phase"] == "Succeeded"
    assert {s: c["state"] for s, c in status["clients"].items()} == {"site-a": "Done", "site-b": "Done"}
    warnings = [r for t, r, _ in fl.events("teardown") if t == "Warning"]
    # The one Warning: the job has neither spec.output nor a checkpoint claim, so its model goes with the pod.
    assert warnings == ["ModelNotPersisted"], fl.events("teardown")
    assert _conditions(status)["ModelNotPersisted"]["status"] == "True"

    status = fl.wait(
        "teardown",
        lambda s: any(c["type"] == "CleanedUp" and c["status"] == "True" for c in s.get("conditions") or []),
        15, "cleaned up after its TTL")
    assert status["phase"] == "Succeeded"
    assert not any(fl.children("teardown").values()), fl.children("teardown")


def _rounds_seen(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(line.split()[0], int(line.split()[1])) for line in path.read_text().splitlines() if line.strip()]


def _pod_template_overrides(job: dict[str, Any], marks: Path) -> dict[str, Any]:
    """Issue 14: labels, a Kueue queue and pod-template fields, with an init container that leaves a mark."""
    job["metadata"]["labels"] = {"team": "vision"}
    job["metadata"]["annotations"] = {"owner": "ana"}
    job["spec"]["queueName"] = "gpu-queue"
    mark = "import os; open(os.environ['MARKS'], 'a').write(os.environ['SITE'] + chr(10))"
    job["spec"]["trainer"].update({
        "priorityClassName": "fl-training", "imagePullSecrets": [{"name": "registry-cred"}],
        "securityContext": {"runAsUser": 1000}, "podSecurityContext": {"supplementalGroups": [3000]},
        # Kubernetes-only: the local runtime that runs these pods ignores it.
        "envFrom": [{"configMapRef": {"name": "hparams", "optional": True}}],
        "initContainers": [{"name": "fetch-data", "image": "python:3.12", "command": ["python", "-c", mark],
                            "env": [{"name": "MARKS", "value": str(marks)}, {"name": "SITE", "value": "x"}]}]})
    job["spec"]["clients"][1]["initContainers"] = [
        {**job["spec"]["trainer"]["initContainers"][0],
         "env": [{"name": "MARKS", "value": str(marks)}, {"name": "SITE", "value": "site-b"}]}]
    return job


def _assert_overrides_and_pod_group(fl: FL, job: str) -> dict[str, str]:
    """Every pod of ``job`` carries the overrides and one Kueue group; returns pod name -> group name."""
    pods = fl.core.list_namespaced_pod("default", label_selector=f"fedkube.dev/job={job}").items
    assert len(pods) == 3, [p.metadata.name for p in pods]
    groups = {}
    for pod in pods:
        labels, notes = pod.metadata.labels, pod.metadata.annotations
        # Annotations are copied; labels only by key from the chart's jobDefaults.copyLabels (none here).
        assert notes["owner"] == "ana" and "team" not in labels
        assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert notes["kueue.x-k8s.io/pod-group-total-count"] == "3"
        groups[pod.metadata.name] = labels["kueue.x-k8s.io/pod-group-name"]
        if labels["fedkube.dev/role"] == "client":
            assert pod.spec.priority_class_name == "fl-training"
            assert [s.name for s in pod.spec.image_pull_secrets] == ["registry-cred"]
            assert pod.spec.containers[0].security_context.run_as_user == 1000
            assert [c.name for c in pod.spec.init_containers] == ["fetch-data", "sidecar"]
    assert len(set(groups.values())) == 1
    return groups


def test_suspend_removes_pods_keeps_state_and_resume_continues_from_the_checkpoint(fl: FL, tmp_path: Path) -> None:
    log = tmp_path / "rounds.log"
    marks = tmp_path / "init-marks.log"
    knobs = {"E2E_ROUND_SLEEP": "0.5", "E2E_ROUNDS_LOG": str(log)}
    job = _knobbed(quickstart_job("pause", rounds=6, server={"checkpoint": {"enabled": True}}),
                   site_a=knobs, site_b=knobs)
    fl.apply(_pod_template_overrides(job, marks))
    fl.wait("pause", lambda s: s.get("phase") == "Running" and int(s.get("round") or 0) >= 3, 60, "in round 3")
    groups = _assert_overrides_and_pod_group(fl, "pause")
    # The init containers ran (locally, as the kubelet runs them) before each trainer: once per site.
    assert sorted(marks.read_text().split()) == ["site-b", "x"]
    tokens = fl.core.read_namespaced_secret("pause-server-tokens", "default").data

    fl.patch_spec("pause", {"suspend": True})
    status = fl.wait_phase("pause", "Suspended", timeout=20)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "True"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and fl.children("pause")["Pod"]:
        time.sleep(0.1)
    kept = fl.children("pause")
    assert kept["Pod"] == []
    assert kept["PersistentVolumeClaim"] == ["pause-checkpoint"] and kept["ConfigMap"] == ["pause-spec"]
    assert len(kept["Secret"]) == 7 and kept["Service"] == ["pause-server"]  # tokens, CA, server and site TLS
    time.sleep(1.0)  # the trainers' processes are gone: nothing more is trained while suspended
    seen_before = _rounds_seen(log)
    last_before = max(r for _, r in seen_before)

    fl.patch_spec("pause", {"suspend": False})
    status = fl.wait_phase("pause", "Succeeded", timeout=90)
    assert status["round"] == 6
    # The evaluation curve came through the checkpoint: the rounds before the suspend are still on it.
    assert [p["round"] for p in status["evaluation"]] == [1, 2, 3, 4, 5, 6], status["evaluation"]
    # Resumed pods are the same Kueue group again, with the same count; their init containers ran again.
    assert _assert_overrides_and_pod_group(fl, "pause") == groups
    assert sorted(marks.read_text().split()) == ["site-b", "site-b", "x", "x"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "False"
    # Same tokens after resume: the running job's identities were reused, not regenerated.
    assert fl.core.read_namespaced_secret("pause-server-tokens", "default").data == tokens
    after = _rounds_seen(log)[len(seen_before):]
    assert after, "no rounds ran after the resume"
    first_after = min(r for _, r in after)
    # The resumed server continued from its checkpoint instead of starting over at round 0/1.
    assert first_after >= 2 and first_after <= last_before + 1, (seen_before, after)
    reasons = [r for _, r, _ in fl.events("pause")]
    assert "Suspended" in reasons and reasons.count("Pending") >= 2
