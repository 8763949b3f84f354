"""FedYogi and FedAdagrad (Reddi et al. 2021) against numpy references, their resume and their spec parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedkube.errors import ConfigError
from fedkube.server.strategies import FedAdagrad, FedAdam, FedAvg, FedYogi, build_strategy
from fedkube.server.strategy_api import StrategyState
from fedkube.spec import SpecError, parse_job
from tests.unit.server.test_strategies import BF16, _model, _results, _round
from tests.unit.spec.manifests import full_manifest

Moment = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _yogi(v: np.ndarray, delta: np.ndarray, b2: float) -> np.ndarray:
    d2 = delta * delta
    return v - (1.0 - b2) * d2 * np.sign(v - d2)


def _adagrad(v: np.ndarray, delta: np.ndarray, b2: float) -> np.ndarray:
    return v + delta * delta


def _mean(model: dict[str, np.ndarray], results: list) -> dict[str, np.ndarray]:
    agg = FedAvg().begin_round(model)
    for client, weight, tensors in results:
        for name, arr in tensors.items():
            agg.add(client, name, arr, weight)
        agg.commit(client)
    return agg.engine.means()  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("cls", "moment"), [(FedYogi, _yogi), (FedAdagrad, _adagrad)], ids=["yogi", "adagrad"])
def test_matches_numpy_reference_bit_exactly_over_rounds(cls: type[FedAdam], moment: Moment, dtype: np.dtype) -> None:
    rng = np.random.default_rng(7)
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    strategy = cls(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    model = _model(rng, dtype)
    ref_m = {k: np.zeros(v.shape, np.float32) for k, v in model.items() if k != "steps"}
    ref_v = {k: np.full(v.shape, tau * tau, np.float32) for k, v in model.items() if k != "steps"}
    for _ in range(3):
        results = _results(rng, model)
        avg = _mean(model, results)
        new = _round(strategy, model, results)
        for name in ("w", "b"):
            x = model[name].astype(np.float32)
            delta = avg[name] - x
            ref_m[name] = b1 * ref_m[name] + (1.0 - b1) * delta
            ref_v[name] = moment(ref_v[name], delta, b2)
            ref_x = x + lr * ref_m[name] / (np.sqrt(ref_v[name]) + tau)
            assert new[name].dtype == dtype
            np.testing.assert_array_equal(new[name], ref_x.astype(dtype))
            np.testing.assert_array_equal(strategy.v[name], ref_v[name])
        assert int(new["steps"]) == 12  # integer tensors take FedAvg's value
        model = new


def test_the_second_moments_differ_from_adams() -> None:
    # Guards the references above: a subclass that silently kept Adam's v would fail here.
    rng = np.random.default_rng(8)
    model = _model(rng)
    results = _results(rng, model)
    v = {}
    for cls in (FedAdam, FedYogi, FedAdagrad):
        strategy = cls(server_lr=0.1)
        _round(strategy, model, results)
        v[cls.name] = strategy.v["w"]
    assert not np.array_equal(v["fedadam"], v["fedyogi"]) and not np.array_equal(v["fedyogi"], v["fedadagrad"])


@pytest.mark.parametrize("cls", [FedYogi, FedAdagrad], ids=["yogi", "adagrad"])
def test_state_round_trip_resumes_bit_exactly(cls: type[FedAdam]) -> None:
    rng = np.random.default_rng(9)
    model = _model(rng)
    r1, r2, r3 = (_results(rng, model) for _ in range(3))
    a = cls(server_lr=0.1)
    after1 = _round(a, model, r1)
    state = a.state()
    assert state.name == cls.name and state.meta["step"] == 1 and set(state.tensors) == {"m/w", "v/w", "m/b", "v/b"}
    b = cls(server_lr=0.1)
    b.load_state(StrategyState(state.name, dict(state.meta), {k: v.copy() for k, v in state.tensors.items()}))
    a2, b2 = _round(a, after1, r2), _round(b, after1, r2)
    np.testing.assert_array_equal(_round(a, a2, r3)["w"], _round(b, b2, r3)["w"])
    with pytest.raises(ConfigError, match=rf"strategy 'fedadam'.*uses '{cls.name}'"):
        cls().load_state(FedAdam().state())


def test_build_strategy_takes_each_optimizers_own_parameters() -> None:
    yogi = build_strategy("fedyogi", {"serverLr": 0.5, "beta2": 0.9})
    assert isinstance(yogi, FedYogi) and yogi.server_lr == 0.5 and yogi.beta2 == 0.9
    adagrad = build_strategy("fedadagrad", {"serverLr": 0.5, "tau": 0.01})
    assert isinstance(adagrad, FedAdagrad) and adagrad.tau == 0.01
    with pytest.raises(ConfigError, match=r"unknown fedadagrad parameter\(s\) \['beta2'\]"):
        build_strategy("fedadagrad", {"beta2": 0.9})


def _job(strategy: dict[str, Any]) -> dict[str, Any]:
    data = full_manifest()
    data["spec"]["strategy"] = strategy
    return data


def test_spec_fills_defaults_and_refuses_parameters_of_other_strategies() -> None:
    s = parse_job(_job({"name": "fedadagrad"})).spec.strategy
    assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.01, 0.9, None, 1e-3)
    s = parse_job(_job({"name": "fedyogi", "beta2": 0.5})).spec.strategy
    assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.01, 0.9, 0.5, 1e-3)
    with pytest.raises(SpecError) as info:
        parse_job(_job({"name": "fedadagrad", "beta2": 0.5}))
    [hit] = [p for p in info.value.problems if p.path == "spec.strategy.beta2"]
    assert "is a fedadam parameter (also of fedyogi)" in hit.message and "fedadam or fedyogi" in hit.fix
