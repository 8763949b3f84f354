"""The server's bulk port, like its gRPC port, answers on IPv4 and IPv6 when it binds every interface."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from fedkube.server.app import FedkubeServer
from fedkube.transfer.bulk import read_status, send_request
from fedkube.wire.v1 import tensor_pb2
from tests.integration.server.conftest import Harness, dial_bulk, make_config
from tests.integration.transfer.test_bulk_ipv6 import _ipv6_loopback

pytestmark = pytest.mark.timeout(30)


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_bulk_port_on_every_interface_answers_ipv4_and_ipv6(harness: Harness) -> None:
    config = dataclasses.replace(make_config(rounds=1, registration_timeout_s=30.0), bulk_port=0, bind_host="[::]")
    srv: FedkubeServer = harness.server(config, {"w": np.zeros(16, np.float32)})
    for host in ("127.0.0.1", "::1"):
        with dial_bulk(srv, "nobody", host=host) as sock:
            send_request(sock, tensor_pb2.BulkRequest(site="nobody", token="x", upload_id="u"))
            code, message = read_status(sock)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not a client" in message, (host, code, message)
