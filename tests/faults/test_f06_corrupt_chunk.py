"""Fault 6: one byte of a tensor flipped on the wire (the proxy corrupts a chunk's payload).

Documented outcome (DESIGN.md §3, §5): the receiver's per-tensor checksum
catches the mismatch before the bytes are used, the tensor is fetched again,
and the aggregate is bit-exact. Both directions: the server pulling site-b's
result (``up``) and site-b's trainer fetching the global model through its
sidecar (``down``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.faults._procs_b import DOWN, UP, LocalJob, scrape, value, wait_for, write_job

SCRIPT = textwrap.dedent("""
    import os
    import time
    from pathlib import Path

    import numpy as np
    import fedkube.trainer_sdk as fk

    fk.init()
    site = os.environ["FEDKUBE_SITE"]
    gate = Path(os.environ["GATE_DIR"])
    k = {"site-a": 1.0, "site-b": 2.0}[site]
    while fk.is_running():
        model = fk.receive()
        params = {n: v + np.float32(k) for n, v in model.params.items()}
        if site == "site-a":  # holds the round open while the test looks at the live processes
            deadline = time.monotonic() + 60
            while not (gate / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        fk.send(fk.FLModel(params=params, num_examples=1 if site == "site-a" else 3))
""")
NBYTES = 1 << 20
INITIAL = np.arange(NBYTES // 4, dtype=np.float32) / 1024  # unique, dyadic values: exact 1:3 running mean
# 1 KiB from the middle of the tensor, as it travels: the global model down, site-b's result (+2) up.
MARKERS = {DOWN: INITIAL[100_000:100_256].tobytes(), UP: (INITIAL + np.float32(2.0))[100_000:100_256].tobytes()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("direction", [UP, DOWN], ids=["result-upload", "model-download"])
def test_flipped_byte_is_caught_by_the_checksum_refetched_and_the_aggregate_is_exact(
    tmp_path: Path, direction: str
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {"GATE_DIR": str(gate)}
    job_file = write_job(tmp_path / "job", SCRIPT, name="f06", rounds=1, initial={"w": INITIAL},
                         checkpoint_enabled=True, client_env={"site-a": env, "site-b": env},
                         transfer={"chunkBytes": 256 << 10, "chunkTimeoutSeconds": 5, "idleTimeoutSeconds": 20})
    with LocalJob(job_file, tmp_path / "run", proxied_sites=["site-b"]) as job:
        proxy = job.proxy("site-b")
        proxy.flip_after(MARKERS[direction], direction)
        server_url = job.server_metrics_url()
        # site-a holds the round; site-b's result is verified and folded in meanwhile.
        wait_for(lambda: value(scrape(server_url), "fedkube_server_transfer_bytes_total",
                               direction="from_clients") == NBYTES, 30, "site-b's result to be verified")
        server = scrape(server_url)
        sidecar = scrape(job.sidecar_metrics_url("site-b"))
        status = job.status()
        (gate / "go").touch()
        result = job.wait_server(30)
        assert result.phase == "Succeeded", job.log_text(None, "server")[-3000:]
        summary = job.summary()
        ck = job.checkpoint()
        server_log = job.log_text(None, "server")
        trainer_log = job.log_text("site-b", "trainer")
    assert len(proxy.flipped) == 1 and proxy.flipped[0][0] == direction, proxy.flipped
    # (a) the aggregate is exact: (1 * (x + 1) + 3 * (x + 2)) / 4, as if nothing had happened.
    np.testing.assert_array_equal(ck.model["w"], INITIAL + np.float32(1.75))
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == 1 and "reason" not in summary
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}
    # (b) the corruption was detected by the checksum, by the receiver of that direction, and refetched.
    detector = server_log if direction == UP else trainer_log
    assert "checksum mismatch" in detector and "refetching from 0" in detector
    assert _client(status, "site-b").get("reason") is None
    # (c) metrics: the server counts its refetch by kind; bad bytes are never counted as transferred.
    retries = value(server, "fedkube_server_download_retries_total", reason="ChecksumMismatchError")
    if direction == UP:
        assert retries == 1
        assert value(server, "fedkube_server_transfer_bytes_total", direction="from_clients") == NBYTES
        assert value(sidecar, "fedkube_sidecar_relayed_bytes_total", direction="to_server") > NBYTES
    else:
        assert retries == 0
        # The model went to the trainer a second time, from offset 0, through the sidecar.
        assert value(sidecar, "fedkube_sidecar_relayed_bytes_total", direction="to_trainer") > NBYTES


def _client(doc: dict[str, Any], site: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in doc["clients"] if c["name"] == site)
    return found
