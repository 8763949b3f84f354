"""spec.strategy.name: scaffold — its parameter, its default and what it refuses to combine with."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fedkube.spec.load import lint
from fedkube.spec.strategy import Strategy, parameter_owners
from tests.unit.spec.manifests import example_manifest


def _manifest(**strategy: Any) -> dict[str, Any]:
    m = example_manifest()
    m["spec"]["strategy"] = {"name": "scaffold", **strategy}
    return m


def test_scaffold_fills_its_global_step_size_and_nothing_else() -> None:
    s = Strategy.model_validate({"name": "scaffold"})
    assert s.server_lr == 1.0
    assert (s.beta1, s.beta2, s.tau) == (None, None, None)
    assert Strategy.model_validate({"name": "scaffold", "serverLr": 0.5}).server_lr == 0.5
    assert "scaffold" in parameter_owners()["server_lr"]


@pytest.mark.parametrize("extra", [{"clipNorm": 1.0}, {"clipNorm": 1.0, "weighting": "equal",
                                                      "privacy": {"targetEpsilon": 1.0, "targetDelta": 1e-5}}])
def test_scaffold_refuses_clipping_and_privacy(extra: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="scaffold"):
        Strategy.model_validate({"name": "scaffold", **extra})


def test_validate_explains_parameters_scaffold_does_not_take() -> None:
    _, errors, _ = lint(_manifest(proximalMu=0.1, beta1=0.9))
    text = " ".join(str(e) for e in errors)
    assert "proximalMu is a fedavg parameter" in text and "beta1 is a fedadam parameter" in text


def test_scaffold_takes_weighting_and_the_examples_cap() -> None:
    _, errors, _ = lint(_manifest(weighting="examples", maxExamplesPerSite=100))
    assert not errors
