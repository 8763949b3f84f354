"""The robust strategies (median, trimmed mean, Krum) against direct numpy references, staged on disk."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.errors import ConfigError
from fedkube.server import checkpoint
from fedkube.server.aggregate import InvalidResultError, accumulator_dtype
from fedkube.server.model import TensorSpec, dtype_name
from fedkube.server.robust import (
    STAGING_DIR,
    Krum,
    Median,
    RobustAggregator,
    TooFewResultsError,
    TrimmedMean,
)
from fedkube.server.strategies import build_strategy
from fedkube.server.strategy_api import RoundAggregator, Strategy, StrategyState
from fedkube.spec.strategy import trim_count

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]
SMALL_BLOCKS = 4096  # bytes per N x block buffer: every tensor below spans many blocks

Results = list[tuple[str, dict[str, np.ndarray]]]


def _wide(dtype: np.dtype) -> np.dtype:
    return accumulator_dtype(TensorSpec("x", dtype_name(dtype), ()))


def _stack(results: Results, name: str) -> np.ndarray:
    return np.stack([r[name] for _, r in results])


# -- the references: the whole (N, *shape) stack at once, textbook formulas ------------------------------


def ref_median(results: Results, name: str) -> np.ndarray:
    x = _stack(results, name)
    if x.dtype.kind != "f" and x.dtype != BF16:
        return np.sort(x, axis=0)[(len(results) - 1) // 2]
    return np.median(x.astype(_wide(x.dtype)), axis=0).astype(x.dtype)


def ref_trimmed(results: Results, name: str, beta: float) -> np.ndarray:
    x = _stack(results, name)
    if x.dtype.kind != "f" and x.dtype != BF16:
        return np.sort(x, axis=0)[(len(results) - 1) // 2]
    k = trim_count(beta, len(results))
    s = np.sort(x.astype(_wide(x.dtype)), axis=0)
    return np.mean(s[k : len(results) - k], axis=0).astype(x.dtype)


def ref_krum_selected(results: Results, f: int, m: int) -> list[int]:
    """Blanchard et al.'s score, computed directly: each pair's squared distance over all float tensors."""
    n = len(results)
    flat = [
        np.concatenate([v.astype(np.float64).reshape(-1) for v in r.values() if v.dtype.kind == "f" or v.dtype == BF16])
        for _, r in results
    ]
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return sorted(range(n), key=lambda i: (scores[i], i))[:m]


def ref_krum(results: Results, name: str, f: int, m: int) -> np.ndarray:
    chosen = [results[i] for i in ref_krum_selected(results, f, m)]
    x = _stack(chosen, name)
    if x.dtype.kind != "f" and x.dtype != BF16:
        return np.sort(x, axis=0)[(len(chosen) - 1) // 2]
    return np.mean(x.astype(_wide(x.dtype)), axis=0).astype(x.dtype)


# -- helpers ----------------------------------------------------------------------------------------------


def _model(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...] = (37, 29)) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal(shape).astype(dtype),
        "b": rng.standard_normal(5).astype(dtype),
        "steps": np.array([3, 4], np.int64),
        "mask": np.array([True, False, True]),
    }


def _results(rng: np.random.Generator, model: dict[str, np.ndarray], n: int) -> Results:
    out: Results = []
    for i in range(n):
        r = {}
        for k, v in model.items():
            if v.dtype == np.bool_:
                r[k] = np.asarray(rng.random(v.shape) < 0.5)
            elif v.dtype.kind == "i":
                r[k] = np.asarray(v + rng.integers(0, 5, v.shape)).astype(v.dtype)
            else:
                r[k] = (v.astype(np.float32) + rng.standard_normal(v.shape).astype(np.float32)).astype(v.dtype)
        out.append((f"site-{i:02d}", r))
    return out


def _round(strategy: Strategy, model: dict[str, np.ndarray], results: Results) -> dict[str, np.ndarray]:
    agg = strategy.begin_round(model)
    assert isinstance(agg, RoundAggregator)
    for i, (client, tensors) in enumerate(results):
        for name, arr in tensors.items():
            assert agg.add(client, name, arr, float(i + 1))  # weights are ignored: they differ on purpose
        agg.commit(client)
    return agg.finish()


def _assert_exact(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        bits = [np.asarray(x).reshape(-1).view(np.uint8) for x in (got[k], want[k])]
        np.testing.assert_array_equal(*bits, err_msg=k)


# -- bit-exact against the references ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("n", [3, 4, 7])
def test_median_is_numpy_median_bit_for_bit(tmp_path: Path, dtype: np.dtype, n: int) -> None:
    rng = np.random.default_rng(n)
    model = _model(rng, dtype)
    results = _results(rng, model, n)
    got = _round(Median(spill_dir=tmp_path, block_bytes=SMALL_BLOCKS), model, results)
    _assert_exact(got, {k: ref_median(results, k) for k in model})


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("n", "beta"), [(5, 0.2), (10, 0.3), (4, 0.0), (9, 0.49)])
def test_trimmed_mean_is_the_sorted_trim_mean_bit_for_bit(tmp_path: Path, dtype: np.dtype, n: int, beta: float) -> None:
    rng = np.random.default_rng(n)
    model = _model(rng, dtype)
    results = _results(rng, model, n)
    got = _round(TrimmedMean(trim_fraction=beta, spill_dir=tmp_path, block_bytes=SMALL_BLOCKS), model, results)
    _assert_exact(got, {k: ref_trimmed(results, k, beta) for k in model})


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("n", "f", "m"), [(5, 1, 1), (7, 2, 3), (6, 1, 5), (3, 0, 2)])
def test_krum_selects_and_averages_like_the_direct_score(
    tmp_path: Path, dtype: np.dtype, n: int, f: int, m: int
) -> None:
    rng = np.random.default_rng(n + f + m)
    model = _model(rng, dtype)
    results = _results(rng, model, n)
    got = _round(Krum(byzantine=f, krum_select=m, spill_dir=tmp_path, block_bytes=SMALL_BLOCKS), model, results)
    _assert_exact(got, {k: ref_krum(results, k, f, m) for k in model})


def test_trim_count_is_the_floor_of_beta_n() -> None:
    assert [trim_count(b, n) for b, n in [(0.2, 5), (0.2, 4), (0.29, 100), (0.3, 10), (0.0, 9), (0.49, 100)]] == [
        1, 0, 29, 3, 0, 49,
    ]  # fmt: skip


@settings(max_examples=60)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from([*FLOATS, np.dtype(np.int32), np.dtype(np.uint8), np.dtype(np.bool_)]),
    n=st.integers(3, 9),
    which=st.sampled_from(["median", "trimmedmean", "krum"]),
    block_bytes=st.integers(1, 2048),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzz_every_strategy_matches_its_reference(
    tmp_path_factory: pytest.TempPathFactory, shape: tuple[int, ...], dtype: np.dtype, n: int, which: str,
    block_bytes: int, seed: int,
) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        model = {"t": rng.random(shape) < 0.5, "f": rng.standard_normal(2).astype(np.float32)}
    elif dtype.kind in "iu":
        model = {"t": rng.integers(0, 100, shape).astype(dtype), "f": rng.standard_normal(2).astype(np.float32)}
    else:
        # Large and tiny magnitudes: half precision rounds, float32 accumulation must match the reference's.
        model = {"t": (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype)}
    results = _results(rng, model, n)
    spill = tmp_path_factory.mktemp("spill")
    if which == "median":
        got = _round(Median(spill_dir=spill, block_bytes=block_bytes), model, results)
        want = {k: ref_median(results, k) for k in model}
    elif which == "trimmedmean":
        got = _round(TrimmedMean(trim_fraction=0.34, spill_dir=spill, block_bytes=block_bytes), model, results)
        want = {k: ref_trimmed(results, k, 0.34) for k in model}
    else:
        f = (n - 3) // 2
        got = _round(Krum(byzantine=f, krum_select=2, spill_dir=spill, block_bytes=block_bytes), model, results)
        want = {k: ref_krum(results, k, f, 2) for k in model}
    _assert_exact(got, want)
    assert list((spill / STAGING_DIR).iterdir()) == []  # nothing left on disk


# -- robustness: one poisoned site --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [Median, lambda **kw: TrimmedMean(trim_fraction=0.2, **kw), lambda **kw: Krum(byzantine=1, krum_select=3, **kw)],
    ids=["median", "trimmedmean", "krum"],
)
def test_a_site_scaled_by_1e6_does_not_move_the_model(tmp_path: Path, strategy: object) -> None:
    rng = np.random.default_rng(1)
    model = {"w": rng.standard_normal((50, 20)).astype(np.float32)}
    results = [(f"honest-{i}", {"w": model["w"] + np.float32(0.01 * (i + 1))}) for i in range(4)]
    results.append(("poisoned", {"w": model["w"] * np.float32(1e6)}))
    got = _round(strategy(spill_dir=tmp_path), model, results)  # type: ignore[operator]
    assert np.max(np.abs(got["w"] - model["w"])) <= 0.04 + 1e-6


# -- exact exclusion, retries, bad input ----------------------------------------------------------------------


def test_discard_removes_a_staged_result_completely(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    model = _model(rng, np.dtype(np.float32))
    results = _results(rng, model, 4)
    agg = Median(spill_dir=tmp_path).begin_round(model)
    for client, tensors in results:
        for name, arr in tensors.items():
            agg.add(client, name, arr, 1.0)
        agg.commit(client)
    before = agg.staged_bytes()
    assert before >= 4 * sum(v.nbytes for v in model.values())
    # The poisoned site's download fails midway: two tensors staged, then discarded.
    agg.add("poisoned", "w", model["w"] * np.float32(1e6), 1.0)
    agg.add("poisoned", "b", model["b"] * np.float32(1e6), 1.0)
    outcome = agg.discard("poisoned")
    assert outcome.exact and not outcome.rebuild and agg.owed() == {}
    assert agg.staged_bytes() == before  # its file is gone
    assert agg.add("poisoned", "steps", model["steps"], 1.0) is False  # a late add is stale
    _assert_exact(agg.finish(), {k: ref_median(results, k) for k in model})
    assert not agg.directory.exists()


def test_a_retried_result_counts_once_under_its_new_key(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = _model(rng, np.dtype(np.float32))
    results = _results(rng, model, 3)
    agg = Median(spill_dir=tmp_path).begin_round(model)
    for client, tensors in results[:2]:
        for name, arr in tensors.items():
            agg.add(client, name, arr, 1.0)
        agg.commit(client)
    last, tensors = results[2]
    agg.add(f"{last}#1", "w", tensors["w"], 1.0)
    assert agg.discard(f"{last}#1", rebuild=False).kept_tensors == ("w",)
    assert agg.reopen(f"{last}#1", last) == ("w",)
    assert agg.add(f"{last}#1", "b", tensors["b"], 1.0) is False  # the old attempt stays discarded
    for name, arr in tensors.items():
        assert agg.add(last, name, arr, 2.0) is (name != "w")  # w was kept, not added twice
    agg.commit(last)
    _assert_exact(agg.finish(), {k: ref_median(results, k) for k in model})


def test_bad_tensors_are_rejected_before_staging(tmp_path: Path) -> None:
    model = {"w": np.zeros(4, np.float32), "b": np.zeros(2, ml_dtypes.bfloat16)}
    agg = TrimmedMean(spill_dir=tmp_path).begin_round(model)
    with pytest.raises(InvalidResultError, match="NaN or Inf"):
        agg.add("a", "w", np.array([0, np.inf, 0, 0], np.float32), 1.0)
    with pytest.raises(InvalidResultError, match="NaN or Inf"):
        agg.add("a", "b", np.array([np.nan, 0], ml_dtypes.bfloat16), 1.0)
    with pytest.raises(InvalidResultError, match="dtype"):
        agg.add("a", "w", np.zeros(4, np.float64), 1.0)
    with pytest.raises(InvalidResultError, match="shape"):
        agg.add("a", "w", np.zeros(5, np.float32), 1.0)
    with pytest.raises(InvalidResultError, match="positive"):
        agg.add("a", "w", np.zeros(4, np.float32), 0.0)
    agg.add("a", "w", np.zeros(4, np.float32), 1.0)
    with pytest.raises(InvalidResultError, match="twice"):
        agg.add("a", "w", np.zeros(4, np.float32), 1.0)
    with pytest.raises(InvalidResultError, match="incomplete"):
        agg.commit("a")


@pytest.mark.parametrize(
    ("strategy", "n", "words"),
    [
        (lambda **kw: Median(**kw), 2, "median needs at least 3"),
        (lambda **kw: TrimmedMean(trim_fraction=0.2, **kw), 4, "at least 5"),
        (lambda **kw: Krum(byzantine=1, **kw), 4, "more than 2·1+2 = 4"),
        (lambda **kw: Krum(byzantine=1, krum_select=5, **kw), 5, "lower krumSelect to at most 4"),
    ],
    ids=["median-2", "trimmed-trims-nothing", "krum-2f+2", "krum-select-too-many"],
)
def test_too_few_results_fail_the_round_without_an_aggregate(
    tmp_path: Path, strategy: object, n: int, words: str
) -> None:
    rng = np.random.default_rng(4)
    model = _model(rng, np.dtype(np.float32))
    agg = strategy(spill_dir=tmp_path).begin_round(model)  # type: ignore[operator]
    for client, tensors in _results(rng, model, n):
        for name, arr in tensors.items():
            agg.add(client, name, arr, 1.0)
        agg.commit(client)
    with pytest.raises(TooFewResultsError, match=re.escape(words)) as info:
        agg.finish()
    assert info.value.reason == "TooFewResults" and "fix:" in str(info.value)
    assert not agg.directory.exists()


def test_staging_lives_under_the_spill_dir_and_is_cleaned(tmp_path: Path) -> None:
    model = {"w": np.zeros(1000, np.float32)}
    strategy = Median(spill_dir=tmp_path)
    stale = tmp_path / STAGING_DIR / "round-crashed"
    stale.mkdir(parents=True)
    (stale / "x.staged").write_bytes(b"0" * 100)
    agg = strategy.begin_round(model)
    assert agg.directory.parent == tmp_path / STAGING_DIR and not stale.exists()
    agg.add("a", "w", model["w"], 1.0)
    assert agg.staged_bytes() >= 4000
    directory = agg.directory
    del agg  # a round that failed: the aggregator is dropped without finish()
    assert not directory.exists()


def test_without_a_spill_dir_a_temp_dir_is_used() -> None:
    strategy = Median()
    agg = strategy.begin_round({"w": np.zeros(3, np.float32)})
    assert isinstance(agg, RobustAggregator) and agg.directory.exists()
    root = agg.directory.parent
    del agg, strategy
    assert not root.exists()


# -- the factory and state ---------------------------------------------------------------------------------


def test_build_strategy_takes_the_spec_parameters(tmp_path: Path) -> None:
    krum = build_strategy("krum", {"byzantine": 2, "krumSelect": 3}, spill_dir=tmp_path)
    assert isinstance(krum, Krum) and krum.state() == StrategyState("krum", {"byzantine": 2, "krumSelect": 3})
    trimmed = build_strategy("trimmedmean", {"trimFraction": 0.1})
    assert isinstance(trimmed, TrimmedMean) and trimmed.state().meta == {"trimFraction": 0.1}
    assert isinstance(build_strategy("median", {}), Median)
    with pytest.raises(ConfigError, match="unknown median parameter"):
        build_strategy("median", {"serverLr": 0.1})
    with pytest.raises(ConfigError, match="trimFraction"):
        build_strategy("trimmedmean", {"trimFraction": 0.5})
    with pytest.raises(ConfigError, match="byzantine"):
        build_strategy("krum", {"byzantine": -1})


def test_load_state_refuses_another_strategys_checkpoint() -> None:
    median = Median()
    median.load_state(StrategyState("median"))
    with pytest.raises(ConfigError, match="'fedavg'"):
        median.load_state(StrategyState("fedavg", {"staged": False}))


def test_concurrent_downloads_stage_independently(tmp_path: Path) -> None:
    """The server pulls several results at once: adds from many threads, a discard among them, one exact result."""
    rng = np.random.default_rng(5)
    model = _model(rng, np.dtype(np.float32), shape=(300, 200))
    results = _results(rng, model, 7)
    agg = Krum(byzantine=1, krum_select=3, spill_dir=tmp_path, block_bytes=SMALL_BLOCKS * 16).begin_round(model)
    barrier = threading.Barrier(len(results) + 1)

    def deliver(client: str, tensors: dict[str, np.ndarray]) -> None:
        barrier.wait()
        for name, arr in tensors.items():
            agg.add(client, name, arr, 1.0)
        agg.commit(client)

    def fail_midway() -> None:
        barrier.wait()
        agg.add("lost", "w", model["w"] * np.float32(1e6), 1.0)
        agg.discard("lost")

    threads = [threading.Thread(target=deliver, args=r) for r in results] + [threading.Thread(target=fail_midway)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    _assert_exact(agg.finish(), {k: ref_krum(sorted(results), k, 1, 3) for k in model})


def test_state_survives_a_checkpoint_next_to_the_staging_dir(tmp_path: Path) -> None:
    """The staging directory shares the checkpoint volume: saving, pruning and loading ignore it."""
    model = {"w": np.ones(10, np.float32)}
    strategy = TrimmedMean(trim_fraction=0.25, spill_dir=tmp_path)
    agg = strategy.begin_round(model)  # a round in progress: its staging directory exists
    agg.add("a", "w", model["w"], 1.0)
    checkpoint.save(tmp_path, "job1", 1, model, strategy.state())
    loaded = checkpoint.load_latest(tmp_path, None)
    assert loaded is not None and loaded.strategy_state == StrategyState("trimmedmean", {"trimFraction": 0.25})
    TrimmedMean(spill_dir=tmp_path).load_state(loaded.strategy_state)
    assert agg.directory.exists()
