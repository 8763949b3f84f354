"""A remote site end to end: two in-cluster sites and one that joins with `fedkube join` from outside the cluster.

The operator runs against the emulated API; the remote site is a `fedkube join` subprocess given the join bundle
the operator wrote and the server's exposed ports on 127.0.0.1 (a NodePort stands for them here). The knob
trainer makes the FedAvg result exact, so it is compared with numpy's to the last bit.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes
import numpy as np
import pytest
from cryptography import x509

from fedkube import envvars
from fedkube.runtime.join import Endpoints, ensure_identity
from fedkube.security import enroll
from fedkube.server.checkpoint import load_latest
from fedkube.spec.remote import DEFAULT_ENROLL_PORT
from tests.e2e.conftest import FL, NAMESPACE, quickstart_job
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

KNOB = Path(__file__).resolve().parents[1] / "faults" / "knob_trainer.py"
# (FAULT_STEP, FAULT_EXAMPLES); weights of powers of two keep every sum exact whatever order the server adds in.
STEPS = {"site-a": (1.0, 16), "site-b": (3.0, 32), "site-r": (5.0, 16)}
ROUNDS = 2


def _knob_env(site: str) -> dict[str, str]:
    step, n = STEPS[site]
    return {"FAULT_STEP": f"{step:g}", "FAULT_EXAMPLES": str(n)}


def _wait(fl: FL, what: str, probe: Any, timeout: float = 30.0) -> Any:
    return until(probe, what, timeout, interval=0.1, context=lambda: (
        f"pods: {fl.children('remote')['Pod']}; status: {fl.status('remote')}\npod output (tail):\n{fl.sink.tail()}"))


def _bundle_text(fl: FL, name: str) -> str | None:
    try:
        secret = fl.core.read_namespaced_secret(name, NAMESPACE)
    except kubernetes.client.exceptions.ApiException:
        return None
    return base64.b64decode(secret.data["bundle.json"]).decode()


def _server_ports(fl: FL, job: str) -> dict[str, int] | None:
    """The local ports standing for the server pod's gRPC, bulk and enroll ports, once it listens on them."""
    if f"{job}-server" not in fl.pods_started:
        return None
    key = f"{NAMESPACE}/{job}-server"
    ports = {var: fl.resolver.local_port(key, port) for var, port in (
        (envvars.GRPC_PORT, envvars.DEFAULT_GRPC_PORT), (envvars.BULK_PORT, envvars.DEFAULT_BULK_PORT),
        (envvars.ENROLL_PORT, DEFAULT_ENROLL_PORT))}
    try:
        socket.create_connection(("127.0.0.1", ports[envvars.ENROLL_PORT]), timeout=1).close()
    except OSError:
        return None
    return ports


def test_two_in_cluster_sites_and_a_joined_remote_site_reach_the_exact_fedavg(fl: FL, tmp_path: Path) -> None:
    job = quickstart_job("remote", sites=tuple(STEPS), rounds=ROUNDS, server={
        "checkpoint": {"enabled": True}, "expose": {"type": "NodePort", "externalAddresses": ["localhost"]}})
    job["spec"]["trainer"]["command"] = ["python", str(KNOB)]
    job["spec"]["clients"] = [
        {"name": s, "env": [{"name": k, "value": v} for k, v in _knob_env(s).items()]} for s in ("site-a", "site-b")
    ] + [{"name": "site-r", "remote": True}]
    fl.apply(job)

    text = _wait(fl, "join bundle", lambda: _bundle_text(fl, "remote-join-site-r"))
    bundle = enroll.JoinBundle.from_text(text)
    assert bundle.server_name == "localhost" and bundle.site == "site-r"
    children = fl.children("remote")
    assert "remote-client-site-r" not in children["Pod"] and "remote-client-site-r-tls" not in children["Secret"]
    assert sorted(children["Service"]) == ["remote-remote", "remote-server"]  # the NodePort one for remote sites
    path = tmp_path / "bundle.json"
    path.write_text(text)
    ports = _wait(fl, "server ports", lambda: _server_ports(fl, "remote"))
    state = tmp_path / "site-state"
    ends = ["--server", "127.0.0.1", "--grpc-port", str(ports[envvars.GRPC_PORT]),
            "--bulk-port", str(ports[envvars.BULK_PORT]), "--enroll-port", str(ports[envvars.ENROLL_PORT])]
    env = {**os.environ, **_knob_env("site-r")}
    joined = subprocess.Popen(
        # The site's policy accepts the job's terms (checked against the server's Registered before any task).
        [sys.executable, "-m", "fedkube.cli", "join", str(path), "--state-dir", str(state), *ends,
         "--max-rounds", str(ROUNDS), "--allow-strategy", "fedavg", "--",
         sys.executable, str(KNOB)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        status = fl.wait_phase("remote", "Succeeded", timeout=90)
        out, _ = joined.communicate(timeout=40)
    finally:
        if joined.poll() is None:
            joined.kill()
            joined.communicate()
    assert joined.returncode == 0, out
    assert {s: c["state"] for s, c in status["clients"].items()} == dict.fromkeys(STEPS, "Done")
    # Where the remote site connected from, as the server saw it, and when its certificate expires.
    remote = status["clients"]["site-r"]
    assert "127.0.0.1" in remote["peer"], remote
    site_cert = x509.load_pem_x509_certificate((state / "tls.crt").read_bytes())
    assert remote["certNotAfter"] == site_cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    ckpt = load_latest(fl.run_dir / "volumes" / "default-remote-checkpoint", "remote")
    assert ckpt is not None and ckpt.round == ROUNDS
    total = sum(n for _, n in STEPS.values())
    want = np.zeros(1, dtype=np.float32)
    for _ in range(ROUNDS):  # FedAvg in numpy: each site adds its step to the global model, weighted by examples
        results = [(want + np.float32(step), n) for step, n in STEPS.values()]
        want = (sum(n * r.astype(np.float64) for r, n in results) / total).astype(np.float32)
    assert want[0] == 6.0  # the site-r's steps count: without it the mean step is 2.33, not 3
    for name in ("w", "b"):
        np.testing.assert_array_equal(ckpt.model[name], np.full_like(ckpt.model[name], want[0]))

    # The site's key stayed in its own state directory, readable by its user only; a restart reuses it.
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "tls.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "token").stat().st_mode) == 0o600
    assert ensure_identity(bundle, state, Endpoints("127.0.0.1", 0, 0, 1)) == "reused"  # port 1: no network
    assert json.loads(text)["token"] not in (state / "token").read_text()  # the bearer token is not the join token
