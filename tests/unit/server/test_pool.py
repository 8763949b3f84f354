"""ArrayPool: superseded global models become accumulators, but never while anything still refers to them."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from fedkube.server import pool
from fedkube.server.aggregate import BLOCK
from fedkube.server.pool import ALIGN, ALIGNED_MIN, ArrayPool, aligned_empty
from fedkube.server.strategies import FedAdam, FedAvg
from fedkube.server.strategy_api import Strategy

F32 = np.dtype(np.float32)


def _retired(pool: ArrayPool, *shapes: tuple[int, ...]) -> list[int]:
    """Retire fresh arrays the caller keeps no reference to; returns their data addresses."""
    arrays = [np.full(s, 7.0, F32) for s in shapes]
    addresses = [a.ctypes.data for a in arrays]
    assert pool.retire(arrays) == len(shapes)
    del arrays
    return addresses


def test_an_unreferenced_retired_array_is_handed_out_again() -> None:
    pool = ArrayPool()
    (address,) = _retired(pool, (64, 32))
    got = pool.take((64, 32), F32)
    assert got.ctypes.data == address and got.shape == (64, 32) and got.dtype == F32
    assert (pool.reused, pool.allocated, pool.busy) == (1, 0, 0)
    assert pool.take((64, 32), F32).ctypes.data != address  # handed out once, not twice
    assert pool.allocated == 1


def test_a_still_referenced_array_is_never_reused() -> None:
    holders: list[tuple[str, object]] = []
    for kind in ("array", "view", "memoryview", "reshaped", "thread"):
        pool = ArrayPool()
        arr = np.arange(4096, dtype=F32)
        pool.retire([arr])
        held: object
        release = threading.Event()
        if kind == "array":
            held = arr
        elif kind == "view":
            held = arr[10:20]
        elif kind == "memoryview":
            held = arr.data.cast("B")
        elif kind == "reshaped":
            held = arr.reshape(64, 64)
        else:
            # A background writer (like the checkpoint thread) that holds the array while it works.
            writer = threading.Thread(target=lambda a=arr, done=release: done.wait(10), daemon=True)
            writer.start()
            held = writer
        address = arr.ctypes.data
        del arr
        got = pool.take((4096,), F32)
        got[...] = -1.0  # a reuse would show in the holder's values
        assert got.ctypes.data != address, kind
        assert (pool.reused, pool.busy, pool.allocated) == (0, 1, 1), kind
        assert pool.nbytes == 0, kind  # dropped, not kept alive beside a fresh array
        if kind in ("array", "view", "reshaped"):
            assert isinstance(held, np.ndarray) and (held >= 0).all(), kind
        release.set()
        holders.append((kind, held))
    for _kind, held in holders:
        if isinstance(held, threading.Thread):
            held.join(10)


def test_only_arrays_owning_their_data_are_pooled() -> None:
    pool = ArrayPool()
    base = np.zeros(1024, F32)
    non_contiguous = np.zeros((8, 8), F32)[:, ::2]
    read_only = np.zeros(16, F32)
    read_only.flags.writeable = False
    assert pool.retire([base[:512], base[1:], non_contiguous, read_only, np.zeros(0, F32)]) == 0
    assert pool.nbytes == 0


def test_a_whole_view_like_np_load_returns_is_pooled_only_while_its_base_is_free() -> None:
    pool = ArrayPool()
    view = np.zeros(4096, F32).reshape(64, 64)
    assert not view.flags.owndata and pool.retire([view]) == 1
    address = view.ctypes.data
    del view
    assert pool.take((64, 64), F32).ctypes.data == address

    base = np.zeros(4096, F32)
    pool.retire([base.reshape(64, 64)])
    got = pool.take((64, 64), F32)
    assert got.ctypes.data != base.ctypes.data and pool.busy == 1  # the base is still held here


def test_shape_and_dtype_must_match() -> None:
    pool = ArrayPool()
    _retired(pool, (16, 16))
    assert pool.take((16, 17), F32).shape == (16, 17)
    assert pool.take((16, 16), np.float64).dtype == np.float64
    assert (pool.reused, pool.allocated) == (0, 2)
    pool.take((16, 16), F32)
    assert pool.reused == 1


def test_retire_replaces_what_was_left() -> None:
    pool = ArrayPool()
    _retired(pool, (8,), (8,))
    assert pool.nbytes == 64
    _retired(pool, (4,))
    assert pool.nbytes == 16  # the leftovers of the earlier model are not kept for ever
    pool.clear()
    assert pool.nbytes == 0


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal((BLOCK // 256 + 5, 256)).astype(F32),
        "b": rng.standard_normal(33).astype(F32),
        "n": np.array(1, np.int64),
    }


def _one_round(strategy: Strategy, model: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[
    dict[str, np.ndarray], list[tuple[float, dict[str, np.ndarray]]]
]:
    results = []
    agg = strategy.begin_round(model)
    for i in range(3):
        tensors = {k: (v + rng.standard_normal(v.shape).astype(F32)) if v.dtype == F32 else v.copy()
                   for k, v in model.items()}
        weight = float(10 * (i + 1))
        for name, arr in tensors.items():
            assert agg.add(f"c{i}", name, arr, weight)
        agg.commit(f"c{i}")
        results.append((weight, tensors))
    return agg.finish(), results


def _mean(results: list[tuple[float, dict[str, np.ndarray]]], name: str) -> np.ndarray:
    total = sum(w for w, _ in results)
    return sum(w * t[name].astype(np.float64) for w, t in results) / total  # type: ignore[return-value]


def test_fedavg_accumulates_into_the_model_of_two_rounds_ago_and_stays_exact() -> None:
    rng = np.random.default_rng(5)
    strategy = FedAvg()
    model = _model(rng)
    history: list[set[int]] = []
    for _ in range(5):
        model, results = _one_round(strategy, model, rng)
        gc.collect()
        history.append({a.ctypes.data for a in model.values() if a.dtype == F32})
        for name in ("w", "b"):
            np.testing.assert_allclose(model[name], _mean(results, name), rtol=2e-6, atol=2e-6)
    # From round 2 on, each round accumulates into the model it superseded last (round 2: the
    # initial model's arrays), so round r's result lives in the memory of round r-2's result.
    assert strategy.pool.reused == 2 and history[3] == history[1] and history[4] == history[2]


def test_fedavg_never_recycles_a_model_the_caller_still_holds() -> None:
    rng = np.random.default_rng(6)
    strategy = FedAvg()
    model = _model(rng)
    kept = [model]
    snapshots = [{k: v.copy() for k, v in model.items()}]
    for _ in range(4):
        model, _results = _one_round(strategy, model, rng)
        kept.append(model)
        snapshots.append({k: v.copy() for k, v in model.items()})
    assert strategy.pool.reused == 0 and strategy.pool.busy == 2
    for held, snap in zip(kept, snapshots, strict=True):
        for name in held:
            np.testing.assert_array_equal(held[name], snap[name])


def test_fedadam_with_recycled_accumulators_matches_a_fresh_strategy_each_round() -> None:
    """m and v are state, never pooled; the result equals an un-pooled run's bit for bit."""
    rng = np.random.default_rng(7)
    pooled = FedAdam(server_lr=0.05)
    model = _model(rng)
    for _ in range(4):
        state = pooled.state()
        fresh = FedAdam(server_lr=0.05)
        fresh.load_state(state) if state.tensors else None
        fresh.step = pooled.step
        expected, _ = _one_round(fresh, {k: v.copy() for k, v in model.items()}, np.random.default_rng(99))
        model, _ = _one_round(pooled, model, np.random.default_rng(99))
        gc.collect()
        for name in model:
            np.testing.assert_array_equal(model[name], expected[name])
        m_ids = {id(a) for a in pooled.m.values()} | {id(a) for a in pooled.v.values()}
        assert not m_ids & {id(a) for a in model.values()}
    assert pooled.pool.reused == 2


# --- page-aligned allocations (the checkpoint writes them with O_DIRECT) -----------------------


def test_take_allocates_page_aligned_arrays_and_pools_them_again() -> None:
    pool = ArrayPool()
    got = pool.take((300, 257), F32)  # 308400 bytes: not a multiple of a page either
    assert got.ctypes.data % ALIGN == 0 and got.shape == (300, 257) and got.flags.c_contiguous
    assert got.flags.writeable and not got.flags.owndata
    assert isinstance(got.base, np.ndarray) and got.base.nbytes - got.nbytes <= ALIGN  # one page more, at most
    address = got.ctypes.data
    assert pool.retire([got]) == 1
    del got
    again = pool.take((300, 257), F32)
    assert again.ctypes.data == address and (pool.reused, pool.allocated) == (1, 1)
    small = pool.take((3,), F32)  # below a page: plain np.empty, pooled as before
    assert small.flags.owndata and pool.retire([small]) == 1


def test_aligned_empty_covers_shapes_dtypes_and_empty_arrays() -> None:
    for shape, dtype in (((ALIGN,), np.uint8), ((5, ALIGN + 1), np.float64), ((0, 7), F32), ((), np.int64)):
        arr = aligned_empty(shape, dtype)
        assert arr.shape == shape and arr.dtype == np.dtype(dtype), (shape, dtype)
        if arr.nbytes >= ALIGN:
            assert arr.ctypes.data % ALIGN == 0, (shape, dtype)
        arr[...] = 1
        assert (arr == 1).all()


def test_a_still_referenced_aligned_array_is_never_reused() -> None:
    from fedkube.transfer.refs import as_bytes

    kinds = ["array", "slice", "memoryview", "reshaped", "as_bytes", "base", "flat", "thread", "torch"]
    holders: list[tuple[str, object]] = []
    for kind in kinds:
        pool = ArrayPool()
        arr = pool.take((64, 1024), F32)
        arr[...] = 3.0
        pool.retire([arr])
        held: object
        release = threading.Event()
        if kind == "array":
            held = arr
        elif kind == "slice":
            held = arr[10:20]
        elif kind == "memoryview":
            held = arr.data.cast("B")
        elif kind == "reshaped":
            held = arr.reshape(-1)
        elif kind == "as_bytes":
            held = as_bytes(arr)  # what the transfer service serves the published model from
        elif kind == "base":
            held = arr.base
        elif kind == "flat":
            assert arr.base is not None
            held = np.asarray(arr.base.data)  # the raw buffer, through its buffer protocol
        elif kind == "thread":
            writer = threading.Thread(target=lambda a=arr, done=release: done.wait(10), daemon=True)
            writer.start()
            held = writer
        else:
            torch = pytest.importorskip("torch")
            held = torch.from_numpy(arr)
        address = arr.ctypes.data
        del arr
        got = pool.take((64, 1024), F32)
        got[...] = -1.0  # a reuse would show in the holder's values
        assert got.ctypes.data != address, kind
        assert (pool.reused, pool.busy, pool.allocated) == (0, 1, 2), kind  # 2: the first take's too
        assert pool.nbytes == 0, kind
        if isinstance(held, np.ndarray) and held.dtype == F32:
            assert (held == 3.0).all(), kind
        release.set()
        holders.append((kind, held))
    for _kind, held in holders:
        if isinstance(held, threading.Thread):
            held.join(10)


def test_views_that_merely_sit_in_a_byte_array_are_pooled_only_when_within_a_page_of_it() -> None:
    pool = ArrayPool()
    big = np.empty(4 * ALIGN, np.uint8)
    assert pool.retire([big[: ALIGN].view(F32)]) == 0  # would keep 3 pages alive for 1
    near = np.empty(2 * ALIGN + 8, np.uint8)
    assert pool.retire([near[8:].view(F32)]) == 1


def test_large_unaligned_arrays_are_not_pooled() -> None:
    pool = ArrayPool()
    # Usually glibc's mmap chunk (16 bytes past a page); once glibc raised its mmap threshold, a heap chunk,
    # which can be page-aligned by chance: another allocation then lands elsewhere (the first stays held).
    held = [np.empty(ALIGNED_MIN // 4, F32)]
    while held[-1].ctypes.data % ALIGN == 0 and len(held) < 8:
        held.append(np.empty(ALIGNED_MIN // 4, F32))
    unaligned = held[-1]
    assert unaligned.ctypes.data % ALIGN != 0
    assert pool.retire([unaligned, pool.take((ALIGNED_MIN // 4 + 1,), F32)]) == 1


def test_fedavg_results_are_page_aligned_in_every_round() -> None:
    rng = np.random.default_rng(8)
    strategy = FedAvg()
    model = _model(rng)
    assert model["w"].nbytes >= ALIGNED_MIN and model["w"].ctypes.data % ALIGN != 0  # astype: np.empty memory
    for r in range(1, 6):
        model, _results = _one_round(strategy, model, rng)
        gc.collect()
        # Round 2 does not recycle the initial model's unaligned "w", or every even round would be unaligned.
        assert model["w"].ctypes.data % ALIGN == 0, r
    assert strategy.pool.reused == 2  # round 5 accumulates into round 3's arrays


def test_realigned_copies_large_unaligned_tensors_once_and_keeps_the_rest() -> None:
    rng = np.random.default_rng(3)
    big = rng.standard_normal(1 << 19).astype(np.float32)  # 2 MiB
    raw = np.empty(big.nbytes + 64, np.uint8)
    unaligned = raw[16 : 16 + big.nbytes].view(np.float32)  # what np.load / np.fromfile give: not page-aligned
    unaligned[...] = big
    aligned = pool.aligned_empty(big.shape, np.float32)
    aligned[...] = big
    small = np.arange(10, dtype=np.int64)
    model = {"u": unaligned, "a": aligned, "s": small}
    out = pool.realigned(model)
    assert out is model
    assert out["u"] is not unaligned and out["u"].ctypes.data % pool.ALIGN == 0
    np.testing.assert_array_equal(out["u"], big)
    assert out["a"] is aligned and out["s"] is small  # already fine, or too small to matter: untouched
    p = pool.ArrayPool()
    assert p.retire(out.values()) == 3  # every one of them can now be recycled
