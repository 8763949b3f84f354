"""CEL `x-kubernetes-validations` of the FLJob CRD: the spec model's cross-field errors, checked at `kubectl apply`.

The API server cannot run pydantic or :mod:`fedkube.spec.checks`, so the rules
that span fields are restated here in CEL, next to the defaults they read from
the same models (the CRD leaves defaults out, so a rule must treat an absent
field as its default). ``tests/unit/spec/test_cel.py`` evaluates every rule and
checks that it agrees with the model's verdict on generated specs, so the two
validators cannot drift.

Only core CEL is used (no Kubernetes extension libraries), and no rule iterates
over a list or string: their cost stays constant, whatever the size of the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedkube.spec.model import FLJobSpec, ModelSource, Timeouts, Transfer
from fedkube.spec.strategy import ROBUST_DEFAULTS, ROBUST_STRATEGY_NAMES, Strategy, parameter_owners

# Fields a running job may change: suspending/resuming and the cleanup delay act on the pods, not the training;
# revoking a site (fedkube.spec.revocation) acts on who may connect.
MUTABLE_SPEC_FIELDS = ("suspend", "ttlSecondsAfterFinished", "revokedSites")


@dataclass(frozen=True)
class Rule:
    """One CEL rule on the schema node at ``at`` (property names below ``spec``; ``()`` is spec itself)."""

    id: str  # stable name, for tests and for the operator's condition
    at: tuple[str, ...]
    rule: str
    message: str
    field_path: str | None = None  # relative to the node, as the API server reports it

    def manifest(self) -> dict[str, Any]:
        """The entry of ``x-kubernetes-validations``."""
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out

    @property
    def transition(self) -> bool:
        """A transition rule (it reads ``oldSelf``): the API server checks it on updates only."""
        return "oldSelf" in self.rule


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, float):
        return repr(value) if "." in repr(value) or "e" in repr(value) else f"{value!r}.0"
    return str(value)


def _field(obj: str, path: tuple[str, ...], default: Any) -> str:
    """CEL for ``obj.path`` that reads ``default`` where the manifest leaves a step out."""
    steps = [f"{obj}.{'.'.join(path[: i + 1])}" for i in range(len(path))]
    present = " && ".join(f"has({s})" for s in steps)
    return f"({present} ? {steps[-1]} : {_literal(default)})"


def _alias(model: type, field: str) -> str:
    return model.model_fields[field].alias or field  # type: ignore[attr-defined]


_T, _X = Timeouts(), Transfer()
_CHUNK = _field("self", ("transfer", "chunkTimeoutSeconds"), _X.chunk_timeout_seconds)
_IDLE = _field("self", ("transfer", "idleTimeoutSeconds"), _X.idle_timeout_seconds)
_ROUND = _field("self", ("timeouts", "roundSeconds"), _T.round_seconds)
_NAME_DEFAULT = Strategy.model_fields["name"].default
_SPEC_NAME = _field("self", ("strategy", "name"), _NAME_DEFAULT)
_NAME = _field("self", ("name",), _NAME_DEFAULT)
_SOURCE = _field("self", ("source",), ModelSource.model_fields["source"].default)
_TRIM = _field("self", ("strategy", "trimFraction"), float(ROBUST_DEFAULTS["trim_fraction"][1]))
_F = _field("self", ("strategy", "byzantine"), ROBUST_DEFAULTS["byzantine"][1])
_M = _field("self", ("strategy", "krumSelect"), ROBUST_DEFAULTS["krum_select"][1])
_ROBUST = "[" + ", ".join(_literal(n) for n in ROBUST_STRATEGY_NAMES) + "]"


def _spec_rules() -> list[Rule]:
    return [
        Rule("minClients", (), "!has(self.minClients) || self.minClients <= size(self.clients)",
             "minClients must be at most the number of client sites; lower minClients or add sites",
             ".minClients"),
        Rule("idleTimeout", (), f"{_IDLE} >= {_CHUNK}",
             "transfer.idleTimeoutSeconds must be at least transfer.chunkTimeoutSeconds: a transfer would be "
             "declared stalled before one chunk request may time out", ".transfer.idleTimeoutSeconds"),
        Rule("roundSeconds", (), f"{_ROUND} >= {_IDLE}",
             "timeouts.roundSeconds must be at least transfer.idleTimeoutSeconds: rounds would end before a "
             "stalled transfer can be detected", ".timeouts.roundSeconds"),
        # fedkube.spec.strategy.min_results, one strategy at a time; floor(b*n + 1e-9) >= 1 is b*n + 1e-9 >= 1.
        Rule("medianClients", (), f"{_SPEC_NAME} != 'median' || size(self.clients) >= 3",
             "strategy median needs at least 3 client sites; add sites or choose another strategy", ".clients"),
        Rule("trimmedmeanClients", (),
             f"{_SPEC_NAME} != 'trimmedmean' || {_TRIM} <= 0.0 || double(size(self.clients)) * {_TRIM} + 1e-9 >= 1.0",
             "strategy trimmedmean trims floor(trimFraction * sites) results at each end, which is none with this "
             "few client sites; add sites (at least 1/trimFraction) or lower trimFraction", ".clients"),
        Rule("krumClients", (),
             f"{_SPEC_NAME} != 'krum' || (size(self.clients) >= 2 * {_F} + 3 && size(self.clients) >= {_F} + {_M})",
             "strategy krum needs at least max(2*byzantine + 3, byzantine + krumSelect) client sites; add sites "
             "or lower byzantine/krumSelect", ".clients"),
    ]


def _model_rules() -> list[Rule]:
    return [
        Rule("modelFilePath", ("model",), f"{_SOURCE} != 'file' || has(self.path)",
             "model source 'file' needs a path: set model.path to the weights file inside the server pod", ".path"),
        Rule("modelFirstClientPath", ("model",), f"{_SOURCE} != 'firstClient' || !has(self.path)",
             "model source 'firstClient' ignores model.path: remove it, or set model.source to file", ".path"),
    ]


def _strategy_rules() -> list[Rule]:
    # Every owner of a parameter (serverLr is fedadam's, fedyogi's, fedadagrad's and scaffold's), as validate says.
    rules = [
        Rule(f"only:{_alias(Strategy, field)}", ("strategy",),
             f"!has(self.{_alias(Strategy, field)}) || {_NAME} in [{', '.join(_literal(o) for o in owners)}]",
             f"{_alias(Strategy, field)} is a {owners[0]} parameter: remove it, or set strategy.name to "
             f"{' or '.join(owners)}", f".{_alias(Strategy, field)}")
        for field, owners in parameter_owners().items()
    ]
    weighting = _field("self", ("weighting",), Strategy.model_fields["weighting"].default)
    rules += [
        Rule("equalWeighting", ("strategy",), f"{weighting} != 'equal' || !has(self.maxExamplesPerSite)",
             "maxExamplesPerSite caps num_examples, which weighting=equal ignores; remove maxExamplesPerSite or "
             "set weighting to examples", ".maxExamplesPerSite"),
        Rule("clipLearningRate", ("strategy",), "!has(self.clipLearningRate) || has(self.clipQuantile)",
             "clipLearningRate is the step of clipQuantile's adaptation; set clipQuantile too or remove "
             "clipLearningRate", ".clipLearningRate"),
        Rule("clipQuantile", ("strategy",), "!has(self.clipQuantile) || has(self.clipNorm)",
             "clipQuantile adapts clipNorm from its first value; set clipNorm too (e.g. 1.0)", ".clipQuantile"),
        Rule("robustBounds", ("strategy",),
             f"!({_NAME} in {_ROBUST}) || ({weighting} == 'examples' && !has(self.maxExamplesPerSite) && "
             "!has(self.clipNorm))",
             "median, trimmedmean and krum ignore num_examples and do not clip: remove weighting, "
             "maxExamplesPerSite and clipNorm, or use fedavg/fedadam with these bounds"),
        Rule("scaffoldBounds", ("strategy",), f"{_NAME} != 'scaffold' || (!has(self.clipNorm) && !has(self.privacy))",
             "scaffold does not clip and takes no privacy: its control variates assume every accepted update counts "
             "whole; remove clipNorm and privacy, or use fedavg/fedadam"),
    ]
    return rules


def _immutable_rules() -> list[Rule]:
    # One rule per field, so the API server names the field that changed; has() on both sides also catches
    # a field added or removed, which a rule on the field itself would never see.
    return [
        Rule(f"immutable:{name}", (),
             f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name})",
             f"spec.{name} cannot change once the FLJob exists (only {' and '.join(MUTABLE_SPEC_FIELDS)} can); "
             "delete the FLJob and create it again with the new spec", f".{name}")
        for name in spec_field_names() if name not in MUTABLE_SPEC_FIELDS
    ]


def spec_field_names() -> list[str]:
    """The spec's fields, as the manifest spells them."""
    return [_alias(FLJobSpec, f) for f in FLJobSpec.model_fields]


def rules() -> list[Rule]:
    """Every CEL rule of the FLJob spec."""
    return [*_spec_rules(), *_model_rules(), *_strategy_rules(), *_immutable_rules()]


def attach(spec_schema: dict[str, Any]) -> dict[str, Any]:
    """Add the rules to the structural schema of ``spec`` (in place, and returned)."""
    for rule in rules():
        node = spec_schema
        for name in rule.at:
            node = node["properties"][name]
        node.setdefault("x-kubernetes-validations", []).append(rule.manifest())
    return spec_schema


def changed_immutable_fields(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """The spec fields (manifest names) an edit changed that a running job cannot take, sorted."""
    old, new = old or {}, new or {}
    return sorted(k for k in set(old) | set(new) if k not in MUTABLE_SPEC_FIELDS and old.get(k) != new.get(k))
