"""The server's settings come from the typed spec model, and their defaults are the spec's own."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from fedkube.server.config import JobSettings, TransferSettings, settings_from_spec
from fedkube.server.influence import Influence
from fedkube.server.strategies import build_strategy
from fedkube.spec import FLJobSpec, Transfer, parse_job
from fedkube.spec.strategy import Strategy as SpecStrategy
from fedkube.spec.strategy import StrategyName

MINIMAL: dict[str, Any] = {
    "apiVersion": "fedkube.dev/v1alpha1",
    "kind": "FLJob",
    "metadata": {"name": "cfg"},
    "spec": {
        "rounds": 3,
        "clients": [{"name": "site-a"}, {"name": "site-b"}],
        "trainer": {"image": "example/trainer:1", "command": ["python", "train.py"]},
    },
}

# Every value the server reads, set away from its default.
EVERYTHING: dict[str, Any] = {
    **MINIMAL["spec"],
    "minClients": 1,
    "strategy": {
        "name": "fedadam", "serverLr": 0.5, "maxExamplesPerSite": 1000, "clipNorm": 2.5, "clipQuantile": 0.5,
        "clipLearningRate": 0.1,
    },
    "model": {"source": "file", "path": "/models/init.npz", "maxBytes": 123456},
    "transfer": {"chunkBytes": 65536, "chunkTimeoutSeconds": 7, "idleTimeoutSeconds": 30, "maxAttempts": 4},
    "timeouts": {"roundSeconds": 90, "heartbeatSeconds": 12, "registrationSeconds": 40},
    "server": {"checkpoint": {"onUnusable": "StartFresh"}},
    "output": {"size": "1Gi", "everyRound": True},
    "evaluation": {"every": 2, "sites": ["site-b"]},
    "revokedSites": ["site-b"],
}


def _spec(spec: dict[str, Any]) -> FLJobSpec:
    return parse_job({**MINIMAL, "spec": spec}).spec


def test_server_defaults_are_the_spec_defaults() -> None:
    """A job that sets nothing optional runs with exactly the settings the dataclasses default to."""
    from_spec = settings_from_spec("cfg", _spec(MINIMAL["spec"]))
    assert from_spec == JobSettings(job="cfg", rounds=3, min_clients=2, clients=("site-a", "site-b"))
    assert TransferSettings() == TransferSettings.from_spec(Transfer())


def test_every_setting_is_read_from_the_spec() -> None:
    """No settings field keeps its default when the spec sets it: none is forgotten by the mapping."""
    s = settings_from_spec("cfg", _spec(EVERYTHING))
    defaults = JobSettings(job="cfg", rounds=1, min_clients=2, clients=())
    for f in dataclasses.fields(JobSettings):
        if f.name != "job":
            assert getattr(s, f.name) != getattr(defaults, f.name), f.name
    for f in dataclasses.fields(TransferSettings):
        assert getattr(s.transfer, f.name) != getattr(TransferSettings(), f.name), f.name
    assert s.transfer == TransferSettings(chunk_bytes=65536, chunk_timeout_s=7.0, idle_timeout_s=30.0, max_attempts=4)


def test_model_max_bytes_defaults_to_a_share_of_the_server_memory_limit() -> None:
    spec = _spec({**MINIMAL["spec"], "server": {"resources": {"limits": {"memory": "10Gi"}}}})
    assert settings_from_spec("cfg", spec).model_max_bytes == 4 * 2**30


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ({"name": "fedavg"}, {}),
        ({"name": "fedadam"}, {"serverLr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        ({"name": "fedadam", "tau": 0.5}, {"serverLr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.5}),
        ({"name": "median"}, {}),
        ({"name": "trimmedmean"}, {"trimFraction": 0.2}),
        ({"name": "trimmedmean", "trimFraction": 0.4}, {"trimFraction": 0.4}),
        ({"name": "krum"}, {"byzantine": 1, "krumSelect": 1}),
        ({"name": "krum", "byzantine": 0, "krumSelect": 2}, {"byzantine": 0, "krumSelect": 2}),
    ],
    ids=["fedavg", "fedadam-defaults", "fedadam-tau", "median", "trimmed-default", "trimmed", "krum-defaults", "krum"],
)
def test_strategy_options_are_the_spec_parameters_by_their_spec_names(
    strategy: dict[str, Any], options: dict[str, float]
) -> None:
    s = settings_from_spec("cfg", _spec({**MINIMAL["spec"], "clients": FIVE, "strategy": strategy}))
    assert s.strategy == strategy["name"]
    assert dict(s.strategy_options) == options


FIVE = [{"name": f"site-{i}"} for i in range(5)]  # enough results for every strategy (krum's default needs 5)


def test_every_strategy_parameter_reaches_the_server_and_its_builder(tmp_path: Path) -> None:
    """Drift guard: each spec.strategy field is in some strategy's options, and build_strategy takes them."""
    seen: set[str] = set()
    for name in typing.get_args(StrategyName):
        s = settings_from_spec("cfg", _spec({**MINIMAL["spec"], "clients": FIVE, "strategy": {"name": name}}))
        build_strategy(s.strategy, s.strategy_options, spill_dir=tmp_path, sites=len(s.clients))
        seen |= set(s.strategy_options)
    private = {"weighting": "equal", "clipNorm": 1.0, "privacy": {"targetEpsilon": 5, "targetDelta": 1e-5},
               "proximalMu": 0.1}
    s = settings_from_spec("cfg", _spec({**MINIMAL["spec"], "strategy": private}))
    assert build_strategy(s.strategy, s.strategy_options, s.influence, rounds=3).privacy is not None  # type: ignore[attr-defined]
    seen |= set(s.strategy_options)
    influence = {"weighting", "maxExamplesPerSite", "clipNorm", "clipQuantile", "clipLearningRate"}
    fields = {f.alias or n for n, f in SpecStrategy.model_fields.items() if n != "name"} - influence
    assert seen == fields


def test_influence_bounds_are_settings_of_their_own_not_strategy_parameters() -> None:
    """weighting/maxExamplesPerSite/clipNorm reach JobSettings.influence and never the strategy's parameters."""
    capped = settings_from_spec("cfg", _spec(EVERYTHING))
    assert capped.influence == Influence("examples", 1000, 2.5, 0.5, 0.1)
    assert dict(capped.strategy_options) == {"serverLr": 0.5, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    equal = settings_from_spec("cfg", _spec({**MINIMAL["spec"], "strategy": {"weighting": "equal"}}))
    assert equal.influence == Influence("equal") and dict(equal.strategy_options) == {}
    assert settings_from_spec("cfg", _spec(MINIMAL["spec"])).influence == Influence()
