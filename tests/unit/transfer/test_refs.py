"""Tensor references, dtypes, zero-copy views and checksums."""

from __future__ import annotations

import contextlib
import math
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedkube.transfer import (
    DTYPE_NAMES,
    Hasher,
    InvalidRefError,
    TensorRef,
    array_from_buffer,
    as_bytes,
    checksum_of,
    dtype_name,
    numpy_dtype,
)
from fedkube.wire.v1 import tensor_pb2


def _ref(**overrides: object) -> TensorRef:
    base: dict[str, object] = {
        "source": "server",
        "transaction_id": "tx1",
        "ref_id": "t0",
        "name": "layer.weight",
        "dtype": "float32",
        "shape": (2, 3),
        "nbytes": 24,
        "checksum": "xxh3_64:0123456789abcdef",
    }
    base.update(overrides)
    return TensorRef(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_every_dtype_round_trips_through_bytes(name: str) -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=48, dtype=np.uint8)
    if name == "bool":
        raw = raw % 2
    array = raw.view(numpy_dtype(name)).reshape(-1)
    assert dtype_name(array.dtype) == name
    view = as_bytes(array)
    back = array_from_buffer(bytes(view), name, array.shape)
    assert back.dtype == array.dtype
    assert back.tobytes() == array.tobytes()  # bit-exact, NaN payloads included


@given(st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=64))
def test_bfloat16_is_bit_exact(bits: list[int]) -> None:
    array = np.array(bits, dtype=np.uint16).view(ml_dtypes.bfloat16)
    ref_bytes = as_bytes(array)
    back = array_from_buffer(bytes(ref_bytes), "bfloat16", array.shape)
    assert back.view(np.uint16).tolist() == bits


def test_as_bytes_is_zero_copy_for_contiguous_little_endian() -> None:
    array = np.arange(1000, dtype=np.float32)
    view = as_bytes(array)
    assert view.readonly
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), array)
    array[0] = 42.0
    assert np.frombuffer(view, dtype=np.float32)[0] == 42.0


def test_as_bytes_copies_non_contiguous_and_big_endian_in_wire_order() -> None:
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    transposed = base.T
    view = as_bytes(transposed)
    assert not np.shares_memory(np.frombuffer(view, dtype=np.uint8), base)
    assert np.array_equal(array_from_buffer(view, "int32", (4, 3)), transposed)
    big = np.arange(5, dtype=">f8")
    out = array_from_buffer(bytes(as_bytes(big)), "float64", (5,))
    assert out.dtype.byteorder in ("<", "=")
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_array_from_buffer_is_zero_copy_and_checks_length() -> None:
    buf = bytearray(16)
    array = array_from_buffer(buf, "int32", (2, 2))
    array[0, 0] = 7
    assert buf[0] == 7
    with pytest.raises(ValueError, match="needs 16"):
        array_from_buffer(bytearray(15), "int32", (2, 2))


def test_unsupported_dtypes_are_refused_with_the_supported_list() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        dtype_name(np.complex64)
    with pytest.raises(ValueError, match="supported"):
        numpy_dtype("float8")
    with pytest.raises(ValueError, match="cannot be transferred"):
        as_bytes(np.zeros(3, dtype=np.uint32))


def test_hasher_incremental_equals_whole_and_accepts_writable_views() -> None:
    data = bytearray(np.random.default_rng(2).integers(0, 256, 100_003, dtype=np.uint8).tobytes())
    for algo in ("xxh3_64", "crc32"):
        h = Hasher(algo)
        mv = memoryview(data)
        for start in range(0, len(data), 4096):
            h.update(mv[start : start + 4096])
        assert h.checksum() == checksum_of(data, algo)
    assert checksum_of(data, "crc32") == f"crc32:{zlib.crc32(data):08x}"
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        Hasher("md5")


def test_ref_proto_round_trip() -> None:
    array = np.ones((3, 5), dtype=ml_dtypes.bfloat16)
    ref = TensorRef.for_array(
        array, source="site-1", transaction_id="tx", ref_id="t0", name="w", checksum=checksum_of(as_bytes(array))
    )
    assert ref.nbytes == 30 and ref.dtype == "bfloat16" and ref.shape == (3, 5)
    msg = tensor_pb2.TensorRef.FromString(ref.to_proto().SerializeToString())
    assert TensorRef.from_proto(msg) == ref


def test_ref_beyond_4_gib_is_representable() -> None:
    ref = _ref(shape=(3 << 30,), dtype="uint8", nbytes=3 << 30).validate()
    assert TensorRef.from_proto(ref.to_proto()).nbytes == 3 << 30
    huge = _ref(shape=(1 << 40, 1 << 10), dtype="float64", nbytes=(1 << 50) * 8).validate()
    assert TensorRef.from_proto(huge.to_proto()) == huge


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"dtype": "complex64"}, "unsupported dtype"),
        ({"nbytes": 25}, "nbytes 25 does not match shape (2, 3) of float32 (24 bytes expected)"),
        ({"shape": (2, -3), "nbytes": 0}, "non-negative"),
        ({"checksum": "xxh3_64:XYZ"}, "checksum 'xxh3_64:XYZ' is malformed"),
        ({"checksum": "md5:0123456789abcdef0123456789abcdef"}, "is malformed"),
        ({"checksum": "crc32:0123456789abcdef"}, "is malformed"),
        ({"transaction_id": "bad id with spaces"}, "transaction id 'bad id with spaces' is not a valid id"),
        ({"ref_id": ""}, "ref id '' is not a valid id"),
        ({"source": "x" * 200}, "source"),
    ],
)
def test_invalid_refs_name_transaction_ref_and_problem(overrides: dict[str, object], fragment: str) -> None:
    ref = _ref(**overrides)
    with pytest.raises(InvalidRefError) as info:
        ref.validate()
    message = str(info.value)
    assert fragment in message
    assert f"transaction {ref.transaction_id!r}" in message and f"ref {ref.ref_id!r}" in message


def test_from_proto_refuses_unknown_dtype_enum() -> None:
    msg = _ref().to_proto()
    msg.dtype = 99  # type: ignore[assignment]
    with pytest.raises(InvalidRefError, match="unknown dtype enum value 99"):
        TensorRef.from_proto(msg)
    msg.dtype = tensor_pb2.DTYPE_UNSPECIFIED
    with pytest.raises(InvalidRefError, match="unknown dtype enum value 0"):
        TensorRef.from_proto(msg)


_text = st.text(max_size=40)
_ref_messages = st.builds(
    tensor_pb2.TensorRef,
    source=_text,
    transaction_id=st.one_of(_text, st.just("tx1")),
    ref_id=st.one_of(_text, st.just("t0")),
    name=_text,
    dtype=st.integers(0, 12),
    shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
    nbytes=st.integers(0, 2**64 - 1),
    checksum=st.one_of(_text, st.just("xxh3_64:0123456789abcdef"), st.just("crc32:00ff00ff")),
)


@settings(max_examples=300, deadline=None)
@given(_ref_messages)
def test_fuzz_from_proto_either_valid_or_invalid_ref_error(msg: tensor_pb2.TensorRef) -> None:
    try:
        ref = TensorRef.from_proto(msg)
    except InvalidRefError as exc:
        assert "invalid" in str(exc) or "unknown dtype" in str(exc)
        return
    assert ref.nbytes == math.prod(ref.shape) * numpy_dtype(ref.dtype).itemsize
    assert TensorRef.from_proto(ref.to_proto()) == ref


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_ref_parsing_from_arbitrary_bytes(raw: bytes) -> None:
    try:
        msg = tensor_pb2.TensorRef.FromString(raw)
    except Exception:  # the protobuf runtime rejects it: nothing of ours ran
        return
    with contextlib.suppress(InvalidRefError):
        TensorRef.from_proto(msg)


@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int16, np.int64, np.uint8, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
    )
)
def test_arbitrary_arrays_round_trip(array: np.ndarray) -> None:
    name = dtype_name(array.dtype)
    back = array_from_buffer(bytes(as_bytes(array)), name, array.shape)
    assert back.tobytes() == np.ascontiguousarray(array).astype(numpy_dtype(name)).tobytes()
