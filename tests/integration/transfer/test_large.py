"""No 2 GiB (or 4 GiB) limit in the code path: offsets beyond 2**32 are served and parsed.

The tensor is np.zeros, whose pages the kernel maps lazily: the test publishes a
4 GiB + 3 MiB tensor without using 4 GiB of memory (the full 3 GiB transfer with
verification is in bench/transfer.py).
"""

from __future__ import annotations

import grpc
import numpy as np
import psutil
import pytest

from fedkube.transfer import FetchSettings, GrpcChunkSource
from fedkube.transfer.wire import FETCH_METHOD, decode_chunk
from fedkube.wire.v1 import tensor_pb2
from tests.integration.transfer.conftest import Publisher

SIZE = (1 << 32) + (3 << 20)


@pytest.mark.slow
def test_offsets_beyond_4_gib_are_served_over_grpc(publisher: Publisher, channel: grpc.Channel) -> None:
    if psutil.virtual_memory().total < 8 << 30:
        pytest.skip("needs 8 GiB of address space headroom for a lazily mapped 4 GiB array")
    big = np.zeros(SIZE, dtype=np.uint8)
    big[-1] = 7
    big[1 << 32] = 9
    txn = publisher.service.publish({"big": big}, receivers=["c1"], ttl_s=60)
    ref = txn.refs[0]
    assert ref.nbytes == SIZE and ref.shape == (SIZE,)
    fetch = channel.unary_stream(FETCH_METHOD, request_serializer=tensor_pb2.FetchRequest.SerializeToString)
    start = (1 << 32) - 1000
    request = tensor_pb2.FetchRequest(transaction_id=txn.id, ref_id="t0", receiver="c1", offset=start)
    got = bytearray()
    for raw in fetch(request, timeout=30):
        offset, data = decode_chunk(raw)
        assert offset == start + len(got)
        got += data
    assert len(got) == SIZE - start
    assert got[1000] == 9 and got[-1] == 7 and sum(got) == 16
    # The fetcher resumes at a 64-bit offset too: a stream that starts past 4 GiB.
    settings = FetchSettings(chunk_timeout_s=10, idle_timeout_s=30)
    source = GrpcChunkSource(channel, "c1", chunk_timeout_s=10)
    tail = list(source.stream(ref, SIZE - 5, settings.max_chunk_bytes))
    assert [(o, bytes(d)) for o, d in tail] == [(SIZE - 5, b"\x00\x00\x00\x00\x07")]
