"""spec.strategy's bounds on one site's influence: weighting, maxExamplesPerSite, clipNorm."""

from __future__ import annotations

from typing import Any

import pytest

from fedkube.spec import SpecError, parse_job
from tests.unit.spec.manifests import full_manifest


def _with_strategy(strategy: dict[str, Any]) -> dict[str, Any]:
    data = full_manifest()
    data["spec"]["strategy"] = strategy
    return data


def test_bounds_default_to_examples_weighting_without_cap_or_clipping() -> None:
    s = parse_job(_with_strategy({"name": "fedavg"})).spec.strategy
    assert (s.weighting, s.max_examples_per_site, s.clip_norm) == ("examples", None, None)


def test_adaptive_clipping_gets_the_papers_learning_rate_by_default() -> None:
    s = parse_job(_with_strategy({"name": "fedavg", "clipNorm": 1, "clipQuantile": 0.5})).spec.strategy
    assert (s.clip_norm, s.clip_quantile, s.clip_learning_rate) == (1.0, 0.5, 0.2)


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_bounds_are_valid_for_every_strategy(name: str) -> None:
    s = parse_job(_with_strategy({"name": name, "maxExamplesPerSite": 500, "clipNorm": 3})).spec.strategy
    assert (s.max_examples_per_site, s.clip_norm) == (500, 3.0)
    assert parse_job(_with_strategy({"name": name, "weighting": "equal"})).spec.strategy.weighting == "equal"


@pytest.mark.parametrize(
    ("strategy", "path", "words"),
    [
        ({"maxExamplesPerSite": 0}, "spec.strategy.maxExamplesPerSite", "greater than or equal to 1"),
        ({"maxExamplesPerSite": -5}, "spec.strategy.maxExamplesPerSite", "greater than or equal to 1"),
        ({"maxExamplesPerSite": 2.5}, "spec.strategy.maxExamplesPerSite", "integer"),
        ({"clipNorm": 0}, "spec.strategy.clipNorm", "greater than or equal"),
        ({"clipNorm": -1.0}, "spec.strategy.clipNorm", "greater than or equal"),
        ({"clipNorm": float("inf")}, "spec.strategy.clipNorm", "finite"),
        ({"clipNorm": "1"}, "spec.strategy.clipNorm", "number"),
        ({"weighting": "median"}, "spec.strategy.weighting", "'examples' or 'equal'"),
        ({"weighting": "equal", "maxExamplesPerSite": 10}, "spec.strategy", "weighting=equal ignores"),
        ({"clipQuantile": 0.5}, "spec.strategy", "set clipNorm too"),
        ({"clipNorm": 1, "clipQuantile": 1.5}, "spec.strategy.clipQuantile", "less than or equal to 1"),
        ({"clipNorm": 1, "clipLearningRate": 0.1}, "spec.strategy", "set clipQuantile too"),
        ({"clipNorm": 1, "clipQuantile": 0.5, "clipLearningRate": 0}, "spec.strategy.clipLearningRate", "greater"),
    ],
    ids=[
        "cap-zero", "cap-negative", "cap-float", "clip-zero", "clip-negative", "clip-inf", "clip-string",
        "weighting-unknown", "cap-with-equal", "quantile-without-clip", "quantile-above-1", "rate-without-quantile",
        "rate-zero",
    ],
)
def test_bad_bounds_name_the_field(strategy: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_job(_with_strategy(strategy))
    hit = [p for p in info.value.problems if p.path == path]
    assert hit, [str(p) for p in info.value.problems]
    assert any(words.lower() in f"{p.message} {p.fix}".lower() for p in hit), [str(p) for p in hit]
