"""Fault 9: a client with the wrong token, and a call with no token at all.

DESIGN.md §8 (each sidecar has its own token): the server refuses both before
they have any effect, says why in its log (site, peer, what to fix), counts
them under ``fedkube_server_rejected_connections_total{reason="BadToken"}``
and the job's real clients are not disturbed.

* wrong token: site-c's token Secret holds another value, so its real sidecar
  is refused (and exits 2, as a sidecar does on a refused registration); site-c
  never registers, so it is excluded as NotRegistered, never Lost.
* missing token: a hand-made gRPC client holding site-a's certificate and key
  (a stolen key: the token is the second factor) opens ``Connect`` as site-a,
  a live client of the job, without an ``authorization`` header, then tries to
  fetch from the ``Download`` service the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from fedkube.operator.naming import client_token_secret_name
from fedkube.protocol import PROTOCOL_VERSION, SITE_METADATA
from fedkube.spec.layout import TOKEN_FILE_NAME
from fedkube.wire.v1 import control_pb2, control_pb2_grpc, tensor_pb2, tensor_pb2_grpc
from tests.faults.support import CLIENTS, FAILURES, REJECTED, LocalJob, clients_of, job_doc, site_channel

pytestmark = pytest.mark.timeout(90)

JOB = "f09"
SECRET = client_token_secret_name(JOB, "site-c")


def _wrong_token_for_site_c(manifests: list[dict[str, Any]]) -> None:
    secret = next(m for m in manifests if m.get("kind") == "Secret" and m["metadata"]["name"] == SECRET)
    secret["stringData"][TOKEN_FILE_NAME] = "not-the-token-of-site-c"


def _connect_without_token(job: LocalJob) -> tuple[list[control_pb2.ServerMessage], grpc.RpcError]:
    """Open Connect as site-a with no authorization metadata; the replies and the error that ended the call."""
    register = control_pb2.ClientMessage(register=control_pb2.Register(
        job=JOB, site="site-a", session_id="intruder", protocol_version=PROTOCOL_VERSION))
    replies: list[control_pb2.ServerMessage] = []
    with site_channel(job.manifests, JOB, "site-a", job.server_address()) as channel:
        call = control_pb2_grpc.ControlStub(channel).Connect(iter([register]), metadata=((SITE_METADATA, "site-a"),),
                                                             timeout=10)
        try:
            replies.extend(call)
        except grpc.RpcError as exc:
            return replies, exc
    raise AssertionError(f"Connect without a token was not refused; replies: {replies}")


def _fetch_without_token(job: LocalJob) -> grpc.RpcError:
    """Ask the server's Download service for a chunk of the global model as site-a, without a token."""
    request = tensor_pb2.FetchRequest(transaction_id=f"{JOB}-r2", ref_id="t0", receiver="site-a")
    with site_channel(job.manifests, JOB, "site-a", job.server_address()) as channel:
        stream = tensor_pb2_grpc.DownloadStub(channel).Fetch(request, metadata=((SITE_METADATA, "site-a"),),
                                                              timeout=10)
        try:
            got = list(stream)
        except grpc.RpcError as exc:
            return exc
    raise AssertionError(f"Fetch without a token was served: {got}")


def test_wrong_and_missing_tokens_are_refused_and_the_others_finish(tmp_path: Path) -> None:
    doc = job_doc(JOB, ("site-a", "site-b", "site-c"), rounds=2, min_clients=2, timeouts={"registrationSeconds": 8})
    with LocalJob(doc, tmp_path, mutate=_wrong_token_for_site_c, client_grace_s=2.0) as job:
        # Round 2 is held at the gate by site-a and site-b; site-c has been refused by then.
        job.until_status(lambda s: s["round"] == 2, "round 2 under way")
        m = job.until_metrics(lambda m: m.value(REJECTED, reason="BadToken") >= 1, "site-c's refusal counted")
        server_log = job.log("server", "server")
        assert "refused call from site 'site-c'" in server_log
        assert "missing or wrong token for site 'site-c'; fix: send 'authorization: Bearer <token>'" in server_log
        assert m.value(CLIENTS, state="Pending") == 1 and m.value(CLIENTS, state="Lost") == 0
        assert {r: v for r, v in m.by(FAILURES, "reason").items() if v} == {"NotRegistered": 2.0}
        c = clients_of(job.status())["site-c"]
        assert (c["state"], c["reason"]) == ("Pending", "NotRegistered"), c

        before = job.scrape().value(REJECTED, reason="BadToken")
        replies, error = _connect_without_token(job)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert "missing or wrong token for site 'site-a'" in str(error.details())
        assert [r.rejected.reason for r in replies] == ["BadToken"]
        # At least this call more (site-c's restarted sidecar may be refused again meanwhile).
        job.until_metrics(lambda m: m.value(REJECTED, reason="BadToken") >= before + 1, "the missing token counted")
        job.until(lambda: "refused call from site 'site-a'" in job.log("server", "server"),
                  "the server to log the call without a token")
        # Nor can a call without a token fetch the global model.
        before = job.scrape().value(REJECTED, reason="BadToken")
        error = _fetch_without_token(job)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        job.until_metrics(lambda m: m.value(REJECTED, reason="BadToken") >= before + 1, "the refused fetch counted")
        job.until(lambda: "refused a Download call from site 'site-a': missing or wrong token"
                  in job.log("server", "server"), "the server to log the refused fetch")
        # The real site-a was not disturbed by a stranger using its name.
        a = clients_of(job.status())["site-a"]
        assert a["state"] in ("Training", "Done") and "reason" not in a, a
        job.open_gate()
        _, summary = job.succeeded(rounds=2)

    clients = clients_of(summary)
    assert {s: (clients[s]["state"], clients[s]["roundsCompleted"]) for s in ("site-a", "site-b")} == {
        "site-a": ("Done", 2), "site-b": ("Done", 2)}
    assert (clients["site-c"]["state"], clients["site-c"]["reason"]) == ("Pending", "NotRegistered")
    # site-c's sidecar says why it gives up: the server's reason, not a bare exit code.
    assert "server rejected the registration (BadToken)" in job.output.text()
