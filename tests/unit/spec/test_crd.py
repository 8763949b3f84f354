"""The checked-in CRD is generated from the spec model, structural, and accepts what the model accepts."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fedkube.spec import SpecError, parse_job
from fedkube.spec.crd import build_crd, to_structural
from fedkube.spec.model import MIN_SECONDS
from fedkube.spec.problems import format_path
from fedkube.spec.strategy import MAX_BETA, MIN_POSITIVE
from tests.unit.spec.manifests import ROOT, example_manifest, full_manifest

CRD_FILE = ROOT / "crds" / "fedkube.dev_fljobs.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return data


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def _validator(schema: dict[str, Any], dialect: type[jsonschema.Validator] = jsonschema.Draft4Validator) -> Any:
    # The API server reads OpenAPI v3.0 (draft 4 semantics); editors, kubeconform and readers often
    # read the same schema as a newer JSON Schema. Both must agree with the spec model. x- keys are ignored.
    return dialect(schema)


DIALECTS = pytest.mark.parametrize(
    "dialect", [jsonschema.Draft4Validator, jsonschema.Draft202012Validator], ids=["draft4", "draft2020"]
)


def test_checked_in_crd_matches_the_model() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_crd.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_checked_in_crd_equals_build_crd(crd: dict[str, Any]) -> None:
    assert crd == build_crd()
    assert "*id0" not in CRD_FILE.read_text(), "no YAML aliases in the CRD"


def test_crd_identity(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "fljobs.fedkube.dev"
    assert spec["group"] == "fedkube.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "FLJob" and spec["names"]["plural"] == "fljobs"
    assert spec["names"]["shortNames"] == ["flj"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Round": ".status.roundDisplay",
        "Clients": ".status.clientsDisplay",
        "Age": ".metadata.creationTimestamp",
    }


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_crd_is_a_valid_customresourcedefinition(crd: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(crd, version, strict=True)


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{key}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title", "default", "nullable"}
    for path, node in _nodes(schema):
        assert not forbidden & node.keys(), f"{path}: {forbidden & node.keys()}"
        typed = (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        # A boolean exclusive bound reads as "minimum: 0 allows 0" outside OpenAPI v3.0 (issue 11).
        assert not {"exclusiveMinimum", "exclusiveMaximum"} & node.keys(), path


def test_schema_describes_the_status(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]["properties"]
    for field in (
        "phase",
        "round",
        "rounds",
        "roundDisplay",
        "clients",
        "conditions",
        "startTime",
        "completionTime",
        "clientsReady",
        "clientsTotal",
        "clientsDisplay",
    ):
        assert field in status, field
    assert status["phase"]["enum"] == ["Pending", "Deploying", "Running", "Succeeded", "Failed", "Suspended"]
    assert {"state", "reason"} <= status["clients"]["additionalProperties"]["properties"].keys()
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= status["conditions"]["items"][
        "properties"
    ].keys()


def test_pass_through_only_where_needed(schema: dict[str, Any]) -> None:
    preserved = {path for path, node in _nodes(schema) if node.get("x-kubernetes-preserve-unknown-fields")}
    # Volumes are typed (issue 13): a pass-through volume let an FLJob author mount hostPath / into a pod.
    assert preserved == {".status"}


def test_site_names_are_a_list_map(schema: dict[str, Any]) -> None:
    clients = schema["properties"]["spec"]["properties"]["clients"]
    assert clients["x-kubernetes-list-type"] == "map" and clients["x-kubernetes-list-map-keys"] == ["name"]
    assert clients["items"]["required"] == ["name"]


@pytest.mark.parametrize("make", [example_manifest, full_manifest], ids=["example", "full"])
def test_manifests_validate_against_the_crd(schema: dict[str, Any], make: Any) -> None:
    data = make()
    _validator(schema).validate(data)
    # What the spec model writes back (every default filled in) must be acceptable to the API server too.
    _validator(schema).validate(parse_job(data).to_manifest())


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(example_manifest())
    node: Any = data
    for key in path[:-1]:
        node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    node[path[-1]] = value
    return data


@DIALECTS
@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "rounds"), 0),
        (("spec", "rounds"), "3"),
        (("spec", "rounds"), 2.5),
        (("spec", "suspend"), "true"),
        (("spec", "strategy", "name"), "fedprox"),
        (("spec", "strategy", "beta1"), 1),
        (("spec", "strategy", "tau"), 0),
        (("spec", "clients"), []),
        (("spec", "trainer", "command"), "python train.py"),
        (("spec", "timeouts", "roundSeconds"), 0),
        (("spec", "timeouts", "roundSeconds"), "90"),
        (("spec", "transfer", "idleTimeoutSeconds"), 0),
        (("spec", "clients", 0, "name"), "Site A"),
    ],
    ids=["rounds-zero", "rounds-string", "rounds-fraction", "suspend-string", "strategy", "beta-one", "tau-zero",
         "no-clients", "command-string", "zero-timeout", "timeout-string", "zero-idle", "site-name"],
)
def test_crd_and_model_reject_the_same_bad_values(
    schema: dict[str, Any], dialect: type[jsonschema.Validator], path: tuple[Any, ...], value: Any
) -> None:
    data = _with(path, value)
    assert list(_validator(schema, dialect).iter_errors(data)), f"the CRD accepts {path}={value!r}"
    with pytest.raises(SpecError) as info:
        parse_job(data)
    assert format_path(path) in {p.path for p in info.value.problems}, info.value


@DIALECTS
@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "transfer"), {"chunkTimeoutSeconds": MIN_SECONDS, "idleTimeoutSeconds": 2 * MIN_SECONDS}),
        (("spec", "transfer", "chunkTimeoutSeconds"), 1),  # an integer where the CRD says number
        (("spec", "strategy"), {"name": "fedadam", "beta2": MAX_BETA, "tau": MIN_POSITIVE}),
        (("spec", "server", "resources"), {"requests": {"memory": "1Gi", "cpu": 1}, "limits": {"cpu": 1.5}}),
        (("spec", "server", "checkpoint"), {"enabled": True, "storageSize": 1073741824}),
    ],
    ids=["least-timeout", "integer-number", "fedadam-bounds", "quantities", "quantity-integer"],
)
def test_crd_and_model_accept_the_same_edge_values(
    schema: dict[str, Any], dialect: type[jsonschema.Validator], path: tuple[Any, ...], value: Any
) -> None:
    data = _with(path, value)
    assert not list(_validator(schema, dialect).iter_errors(data))
    parse_job(data)


def test_to_structural_rejects_real_unions() -> None:
    with pytest.raises(ValueError, match="union"):
        to_structural({"anyOf": [{"type": "string"}, {"type": "integer"}]})


def test_to_structural_refuses_exclusive_bounds() -> None:
    with pytest.raises(ValueError, match="inclusive bound"):
        to_structural({"type": "object", "properties": {"v": {"type": "number", "exclusiveMinimum": 0}}})


def test_to_structural_inlines_refs() -> None:
    out = to_structural(
        {
            "$defs": {"X": {"type": "object", "properties": {"v": {"type": "number", "minimum": 0}}}},
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/X", "description": "an x"}, "k": {"const": "a", "default": "a"}},
        }
    )
    assert out["properties"]["x"] == {
        "type": "object",
        "description": "an x",
        "properties": {"v": {"type": "number", "minimum": 0}},
    }
    assert out["properties"]["k"] == {"enum": ["a"], "type": "string", "description": 'Default: "a".'}
