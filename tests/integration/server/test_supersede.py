"""Issue 16: a remote site renewed; whoever still holds its old certificate and key is refused on both ports.

The real server with its enrollment port (remote site site-b, in-cluster site site-a): site-b enrolls, renews,
and its previous certificate stays usable only until the new one is first used. Then a copy of the old key (a
stolen one) is refused on gRPC (7070) and on the bulk port (8471) as ``superseded``, logged with the site and
counted; the current certificate and the in-cluster site are unaffected.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from fedkube.protocol import AUTH_METADATA, BEARER, SITE_METADATA
from fedkube.security import enroll, pki
from fedkube.security.enroll_wire import EnrollmentError, enroll_site, renew_site
from fedkube.security.material import files_in
from fedkube.server.app import FedkubeServer
from fedkube.server.enrollment import EnrollSettings
from fedkube.transfer import endpoints
from fedkube.transfer.bulk import read_status, send_request
from fedkube.transfer.endpoints import ClientTls
from fedkube.wire.v1 import tensor_pb2
from tests.integration.server.conftest import JOB, Harness, make_config, rejected, token_of
from tests.support.tls import NAMESPACE, SERVER_NAME, session_pki

pytestmark = pytest.mark.timeout(60)
REMOTE = "site-b"


def _bundle(token: str) -> enroll.JoinBundle:
    ca = session_pki().tls.ca.cert
    return enroll.JoinBundle(
        namespace=NAMESPACE, job=JOB, site=REMOTE, server_name=SERVER_NAME, addresses=("127.0.0.1",), grpc_port=0,
        bulk_port=0, enroll_port=0, ca_pem=ca.public_bytes(serialization.Encoding.PEM).decode(),
        ca_sha256=enroll.fingerprint(ca), token=token, expires_at="",
    )  # fmt: skip


def _save(directory: Path, key: object, issued: object) -> ClientTls:
    assert hasattr(key, "private_bytes") and hasattr(issued, "certificate")
    directory.mkdir()
    pki.write_file(directory / "tls.key", key.private_bytes(serialization.Encoding.PEM,
                   serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)  # fmt: skip
    pki.write_file(directory / "tls.crt", issued.certificate, 0o644)
    pki.write_file(directory / "ca.crt", issued.ca, 0o644)
    return ClientTls.from_files(files_in(directory), SERVER_NAME)


def _grpc(server: FedkubeServer, tls: ClientTls, site: str = REMOTE) -> grpc.StatusCode:
    """A Download call as ``site`` with ``tls``: NOT_FOUND once it got past authentication."""
    md = ((SITE_METADATA, site), (AUTH_METADATA, BEARER + token_of(site)))
    fetch = tensor_pb2.FetchRequest(transaction_id="no-such-tx", ref_id="w", receiver=site)
    with endpoints.channel(f"127.0.0.1:{server.grpc_port}", [], tls) as channel:
        call = channel.unary_stream("/fedkube.v1.Download/Fetch", request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(call(fetch, metadata=md, timeout=10))
    return info.value.code()  # type: ignore[no-any-return]


def _bulk(server: FedkubeServer, tls: ClientTls, site: str = REMOTE) -> grpc.StatusCode:
    request = tensor_pb2.BulkRequest(site=site, token=token_of(site), fetch=tensor_pb2.FetchRequest(
        transaction_id="no-such-tx", ref_id="w", receiver=site))  # fmt: skip
    with endpoints.dial(f"127.0.0.1:{server.bulk_port}", 5.0, tls) as sock:
        send_request(sock, request)
        code, _ = read_status(sock)
    return code  # type: ignore[no-any-return]


def test_a_superseded_certificate_is_refused_on_both_ports_once_the_renewed_one_is_in_use(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    ca = session_pki().tls.ca
    token = enroll.derive_token(ca, NAMESPACE, JOB, REMOTE, "1")
    settings = EnrollSettings(ca=ca, records={REMOTE: enroll.TokenRecord(enroll.token_hash(token), time.time() + 600)},
                              port=0, ledger_dir=tmp_path / "ledger")  # fmt: skip
    config = dataclasses.replace(make_config(registration_timeout_s=30.0), bulk_port=0, enroll=settings)
    server = harness.server(config, {"w": np.zeros(4, np.float32)})
    assert server.enrollment is not None
    address, bundle = ("127.0.0.1", server.enrollment.port), _bundle(token)
    old_key = enroll.new_site_key()
    old = _save(tmp_path / "old", old_key, enroll_site(bundle, old_key, address, timeout_s=5.0))
    assert _grpc(server, old) == _bulk(server, old) == grpc.StatusCode.NOT_FOUND

    new_key = enroll.new_site_key()
    renewed = renew_site(bundle, new_key, tmp_path / "old" / "tls.crt", tmp_path / "old" / "tls.key", address,
                         timeout_s=5.0)  # fmt: skip
    new = _save(tmp_path / "new", new_key, renewed)
    # Grace: the site's own connections switch over as they are made anew, so the old one still works...
    assert _bulk(server, old) == grpc.StatusCode.NOT_FOUND
    # ...until the renewed certificate is used once.
    assert _grpc(server, new) == grpc.StatusCode.NOT_FOUND
    assert _grpc(server, old) == grpc.StatusCode.PERMISSION_DENIED
    assert _bulk(server, old) == grpc.StatusCode.PERMISSION_DENIED
    assert rejected(server, "superseded", "grpc") == rejected(server, "superseded", "bulk") == 1
    assert _bulk(server, new) == _grpc(server, new) == grpc.StatusCode.NOT_FOUND
    # The in-cluster site's operator-issued certificate has no ledger entry: unchanged.
    site_a = session_pki().client_tls("site-a")
    assert _grpc(server, site_a, "site-a") == _bulk(server, site_a, "site-a") == grpc.StatusCode.NOT_FOUND
    lines = [r.getMessage() for r in caplog.records if "superseded" in r.getMessage() and "refused" in r.getMessage()]
    assert any("site 'site-b'" in m and "(reason superseded" in m for m in lines), lines
    assert len(lines) == 2, lines

    # A new server pod on the same ledger claim (FEDKUBE_ENROLL_LEDGER_DIR, no checkpoint directory) remembers
    # both: the spent token stays spent and the superseded certificate stays refused, with no grace.
    assert config.checkpoint_dir is None and (tmp_path / "ledger" / "enrollment.json").is_file()
    server.request_stop("restart")
    server.wait(10)
    server.shutdown(grace_s=0.5)
    again = harness.server(config, {"w": np.zeros(4, np.float32)})
    assert again.enrollment is not None
    with pytest.raises(EnrollmentError) as replay:
        enroll_site(bundle, enroll.new_site_key(), ("127.0.0.1", again.enrollment.port), timeout_s=5.0)
    assert replay.value.reason == enroll.TOKEN_REPLAYED
    assert _grpc(again, old) == _bulk(again, old) == grpc.StatusCode.PERMISSION_DENIED
    assert _grpc(again, new) == _bulk(again, new) == grpc.StatusCode.NOT_FOUND
