"""Chunk and PushedChunk encoding against the generated protobuf code, and the message-size limits."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.transfer import wire
from fedkube.transfer.wire import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    channel_options,
    decode_chunk,
    encode_chunk,
    encode_pushed_chunk,
    server_options,
)
from fedkube.wire.v1 import control_pb2, tensor_pb2


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_encoded_chunks_parse_with_the_generated_stub(offset: int, data: bytes) -> None:
    msg = tensor_pb2.Chunk.FromString(encode_chunk(offset, memoryview(data)))
    assert (msg.offset, msg.data) == (offset, data)


@settings(max_examples=300, deadline=None)
@given(rid=st.text(max_size=40), offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=3000),
       error=st.text(max_size=50))
def test_encoded_pushed_chunk_parses_with_the_generated_code(rid: str, offset: int, data: bytes, error: str) -> None:
    raw = encode_pushed_chunk(rid, offset, memoryview(data), error)
    msg = control_pb2.PushedChunk.FromString(raw)
    assert (msg.request_id, msg.offset, msg.data, msg.error) == (rid, offset, data, error)
    # The same bytes protobuf writes: fields in tag order, defaults left out.
    assert raw == msg.SerializeToString()


def test_pushed_chunk_offset_outside_uint64_is_refused() -> None:
    with pytest.raises(ValueError, match="outside uint64"):
        encode_pushed_chunk("r", 1 << 64)
    with pytest.raises(ValueError, match="outside uint64"):
        encode_pushed_chunk("r", -1)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_generated_chunks_decode(offset: int, data: bytes) -> None:
    raw = tensor_pb2.Chunk(offset=offset, data=data).SerializeToString()
    got_offset, got_data = decode_chunk(raw)
    assert (got_offset, bytes(got_data)) == (offset, data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_decode_agrees_with_protobuf_or_refuses(raw: bytes) -> None:
    try:
        expected = tensor_pb2.Chunk.FromString(raw)
    except DecodeError:
        expected = None
    try:
        offset, data = decode_chunk(raw)
    except ValueError as exc:
        # Stricter than protobuf only for obsolete groups, which fedkube never sends.
        assert expected is None or "group" in str(exc), f"protobuf accepts {raw!r} but decode_chunk refuses it"
        return
    assert expected is not None, f"protobuf refuses {raw!r} but decode_chunk accepts it"
    assert (offset, bytes(data)) == (expected.offset, expected.data)


@pytest.mark.parametrize(
    "raw",
    [
        # Found by the fuzz test above in CI: a 10-byte value varint with bits past 64, which protobuf
        # truncates to its low 64 bits; a length or a tag that long is refused by both.
        b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x02\x85\x01\x00\x00\x00\x00\x08\x00",
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
        b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x02",
        b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x02\x00",
    ],
)
def test_overlong_varints_are_read_as_protobuf_reads_them(raw: bytes) -> None:
    test_fuzz_decode_agrees_with_protobuf_or_refuses.hypothesis.inner_test(raw)  # type: ignore[attr-defined]


def test_decode_skips_unknown_fields_and_is_zero_copy() -> None:
    msg = tensor_pb2.Chunk(offset=7, data=b"hello").SerializeToString()
    unknown = bytes([0x18, 0x05, 0x22, 0x02]) + b"zz" + bytes([0x2D]) + b"\x00\x00\x00\x00"
    offset, data = decode_chunk(unknown + msg)
    assert offset == 7 and bytes(data) == b"hello"
    assert data.obj is not None  # a view into the received message, no copy


@pytest.mark.parametrize("raw", [b"\x08", b"\x12\x05ab", b"\x08" + b"\xff" * 11, b"\x00\x01", b"\x0b", b"\x09\x00"])
def test_decode_refuses_malformed(raw: bytes) -> None:
    with pytest.raises(ValueError, match="Chunk"):
        decode_chunk(raw)


def test_no_2_gib_limit_in_the_code_path_by_design() -> None:
    """Offsets and lengths are 64-bit; per-message limits are sized for a chunk, not a tensor."""
    for offset in (2**31, 2**32 + 5, 3 << 30, 2**63):
        assert decode_chunk(encode_chunk(offset, b"x"))[0] == offset
        assert tensor_pb2.Chunk.FromString(encode_chunk(offset, b"x")).offset == offset
    assert tensor_pb2.FetchRequest(offset=5 << 30).offset == 5 << 30
    server = dict(server_options())
    client = dict(channel_options())
    assert DEFAULT_CHUNK_BYTES <= MAX_CHUNK_BYTES
    # Chunks of the largest allowed size fit, with room for the tag/offset bytes.
    assert server["grpc.max_send_message_length"] >= MAX_CHUNK_BYTES + 32
    assert client["grpc.max_receive_message_length"] >= MAX_CHUNK_BYTES + 32
    # The server never disables its receive limit: oversized requests must be refused.
    assert 0 < server["grpc.max_receive_message_length"] < 2**31
    assert wire.MAX_CHUNK_BYTES < 2**31  # a chunk never needs a >2 GiB message


def test_encode_refuses_offsets_outside_uint64() -> None:
    with pytest.raises(ValueError, match="uint64"):
        encode_chunk(-1, b"")
    with pytest.raises(ValueError, match="uint64"):
        encode_chunk(2**64, b"")
