"""SCAFFOLD's server side (fedkube.server.scaffold): the update against numpy, the intake, the checkpoint and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedkube.errors import ConfigError
from fedkube.protocol import SCAFFOLD_PREFIX
from fedkube.server import checkpoint
from fedkube.server.aggregate import InvalidResultError
from fedkube.server.influence import Influence
from fedkube.server.model import ModelSpec, check_result
from fedkube.server.scaffold import Scaffold, ScaffoldAggregator
from fedkube.server.strategies import build_strategy
from fedkube.server.strategy_api import StrategyState
from fedkube.server.strategy_report import published
from tests.unit.server.test_optimizers import _mean
from tests.unit.server.test_strategies import BF16, F32, _model

Result = tuple[str, float, dict[str, np.ndarray]]


def _scaffold_results(rng: np.random.Generator, model: dict[str, np.ndarray], n: int = 3) -> list[Result]:
    """n sites' models near ``model`` and their variate deltas, in the model's dtypes."""
    out: list[Result] = []
    for i in range(n):
        tensors: dict[str, np.ndarray] = {}
        for k, v in model.items():
            if v.dtype == np.int64:
                tensors[k] = np.array(10 + i, np.int64)
                continue
            tensors[k] = (v.astype(np.float32) + rng.standard_normal(v.shape).astype(np.float32) * 0.1).astype(v.dtype)
            tensors[SCAFFOLD_PREFIX + k] = rng.standard_normal(v.shape).astype(np.float32).astype(v.dtype)
        out.append((f"site-{i}", float(100 * (i + 1)), tensors))
    return out


def _play(strategy: Scaffold, model: dict[str, np.ndarray], results: list[Result]) -> dict[str, np.ndarray]:
    sent = published(strategy, model)
    agg = strategy.begin_round(model)
    for client, weight, tensors in results:
        assert check_result(ModelSpec.of(sent), [_Meta(k, v) for k, v in tensors.items()]) is None
        for name, arr in tensors.items():
            assert agg.add(client, name, arr, weight)
        agg.bound(client)
        agg.commit(client)
    return agg.finish()


class _Meta:
    def __init__(self, name: str, arr: np.ndarray) -> None:
        from fedkube.server.model import dtype_name

        self.name, self.dtype, self.shape = name, dtype_name(arr.dtype), tuple(arr.shape)


def _split(results: list[Result]) -> tuple[list[Result], list[Result]]:
    models = [(c, w, {k: v for k, v in t.items() if not k.startswith(SCAFFOLD_PREFIX)}) for c, w, t in results]
    deltas = [(c, 1.0, {k[len(SCAFFOLD_PREFIX) :]: v for k, v in t.items() if k.startswith(SCAFFOLD_PREFIX)})
              for c, _, t in results]  # fmt: skip
    return models, deltas


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("lr", [1.0, 0.7])
def test_matches_numpy_reference_bit_exactly_over_rounds(dtype: np.dtype, lr: float) -> None:
    rng = np.random.default_rng(17)
    sites = 5  # N: 3 of 5 deliver each round, so |S|/N = 0.6
    strategy = Scaffold(sites=sites, server_lr=lr)
    model = _model(rng, dtype)
    ref_c = {k: np.zeros(v.shape, np.float32) for k, v in model.items() if k != "steps"}
    for _ in range(3):
        sent = published(strategy, model)
        for name in ref_c:  # the task carries c in the model's dtype
            assert sent[SCAFFOLD_PREFIX + name].dtype == dtype
            np.testing.assert_array_equal(sent[SCAFFOLD_PREFIX + name], ref_c[name].astype(dtype))
        results = _scaffold_results(rng, model)
        models, deltas = _split(results)
        avg = _mean(model, models)
        mean_dc = _mean({k: model[k] for k in ref_c}, deltas)  # every site weighs 1 in c's mean
        new = _play(strategy, model, results)
        for name in ref_c:
            x = model[name].astype(np.float32)
            ref_x = avg[name] if lr == 1.0 else x + lr * (avg[name] - x)
            assert new[name].dtype == dtype
            np.testing.assert_array_equal(new[name], ref_x.astype(dtype))
            ref_c[name] = ref_c[name] + np.float32(3 / sites) * mean_dc[name]
            np.testing.assert_array_equal(strategy.c[name], ref_c[name])
        assert int(new["steps"]) == 12  # integer tensors take FedAvg's value and have no variate
        model = new


def test_c_is_the_unweighted_mean_whatever_the_weighting() -> None:
    model = {"w": np.zeros(4, np.float32)}
    strategy = Scaffold(sites=2, influence=Influence(weighting="examples"))
    results: list[Result] = [
        ("a", 1.0, {"w": np.full(4, 1.0, np.float32), "scaffold/w": np.full(4, 2.0, np.float32)}),
        ("b", 3.0, {"w": np.full(4, 5.0, np.float32), "scaffold/w": np.full(4, 6.0, np.float32)}),
    ]
    new = _play(strategy, model, results)
    np.testing.assert_array_equal(new["w"], np.full(4, 4.0, np.float32))  # (1*1 + 3*5) / 4: weighted
    np.testing.assert_array_equal(strategy.c["w"], np.full(4, 4.0, np.float32))  # (2 + 6) / 2 * (2/2): not


def test_intake_refuses_variates_in_another_job_and_bad_variates_in_a_scaffold_job() -> None:
    model = {"w": np.zeros((2, 3), np.float32), "steps": np.array(1, np.int64)}
    w, dw = _Meta("w", model["w"]), _Meta("scaffold/w", model["w"])
    steps = _Meta("steps", model["steps"])
    other = check_result(ModelSpec.of(model), [w, steps, dw])
    assert other is not None and "only a job with spec.strategy.name scaffold" in other and "'scaffold/w'" in other
    spec = ModelSpec.of(published(Scaffold(sites=2), model))
    assert spec.names == ("w", "steps", "scaffold/w")  # no variate for an integer tensor
    assert check_result(spec, [w, steps, dw]) is None
    missing = check_result(spec, [w, steps])
    assert missing is not None and "missing: 'scaffold/w'" in missing and "one control variate delta" in missing
    extra = check_result(spec, [w, steps, dw, _Meta("scaffold/steps", model["steps"])])
    assert extra is not None and "'scaffold/steps'" in extra and "one control variate delta" in extra
    shaped = check_result(spec, [w, steps, _Meta("scaffold/w", np.zeros((3, 2), np.float32))])
    assert shaped is not None and "tensor 'scaffold/w' has shape (3, 2)" in shaped
    typed = check_result(spec, [w, steps, _Meta("scaffold/w", np.zeros((2, 3), np.float64))])
    assert typed is not None and "tensor 'scaffold/w' has dtype float64" in typed


def test_a_result_whose_variates_are_incomplete_or_not_finite_never_counts() -> None:
    model = {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    agg = Scaffold(sites=2).begin_round(model)
    assert isinstance(agg, ScaffoldAggregator)
    for name, arr in model.items():
        agg.add("a", name, arr + 1, 1.0)
    agg.add("a", "scaffold/w", np.ones(3, np.float32), 1.0)
    with pytest.raises(InvalidResultError, match="never added, first 'scaffold/b'"):
        agg.commit("a")
    agg.discard("a")
    with pytest.raises(InvalidResultError, match="NaN or Inf"):
        agg.add("b", "scaffold/w", np.array([0, np.nan, 0], np.float32), 1.0)


def _checkpointed(tmp_path: Path, strategy: Scaffold, model: dict[str, np.ndarray]) -> tuple[dict, StrategyState]:
    checkpoint.save(tmp_path, "job", 2, model, strategy.state())
    loaded = checkpoint.load_latest(tmp_path, "job")
    assert loaded is not None
    return loaded.model, loaded.strategy_state


def test_resume_after_round_k_gives_the_uninterrupted_x_and_c(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = _model(rng)
    rounds = [_scaffold_results(rng, model) for _ in range(3)]
    straight = build_strategy("scaffold", {"serverLr": 0.5}, sites=4)
    assert isinstance(straight, Scaffold)
    x = model
    for results in rounds:
        x = _play(straight, x, results)
    interrupted = Scaffold(sites=4, server_lr=0.5)
    y = model
    for results in rounds[:2]:
        y = _play(interrupted, y, results)
    saved_model, state = _checkpointed(tmp_path, interrupted, y)
    resumed = Scaffold(sites=4, server_lr=0.5)
    resumed.load_state(state)
    resumed.check_resume(saved_model)
    y = _play(resumed, saved_model, rounds[2])
    for name in x:
        np.testing.assert_array_equal(y[name], x[name])
    assert resumed.c.keys() == straight.c.keys() == {"w", "b"}
    for name in straight.c:
        np.testing.assert_array_equal(resumed.c[name], straight.c[name])


def test_resume_refuses_a_checkpoint_without_c_or_with_one_that_does_not_fit(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = _model(rng)
    strategy = Scaffold(sites=3)
    x = _play(strategy, model, _scaffold_results(rng, model))
    saved_model, state = _checkpointed(tmp_path, strategy, x)
    with pytest.raises(ConfigError, match="holds no server control variate c"):
        Scaffold(sites=3).load_state(StrategyState("scaffold", dict(state.meta), {}))
    with pytest.raises(ConfigError, match="unexpected tensor 'm/w'"):
        Scaffold(sites=3).load_state(StrategyState("scaffold", {}, {"m/w": state.tensors["c/w"]}))
    with pytest.raises(ConfigError, match="strategy 'scaffold', but the job uses 'fedavg'"):
        build_strategy("fedavg").load_state(state)
    cases = {
        "no variate for 1 float tensor\\(s\\), first 'b'": {"c/w": state.tensors["c/w"]},
        "the variate of 'b' is float32\\(3,\\)": {**state.tensors, "c/b": np.zeros(3, np.float32)},
        "the variate of 'b' is float64": {**state.tensors, "c/b": state.tensors["c/b"].astype(np.float64)},
        "variates for 1 tensor\\(s\\) the model has no float tensor of, first 'steps'": {
            **state.tensors, "c/steps": np.zeros((), np.float32)},
    }  # fmt: skip
    for message, tensors in cases.items():
        resumed = Scaffold(sites=3)
        resumed.load_state(StrategyState("scaffold", dict(state.meta), tensors))
        with pytest.raises(ConfigError, match=message):
            resumed.check_resume(saved_model)


def test_build_refuses_what_scaffold_does_not_take() -> None:
    with pytest.raises(ConfigError, match="takes no proximalMu"):
        build_strategy("scaffold", {"proximalMu": 0.1}, sites=2)
    with pytest.raises(ConfigError, match="unknown scaffold parameter"):
        build_strategy("scaffold", {"beta1": 0.9}, sites=2)
    with pytest.raises(ConfigError, match="does not clip"):
        build_strategy("scaffold", {}, Influence(clip_norm=1.0), sites=2)
    with pytest.raises(ConfigError, match="number of sites"):
        build_strategy("scaffold", {})
    with pytest.raises(ConfigError, match="reserves for its control variates"):
        Scaffold(sites=1).begin_round({"scaffold/w": np.zeros(2, np.float32)})
