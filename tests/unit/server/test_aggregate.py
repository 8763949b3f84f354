"""Streaming weighted mean: precision, per-tensor discard semantics, integer rule, misuse."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.server.aggregate import (
    BLOCK,
    AggregationError,
    InvalidResultError,
    WeightedMean,
    weighted_metrics,
)
from fedkube.server.model import ModelSpec


def _clients(n: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal(size) * (i + 1) + i).astype(np.float32) for i in range(n)]
    ws = [float(w) for w in rng.integers(1, 10_000, size=n)]
    return xs, ws


def _reference(xs: list[np.ndarray], ws: list[float]) -> np.ndarray:
    total = sum(ws)
    out = np.zeros(xs[0].shape, np.float64)
    for w, x in zip(ws, xs, strict=True):
        out += w * x.astype(np.float64)
    return out / total


def test_float32_running_mean_error_vs_float64_reference_8_clients() -> None:
    # Larger than BLOCK so the blocked update loop runs more than once.
    xs, ws = _clients(8, 1_000_003)  # several BLOCKs
    wm = WeightedMean(ModelSpec.of({"w": xs[0]}))
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        wm.add(f"c{i}", "w", x, w)
        wm.commit(f"c{i}")
    got = wm.means()["w"]
    assert got.dtype == np.float32
    ref = _reference(xs, ws)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    # Float32 weighted sum (the alternative) measured the same way, for the docstring's comparison.
    acc = np.zeros_like(xs[0])
    for x, w in zip(xs, ws, strict=True):
        acc += np.float32(w) * x
    err_sum = float(np.abs((acc / np.float32(sum(ws))).astype(np.float64) - ref).max())
    ulp = float(np.spacing(np.float32(np.abs(ref).max())))
    print(f"max abs error: running mean {err:.3g}, weighted sum {err_sum:.3g}, ulp {ulp:.3g}")
    assert err <= 8 * ulp
    assert err <= 2 * err_sum  # no worse than the alternative, in the same order


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_accumulates_in_float32_and_casts_once(dtype: str) -> None:
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    xs32, ws = _clients(8, 4096, seed=3)
    xs = [x.astype(np_dtype) for x in xs32]
    wm = WeightedMean(ModelSpec.of({"w": xs[0]}))
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        wm.add(f"c{i}", "w", x, w)
        wm.commit(f"c{i}")
    acc = wm.means()["w"]
    assert acc.dtype == np.float32
    ref = _reference([x.astype(np.float32) for x in xs], ws)
    # Casting the float32 mean once equals rounding the exact mean, except at rare ties one ulp apart.
    exact = ref.astype(np.float32).astype(np_dtype)
    mismatched = np.count_nonzero(acc.astype(np_dtype) != exact)
    assert mismatched <= 0.01 * acc.size


def test_discard_before_any_tensor_is_exact() -> None:
    xs, ws = _clients(3, 100)
    model = {"a": xs[0], "b": xs[0] * 2}
    wm = WeightedMean(ModelSpec.of(model))
    for i in (0, 1):
        wm.add(f"c{i}", "a", xs[i], ws[i])
        wm.add(f"c{i}", "b", xs[i] * 2, ws[i])
        wm.commit(f"c{i}")
    assert wm.discard("c2").exact
    assert wm.add("c2", "a", xs[2], ws[2]) is False  # a late download from a discarded client is ignored
    means = wm.means()
    np.testing.assert_allclose(means["a"], _reference(xs[:2], ws[:2]), rtol=1e-6, atol=1e-6)


def test_streaming_discard_midway_keeps_per_tensor_means_exact() -> None:
    xs, ws = _clients(3, 100, seed=5)
    model = {"a": xs[0], "b": xs[0], "c": xs[0]}
    wm = WeightedMean(ModelSpec.of(model))
    for i in (0, 1):
        for name in model:
            wm.add(f"c{i}", name, xs[i], ws[i])
        wm.commit(f"c{i}")
    # c2 delivers 'a' and then its download of 'b' fails.
    wm.add("c2", "a", xs[2], ws[2])
    outcome = wm.discard("c2")
    assert outcome.kept_tensors == ("a",) and not outcome.exact
    assert wm.add("c2", "b", xs[2], ws[2]) is False
    means = wm.means()
    np.testing.assert_allclose(means["a"], _reference(xs, ws), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(means["b"], _reference(xs[:2], ws[:2]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(means["c"], _reference(xs[:2], ws[:2]), rtol=1e-6, atol=1e-6)
    assert wm.contributors("a") == ("c0", "c1", "c2") and wm.contributors("b") == ("c0", "c1")


def test_staged_discard_midway_removes_everything_and_order_does_not_matter() -> None:
    xs, ws = _clients(3, 100, seed=6)
    model = {"a": xs[0], "b": xs[0]}

    def run(order: list[tuple[str, str]]) -> dict[str, np.ndarray]:
        wm = WeightedMean(ModelSpec.of(model), staged=True)
        for client, name in order:
            i = int(client[1])
            wm.add(client, name, xs[i], ws[i])
        wm.commit("c1")
        wm.commit("c0")
        assert wm.discard("c2").exact
        return wm.means()

    one = run([("c0", "a"), ("c0", "b"), ("c1", "a"), ("c2", "a"), ("c1", "b")])
    two = run([("c2", "a"), ("c1", "b"), ("c0", "b"), ("c1", "a"), ("c0", "a")])
    for name in model:
        np.testing.assert_array_equal(one[name], two[name])
        np.testing.assert_allclose(one[name], _reference(xs[:2], ws[:2]), rtol=1e-6, atol=1e-6)


def test_integer_and_bool_tensors_take_the_largest_weight_client_value() -> None:
    model = {"n": np.array(0, np.int64), "mask": np.zeros(4, np.bool_)}
    wm = WeightedMean(ModelSpec.of(model))
    values = {"c0": (10.0, 5, [1, 0, 0, 0]), "c1": (30.0, 7, [0, 1, 0, 0]), "c2": (30.0, 9, [0, 0, 1, 0])}
    for client in ("c2", "c0", "c1"):  # arrival order must not matter
        w, n, mask = values[client]
        wm.add(client, "n", np.array(n, np.int64), w)
        wm.add(client, "mask", np.array(mask, np.bool_), w)
        wm.commit(client)
    means = wm.means()
    # c1 and c2 tie on weight 30: the smaller name wins.
    assert int(means["n"]) == 7 and means["n"].dtype == np.int64
    assert means["mask"].tolist() == [False, True, False, False]


def test_concurrent_adds_from_threads_match_serial_result() -> None:
    xs, ws = _clients(6, 50_000, seed=9)
    names = [f"t{j}" for j in range(4)]
    model = dict.fromkeys(names, xs[0])
    wm = WeightedMean(ModelSpec.of(model))
    barrier = threading.Barrier(6)

    def client(i: int) -> None:
        barrier.wait(timeout=10)
        for n in names:
            wm.add(f"c{i}", n, xs[i], ws[i])
        wm.commit(f"c{i}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    means = wm.means()
    ref = _reference(xs, ws)
    for n in names:
        np.testing.assert_allclose(means[n], ref, rtol=1e-5, atol=1e-5)
    assert sorted(wm.committed) == [f"c{i}" for i in range(6)]


def test_misuse_and_bad_results_raise_clear_errors() -> None:
    x = np.ones((2, 2), np.float32)
    wm = WeightedMean(ModelSpec.of({"a": x, "b": x}))
    with pytest.raises(InvalidResultError, match="shape"):
        wm.add("c0", "a", np.ones((2, 3), np.float32), 1)
    with pytest.raises(InvalidResultError, match="dtype"):
        wm.add("c0", "a", np.ones((2, 2), np.float64), 1)
    with pytest.raises(InvalidResultError, match="not in the global model"):
        wm.add("c0", "z", x, 1)
    with pytest.raises(InvalidResultError, match="num_examples must be > 0"):
        wm.add("c0", "a", x, 0)
    wm.add("c0", "a", x, 2)
    with pytest.raises(InvalidResultError, match="weight changed"):
        wm.add("c0", "b", x, 3)
    with pytest.raises(InvalidResultError, match="added twice"):
        wm.add("c0", "a", x, 2)
    with pytest.raises(InvalidResultError, match="incomplete: 1 tensor"):
        wm.commit("c0")
    with pytest.raises(AggregationError, match="neither committed nor discarded"):
        wm.means()
    wm.discard("c0")
    with pytest.raises(AggregationError, match="no client result was committed"):
        wm.means()


def test_weighted_metrics() -> None:
    got = weighted_metrics(
        {"a": (1, {"loss": 1.0, "acc": 0.5}), "b": (3, {"loss": 3.0}), "c": (5, {"loss": float("nan")})}
    )
    assert got == {"acc": 0.5, "loss": 2.5}


def test_reopen_after_a_partial_attempt_counts_each_tensor_once() -> None:
    xs, ws = _clients(3, 64, seed=11)
    model = {"a": xs[0], "b": xs[0]}
    wm = WeightedMean(ModelSpec.of(model))
    for name in model:
        wm.add("c0", name, xs[0], ws[0])
    wm.commit("c0")
    wm.add("c1", "a", xs[1], ws[1])  # first attempt: 'a' arrives, then the connection drops
    assert wm.discard("c1").kept_tensors == ("a",)
    with pytest.raises(AggregationError, match="not discarded"):
        wm.reopen("c0")
    assert wm.reopen("c1") == ("a",)
    # The re-sent task's attempt carries new values and a new weight; 'a' is already counted.
    assert wm.add("c1", "a", xs[2], ws[2]) is False
    assert wm.add("c1", "b", xs[2], ws[2]) is True
    wm.commit("c1")
    means = wm.means()
    np.testing.assert_allclose(means["a"], _reference([xs[0], xs[1]], [ws[0], ws[1]]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(means["b"], _reference([xs[0], xs[2]], [ws[0], ws[2]]), rtol=1e-6, atol=1e-6)
    assert wm.contributors("a") == ("c0", "c1") and wm.contributors("b") == ("c0", "c1")


def test_reopen_in_staged_mode_starts_afresh() -> None:
    xs, ws = _clients(2, 64, seed=12)
    model = {"a": xs[0], "b": xs[0]}
    wm = WeightedMean(ModelSpec.of(model), staged=True)
    wm.add("c0", "a", xs[0], ws[0])
    assert wm.discard("c0").exact
    assert wm.reopen("c0") == ()
    for name in model:
        assert wm.add("c0", name, xs[1], ws[1])
    wm.commit("c0")
    np.testing.assert_array_equal(wm.means()["a"], xs[1])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_interleavings_and_discards_match_per_tensor_reference(data: st.DataObject) -> None:
    n_clients = data.draw(st.integers(1, 5))
    names = [f"t{i}" for i in range(data.draw(st.integers(1, 4)))]
    staged = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    values = {(c, n): rng.standard_normal(5).astype(np.float32) for c in range(n_clients) for n in names}
    weights = {c: float(rng.integers(1, 100)) for c in range(n_clients)}
    wm = WeightedMean(ModelSpec.of({n: np.zeros(5, np.float32) for n in names}), staged=staged)
    # Each client delivers its tensors in some order; some fail after a prefix.
    pending = {c: data.draw(st.permutations(names)) for c in range(n_clients)}
    fails_after = {c: data.draw(st.one_of(st.none(), st.integers(0, len(names) - 1))) for c in range(n_clients)}
    delivered: dict[int, list[str]] = {c: [] for c in range(n_clients)}
    while any(pending.values()):
        c = data.draw(st.sampled_from([c for c, left in pending.items() if left]))
        if fails_after[c] is not None and len(delivered[c]) == fails_after[c]:
            wm.discard(f"c{c}")
            pending[c] = []
            continue
        name = pending[c].pop(0)
        wm.add(f"c{c}", name, values[(c, name)], weights[c])
        delivered[c].append(name)
        if not pending[c]:
            wm.commit(f"c{c}")
    committed = [c for c in range(n_clients) if fails_after[c] is None]
    if not committed:
        with pytest.raises(AggregationError, match="no client result was committed"):
            wm.means()
        return
    means = wm.means()
    for name in names:
        # Streaming keeps a failed client's delivered tensors; staged keeps only committed clients.
        contributors = [c for c in range(n_clients) if c in committed or (not staged and name in delivered[c])]
        ref = _reference([values[(c, name)] for c in contributors], [weights[c] for c in contributors])
        np.testing.assert_allclose(means[name], ref, rtol=1e-5, atol=1e-6)
        assert sorted(wm.contributors(name)) == sorted(f"c{c}" for c in contributors)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensor_is_rejected_before_it_touches_the_mean(dtype: np.dtype, bad: float) -> None:
    good = np.ones(BLOCK + 10, np.float32).astype(dtype)
    wm = WeightedMean(ModelSpec.of({"w": good}))
    wm.add("c0", "w", good, 1.0)
    wm.commit("c0")
    poisoned = good.copy()
    poisoned[BLOCK + 5] = bad  # in the second block, after a clean first one
    with pytest.raises(InvalidResultError, match="'w' contains NaN or Inf"):
        wm.add("c1", "w", poisoned, 1.0)
    wm.discard("c1")
    assert np.all(wm.means()["w"] == 1.0)


def test_reopen_under_a_new_key_ignores_the_old_attempts_late_adds() -> None:
    xs, ws = _clients(3, 64, seed=13)
    model = {"a": xs[0], "b": xs[0], "c": xs[0]}
    wm = WeightedMean(ModelSpec.of(model))
    for name in model:
        wm.add("s0", name, xs[0], ws[0])
    wm.commit("s0")
    wm.add("s1#1", "a", xs[1], ws[1])
    wm.discard("s1#1")  # superseded: the task was re-sent after a reconnect
    assert wm.reopen("s1#1", "s1#2") == ("a",)
    assert wm.add("s1#1", "b", xs[1], ws[1]) is False  # the old download winding down
    assert wm.add("s1#2", "a", xs[2], ws[2]) is False  # already counted by attempt 1
    assert wm.add("s1#2", "b", xs[2], ws[2]) and wm.add("s1#2", "c", xs[2], ws[2])
    wm.commit("s1#2")
    # A key already used this round cannot name a new attempt.
    with pytest.raises(AggregationError, match="already used"):
        wm.reopen("s1#1", "s0")
    means = wm.means()
    np.testing.assert_allclose(means["a"], _reference([xs[0], xs[1]], [ws[0], ws[1]]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(means["b"], _reference([xs[0], xs[2]], [ws[0], ws[2]]), rtol=1e-6, atol=1e-6)
    assert wm.contributors("a") == ("s0", "s1#1") and wm.contributors("c") == ("s0", "s1#2")
