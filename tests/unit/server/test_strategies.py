"""FedAvg and FedAdam through the streaming interface, against direct numpy references."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fedkube.errors import ConfigError
from fedkube.server.aggregate import BLOCK
from fedkube.server.strategies import FedAdam, FedAvg, build_strategy, check_initial_model
from fedkube.server.strategy_api import RoundAggregator, Strategy, StrategyState

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


def _model(rng: np.random.Generator, dtype: np.dtype = F32) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal((BLOCK // 512 + 3, 512)).astype(dtype),  # spans two blocks
        "b": rng.standard_normal(7).astype(dtype),
        "steps": np.array(3, np.int64),
    }


def _round(
    strategy: Strategy, global_model: dict[str, np.ndarray], results: list[tuple[str, float, dict[str, np.ndarray]]]
) -> dict[str, np.ndarray]:
    agg = strategy.begin_round(global_model)
    assert isinstance(agg, RoundAggregator)
    for client, weight, tensors in results:
        for name, arr in tensors.items():
            assert agg.add(client, name, arr, weight)
        agg.commit(client)
    return agg.finish()


def _results(rng: np.random.Generator, model: dict[str, np.ndarray], n: int = 3) -> list:
    out = []
    for i in range(n):
        tensors = {
            k: (v.astype(np.float32) + rng.standard_normal(v.shape).astype(np.float32) * 0.1).astype(v.dtype)
            if v.dtype != np.int64
            else np.array(10 + i, np.int64)
            for k, v in model.items()
        }
        out.append((f"site-{i}", float(100 * (i + 1)), tensors))
    return out


def test_fedavg_matches_weighted_mean_and_keeps_dtypes_and_order() -> None:
    rng = np.random.default_rng(0)
    model = _model(rng)
    results = _results(rng, model)
    new = _round(FedAvg(), model, results)
    assert list(new) == list(model)
    total = sum(w for _, w, _ in results)
    for name in ("w", "b"):
        ref = sum(w * t[name].astype(np.float64) for _, w, t in results) / total
        assert new[name].dtype == np.float32
        np.testing.assert_allclose(new[name], ref, rtol=1e-5, atol=1e-6)
    assert int(new["steps"]) == 12  # site-2 has the largest weight


def test_fedavg_bfloat16_model_returns_bfloat16() -> None:
    rng = np.random.default_rng(1)
    model = _model(rng, BF16)
    new = _round(FedAvg(), model, _results(rng, model))
    assert new["w"].dtype == BF16 and new["b"].dtype == BF16


def _adam_reference(
    x: np.ndarray, avg: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, b1: float, b2: float, tau: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    delta = avg - x
    m = b1 * m + (1.0 - b1) * delta
    v = b2 * v + (1.0 - b2) * (delta * delta)
    return x + lr * m / (np.sqrt(v) + tau), m, v


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16])
def test_fedadam_matches_numpy_reference_bit_exactly_over_rounds(dtype: np.dtype) -> None:
    rng = np.random.default_rng(2)
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    strategy = FedAdam(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    model = _model(rng, dtype)
    ref_m = {k: np.zeros(v.shape, np.float32) for k, v in model.items() if k != "steps"}
    ref_v = {k: np.full(v.shape, tau * tau, np.float32) for k, v in model.items() if k != "steps"}
    for _ in range(3):
        results = _results(rng, model)
        # The mean itself is FedAvg's, computed by the same engine (tested separately against float64).
        avg_agg = FedAvg().begin_round(model)
        for client, weight, tensors in results:
            for name, arr in tensors.items():
                avg_agg.add(client, name, arr, weight)
            avg_agg.commit(client)
        avg = avg_agg.engine.means()  # type: ignore[attr-defined]
        new = _round(strategy, model, results)
        for name in ("w", "b"):
            ref_x, ref_m[name], ref_v[name] = _adam_reference(
                model[name].astype(np.float32), avg[name], ref_m[name], ref_v[name], lr, b1, b2, tau
            )
            assert new[name].dtype == dtype
            np.testing.assert_array_equal(new[name], ref_x.astype(dtype))
            np.testing.assert_array_equal(strategy.m[name], ref_m[name])
            np.testing.assert_array_equal(strategy.v[name], ref_v[name])
        assert int(new["steps"]) == 12
        model = new
    assert strategy.step == 3


def test_fedadam_state_round_trip_resumes_identically() -> None:
    rng = np.random.default_rng(4)
    model = _model(rng)
    r1, r2 = _results(rng, model), _results(rng, model)
    a = FedAdam(server_lr=0.1)
    after1 = _round(a, model, r1)
    state = a.state()
    assert state.meta["step"] == 1 and set(state.tensors) == {"m/w", "v/w", "m/b", "v/b"}
    b = FedAdam(server_lr=0.1)
    b.load_state(StrategyState(state.name, dict(state.meta), {k: v.copy() for k, v in state.tensors.items()}))
    np.testing.assert_array_equal(_round(a, after1, r2)["w"], _round(b, after1, r2)["w"])
    assert b.step == 2


def test_fedadam_moves_towards_the_average() -> None:
    model = {"w": np.zeros(4, np.float32)}
    strategy = FedAdam(server_lr=0.1, tau=1e-3)
    new = _round(strategy, model, [("a", 1.0, {"w": np.ones(4, np.float32)})])
    assert np.all(new["w"] > 0) and np.all(new["w"] < 1)


def test_load_state_of_another_strategy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"strategy 'fedavg'.*uses 'fedadam'"):
        FedAdam().load_state(FedAvg().state())
    with pytest.raises(ConfigError, match="unexpected tensor 'x/w'"):
        FedAdam().load_state(StrategyState("fedadam", {}, {"x/w": np.zeros(1)}))


def test_build_strategy() -> None:
    assert isinstance(build_strategy("fedavg"), FedAvg)
    adam = build_strategy("fedadam", {"serverLr": 0.5, "beta1": 0.8})
    assert isinstance(adam, FedAdam) and adam.server_lr == 0.5 and adam.beta1 == 0.8
    with pytest.raises(ConfigError, match="not a known strategy; use one of fedavg, fedadam"):
        build_strategy("fedsgd")
    with pytest.raises(ConfigError, match="unknown fedadam parameter"):
        build_strategy("fedadam", {"lr": 1})
    with pytest.raises(ConfigError, match=r"spec.strategy.beta1=1.5 is out of range"):
        build_strategy("fedadam", {"beta1": 1.5})


def test_check_initial_model() -> None:
    check_initial_model({"w": np.zeros(2, np.float32)})
    with pytest.raises(ConfigError, match="not a numpy array"):
        check_initial_model({"w": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="complex"):
        check_initial_model({"w": np.zeros(2, np.complex64)})
    with pytest.raises(ConfigError, match="no tensors"):
        check_initial_model({})
