"""Central DP (fedkube.server.dp): the noise against a numpy reference, the budget, its checkpoint and its spec."""

from __future__ import annotations

from typing import Any

import dp_accounting
import numpy as np
import pytest

from fedkube.errors import ConfigError
from fedkube.metrics.core import new_registry
from fedkube.metrics.server import ServerMetrics
from fedkube.server.aggregate import BLOCK
from fedkube.server.dp import CentralDP, PrivacyBudgetExhausted, noise_for, report_privacy, spent_epsilon
from fedkube.server.influence import Influence
from fedkube.server.strategies import FedAdam, FedAvg, build_strategy
from fedkube.server.strategy_api import Strategy, StrategyState
from fedkube.spec import SpecError, parse_job
from fedkube.status import JobStatus, Phase
from tests.unit.server.test_influence import _run
from tests.unit.spec.manifests import full_manifest

EQUAL_CLIP = Influence("equal", None, 1.0)


def _dp(sigma: float = 1.5, epsilon: float = 100.0, seed: int = 3) -> CentralDP:
    return CentralDP.from_spec({"targetEpsilon": epsilon, "targetDelta": 1e-5, "noiseMultiplier": sigma}, 1.0, None,
                               seed=seed)  # fmt: skip


def _model() -> dict[str, np.ndarray]:
    return {"w": np.zeros(BLOCK + 100, np.float32), "steps": np.array(3, np.int64)}  # w spans two noise blocks


def _results(model: dict[str, np.ndarray], scales: list[float]) -> dict[str, tuple[dict[str, np.ndarray], float]]:
    # Update i is scales[i] * (1, 1, ...) / sqrt(size): its norm is scales[i].
    unit = np.full(model["w"].shape, 1.0 / np.sqrt(model["w"].size), np.float32)
    return {f"site-{i}": ({"w": model["w"] + s * unit, "steps": np.array(100 + i, np.int64)}, 10.0 ** (i + 1))
            for i, s in enumerate(scales)}  # fmt: skip


def _round(strategy: Strategy, model: dict[str, np.ndarray], results: dict[str, Any]) -> dict[str, np.ndarray]:
    assert isinstance(strategy, (FedAvg, FedAdam))
    return _run(strategy, model, results)[0]


def test_noise_on_the_clipped_equal_mean_matches_a_numpy_reference() -> None:
    model = _model()
    sigma, n = 1.5, 3
    strategy = FedAvg(influence=EQUAL_CLIP, privacy=_dp(sigma, seed=11))
    results = _results(model, [0.5, 4.0, 1e6])  # the last two are clipped to norm 1
    new = _round(strategy, model, results)
    unit = 1.0 / np.sqrt(model["w"].size)
    clipped_mean = np.float32((0.5 + 1.0 + 1.0) / n * unit)
    noise = np.random.default_rng(11).standard_normal(model["w"].size, dtype=np.float32) * np.float32(sigma * 1.0 / n)
    np.testing.assert_allclose(new["w"], clipped_mean + noise, rtol=0, atol=2e-6)
    assert abs(float(np.std(new["w"] - clipped_mean)) / (sigma / n) - 1.0) < 0.02
    assert int(new["steps"]) == 3, "integer tensors keep the global model's value under DP: no site's integers leak"


def test_the_accountant_is_dp_accountings_and_the_job_stops_before_exceeding_the_budget() -> None:
    sigma = 2.0
    two, three = spent_epsilon([(sigma, 2)], 1e-5), spent_epsilon([(sigma, 3)], 1e-5)
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(sigma), 2)
    assert two == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12) and two < three
    strategy = FedAvg(influence=EQUAL_CLIP, privacy=_dp(sigma, epsilon=(two + three) / 2))
    model = _model()
    for _ in range(2):
        model = _round(strategy, model, _results(model, [1.0, 2.0]))
    assert strategy.privacy is not None and strategy.privacy.epsilon == pytest.approx(two)
    registry = new_registry()
    telemetry = ServerMetrics(registry, "job")
    assert report_privacy(strategy, telemetry) == pytest.approx(two)
    assert registry.get_sample_value("fedkube_server_privacy_epsilon_spent", {"fljob": "job"}) == \
        pytest.approx(two)  # fmt: skip
    with pytest.raises(PrivacyBudgetExhausted, match=r"2 round\(s\) spent epsilon .* one more round") as info:
        strategy.begin_round(model)
    assert info.value.reason == "PrivacyBudgetExhausted" and strategy.privacy.rounds == 2
    assert report_privacy(FedAvg(), telemetry) is None


def test_the_noise_multiplier_derived_from_the_target_spends_at_most_it() -> None:
    sigma = noise_for(3.0, 1e-5, 20)
    assert spent_epsilon([(sigma, 20)], 1e-5) <= 3.0 < spent_epsilon([(sigma * 0.97, 20)], 1e-5)
    derived = build_strategy("fedavg", {"privacy": {"targetEpsilon": 3.0, "targetDelta": 1e-5}}, EQUAL_CLIP, rounds=20)
    assert isinstance(derived, FedAvg) and derived.privacy is not None
    assert derived.privacy.noise_multiplier == pytest.approx(sigma)


@pytest.mark.parametrize("cls", [FedAvg, FedAdam], ids=["fedavg", "fedadam"])
def test_the_spent_budget_is_in_the_checkpoint_and_a_resume_continues_it(cls: type[Any]) -> None:
    model = _model()
    sigma = 2.0
    budget = (spent_epsilon([(sigma, 2)], 1e-5) + spent_epsilon([(sigma, 3)], 1e-5)) / 2
    a: Strategy = cls(influence=EQUAL_CLIP, privacy=_dp(sigma, epsilon=budget))
    model = _round(a, model, _results(model, [1.0, 2.0]))
    state = a.state()
    b: Strategy = cls(influence=EQUAL_CLIP, privacy=_dp(sigma, epsilon=budget, seed=5))
    b.load_state(StrategyState(state.name, dict(state.meta), dict(state.tensors)))
    assert b.privacy is not None and b.privacy.epsilon == pytest.approx(spent_epsilon([(sigma, 1)], 1e-5))
    model = _round(b, model, _results(model, [1.0, 2.0]))
    # A budget already spent at resume: refused before the round, with the reason.
    c: Strategy = cls(influence=EQUAL_CLIP, privacy=_dp(sigma, epsilon=budget))
    c.load_state(b.state())
    with pytest.raises(PrivacyBudgetExhausted):
        c.begin_round(model)
    # The spec dropped privacy, or added it to rounds trained without it: refused, naming the fix.
    with pytest.raises(ConfigError, match="trained with central DP"):
        cls(influence=EQUAL_CLIP).load_state(b.state())
    with pytest.raises(ConfigError, match="trained without central DP"):
        cls(influence=EQUAL_CLIP, privacy=_dp()).load_state(cls(influence=EQUAL_CLIP).state())
    with pytest.raises(ConfigError, match="targetDelta back to 1e-05"):
        CentralDP.from_spec({"targetEpsilon": 9, "targetDelta": 1e-6, "noiseMultiplier": 1}, 1.0, None).load(
            b.state().meta)


def test_the_noise_is_unpredictable_without_an_injected_seed() -> None:
    draws = [CentralDP.from_spec({"targetEpsilon": 9, "targetDelta": 1e-5, "noiseMultiplier": 1}, 1.0, None)
             .rng.standard_normal(4) for _ in range(2)]  # fmt: skip
    assert not np.array_equal(draws[0], draws[1])


def _job(strategy: dict[str, Any]) -> dict[str, Any]:
    data = full_manifest()
    data["spec"]["strategy"] = strategy
    return data


PRIVACY = {"targetEpsilon": 8, "targetDelta": 1e-5}


@pytest.mark.parametrize(
    ("strategy", "words"),
    [
        ({"name": "fedavg", "weighting": "equal", "privacy": PRIVACY}, "set clipNorm"),
        ({"name": "fedavg", "weighting": "equal", "clipNorm": 1, "clipQuantile": 0.5, "privacy": PRIVACY},
         "remove clipQuantile"),
        ({"name": "fedadam", "clipNorm": 1.0, "privacy": PRIVACY}, "needs weighting=equal"),
        ({"name": "median", "privacy": PRIVACY}, "use fedavg, fedadam"),
        ({"name": "fedavg", "weighting": "equal", "clipNorm": 1.0, "privacy": {"targetEpsilon": 8}}, "targetDelta"),
    ],
    ids=["no-clip", "adaptive-clip", "weighted", "robust", "no-delta"],
)
def test_the_spec_refuses_privacy_it_cannot_account(strategy: dict[str, Any], words: str) -> None:
    with pytest.raises(SpecError, match=words):
        parse_job(_job(strategy))
    ok = parse_job(_job({"name": "fedyogi", "weighting": "equal", "clipNorm": 1.0, "privacy": PRIVACY}))
    assert ok.spec.strategy.privacy is not None and ok.spec.strategy.privacy.noise_multiplier is None


def test_the_status_document_carries_the_spent_epsilon() -> None:
    status = JobStatus(job="j", phase=Phase.RUNNING, round=2, rounds=5, privacy_epsilon=1.25)
    assert status.to_dict()["privacyEpsilon"] == 1.25
    assert JobStatus.from_json(status.to_json()).privacy_epsilon == 1.25
    assert "privacyEpsilon" not in JobStatus(job="j", phase=Phase.RUNNING, round=2, rounds=5).to_dict()


def test_validate_says_when_an_explicit_noise_multiplier_cannot_last_all_rounds() -> None:
    budget = (spent_epsilon([(2.0, 3)], 1e-5) + spent_epsilon([(2.0, 4)], 1e-5)) / 2  # three rounds fit
    privacy = {"targetEpsilon": budget, "targetDelta": 1e-5, "noiseMultiplier": 2.0}
    data = _job({"name": "fedavg", "weighting": "equal", "clipNorm": 1.0, "privacy": privacy})
    data["spec"]["rounds"] = 3
    parse_job(data)
    data["spec"]["rounds"] = 10
    with pytest.raises(SpecError) as info:
        parse_job(data)
    [hit] = [p for p in info.value.problems if p.path == "spec.strategy.privacy.noiseMultiplier"]
    assert "in 3 of the 10 rounds" in hit.message and "set rounds to 3" in hit.fix
