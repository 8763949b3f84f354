"""Fault 15: a wiretap between a site and the server (issue 12, "capture test").

A recording TCP proxy carries every connection of site-b's sidecar to the
server — the gRPC control plane and the bulk data plane — for a whole round.
With mutual TLS (the default) the bytes it saw hold neither site-b's token,
nor its name, nor any slice of the global model or of site-b's result. The
same probes run against a job with ``security.tls: disabled`` and find the
token and the tensors there: the test can fail, and it shows what TLS hides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.faults.support import (
    ONE_AND_TWO,
    PROXIED_ENV,
    PodJob,
    job_doc,
    save_model,
    trainer_script,
)

NBYTES = 1 << 20
INITIAL = {"w": np.random.default_rng(15).standard_normal(NBYTES // 4).astype(np.float32)}
PROBE = 48  # bytes of a tensor taken as one probe: far too many to occur by chance in ciphertext


def _job(tmp_path: Path, *, tls: bool) -> dict[str, Any]:
    doc = job_doc("f15", ("site-a", "site-b"), rounds=1, roomy=True, trainer=trainer_script(tmp_path, ONE_AND_TWO),
                  initial=save_model(tmp_path / "initial.npz", INITIAL))
    if not tls:
        doc["spec"]["security"] = {"tls": "disabled"}
    return doc


def _probes(job: PodJob) -> list[tuple[str, bytes]]:
    """What a wiretap must not learn: site-b's token and name, and bytes of the model and of its result."""
    probes = [("site-b's token", job.tokens["site-b"].encode()), ("site-b's name", b"site-b")]
    tensors = {"the global model": INITIAL["w"].tobytes(), "site-b's result": (INITIAL["w"] + np.float32(2)).tobytes()}
    for what, data in tensors.items():
        probes += [(f"{what} at byte {at}", data[at:at + PROBE]) for at in (0, len(data) // 2, len(data) - PROBE)]
    return probes


def _tapped_round(tmp_path: Path, *, tls: bool) -> tuple[PodJob, bytes]:
    job = PodJob(_job(tmp_path, tls=tls), tmp_path, proxied_sites=["site-b"])
    for var in PROXIED_ENV:
        job.proxy("site-b", var).record()
    with job:
        summary = job.server_succeeded(60)
    assert summary["phase"] == "Succeeded", summary
    wire = b"".join(bytes(b) for var in PROXIED_ENV for b in job.proxy("site-b", var).recorded.values())
    # The round's tensors did cross the tap: the model down to site-b and its result up.
    assert len(wire) >= 2 * NBYTES, len(wire)
    return job, wire


@pytest.mark.timeout(120)
def test_a_wiretap_learns_no_token_no_site_name_and_no_tensor_bytes(tmp_path: Path) -> None:
    job, wire = _tapped_round(tmp_path, tls=True)
    seen = [what for what, probe in _probes(job) if probe in wire]
    assert not seen, f"in clear on the wire: {seen}"


@pytest.mark.timeout(120)
def test_without_tls_the_same_wiretap_reads_the_token_and_the_tensors(tmp_path: Path) -> None:
    job, wire = _tapped_round(tmp_path, tls=False)
    seen = {what for what, probe in _probes(job) if probe in wire}
    assert "site-b's token" in seen, seen
    assert any(w.startswith("the global model") for w in seen), seen
    assert any(w.startswith("site-b's result") for w in seen), seen
