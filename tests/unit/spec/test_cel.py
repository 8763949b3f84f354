"""The CRD's CEL rules, evaluated offline: each one refuses what it names, accepts the rest, and agrees with the model.

The rules are read from the generated CRD (what `kubectl apply` meets) and
evaluated with the `common-expression-language` library (core CEL). Values are
typed as the API server types them: a schema `number` is a double even when the
manifest writes 60.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Iterator
from typing import Any

import cel
import pytest

from fedkube.spec import cel as rules_mod
from fedkube.spec.crd import build_crd
from fedkube.spec.load import lint
from tests.unit.spec.manifests import example_manifest, full_manifest

_CRD_SPEC = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
_EXAMPLE = example_manifest()  # parsed once: YAML loading would dominate the generated-spec test
RULES = {r.id: r for r in rules_mod.rules()}
VALIDATION = [r for r in RULES.values() if not r.transition]
TRANSITION = [r for r in RULES.values() if r.transition]


def _node(schema: dict[str, Any], at: tuple[str, ...]) -> dict[str, Any]:
    for name in at:
        schema = schema["properties"][name]
    return schema


def _typed(schema: dict[str, Any], value: Any) -> Any:
    """``value`` as the API server hands it to CEL: numbers of a `number` field are doubles."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {k: _typed(props.get(k) or (extra if isinstance(extra, dict) else {}), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(schema.get("items", {}), v) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _at(spec: dict[str, Any], at: tuple[str, ...]) -> Any:
    for name in at:
        if not isinstance(spec, dict) or name not in spec:
            return None
        spec = spec[name]
    return spec


def holds(rule: rules_mod.Rule, spec: dict[str, Any], old: dict[str, Any] | None = None) -> bool:
    """The rule's verdict on ``spec`` (an update from ``old`` for a transition rule); absent nodes are not checked."""
    node = _at(spec, rule.at)
    if node is None:
        return True  # the API server runs a rule only where its node exists
    schema = _node(_CRD_SPEC, rule.at)
    variables = {"self": _typed(schema, node)}
    if rule.transition:
        before = _at(old or {}, rule.at)
        if before is None:
            return True  # transition rules do not run on create
        variables["oldSelf"] = _typed(schema, before)
    verdict = _program(rule.rule).execute(variables)
    assert isinstance(verdict, bool), f"{rule.id}: {rule.rule} gave {verdict!r}, not a bool"
    return verdict


@functools.cache
def _program(source: str) -> Any:
    return cel.compile(source)


def failing(spec: dict[str, Any], old: dict[str, Any] | None = None) -> set[str]:
    return {r.id for r in (TRANSITION if old is not None else VALIDATION) if not holds(r, spec, old)}


def test_the_crd_carries_every_rule_where_it_applies() -> None:
    shipped: list[tuple[tuple[str, ...], dict[str, Any]]] = []

    def walk(node: dict[str, Any], at: tuple[str, ...]) -> None:
        shipped.extend((at, v) for v in node.get("x-kubernetes-validations", []))
        for name, child in node.get("properties", {}).items():
            walk(child, (*at, name))

    walk(_CRD_SPEC, ())
    assert sorted(map(repr, shipped)) == sorted(repr((r.at, r.manifest())) for r in RULES.values())


# Core CEL operators and the two functions the rules need: no Kubernetes extension library. No macro either
# (all, exists, map, filter: the API server multiplies their cost by a list's estimated size); a macro's
# iteration variable shows among the program's variables, which may only be self and oldSelf.
CHEAP = {"!_", "@in", "_!=_", "_&&_", "_*_", "_+_", "_<=_", "_<_", "_==_", "_>=_", "_>_", "_?_:_", "_||_",
         "double", "size"}


def test_every_rule_compiles_is_core_cel_and_iterates_over_nothing() -> None:
    for rule in RULES.values():
        program = cel.compile(rule.rule)
        assert set(program.variables()) <= {"self", "oldSelf"}, rule.id
        assert set(program.functions()) <= CHEAP, (rule.id, set(program.functions()) - CHEAP)


@pytest.mark.parametrize("make", [example_manifest, full_manifest], ids=["example", "full"])
def test_valid_manifests_pass_every_rule(make: Any) -> None:
    spec = make()["spec"]
    assert failing(spec) == set()
    assert failing(spec, old=copy.deepcopy(spec)) == set()


def _fedavg(**strategy: Any) -> dict[str, Any]:
    spec = example_manifest()["spec"]
    spec["clients"] = [{"name": f"s{i}"} for i in range(6)]
    spec["strategy"] = strategy
    return spec


def _with(path: str, value: Any, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(spec) if spec is not None else _fedavg(name="fedavg")
    *parents, last = path.split(".")
    node = spec
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return spec


# One spec per rule that breaks that rule alone; a new rule without a case here fails test_every_rule_has_a_case.
INVALID: dict[str, dict[str, Any]] = {
    "minClients": _with("minClients", 7),
    "idleTimeout": _with("transfer.chunkTimeoutSeconds", 121),  # idle stays at its default 120
    "roundSeconds": _with("timeouts.roundSeconds", 60),  # below the default idle timeout
    "medianClients": _with("clients", [{"name": "a"}, {"name": "b"}], _fedavg(name="median")),
    "trimmedmeanClients": _fedavg(name="trimmedmean", trimFraction=0.1),  # 6 sites trim floor(0.6) = 0
    "krumClients": _with("clients", [{"name": f"s{i}"} for i in range(4)], _fedavg(name="krum")),
    "modelFilePath": _with("model", {"source": "file"}),
    "modelFirstClientPath": _with("model", {"path": "/m.npz"}),
    "only:serverLr": _fedavg(serverLr=0.1),
    "only:beta1": _fedavg(name="krum", beta1=0.5),
    "only:beta2": _fedavg(name="median", beta2=0.5),
    "only:tau": _fedavg(tau=0.1),
    "only:trimFraction": _fedavg(name="median", trimFraction=0.2),
    "only:byzantine": _fedavg(byzantine=1),
    "only:krumSelect": _fedavg(name="fedadam", krumSelect=2),
    "equalWeighting": _fedavg(weighting="equal", maxExamplesPerSite=10),
    "clipLearningRate": _fedavg(clipNorm=1.0, clipLearningRate=0.1),
    "clipQuantile": _fedavg(clipQuantile=0.5),
    "robustBounds": _fedavg(name="median", clipNorm=1),
    "only:proximalMu": _fedavg(name="scaffold", proximalMu=0.1),
    "scaffoldBounds": _fedavg(name="scaffold", clipNorm=1),
}


def test_every_rule_has_a_case() -> None:
    assert set(INVALID) == {r.id for r in VALIDATION}


@pytest.mark.parametrize("rule_id", sorted(INVALID))
def test_rule_refuses_its_case_and_so_does_the_model(rule_id: str) -> None:
    spec = INVALID[rule_id]
    assert failing(spec) == {rule_id}
    _, errors, _ = lint({**example_manifest(), "spec": spec})
    assert errors, f"the model accepts what CEL rule {rule_id} refuses"


def _random_spec(rng: random.Random) -> dict[str, Any]:
    """A spec varying every field a CEL rule reads, the rest valid."""
    spec = copy.deepcopy(_EXAMPLE["spec"])
    spec["clients"] = [{"name": f"s{i}"} for i in range(rng.randint(1, 8))]
    if rng.random() < 0.3:
        spec["minClients"] = rng.randint(1, 9)
    strategy: dict[str, Any] = {}
    if rng.random() < 0.9:
        strategy["name"] = rng.choice(["fedavg", "fedadam", "fedyogi", "median", "trimmedmean", "krum", "scaffold"])
    optional = {
        "serverLr": lambda: 0.1, "beta1": lambda: 0.9, "beta2": lambda: 0.99, "tau": lambda: 0.01,
        "trimFraction": lambda: rng.choice([0, 0.1, 0.2, 0.25, 0.3, 0.45]),
        "byzantine": lambda: rng.randint(0, 3), "krumSelect": lambda: rng.randint(1, 5),
        "weighting": lambda: rng.choice(["examples", "equal"]), "maxExamplesPerSite": lambda: 100,
        "clipNorm": lambda: rng.choice([1, 2.5]), "clipQuantile": lambda: 0.5, "clipLearningRate": lambda: 0.1,
    }
    for key, value in optional.items():
        if rng.random() < 0.08:
            strategy[key] = value()
    if strategy:
        spec["strategy"] = strategy
    model: dict[str, Any] = {}
    if rng.random() < 0.5:
        model["source"] = rng.choice(["file", "firstClient"])
    if model.get("source") == "file" or rng.random() < 0.1:
        model["path"] = "/m.npz"
    spec["model"] = model
    spec.pop("transfer", None)
    spec.pop("timeouts", None)
    for section, key, choices in (
        ("transfer", "chunkTimeoutSeconds", [5, 30, 119.5, 121]),
        ("transfer", "idleTimeoutSeconds", [10, 120, 200.25]),
        ("timeouts", "roundSeconds", [30, 120, 200.25, 3600]),
    ):
        if rng.random() < 0.3:
            spec.setdefault(section, {})[key] = rng.choice(choices)
    return spec


def _random_specs() -> Iterator[dict[str, Any]]:
    rng = random.Random(14)
    for _ in range(300):
        yield _random_spec(rng)


def test_cel_rules_agree_with_the_model_on_generated_specs() -> None:
    verdicts = {True: 0, False: 0}
    for spec in _random_specs():
        _, errors, _ = lint({**_EXAMPLE, "spec": spec})
        cel_ok = not failing(spec)
        assert cel_ok == (not errors), f"CEL says {cel_ok}, the model {[str(e) for e in errors]} for {spec}"
        verdicts[cel_ok] += 1
    assert min(verdicts.values()) > 60, verdicts  # both verdicts well exercised


@pytest.mark.parametrize("field", rules_mod.spec_field_names())
def test_a_running_job_takes_edits_only_to_suspend_and_ttl(field: str) -> None:
    old = full_manifest()["spec"]
    new = copy.deepcopy(old)
    changed = {"suspend": True, "ttlSecondsAfterFinished": 60}.get(field, "changed")
    new[field] = changed
    added = copy.deepcopy(old)
    added.pop(field, None)  # removing (or adding back) the field is an edit as well
    if field in rules_mod.MUTABLE_SPEC_FIELDS:
        assert failing(new, old) == set() == failing(added, old) == failing(old, added)
    else:
        assert failing(new, old) == {f"immutable:{field}"}
        if field in old:
            assert failing(added, old) == {f"immutable:{field}"} == failing(old, added)
    assert rules_mod.changed_immutable_fields(old, new) == ([] if field in rules_mod.MUTABLE_SPEC_FIELDS else [field])
