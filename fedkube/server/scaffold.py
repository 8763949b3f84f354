"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning").

Client drift on non-IID data is corrected with control variates: the server
keeps ``c`` (the mean of the clients' variates), each client ``c_i``; a client
trains with the corrected gradient ``g - c_i + c`` and returns its model ``y_i``
and ``Δc_i = c_i⁺ - c_i`` (option II: ``c_i⁺ = c_i - c + (x - y_i)/(K·lr)``,
``fedkube.trainer_sdk.scaffold``). The server (Algorithm 1, lines 16-17)::

    x ← x + η_g · mean_S(y_i - x)            mean weighted as spec.strategy.weighting says
    c ← c + (|S|/N) · mean_S(Δc_i)           always unweighted: c stays the mean of all N clients' c_i

with ``S`` the results accepted this round and ``N`` the job's sites. ``η_g`` is
``spec.strategy.serverLr`` (1.0, the paper's choice, makes the model step
FedAvg's mean exactly).

On the wire: every task of a train round carries ``c`` next to the model, each
float tensor's variate named ``scaffold/<tensor>`` in the tensor's dtype and
shape (:data:`fedkube.protocol.SCAFFOLD_PREFIX`); the trainer pulls them through
the ordinary download path. A result must carry exactly the model's tensors
plus one ``Δc_i`` per float tensor under the same names; the round checks the
announcement against the published tensors (``fedkube.server.model.check_result``)
before a byte moves, and a job of any other strategy refuses such tensors by
name. Integer tensors have no gradient and no variate: they take FedAvg's value.

Memory: two streaming means (``fedkube.server.aggregate``), one for the
models and one for the variates, plus ``c`` itself, all in accumulator
precision (float32; float64 for float64 tensors): about 4xS for a float32 model
of S bytes against FedAvg's 2xS, whatever the number of sites. ``c`` is never
updated in place (the round's variate mean becomes the next ``c``), so a
checkpoint write or a transfer still holding the old one needs no wait.

Checkpoints hold ``c`` as ``c/<tensor>`` (``state()``); a resumed job takes it
back bit for bit, and :meth:`Scaffold.check_resume` refuses a checkpoint whose
``c`` is missing or does not fit the model before any round starts.

SCAFFOLD does not clip and takes no central DP (the spec refuses them): a
clipped model update with an unclipped variate, or noise on one of them, would
stop ``c`` from being the clients' mean, which the correction relies on.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import numpy as np

from fedkube.errors import ConfigError
from fedkube.protocol import SCAFFOLD_PREFIX
from fedkube.server.aggregate import (
    AggregationError,
    DiscardOutcome,
    Intake,
    WeightedMean,
    accumulator_dtype,
    cast_to,
)
from fedkube.server.influence import Bounded, Influence
from fedkube.server.model import Model, ModelSpec, TensorSpec
from fedkube.server.pool import ArrayPool
from fedkube.server.strategies import _check_name, _mean_aggregator, _Recycler, _spec_of, _StreamingMeanAggregator
from fedkube.server.strategy_api import StrategyState

VARIATE_STATE = "c/"
"""Prefix of ``c``'s tensors in the strategy state (the checkpoint)."""


def variate_spec(spec: ModelSpec) -> ModelSpec:
    """The control variates of a model: one per float tensor, ``scaffold/<name>``, same dtype and shape."""
    return ModelSpec(tuple(TensorSpec(SCAFFOLD_PREFIX + t.name, t.dtype, t.shape) for t in spec if t.is_float))


class ScaffoldAggregator:
    """One round: the models into a (weighted) streaming mean, the ``Δc_i`` into an unweighted one.

    A RoundAggregator, StreamingAggregator and BoundsInfluence (the weight a
    site's model counted with, for the status); every call is routed to the
    model or the variate engine by the tensor's name.
    """

    def __init__(self, strategy: Scaffold, spec: ModelSpec, model: Model) -> None:
        self._strategy = strategy
        self._spec = spec
        self._model = model
        self.variates = WeightedMean(variate_spec(spec))
        agg = _mean_aggregator(spec, False, self._finish_model, strategy.pool, strategy.influence, model,
                               lambda norms: None)  # fmt: skip
        assert isinstance(agg, _StreamingMeanAggregator)
        self.models = agg

    @staticmethod
    def _is_variate(name: str) -> bool:
        return name.startswith(SCAFFOLD_PREFIX)

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        if self._is_variate(name):
            return self.variates.add(client, name, array, 1.0)  # c is the plain mean of the c_i (see module doc)
        return self.models.add(client, name, array, weight)

    def intake(
        self, client: str, name: str, dtype: str, shape: tuple[int, ...], weight: float, *,
        abort: threading.Event | None = None,
    ) -> Intake:  # fmt: skip
        if self._is_variate(name):
            return self.variates.intake(client, name, dtype, shape, 1.0, abort=abort)
        return self.models.intake(client, name, dtype, shape, weight, abort=abort)

    def bound(self, client: str) -> Bounded:
        return self.models.bound(client)

    def commit(self, client: str) -> None:
        # The round checked the announced names against model + variates (check_result) before any download, so
        # both halves are complete here; the variates go first so an incomplete one refuses before the model counts.
        self.variates.commit(client)
        self.models.commit(client)

    def discard(self, client: str, *, rebuild: bool = True) -> DiscardOutcome:
        a = self.models.discard(client, rebuild=rebuild)
        b = self.variates.discard(client, rebuild=rebuild)
        return DiscardOutcome(client, (*a.kept_tensors, *b.kept_tensors), {**a.rebuild, **b.rebuild})

    def refold(self, client: str, name: str, array: np.ndarray, *, abort: threading.Event | None = None) -> bool:
        engine = self.variates if self._is_variate(name) else self.models
        return engine.refold(client, name, array, abort=abort)

    def owed(self) -> dict[str, tuple[str, ...]]:
        return {**self.models.owed(), **self.variates.owed()}

    def reopen(self, client: str, new_key: str | None = None) -> tuple[str, ...]:
        return (*self.models.reopen(client, new_key), *self.variates.reopen(client, new_key))

    @property
    def committed(self) -> tuple[str, ...]:
        return self.models.committed

    def finish(self) -> Model:
        """The new global model; the strategy's ``c`` is replaced by the round's update of it."""
        accepted = len(self.variates.committed)
        means = self.variates.means()  # before the model's finish: a refused round changes neither x nor c
        new_model = self.models.finish()
        self._strategy.c = self._strategy.updated_variates(self._spec, means, accepted)
        return new_model

    def _finish_model(self, means: dict[str, np.ndarray]) -> Model:
        return self._strategy.model_step(self._spec, self._model, means)


class Scaffold:
    """SCAFFOLD's server side: the model step with ``η_g`` and the server control variate ``c``."""

    name = "scaffold"
    params = {"serverLr": "server_lr"}

    def __init__(self, *, sites: int, server_lr: float = 1.0, influence: Influence | None = None) -> None:
        if not (isinstance(server_lr, (int, float)) and math.isfinite(server_lr) and server_lr > 0):
            raise ConfigError(f"spec.strategy.serverLr={server_lr!r} must be a finite number > 0 for scaffold")
        if not (isinstance(sites, int) and sites >= 1):
            raise ConfigError(f"scaffold needs the job's number of sites (N >= 1) for its c update, got {sites!r}")
        influence = influence or Influence()
        if influence.clip_norm is not None:
            raise ConfigError("spec.strategy: scaffold does not clip; remove clipNorm (fedkube.server.scaffold)")
        self.server_lr = float(server_lr)
        self.sites = sites
        self.influence = influence
        self.task_settings: dict[str, str] = {}
        self.c: dict[str, np.ndarray] = {}
        """The server control variate, float tensor name -> array in accumulator precision."""
        self._recycler = _Recycler()

    @property
    def pool(self) -> ArrayPool:
        """Where superseded global models wait to become the model mean's accumulators."""
        return self._recycler.pool

    def _variates(self, spec: ModelSpec) -> dict[str, np.ndarray]:
        """``c`` for ``spec``'s float tensors: zeros (the paper's initialisation) where none is kept yet."""
        out: dict[str, np.ndarray] = {}
        for t in spec:
            if not t.is_float:
                continue
            c = self.c.get(t.name)
            out[t.name] = c if c is not None else np.zeros(t.shape, accumulator_dtype(t))
        return out

    def task_tensors(self, model: Mapping[str, np.ndarray]) -> Model:
        """The tensors every train task carries besides the model: ``c`` as ``scaffold/<name>``, model dtypes."""
        spec = _spec_of(model)
        _check_no_reserved(spec)
        c = self.c = self._variates(spec)
        return {SCAFFOLD_PREFIX + t.name: cast_to(t, c[t.name]) for t in spec if t.is_float}

    def begin_round(self, global_model: Mapping[str, np.ndarray]) -> ScaffoldAggregator:
        spec = _spec_of(global_model)
        _check_no_reserved(spec)
        self._recycler.supersede(global_model)
        return ScaffoldAggregator(self, spec, dict(global_model))

    def model_step(self, spec: ModelSpec, model: Mapping[str, np.ndarray], means: Mapping[str, np.ndarray]) -> Model:
        """``x + η_g·(avg - x)`` per float tensor in accumulator precision, cast once; ``avg`` itself at η_g = 1."""
        out: Model = {}
        for t in spec:
            avg = means[t.name]
            if t.is_float and self.server_lr != 1.0:
                x = np.asarray(model[t.name]).astype(accumulator_dtype(t))
                step = avg - x
                step *= self.server_lr
                x += step
                avg = x
            out[t.name] = cast_to(t, avg)
        return out

    def updated_variates(self, spec: ModelSpec, means: Mapping[str, np.ndarray], accepted: int) -> Model:
        """``c + (|S|/N)·mean(Δc_i)``, into the round's mean arrays (they are the engine's, free after finish)."""
        if accepted < 1:
            raise AggregationError("scaffold: no result was accepted this round; c cannot be updated")
        fraction = accepted / self.sites
        current = self._variates(spec)
        out: dict[str, np.ndarray] = {}
        for name, c in current.items():
            mean = means[SCAFFOLD_PREFIX + name]
            mean *= mean.dtype.type(fraction)
            mean += c
            out[name] = mean
        return out

    def state(self) -> StrategyState:
        """``c`` as live arrays (never updated in place, so no copy), with η_g and N for the record."""
        return StrategyState(self.name, {"serverLr": self.server_lr, "sites": self.sites},
                             {VARIATE_STATE + name: arr for name, arr in self.c.items()})  # fmt: skip

    def load_state(self, state: StrategyState) -> None:
        _check_name(self.name, state)
        c: dict[str, np.ndarray] = {}
        for key, arr in state.tensors.items():
            if not key.startswith(VARIATE_STATE) or key == VARIATE_STATE:
                raise ConfigError(f"the checkpoint's scaffold state has an unexpected tensor {key!r}; expected "
                                  f"'{VARIATE_STATE}<tensor>' (the server control variate); start from a fresh "
                                  "checkpoint directory")  # fmt: skip
            c[key[len(VARIATE_STATE) :]] = np.array(arr, copy=True)
        if not c:
            raise ConfigError("the checkpoint of this scaffold job holds no server control variate c; resuming "
                              "without it would restart c at zero while the sites keep theirs, and the correction "
                              "would be wrong; restore the checkpoint's strategy tensors or start from a fresh "
                              "checkpoint directory")  # fmt: skip
        # serverLr may change on resume (like FedAdam's); N is the spec's, today's.
        self.c = c

    def check_resume(self, model: Mapping[str, np.ndarray]) -> None:
        """Refuse (ConfigError) a loaded ``c`` that does not fit the checkpoint's model, before any round."""
        spec = _spec_of(model)
        _check_no_reserved(spec)
        floats = {t.name: t for t in spec if t.is_float}
        problems: list[str] = []
        missing = [n for n in floats if n not in self.c]
        extra = [n for n in self.c if n not in floats]
        if missing:
            problems.append(f"no variate for {len(missing)} float tensor(s), first {missing[0]!r}")
        if extra:
            problems.append(f"variates for {len(extra)} tensor(s) the model has no float tensor of, first {extra[0]!r}")
        for name, t in floats.items():
            arr = self.c.get(name)
            if arr is None:
                continue
            if tuple(arr.shape) != t.shape or arr.dtype != accumulator_dtype(t):
                problems.append(f"the variate of {name!r} is {arr.dtype}{tuple(arr.shape)}, the model needs "
                                f"{accumulator_dtype(t)}{t.shape}")  # fmt: skip
        if problems:
            raise ConfigError("the checkpoint's scaffold server control variate c does not fit its model: "
                              + "; ".join(problems[:4]) + "; start from a fresh checkpoint directory "
                              "or restore the checkpoint's strategy tensors")  # fmt: skip


def _check_no_reserved(spec: ModelSpec) -> None:
    clash = [n for n in spec.names if n.startswith(SCAFFOLD_PREFIX)]
    if clash:
        raise ConfigError(f"the model has tensor(s) named {clash[:3]} under {SCAFFOLD_PREFIX!r}, which scaffold "
                          "reserves for its control variates; rename them in the model")


def build_scaffold(params: Mapping[str, object], influence: Influence | None, sites: int | None) -> Scaffold:
    """The scaffold strategy from the spec's parameters (``serverLr``); ``sites`` is N, the job's sites."""
    params = dict(params)
    for refused in ("privacy", "proximalMu", "staged"):
        if params.pop(refused, None) is not None:
            raise ConfigError(f"spec.strategy: scaffold takes no {refused} (fedkube.server.scaffold says why)")
    unknown = sorted(set(params) - set(Scaffold.params))
    if unknown:
        raise ConfigError(f"spec.strategy: unknown scaffold parameter(s) {unknown}; known: {sorted(Scaffold.params)}")
    if sites is None:
        raise ConfigError("scaffold needs the job's number of sites (build_strategy(..., sites=N))")
    lr = params.get("serverLr", 1.0)
    if not isinstance(lr, (int, float)):
        raise ConfigError(f"spec.strategy.serverLr={lr!r} is not a number")
    return Scaffold(sites=sites, server_lr=float(lr), influence=influence)


__all__ = ["VARIATE_STATE", "Scaffold", "ScaffoldAggregator", "build_scaffold", "variate_spec"]
