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
    FoldAbortedError,
    Intake,
    InvalidResultError,
    WeightedMean,
    weighted_metrics,
)
from fedkube.server.model import ModelSpec
from fedkube.server.pool import ArrayPool


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
    # c2 delivers 'a' and then its download of 'b' fails: 'a' is emptied and owed to c0 and c1 again.
    wm.add("c2", "a", xs[2], ws[2])
    outcome = wm.discard("c2")
    assert outcome.exact and outcome.rebuild == {"a": ("c0", "c1")}
    assert wm.add("c2", "b", xs[2], ws[2]) is False
    assert wm.refold("c2", "a", xs[2]) is False  # nothing of a discarded client is taken back
    with pytest.raises(AggregationError, match=r"\['a'\].*refolded"):
        wm.means()
    wm2 = WeightedMean(ModelSpec.of(model))  # the same, refolded: means over exactly c0 and c1
    for i in (0, 1):
        for name in model:
            wm2.add(f"c{i}", name, xs[i], ws[i])
        wm2.commit(f"c{i}")
    wm2.add("c2", "a", xs[2], ws[2])
    wm2.discard("c2")
    assert wm2.refold("c1", "a", xs[1]) and wm2.refold("c0", "a", xs[0])
    assert wm2.refold("c0", "a", xs[0]) is False  # owed once
    means = wm2.means()
    for name in model:
        np.testing.assert_allclose(means[name], _reference(xs[:2], ws[:2]), rtol=1e-6, atol=1e-6)
    assert wm2.contributors("a") == ("c1", "c0") and wm2.contributors("b") == ("c0", "c1")


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
    assert wm.discard("c1", rebuild=False).kept_tensors == ("a",)
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
    refolds: list[tuple[str, str]] = []  # (client, tensor) a discard emptied, fetched again later in any order
    while any(pending.values()) or refolds:
        choices = [c for c, left in pending.items() if left] + ([-1] if refolds else [])
        c = data.draw(st.sampled_from(choices))
        if c == -1:
            key, name = refolds.pop(data.draw(st.integers(0, len(refolds) - 1)))
            wm.refold(key, name, values[(int(key[1:]), name)])
            continue
        if fails_after[c] is not None and len(delivered[c]) == fails_after[c]:
            outcome = wm.discard(f"c{c}")
            assert outcome.exact and (not staged or not outcome.rebuild)
            refolds += [(key, name) for name, keys in outcome.rebuild.items() for key in keys]
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
        # A failed client leaves nothing behind, streamed or staged: its tensors were rebuilt without it.
        ref = _reference([values[(c, name)] for c in committed], [weights[c] for c in committed])
        np.testing.assert_allclose(means[name], ref, rtol=1e-5, atol=1e-6)
        assert sorted(wm.contributors(name)) == sorted(f"c{c}" for c in committed)


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
    wm.discard("s1#1", rebuild=False)  # superseded: the task was re-sent after a reconnect
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
    # The kept contribution is the new attempt's: discarding that one would take it out too.
    assert wm.contributors("a") == ("s0", "s1#2") and wm.contributors("c") == ("s0", "s1#2")


# -- intake: finite check while receiving, first contribution straight into the accumulator ----------------


def _receive(intake: Intake, array: np.ndarray, buffer: np.ndarray | None = None) -> np.ndarray:
    """What the server's download does: write the bytes where the intake says, piece by piece through its check."""
    out = intake.target if intake.target is not None else (buffer if buffer is not None else np.empty_like(array))
    flat = out.reshape(-1).view(np.uint8)
    src = array.reshape(-1).view(np.uint8)
    if intake.check is not None:
        intake.check.reset()
    for start in range(0, src.size, 4099):  # pieces that end inside elements
        stop = min(start + 4099, src.size)
        flat[start:stop] = src[start:stop]
        if intake.check is not None:
            intake.check.update(flat.data, start, stop)
    return out


def _spec_w(n: int = 5000, dtype: type = np.float32) -> ModelSpec:
    return ModelSpec.of({"w": np.zeros(n, dtype)})


def test_first_contribution_is_received_into_the_accumulator_without_a_copy() -> None:
    xs, ws = _clients(2, 5000, seed=3)
    pool = ArrayPool()
    wm = WeightedMean(_spec_w(), pool=pool)
    first = wm.intake("a", "w", "float32", (5000,), ws[0])
    assert first.claimed and first.target is not None and first.check is not None
    target = first.target
    assert first.add(_receive(first, xs[0]))
    first.close()
    second = wm.intake("b", "w", "float32", (5000,), ws[1])
    assert not second.claimed and second.target is None  # an accumulator exists: fold as before
    assert second.add(_receive(second, xs[1]))
    wm.commit("a")
    wm.commit("b")
    got = wm.means()["w"]
    assert got is target
    assert float(np.abs(got - _reference(xs, ws)).max()) <= 8 * float(np.spacing(np.float32(np.abs(xs[1]).max())))
    assert wm.contributors("w") == ("a", "b")


def test_two_downloads_race_for_a_tensor_the_loser_folds_after_the_claimer_published() -> None:
    xs, ws = _clients(2, 5000, seed=4)
    wm = WeightedMean(_spec_w())
    claimer = wm.intake("a", "w", "float32", (5000,), ws[0])
    loser = wm.intake("b", "w", "float32", (5000,), ws[1])
    assert claimer.claimed and not loser.claimed and loser.target is None
    received = _receive(loser, xs[1])
    done = threading.Event()
    result: list[object] = []

    def fold_loser() -> None:
        result.append(loser.add(received))
        done.set()

    t = threading.Thread(target=fold_loser)
    t.start()
    _receive(claimer, xs[0])  # the claimer is still writing its accumulator
    assert not done.wait(0.2), "folded into an accumulator that was still being received"
    assert wm.contributors("w") == ()
    assert claimer.add(claimer.target)  # type: ignore[arg-type]
    assert done.wait(5) and result == [True]
    t.join(5)
    wm.commit("a")
    wm.commit("b")
    assert wm.contributors("w") == ("a", "b")
    np.testing.assert_allclose(wm.means()["w"], _reference(xs, ws), rtol=0, atol=1e-5)


@pytest.mark.parametrize("failure", ["transfer", "non-finite", "discarded"])
def test_a_failed_claim_leaves_the_tensor_as_if_never_claimed(failure: str) -> None:
    xs, ws = _clients(2, 5000, seed=5)
    wm = WeightedMean(_spec_w())
    claimer = wm.intake("a", "w", "float32", (5000,), ws[0])
    waiter = wm.intake("b", "w", "float32", (5000,), ws[1])
    target = claimer.target
    received = _receive(waiter, xs[1])
    done = threading.Event()
    def fold_waiter() -> None:
        waiter.add(received)
        done.set()

    t = threading.Thread(target=fold_waiter)
    t.start()
    if failure == "transfer":
        _receive(claimer, xs[0][:100].repeat(50))  # half-written, then the fetch fails: no add
        claimer.close()
    elif failure == "non-finite":
        bad = xs[0].copy()
        bad[77] = np.inf
        _receive(claimer, bad)
        with pytest.raises(InvalidResultError, match="NaN or Inf"):
            claimer.add(claimer.target)  # type: ignore[arg-type]
        wm.discard("a")
    else:
        _receive(claimer, xs[0])
        wm.discard("a")  # e.g. the client was lost while its bytes arrived
        assert claimer.add(claimer.target) is False  # type: ignore[arg-type]
    assert done.wait(5)
    t.join(5)
    assert not claimer.claimed
    wm.commit("b")
    got = wm.means()["w"]
    if failure != "discarded":  # (a discarded claim may also be revoked, its array then unused: see below)
        assert got is target  # the given-up array became the waiter's accumulator (copied in)
    assert np.array_equal(got, xs[1])  # weights and contributors of the failed claimer untouched
    assert wm.contributors("w") == ("b",)


def test_a_claim_given_back_is_claimed_again_by_the_next_download() -> None:
    xs, ws = _clients(1, 5000, seed=6)
    wm = WeightedMean(_spec_w())
    first = wm.intake("a#1", "w", "float32", (5000,), ws[0])
    target = first.target
    first.close()  # aborted before a byte arrived
    wm.discard("a#1")
    assert wm.reopen("a#1", "a#2") == ()
    again = wm.intake("a#2", "w", "float32", (5000,), ws[0])
    assert again.claimed and again.target is target
    assert again.add(_receive(again, xs[0]))
    wm.commit("a#2")
    assert np.array_equal(wm.means()["w"], xs[0]) and wm.contributors("w") == ("a#2",)


def test_a_waiting_fold_gives_up_when_its_download_is_aborted() -> None:
    xs, ws = _clients(2, 5000, seed=7)
    wm = WeightedMean(_spec_w())
    claimer = wm.intake("a", "w", "float32", (5000,), ws[0])
    abort = threading.Event()
    waiter = wm.intake("b", "w", "float32", (5000,), ws[1], abort=abort)
    received = _receive(waiter, xs[1])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            waiter.add(received)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    abort.set()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], FoldAbortedError)
    assert wm.discard("b").exact  # nothing of b was registered
    assert claimer.add(_receive(claimer, xs[0]))
    wm.commit("a")
    assert np.array_equal(wm.means()["w"], xs[0])


def test_no_claim_for_kept_staged_half_precision_or_mismatching_tensors() -> None:
    xs, ws = _clients(1, 5000, seed=8)
    wm = WeightedMean(_spec_w())
    with wm.intake("a", "w", "float32", (5000,), ws[0]) as first:
        assert first.add(_receive(first, xs[0]))
    wm.discard("a", rebuild=False)
    wm.reopen("a", "a#2")
    kept = wm.intake("a#2", "w", "float32", (5000,), ws[0])
    assert not kept.claimed  # the earlier attempt's value stays; this copy is ignored
    assert kept.add(_receive(kept, xs[0])) is False
    staged = WeightedMean(_spec_w(), staged=True).intake("a", "w", "float32", (5000,), 1.0)
    assert not staged.claimed and staged.check is not None
    half = WeightedMean(_spec_w(dtype=np.float16)).intake("a", "w", "float16", (5000,), 1.0)
    assert not half.claimed and half.check is not None  # accumulated in float32: received into a buffer
    wrong = WeightedMean(_spec_w()).intake("a", "w", "float64", (5000,), 1.0)
    assert not wrong.claimed and wrong.check is None
    with pytest.raises(InvalidResultError, match="dtype float64"):
        wrong.add(np.zeros(5000))
    ints = WeightedMean(ModelSpec.of({"n": np.zeros(3, np.int64)})).intake("a", "n", "int64", (3,), 1.0)
    assert not ints.claimed and ints.check is None


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_intake_rejects_a_non_finite_tensor_from_the_receive_time_verdict(dtype: type) -> None:
    wm = WeightedMean(_spec_w(dtype=dtype))
    bad: np.ndarray = np.ones(5000, dtype)
    bad[4999] = np.nan
    intake = wm.intake("a", "w", np.dtype(dtype).name if dtype is not ml_dtypes.bfloat16 else "bfloat16", (5000,), 1.0)
    received = _receive(intake, bad)
    assert intake.check is not None and intake.check.complete and not intake.check.finite
    with pytest.raises(InvalidResultError, match="NaN or Inf"):
        intake.add(received)
    assert not intake.claimed
    assert wm.discard("a").exact


def test_a_discarded_clients_claim_is_revoked_not_waited_for_and_its_array_never_used() -> None:
    xs, ws = _clients(2, 5000, seed=9)
    wm = WeightedMean(_spec_w())
    late = wm.intake("a", "w", "float32", (5000,), ws[0])
    assert late.claimed and late.target is not None
    target = late.target
    other = wm.intake("b", "w", "float32", (5000,), ws[1])
    assert not other.claimed
    wm.discard("a")  # e.g. the client was lost; its download thread is still winding down
    assert other.add(_receive(other, xs[1]))  # no wait for a's fetch
    assert not late.claimed
    target[:] = -1.0  # a's fetch keeps writing its array: b's accumulator must not be that memory
    assert late.add(target) is False  # stale: ignored through the ordinary path
    late.close()
    wm.commit("b")
    got = wm.means()["w"]
    assert got is not target and np.array_equal(got, xs[1]) and wm.contributors("w") == ("b",)
