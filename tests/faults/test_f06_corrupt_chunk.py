"""Fault 6: one byte of a tensor flipped on the wire (the proxy corrupts a chunk's payload).

Documented outcome (DESIGN.md §3, §5): the receiver's per-tensor checksum
catches the mismatch before the bytes are used, the tensor is fetched again,
and the aggregate is bit-exact. Both directions: the server pulling site-b's
result (``up``) and site-b's trainer fetching the global model through its
sidecar (``down``).

This is the plaintext job's defence (``security.tls: disabled``), so these run
without TLS. With TLS (the default) a flipped byte never reaches a checksum:
the record's AEAD tag fails, the connection is dropped and the transfer is
retried (the last test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.faults.support import DOWN, ONE_AND_TWO, UP, PodJob, clients_of, job_doc, save_model, trainer_script

BYTES = "fedkube_server_transfer_bytes_total"
RELAYED = "fedkube_sidecar_relayed_bytes_total"
NBYTES = 1 << 20
INITIAL = np.arange(NBYTES // 4, dtype=np.float32) / 1024  # unique, dyadic values: exact 1:3 running mean
# 1 KiB from the middle of the tensor, as it travels: the global model down, site-b's result (+2) up.
MARKERS = {DOWN: INITIAL[100_000:100_256].tobytes(), UP: (INITIAL + np.float32(2.0))[100_000:100_256].tobytes()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("direction", [UP, DOWN], ids=["result-upload", "model-download"])
def test_flipped_byte_is_caught_by_the_checksum_refetched_and_the_aggregate_is_exact(
    tmp_path: Path, direction: str
) -> None:
    doc = job_doc("f06", ("site-a", "site-b"), rounds=1, roomy=True, checkpoint=True, env={"HOLD": "site-a"},
                  trainer=trainer_script(tmp_path, ONE_AND_TWO), initial=save_model(tmp_path / "initial.npz",
                                                                                   {"w": INITIAL}),
                  transfer={"chunkBytes": 256 << 10, "chunkTimeoutSeconds": 5, "idleTimeoutSeconds": 20})
    doc["spec"]["security"] = {"tls": "disabled"}  # the bytes must be in clear for the checksum to be the catch
    with PodJob(doc, tmp_path, proxied_sites=["site-b"]) as job:
        proxy = job.proxy("site-b")
        proxy.flip_after(MARKERS[direction], direction)
        # site-a holds the round; site-b's result is verified and folded in meanwhile.
        server = job.until_metrics(lambda m: m.total(BYTES, direction="from_clients") == NBYTES,
                                   "site-b's result to be verified", timeout=30)
        sidecar = job.scrape("site-b")
        status = job.status()
        job.open_gate()
        summary = job.server_succeeded(30)
        ck = job.checkpoint()
        server_log = job.log("server", "server")
        trainer_log = job.log("site-b", "trainer")
    assert len(proxy.flipped) == 1 and proxy.flipped[0][0] == direction, proxy.flipped
    # (a) the aggregate is exact: (1 * (x + 1) + 3 * (x + 2)) / 4, as if nothing had happened.
    np.testing.assert_array_equal(ck.model["w"], INITIAL + np.float32(1.75))
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == 1 and "reason" not in summary
    assert {c["name"]: c["state"] for c in summary["clients"]} == {"site-a": "Done", "site-b": "Done"}
    # (b) the corruption was detected by the checksum, by the receiver of that direction, and refetched.
    detector = server_log if direction == UP else trainer_log
    assert "checksum mismatch" in detector and "refetching from 0" in detector
    assert clients_of(status)["site-b"].get("reason") is None
    # (c) metrics: the server counts its refetch by kind; bad bytes are never counted as transferred.
    retries = server.total("fedkube_server_download_retries_total", reason="ChecksumMismatchError")
    if direction == UP:
        assert retries == 1
        assert server.total(BYTES, direction="from_clients") == NBYTES
        assert sidecar.total(RELAYED, direction="to_server") > NBYTES
    else:
        assert retries == 0
        # The model went to the trainer a second time, from offset 0, through the sidecar.
        assert sidecar.total(RELAYED, direction="to_trainer") > NBYTES


@pytest.mark.timeout(60)
def test_with_tls_a_flipped_byte_breaks_the_record_and_the_upload_is_retried(tmp_path: Path) -> None:
    doc = job_doc("f06", ("site-a", "site-b"), rounds=1, roomy=True, checkpoint=True,
                  trainer=trainer_script(tmp_path, ONE_AND_TWO), initial=save_model(tmp_path / "initial.npz",
                                                                                   {"w": INITIAL}),
                  transfer={"chunkBytes": 256 << 10, "chunkTimeoutSeconds": 5, "idleTimeoutSeconds": 20})
    with PodJob(doc, tmp_path, proxied_sites=["site-b"]) as job:
        proxy = job.proxy("site-b")
        # Half a result into what goes up: ciphertext of site-b's result (no marker can be found in it).
        proxy.flip_byte_at(NBYTES // 2, UP)
        summary = job.server_succeeded(45)
        ck = job.checkpoint()
        server_log = job.log("server", "server")
    assert len(proxy.flipped) == 1, proxy.flipped
    np.testing.assert_array_equal(ck.model["w"], INITIAL + np.float32(1.75))
    assert summary["phase"] == "Succeeded" and summary["completedRounds"] == 1 and "reason" not in summary
    # Never a checksum mismatch: TLS refused the altered record before any byte of it was used.
    assert "checksum mismatch" not in server_log
