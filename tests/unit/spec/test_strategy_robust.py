"""spec.strategy for the robust strategies: defaults, parameters only valid for their strategy, results per round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fedkube.spec import SpecError, parse_job
from fedkube.spec.command import validate_main
from fedkube.spec.load import lint
from fedkube.spec.strategy import MAX_TRIM_FRACTION, Strategy, min_results
from tests.unit.spec.manifests import ROOT, full_manifest


def _job(strategy: dict[str, Any], clients: int = 5, min_clients: int | None = None) -> dict[str, Any]:
    data = full_manifest()
    data["spec"]["strategy"] = strategy
    data["spec"]["clients"] = [{"name": f"site-{i}"} for i in range(clients)]
    data["spec"]["minClients"] = clients if min_clients is None else min_clients
    return data


@pytest.mark.parametrize(
    ("strategy", "fields"),
    [
        ({"name": "median"}, {}),
        ({"name": "trimmedmean"}, {"trim_fraction": 0.2}),
        ({"name": "trimmedmean", "trimFraction": 0}, {"trim_fraction": 0.0}),
        ({"name": "krum"}, {"byzantine": 1, "krum_select": 1}),
        ({"name": "krum", "byzantine": 0, "krumSelect": 3}, {"byzantine": 0, "krum_select": 3}),
    ],
)
def test_robust_parameters_get_defaults_only_for_their_strategy(
    strategy: dict[str, Any], fields: dict[str, Any]
) -> None:
    s = parse_job(_job(strategy)).spec.strategy
    for name in ("trim_fraction", "byzantine", "krum_select", "server_lr", "beta1", "beta2", "tau"):
        assert getattr(s, name) == fields.get(name), name


@pytest.mark.parametrize(
    ("strategy", "path", "owner"),
    [
        ({"name": "fedavg", "trimFraction": 0.1}, "spec.strategy.trimFraction", "trimmedmean"),
        ({"name": "median", "byzantine": 1}, "spec.strategy.byzantine", "krum"),
        ({"name": "trimmedmean", "krumSelect": 2}, "spec.strategy.krumSelect", "krum"),
        ({"name": "krum", "trimFraction": 0.1}, "spec.strategy.trimFraction", "trimmedmean"),
        ({"name": "fedadam", "byzantine": 1}, "spec.strategy.byzantine", "krum"),
        ({"name": "median", "serverLr": 0.1}, "spec.strategy.serverLr", "fedadam"),
    ],
)
def test_a_parameter_of_another_strategy_is_an_error(strategy: dict[str, Any], path: str, owner: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_job(_job(strategy))
    hit = [p for p in info.value.problems if p.path == path]
    assert hit and f"is a {owner} parameter" in hit[0].message and owner in hit[0].fix, info.value


@pytest.mark.parametrize(
    ("strategy", "path"),
    [
        ({"name": "trimmedmean", "trimFraction": 0.5}, "spec.strategy.trimFraction"),
        ({"name": "trimmedmean", "trimFraction": -0.1}, "spec.strategy.trimFraction"),
        ({"name": "krum", "byzantine": -1}, "spec.strategy.byzantine"),
        ({"name": "krum", "krumSelect": 0}, "spec.strategy.krumSelect"),
        ({"name": "krum", "byzantine": 1.5}, "spec.strategy.byzantine"),
    ],
)
def test_out_of_range_parameters_are_rejected_by_the_model_and_the_crd(strategy: dict[str, Any], path: str) -> None:
    data = _job(strategy)
    with pytest.raises(SpecError) as info:
        parse_job(data)
    assert path in {p.path for p in info.value.problems}
    crd = yaml.safe_load((ROOT / "crds" / "fedkube.dev_fljobs.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert list(jsonschema.Draft4Validator(schema).iter_errors(data)), f"the CRD accepts {strategy}"


def test_the_crd_accepts_the_edge_values() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "fedkube.dev_fljobs.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for strategy in ({"name": "trimmedmean", "trimFraction": MAX_TRIM_FRACTION}, {"name": "krum", "byzantine": 0}):
        data = _job(strategy, clients=9)
        assert not list(jsonschema.Draft4Validator(schema).iter_errors(data))
        parse_job(data)


@pytest.mark.parametrize(
    ("strategy", "need"),
    [
        ({"name": "fedavg"}, 1),
        ({"name": "median"}, 3),
        ({"name": "trimmedmean"}, 5),
        ({"name": "trimmedmean", "trimFraction": 0.3}, 4),
        ({"name": "trimmedmean", "trimFraction": 0.1}, 10),
        ({"name": "trimmedmean", "trimFraction": 0}, 1),
        ({"name": "krum"}, 5),
        ({"name": "krum", "byzantine": 2, "krumSelect": 6}, 8),
    ],
)
def test_min_results(strategy: dict[str, Any], need: int) -> None:
    assert min_results(Strategy.model_validate(strategy)) == need


def test_too_few_clients_is_an_error_and_a_low_quorum_a_warning() -> None:
    _, errors, _ = lint(_job({"name": "krum", "byzantine": 1}, clients=4))
    assert [p.path for p in errors] == ["spec.strategy.name"]
    assert "needs at least 5 results" in errors[0].message and "4 client site(s)" in errors[0].message
    _, errors, warnings = lint(_job({"name": "median"}, clients=4, min_clients=2))
    assert errors == []
    assert [p.path for p in warnings] == ["spec.minClients"] and "set minClients to at least 3" in warnings[0].fix
    _, errors, warnings = lint(_job({"name": "median"}, clients=3))
    assert errors == [] and warnings == []


def test_fedkube_validate_explains_the_robust_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job({"name": "trimmedmean", "trimFraction": 0.3, "byzantine": 1}, clients=3)))
    assert validate_main([str(path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    found = {e["path"]: e for e in doc["errors"]}
    assert set(found) == {"spec.strategy.byzantine", "spec.strategy.name"}
    assert "trimFraction=0.3 needs at least 4 results" in found["spec.strategy.name"]["message"]
