"""Fault 14: a result excluded after some of its tensors were already folded leaves nothing in the aggregate.

The server pulls each client's tensors from that client's own starting point
(``downloads.rotated``): of three sites, the last by name (site-z) is pulled
``b`` first, then ``w``. site-z holds its round-1 result until site-a and
site-b delivered theirs, so its ``b`` is folded into an average that already
has theirs; then its ``w`` turns out bad (NaN, or its trainer is killed in the
middle of it). The server empties ``b`` and pulls site-a's and site-b's ``b``
again (they serve their result until their next task), so each round's model
is exactly the FedAvg of site-a and site-b. On main, ``b`` kept site-z's value
(``w`` was averaged over two sites and ``b`` over three).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.faults.support import LocalJob, assert_knob_aggregate, clients_of, job_doc, knob_steps

pytestmark = pytest.mark.timeout(120)

CHUNK = 16 << 10
SIZE = 16 * CHUNK // 4  # tensor w: 16 chunks of float32


def _doc(name: str, bad: dict[str, str], rounds: int) -> dict[str, Any]:
    healthy = {site: {**env, "FAULT_HOLD_ROUND": "-1"} for site, env in knob_steps().items()}
    return job_doc(
        name, ("site-a", "site-b", "site-z"), rounds=rounds, min_clients=2, checkpoint=True,
        transfer={"chunkBytes": CHUNK}, env={"FAULT_SIZE": str(SIZE)},
        site_env={**healthy, "site-z": {"FAULT_STEP": "1000", "FAULT_EXAMPLES": "1000", "FAULT_HOLD_ROUND": "1",
                                        **bad}},
    )  # fmt: skip


def _let_site_z_go_last(job: LocalJob) -> None:
    """Open the gate once site-a and site-b delivered round 1, so site-z's ``b`` folds into theirs."""
    job.until_status(lambda s: all(clients_of(s)[c]["state"] == "Done" for c in ("site-a", "site-b")),
                     "site-a and site-b delivered round 1")
    job.open_gate()


def _assert_rebuilt_from_a_and_b(job: LocalJob, message: str) -> None:
    assert "nothing of it kept: b rebuilt from 2 other client(s) (site-a, site-b)" in message, message
    server_log = job.log("server", "server")
    assert re.search(r"round 1: result of site-z excluded; nothing of it stays in the aggregate: the 1 tensor\(s\) "
                     r"of it already folded \(b\) are emptied and rebuilt", server_log), server_log[-3000:]
    for site in ("site-a", "site-b"):
        assert re.search(rf"round 1: pulled 1 tensor\(s\) of {site} again", server_log), server_log[-3000:]
    assert "staged: true" not in server_log  # no advice to set an option the spec does not have


def test_a_result_rejected_for_nan_after_a_tensor_was_folded_contributes_nothing(tmp_path: Path) -> None:
    # One round: in a later one site-z would deliver a healthy result (or, NaN again, race the others).
    with LocalJob(_doc("f14n", {"FAULT_NAN_FROM_ROUND": "1"}, rounds=1), tmp_path) as job:
        _let_site_z_go_last(job)
        _, summary = job.succeeded(rounds=1)
    # site-a and site-b alone, to the bit (site-z's 1000 at weight 1000 would dominate).
    assert_knob_aggregate(job.checkpoint(), rounds=1)
    z = clients_of(summary)["site-z"]
    assert (z["state"], z["reason"]) == ("Failed", "InvalidResult"), z
    assert "'w' contains NaN or Inf" in z["message"], z
    _assert_rebuilt_from_a_and_b(job, z["message"])


def test_a_result_whose_download_fails_midway_after_a_tensor_was_folded_contributes_nothing(tmp_path: Path) -> None:
    # site-z's trainer dies when the server asks for its third result chunk: b (one chunk) was served
    # and folded, w is cut off after its first chunk.
    bad = {"FAULT_KILL_IN_UPLOAD_AT_ROUND": "1", "FAULT_KILL_AFTER_CHUNKS": "2"}
    with LocalJob(_doc("f14k", bad, rounds=2), tmp_path) as job:
        _let_site_z_go_last(job)
        _, summary = job.succeeded(rounds=2)
    assert "[site-z trainer] fault: SIGKILL after 2 result chunks were served" in job.output.text()
    assert_knob_aggregate(job.checkpoint(), rounds=2)
    z = clients_of(summary)["site-z"]
    assert (z["state"], z["reason"]) == ("Failed", "ExitedBeforeDownload"), z
    _assert_rebuilt_from_a_and_b(job, job.log("server", "server"))
