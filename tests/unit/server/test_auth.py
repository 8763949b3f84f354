"""The one token check (fedkube.server.auth) and the one upload claim (UploadBroker.claim), attacked directly."""

from __future__ import annotations

import socket

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedkube.metrics.core import new_registry
from fedkube.metrics.server import ServerMetrics
from fedkube.server.auth import Authenticator, AuthError, credentials_from_metadata
from fedkube.server.reverse import ClaimRefused, UploadBroker
from fedkube.transfer.refs import TensorRef, checksum_of

TOKENS = {"site-a": b"token-of-a", "site-b": b"token-of-b"}


def _auth() -> tuple[Authenticator, CollectorRegistry]:
    registry = new_registry()
    return Authenticator("j", TOKENS, ServerMetrics(registry, "j")), registry


def _rejected(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value(
        "fedkube_server_rejected_connections_total", {"fljob": "j", "plane": "grpc", "reason": reason}
    )
    return value or 0.0


def test_the_right_token_gives_the_site_as_identity() -> None:
    auth, _ = _auth()
    assert auth.authenticate("site-a", b"token-of-a", what="call").site == "site-a"
    assert auth.authenticate("site-b", "token-of-b", what="a bulk request").site == "site-b"
    assert auth.authorize_bulk("site-a", "token-of-a") == (None, "")


@pytest.mark.parametrize(
    ("site", "token", "code", "reason"),
    [
        ("site-a", b"token-of-b", grpc.StatusCode.UNAUTHENTICATED, "BadToken"),  # another site's token
        ("site-a", b"", grpc.StatusCode.UNAUTHENTICATED, "BadToken"),
        ("site-a", b"token-of-", grpc.StatusCode.UNAUTHENTICATED, "BadToken"),  # a prefix of the right one
        ("site-a", b"token-of-a\x00", grpc.StatusCode.UNAUTHENTICATED, "BadToken"),
        ("site-x", b"token-of-a", grpc.StatusCode.PERMISSION_DENIED, "UnknownSite"),  # a site the job lacks
        ("", b"token-of-a", grpc.StatusCode.PERMISSION_DENIED, "UnknownSite"),
        ("SITE-A", b"token-of-a", grpc.StatusCode.PERMISSION_DENIED, "UnknownSite"),
    ],
)
def test_wrong_tokens_and_sites_are_refused_and_counted(
    site: str, token: bytes, code: grpc.StatusCode, reason: str
) -> None:
    auth, metrics = _auth()
    with pytest.raises(AuthError) as info:
        auth.authenticate(site, token, what="call")
    assert (info.value.code, info.value.reason) == (code, reason)
    assert "fix:" in info.value.message
    assert _rejected(metrics, reason) == 1
    assert auth.authorize_bulk(site, token.decode()) == (code, info.value.message)


def test_metadata_credentials_need_the_bearer_scheme() -> None:
    assert credentials_from_metadata((("x-fedkube-site", "site-a"), ("authorization", "Bearer t"))) == ("site-a", b"t")
    assert credentials_from_metadata((("x-fedkube-site", "site-a"), ("authorization", "t"))) == ("site-a", b"")
    assert credentials_from_metadata(None) == ("", b"")


def _ref() -> TensorRef:
    arr = np.arange(4, dtype=np.float32)
    return TensorRef.for_array(arr, source="site-b", transaction_id="t", ref_id="w", name="w",
                               checksum=checksum_of(arr))


@pytest.mark.parametrize(("site", "token", "expected"), [
    ("site-a", "token-of-a", "site-a"), ("site-a", "token-of-b", None), ("site-c", "token-of-a", None),
    ("", "", None),
])  # fmt: skip
def test_verified_site_names_only_a_proven_site_and_counts_nothing(site: str, token: str, expected: str | None) -> None:
    """The per-site call budget's quiet check: the entry point that refuses counts the reason, once."""
    auth, registry = _auth()
    metadata = (("x-fedkube-site", site), ("authorization", f"Bearer {token}"))
    assert auth.verified_site(metadata, context=None) == expected  # type: ignore[arg-type]  # no TLS: unused
    assert registry.get_sample_value("fedkube_server_rejected_connections_total",
                                      {"fljob": "j", "plane": "grpc", "reason": "BadToken"}) is None


def test_an_upload_is_claimed_only_by_its_own_site_and_only_once() -> None:
    broker = UploadBroker()
    upload = broker.open("site-b", _ref(), window=2)
    with pytest.raises(ClaimRefused) as info:
        broker.claim("site-a", upload.request_id)  # an authenticated site answering another site's request
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "WrongSite")
    with pytest.raises(ClaimRefused) as info:
        broker.claim("site-b", "up-guessed")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert broker.claim("site-b", upload.request_id) is upload
    a, b = socket.socketpair()
    try:
        with pytest.raises(ClaimRefused) as info:
            broker.claim("site-b", upload.request_id, a)  # a second answer on the bulk port
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    finally:
        a.close()
        b.close()


def test_a_cancelled_upload_refuses_its_claim_and_the_socket_stays_the_callers() -> None:
    broker = UploadBroker()
    upload = broker.open("site-b", _ref(), window=2)
    upload.cancel()
    a, b = socket.socketpair()
    try:
        with pytest.raises(ClaimRefused) as info:
            broker.claim("site-b", upload.request_id, a)
        assert info.value.code == grpc.StatusCode.CANCELLED
        a.sendall(b"x")  # still open: the caller answers on it and closes it
        assert b.recv(1) == b"x"
    finally:
        a.close()
        b.close()
