"""Bounded influence: capped claims, equal weights and clipped updates, checked against a float64 reference.

The poisoning scenario of issue 17: three sites, one scales its update by
1e6 or claims 1e6 examples. With clipNorm / maxExamplesPerSite the global
model stays next to the honest average; without them it does not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import pytest

from fedkube.errors import ConfigError
from fedkube.server.aggregate import AggregationError, InvalidResultError, WeightedMean
from fedkube.server.influence import Influence, squared_distance, toward
from fedkube.server.model import ModelSpec
from fedkube.server.strategies import FedAdam, FedAvg, build_strategy
from fedkube.server.strategy_api import BoundsInfluence

Model = dict[str, np.ndarray]


F32 = np.dtype(np.float32)


def _global(dtype: np.dtype = F32) -> Model:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((40, 30)).astype(np.float32).astype(dtype),
        "b": rng.standard_normal(30).astype(np.float32).astype(dtype),
        "steps": np.array([7], np.int64),
    }


def _honest(g: Model, seed: int) -> Model:
    rng = np.random.default_rng(seed)
    out = {k: (v.astype(np.float32) + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in g.items()
           if k != "steps"}  # fmt: skip
    out["steps"] = g["steps"] + 1
    return out


def _norm(g: Model, x: Model) -> float:
    return math.sqrt(sum(float(np.sum((x[k].astype(np.float64) - g[k].astype(np.float64)) ** 2))
                         for k in g if k != "steps"))  # fmt: skip


def _reference(g: Model, results: Mapping[str, tuple[Model, float]], influence: Influence) -> Model:
    """float64 weighted mean of the bounded results: the definition in fedkube.server.influence."""
    total = sum(influence.weight(claimed) for _, claimed in results.values())
    out: Model = {}
    for k, gv in g.items():
        if k == "steps":
            continue
        acc = np.zeros(gv.shape, np.float64)
        for x, claimed in results.values():
            s = influence.scale(_norm(g, x))
            acc += influence.weight(claimed) * (gv.astype(np.float64) + s * (x[k].astype(np.float64) - gv))
        out[k] = acc / total
    return out


def _run(strategy: FedAvg | FedAdam, g: Model, results: dict[str, tuple[Model, float]],
         order: list[str] | None = None) -> tuple[Model, dict[str, object]]:  # fmt: skip
    """One round as the server runs it: add, bound, re-pull what bound() emptied, commit, finish."""
    agg = strategy.begin_round(g)
    assert isinstance(agg, BoundsInfluence)
    bounded = {}
    for client in order or list(results):
        x, claimed = results[client]
        for name in g:
            assert agg.add(client, name, x[name], claimed)
        b = agg.bound(client)
        bounded[client] = b.influence
        for name, keys in b.rebuild.items():  # the server pulls these again from each site
            for key in keys:
                assert agg.refold(key, name, results[key][0][name])
        agg.commit(client)
    assert agg.owed() == {}
    return agg.finish(), bounded


def _assert_close(got: Model, want: Model, atol: float) -> None:
    for k, v in want.items():
        np.testing.assert_allclose(got[k].astype(np.float64), v, atol=atol, rtol=0, err_msg=k)


def _poisoned(g: Model, factor: float) -> Model:
    bad = _honest(g, 99)
    return {k: (g[k] + factor * (v - g[k])) if k != "steps" else v for k, v in bad.items()}


@pytest.mark.parametrize("staged", [False, True], ids=["streaming", "staged"])
def test_a_site_scaling_its_update_by_1e6_is_clipped_and_the_model_stays_at_the_honest_average(staged: bool) -> None:
    g = _global()
    honest = {"site-a": (_honest(g, 1), 100.0), "site-b": (_honest(g, 2), 120.0)}
    results = {**honest, "site-c": (_poisoned(g, 1e6), 110.0)}
    clip = 2 * max(_norm(g, x) for x, _ in honest.values())
    influence = Influence(clip_norm=clip)

    got, bounded = _run(FedAvg(staged=staged, influence=influence), g, results)

    _assert_close(got, _reference(g, results, influence), atol=1e-5)
    honest_avg = _reference(g, honest, Influence())
    # Three sites, one clipped to 2x an honest norm: at most that far from the honest average, per element.
    for k in honest_avg:
        assert float(np.max(np.abs(got[k] - honest_avg[k]))) < clip / 3 + 1e-5
    c = bounded["site-c"]
    assert c.clipped and c.norm == pytest.approx(_norm(g, results["site-c"][0]), rel=1e-4)
    assert c.scale == pytest.approx(clip / c.norm)
    assert not bounded["site-a"].clipped and bounded["site-a"].norm is not None
    assert got["steps"].tolist() == [8]  # integer tensors take a site's value; clipping leaves them alone
    unclipped, _ = _run(FedAvg(staged=staged), g, results)
    assert float(np.max(np.abs(unclipped["w"] - honest_avg["w"]))) > 100  # what clipping prevents


def test_a_clip_decided_while_another_site_is_still_streaming_is_exact() -> None:
    """site-b's tensors arrive after site-c's clip emptied the accumulators; nothing counts twice or unclipped."""
    g = _global()
    results = {"site-a": (_honest(g, 1), 5.0), "site-c": (_poisoned(g, 1e3), 5.0), "site-b": (_honest(g, 2), 9.0)}
    influence = Influence(clip_norm=0.5)
    agg = FedAvg(influence=influence).begin_round(g)
    assert isinstance(agg, BoundsInfluence)
    for name in g:
        agg.add("site-a", name, results["site-a"][0][name], 5.0)
    agg.add("site-b", "w", results["site-b"][0]["w"], 9.0)  # site-b is halfway
    for name in g:
        agg.add("site-c", name, results["site-c"][0][name], 5.0)
    b = agg.bound("site-c")
    assert set(b.rebuild) == {"w", "b"} and set(b.rebuild["w"]) == {"site-a", "site-b", "site-c"}
    assert set(b.rebuild["b"]) == {"site-a", "site-c"}
    for name in ("b", "steps"):
        agg.add("site-b", name, results["site-b"][0][name], 9.0)  # folds into the emptied tensor as usual
    with pytest.raises(AggregationError, match="refolded"):
        agg.commit("site-a"), agg.commit("site-c"), agg.commit("site-b"), agg.finish()
    for name, keys in b.rebuild.items():
        for key in keys:
            assert agg.refold(key, name, results[key][0][name])
    got = agg.finish()
    _assert_close(got, _reference(g, results, influence), atol=1e-5)


def test_a_site_claiming_1e6_examples_is_capped_and_the_model_stays_at_the_honest_average() -> None:
    g = _global()
    honest = {"site-a": (_honest(g, 1), 100.0), "site-b": (_honest(g, 2), 120.0)}
    bad = _honest(g, 3)
    bad = {k: (v + 0.5 if k != "steps" else v) for k, v in bad.items()}  # a plausible update, far off
    results = {**honest, "site-c": (bad, 1e6)}
    influence = Influence(max_examples=120)

    got, bounded = _run(FedAvg(influence=influence), g, results)

    _assert_close(got, _reference(g, results, influence), atol=1e-5)
    assert bounded["site-c"].capped and bounded["site-c"].weight == 120.0 and bounded["site-c"].claimed == 1e6
    assert not bounded["site-a"].capped and bounded["site-a"].weight == 100.0
    assert bounded["site-c"].norm is None  # measured only with clipNorm
    honest_avg = _reference(g, honest, Influence())
    assert float(np.max(np.abs(got["w"] - honest_avg["w"]))) < 0.5 * 120 / 340 + 0.05
    uncapped, _ = _run(FedAvg(), g, results)
    assert float(np.max(np.abs(uncapped["w"] - bad["w"]))) < 1e-3  # what the cap prevents: site-c is the model


def test_equal_weighting_ignores_every_claim() -> None:
    g = _global()
    results = {"site-a": (_honest(g, 1), 1.0), "site-b": (_honest(g, 2), 1e9), "site-c": (_honest(g, 3), 7.0)}
    got, bounded = _run(FedAvg(influence=Influence("equal")), g, results)
    _assert_close(got, _reference(g, results, Influence("equal")), atol=1e-6)
    assert {b.weight for b in bounded.values()} == {1.0} and not any(b.capped for b in bounded.values())


def test_a_site_returning_the_global_model_unchanged_counts_with_its_weight_and_norm_zero() -> None:
    g = _global()
    same = {k: v.copy() for k, v in g.items()}
    results = {"site-a": (_honest(g, 1), 10.0), "site-z": (same, 30.0)}
    influence = Influence(clip_norm=1e-3)  # below site-a's norm: site-a is clipped, site-z is not
    got, bounded = _run(FedAvg(influence=influence), g, results)
    assert bounded["site-z"].norm == 0.0 and not bounded["site-z"].clipped and bounded["site-z"].weight == 30.0
    assert bounded["site-a"].clipped
    _assert_close(got, _reference(g, results, influence), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)], ids=str)
def test_clipping_half_precision_and_float64_models(dtype: np.dtype) -> None:
    g = _global(dtype)
    results = {"site-a": (_honest(g, 1), 3.0), "site-c": (_poisoned(g, 1e3), 3.0)}
    influence = Influence(clip_norm=0.2)
    got, bounded = _run(FedAvg(influence=influence), g, results)
    assert all(got[k].dtype == g[k].dtype for k in g)
    tol = 1e-9 if dtype == np.float64 else 3e-2  # the result is cast back to the model's dtype once
    _assert_close(got, _reference(g, results, influence), atol=tol)
    assert bounded["site-c"].clipped


def test_fedadam_steps_on_the_clipped_average() -> None:
    g = _global()
    results = {"site-a": (_honest(g, 1), 1.0), "site-c": (_poisoned(g, 1e6), 1.0)}
    influence = Influence(clip_norm=0.1)
    got, _ = _run(FedAdam(influence=influence), g, results)
    means = {k: v.astype(np.float32) for k, v in _reference(g, results, influence).items()}
    want = FedAdam()._apply(ModelSpec.of(g), g, means | {"steps": g["steps"]})
    _assert_close(got, {k: v.astype(np.float64) for k, v in want.items() if k != "steps"}, atol=1e-5)


def test_build_strategy_takes_the_bounds_apart_from_the_parameters() -> None:
    s = build_strategy("fedadam", {"serverLr": 0.1}, Influence("examples", 10, 1.0))
    assert isinstance(s, FedAdam) and s.influence == Influence("examples", 10, 1.0)
    assert build_strategy("fedavg").influence == Influence()  # type: ignore[attr-defined]


def test_influence_weights_and_scales() -> None:
    capped = Influence(max_examples=50)
    assert capped.weight(10) == 10 and capped.weight(50) == 50 and capped.weight(1e6) == 50
    assert capped.capped(51) and not capped.capped(50)
    assert Influence("equal").weight(1e6) == 1.0 and not Influence("equal").capped(1e6)
    clip = Influence(clip_norm=2.0)
    assert clip.scale(1.0) == 1.0 and clip.scale(2.0) == 1.0 and clip.scale(8.0) == 0.25
    assert clip.scale(math.inf) == 0.0  # an overflowing norm counts as the global model
    for bad in ({"max_examples": 0}, {"clip_norm": 0.0}, {"clip_norm": math.nan}, {"weighting": "median"}):
        with pytest.raises(ValueError):
            Influence(**bad)  # type: ignore[arg-type]


def test_squared_distance_survives_float32_overflow_and_toward_is_the_clipped_point() -> None:
    g = np.zeros(1000, np.float32)
    x = np.full(1000, 1e20, np.float32)  # each square overflows float32
    assert squared_distance(x, g, np.empty(1 << 18, np.float32)) == pytest.approx(1000 * 1e40, rel=1e-6)
    y = toward(g + 1, x, 1e-20, np.dtype(np.float32))
    np.testing.assert_allclose(y, 1 + 1e-20 * (1e20 - 1), rtol=1e-6)


def test_rescale_is_refused_after_commit_and_without_a_reference() -> None:
    g = _global()
    wm = WeightedMean(ModelSpec.of(g))
    with pytest.raises(AggregationError, match="reference"):
        wm.rescale("a", 0.5)
    wm = WeightedMean(ModelSpec.of(g), reference=g)
    for name in g:
        wm.add("a", name, g[name], 1.0)
    wm.commit("a")
    with pytest.raises(AggregationError, match="committed"):
        wm.rescale("a", 0.5)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)], ids=str)
def test_the_norm_summed_while_receiving_equals_the_norm_of_the_whole_tensor(dtype: np.dtype) -> None:
    """The intake's check sums ‖x - g‖² per received piece (pieces may split an element); a refetch restarts it."""
    g = {"t": np.random.default_rng(1).standard_normal(3001).astype(np.float32).astype(dtype)}
    x = (g["t"].astype(np.float32) + np.float32(0.25)).astype(dtype)
    raw = x.tobytes()
    wm = WeightedMean(ModelSpec.of(g), reference=g)
    with wm.intake("c", "t", g["t"].dtype.name, x.shape, 1.0, claim=False) as intake:
        check = intake.check
        assert check is not None
        check.update(memoryview(raw), 0, 999)  # a first attempt, abandoned: the fetcher starts again at 0
        check.reset()
        for start in range(0, len(raw), 1001):  # pieces end inside elements
            check.update(memoryview(raw), start, min(start + 1001, len(raw)))
        assert check.complete and check.sq == pytest.approx(_norm(g, {"t": x}) ** 2, rel=1e-5)
        check.sq = 4.0  # the engine takes the received sum and does not read the array again
        assert intake.add(x)
    assert wm.update_norm("c") == 2.0


def test_a_result_delivered_again_under_a_new_key_is_measured_and_clipped_once() -> None:
    """A re-sent task's second attempt keeps what the first verified; the norm covers both parts, counted once."""
    g = _global()
    results = {"site-a": (_honest(g, 1), 4.0), "site-c": (_poisoned(g, 1e4), 4.0)}
    influence = Influence(clip_norm=1.0)  # above site-a's norm (~0.35)
    agg = FedAvg(influence=influence).begin_round(g)
    assert isinstance(agg, BoundsInfluence)
    for name in g:
        agg.add("site-a", name, results["site-a"][0][name], 4.0)
    assert not agg.bound("site-a").influence.clipped
    agg.commit("site-a")
    poison = results["site-c"][0]
    agg.add("c#1", "w", poison["w"], 4.0)  # then the sidecar restarted
    agg.discard("c#1", rebuild=False)
    assert agg.reopen("c#1", "c#2") == ("w",)
    for name in ("b", "steps"):
        agg.add("c#2", name, poison[name], 4.0)
    b = agg.bound("c#2")
    assert b.influence.norm == pytest.approx(_norm(g, poison), rel=1e-4) and b.influence.weight == 4.0
    for name, keys in b.rebuild.items():
        for key in keys:
            assert agg.refold(key, name, (poison if key == "c#2" else results["site-a"][0])[name])
    agg.commit("c#2")
    _assert_close(agg.finish(), _reference(g, results, influence), atol=1e-5)


def test_nan_is_still_refused_before_anything_is_measured_or_folded_when_clipping() -> None:
    g = _global()
    bad = _honest(g, 1)
    bad["b"][3] = np.nan
    agg = FedAvg(influence=Influence(clip_norm=1.0)).begin_round(g)
    assert isinstance(agg, BoundsInfluence)
    agg.add("site-a", "w", bad["w"], 1.0)
    with pytest.raises(InvalidResultError, match="NaN or Inf"):
        agg.add("site-a", "b", bad["b"], 1.0)
    agg.discard("site-a")
    for name in g:
        agg.add("site-b", name, g[name], 1.0)
    assert agg.bound("site-b").influence.norm == 0.0
    agg.commit("site-b")
    _assert_close(agg.finish(), {k: v.astype(np.float64) for k, v in g.items() if k != "steps"}, atol=0)


def test_the_adaptive_bound_follows_the_geometric_update_and_settles_at_the_quantile() -> None:
    influence = Influence(clip_norm=5.0, clip_quantile=0.5)
    assert influence.adapted([1, 2, 3, 10]).clip_norm == pytest.approx(5.0 * math.exp(-0.2 * (0.75 - 0.5)))
    assert influence.adapted([]) == influence and Influence(clip_norm=5.0).adapted([1.0]) == Influence(clip_norm=5.0)
    bound = Influence(clip_norm=100.0, clip_quantile=0.5)
    for _ in range(60):
        bound = bound.adapted([1.0, 2.0, 3.0])
    assert 1.0 <= (bound.clip_norm or 0) <= 3.3  # it oscillates around the median, 2


def test_fedavg_adapts_its_bound_each_round_and_a_checkpoint_resumes_it() -> None:
    g = _global()
    results = {"site-a": (_honest(g, 1), 1.0), "site-b": (_honest(g, 2), 1.0), "site-c": (_poisoned(g, 1e6), 1.0)}
    strategy = FedAvg(influence=Influence(clip_norm=0.1, clip_quantile=0.5))
    got, bounded = _run(strategy, g, results)  # every norm (~0.35, 0.35, 3.5e5) is above 0.1: all clipped
    assert all(b.clipped for b in bounded.values())
    _assert_close(got, _reference(g, results, Influence(clip_norm=0.1)), atol=1e-6)
    assert strategy.influence.clip_norm == pytest.approx(0.1 * math.exp(0.2 * 0.5))
    state = strategy.state()
    assert state.meta["clipNorm"] == strategy.influence.clip_norm
    resumed = FedAvg(influence=Influence(clip_norm=0.1, clip_quantile=0.5))
    resumed.load_state(state)
    assert resumed.influence == strategy.influence
    fixed = FedAvg(influence=Influence(clip_norm=0.1))  # the spec no longer adapts: its own bound
    fixed.load_state(state)
    assert fixed.influence.clip_norm == 0.1 and "clipNorm" not in fixed.state().meta
    adam = FedAdam(influence=Influence(clip_norm=0.1, clip_quantile=0.5))
    with pytest.raises(ConfigError, match="clipNorm"):
        adam.load_state(dataclasses.replace(adam.state(), meta={"clipNorm": -1.0}))
