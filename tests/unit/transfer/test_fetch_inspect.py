"""Fetcher's per-range inspector hook: consecutive ranges, resumes mid-element, reset on a checksum refetch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest

from fedkube.server.aggregate import FiniteCheck
from fedkube.transfer import ChecksumMismatchError, Fetcher, FetchSettings, StreamBrokenError, TensorRef, checksum_of

FAST = FetchSettings(chunk_timeout_s=1.0, idle_timeout_s=5.0, max_attempts=4, backoff_base_s=0.001, backoff_max_s=0.002)


class _MemorySource:
    """A ChunkSource over bytes in memory: odd-sized chunks, a break after ``break_at`` bytes (once), and
    ``corrupt`` = {fetch number: {offset: byte}} to flip bytes of whole fetches (as a bad link would)."""

    receiver = "server"

    def __init__(self, data: bytes, chunk: int, *, break_at: int | None = None, corrupt: dict | None = None) -> None:
        self.data = data
        self.chunk = chunk
        self.break_at = break_at
        self.corrupt = corrupt or {}
        self.fetches = 0  # streams that started at offset 0

    def stream(self, ref: object, offset: int, max_chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
        if offset == 0:
            self.fetches += 1
        data = bytearray(self.data)
        for pos, byte in self.corrupt.get(self.fetches, {}).items():
            data[pos] = byte
        for pos in range(offset, len(data), self.chunk):
            if self.break_at is not None and pos + self.chunk > self.break_at:
                self.break_at = None
                if pos < len(data):
                    yield pos, bytes(data[pos : pos + 3])  # part of a chunk, then the link breaks
                raise StreamBrokenError("link broke")
            yield pos, bytes(data[pos : pos + self.chunk])

    def complete(self, transaction_id: str, ok: bool, error: str = "") -> None:
        pass


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def reset(self) -> None:
        self.events.append(("reset", 0, 0))

    def update(self, buf: memoryview, start: int, stop: int) -> None:
        self.events.append(("update", start, stop))


def _ref(array: np.ndarray) -> tuple[TensorRef, bytes]:
    data = array.tobytes()
    ref = TensorRef.for_array(array, source="c", transaction_id="tx", ref_id="t0", name="w", checksum=checksum_of(data))
    return ref, data


def test_ranges_are_consecutive_across_a_resume_that_ends_mid_element() -> None:
    ref, data = _ref(np.arange(1000, dtype=np.float32))
    rec = _Recorder()
    # 7-byte chunks never line up with 4-byte elements; the break leaves a 3-byte piece.
    Fetcher(_MemorySource(data, 7, break_at=2000), FAST).fetch_into(ref, inspect=rec)
    assert rec.events[0] == ("reset", 0, 0)
    updates = [e for e in rec.events if e[0] == "update"]
    assert [e for e in rec.events if e[0] == "reset"] == [("reset", 0, 0)]  # a resume is no restart
    assert updates[0][1] == 0 and updates[-1][2] == len(data)
    assert all(a[2] == b[1] for a, b in itertools.pairwise(updates))
    assert any(stop % 4 for _, _, stop in updates)


def test_checksum_refetch_resets_the_inspector() -> None:
    ref, data = _ref(np.arange(100, dtype=np.float32))
    rec = _Recorder()
    source = _MemorySource(data, 64, corrupt={1: {10: 0xFF}})
    Fetcher(source, FAST).fetch_into(ref, inspect=rec)
    resets = [i for i, e in enumerate(rec.events) if e[0] == "reset"]
    assert len(resets) == 2 and source.fetches == 2
    assert rec.events[resets[1] + 1] == ("update", 0, 64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_finite_check_sees_a_genuine_nan_or_inf_across_odd_pieces(dtype: type) -> None:
    for bad, where in ((np.nan, 0), (np.inf, 517), (-np.inf, 999)):
        array: np.ndarray = np.linspace(-3, 3, 1000).astype(dtype)
        array[where] = bad
        ref, data = _ref(array)
        check = FiniteCheck(array.dtype, array.nbytes)
        out = Fetcher(_MemorySource(data, 7, break_at=1001), FAST).fetch_into(ref, inspect=check)
        assert bytes(out) == data
        assert check.complete and check.finite is False, (dtype, bad, where)
    clean: np.ndarray = np.linspace(-3, 3, 1000).astype(dtype)
    ref, data = _ref(clean)
    check = FiniteCheck(clean.dtype, clean.nbytes)
    Fetcher(_MemorySource(data, 5), FAST).fetch_into(ref, inspect=check)
    assert check.complete and check.finite is True


def test_a_nan_made_by_a_corrupted_fetch_is_forgotten_after_the_refetch() -> None:
    array = np.ones(256, np.float32)
    ref, data = _ref(array)
    # 0x7fc00000 little-endian at element 3: a NaN that only the first, corrupted fetch carries.
    corrupt = {1: {12: 0x00, 13: 0x00, 14: 0xC0, 15: 0x7F}}
    check = FiniteCheck(array.dtype, array.nbytes)
    Fetcher(_MemorySource(data, 100, corrupt=corrupt), FAST).fetch_into(ref, inspect=check)
    assert check.complete and check.finite is True


def test_a_corruption_that_persists_is_a_checksum_error_not_a_verdict() -> None:
    array = np.ones(256, np.float32)
    ref, data = _ref(array)
    nan_at_3 = {12: 0x00, 13: 0x00, 14: 0xC0, 15: 0x7F}
    source = _MemorySource(data, 100, corrupt={1: nan_at_3, 2: nan_at_3, 3: nan_at_3})
    check = FiniteCheck(array.dtype, array.nbytes)
    with pytest.raises(ChecksumMismatchError):
        Fetcher(source, FAST).fetch_into(ref, inspect=check)


def test_finite_check_waits_for_whole_elements() -> None:
    array = np.array([1.0, np.nan, 2.0], np.float32)
    buf = memoryview(bytearray(array.tobytes()))
    check = FiniteCheck(array.dtype, array.nbytes)
    check.update(buf, 0, 6)  # element 1 only half there: not judged yet
    assert check.checked == 4 and check.finite
    check.update(buf, 6, 9)
    assert check.checked == 8 and not check.finite
    check.update(buf, 9, 12)
    assert check.complete and not check.finite
    check.reset()
    assert check.checked == 0 and check.finite
