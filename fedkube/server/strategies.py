"""Aggregation strategies behind one small, streaming interface.

A round goes::

    agg = strategy.begin_round(global_model)        # dict name -> ndarray
    agg.add(client, name, array, weight)            # each tensor as it is downloaded
    agg.commit(client) | agg.discard(client)        # result complete | download failed
    new_global = agg.finish()                       # dict name -> ndarray, global dtypes

``weight`` is the client's claimed ``num_examples``; the mean aggregators
weight it as ``spec.strategy.weighting``/``maxExamplesPerSite`` say and fold
each update clipped to ``clipNorm`` at the scale a norm pre-pass over the
result measured (``fedkube.server.prepass``; ``fedkube.server.influence`` has
the design and its costs). The interfaces are in ``strategy_api``; the
averaging engine, its accumulator precision and its memory math in
``fedkube.server.aggregate``.

Strategies:

* ``FedAvg``: the new global model is the per-tensor weighted mean.
* ``FedAdam`` (Reddi et al. 2021, "Adaptive Federated Optimization",
  Algorithm 2): with the weighted mean ``avg`` and the global model ``x``,
  ``Δ = avg - x; m = β1·m + (1-β1)·Δ; v = β2·v + (1-β2)·Δ²;
  x = x + η·m / (√v + τ)``, with ``m`` starting at 0 and ``v`` at τ² (the
  paper's ``v_{-1} ≥ τ²``). m and v are float32 (float64 for float64
  tensors), stored in checkpoints through ``state()``/``load_state()``.
  Integer/bool tensors have no gradient; they take FedAvg's value. FedAdam
  needs 2xS more memory than FedAvg for m and v: that is the optimizer's
  state, not an aggregation cost.
* ``FedYogi`` and ``FedAdagrad``: the same algorithm with the paper's other
  second moments, ``v = v - (1-β2)·Δ²·sign(v - Δ²)`` (Yogi) and
  ``v = v + Δ²`` (Adagrad, which has no β2); the same state and memory.
* ``median``, ``trimmedmean``, ``krum``: robust to a minority of bad
  results; they need all N results at once and stage them on disk
  (``fedkube.server.robust``, which documents their memory and disk cost).
* ``scaffold``: FedAvg's mean plus control variates (``fedkube.server.scaffold``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.errors import ConfigError, FedkubeError
from fedkube.protocol import PROXIMAL_MU_KEY
from fedkube.server.aggregate import (
    BLOCK,
    AggregationError,
    DiscardOutcome,
    Intake,
    WeightedMean,
    accumulator_dtype,
    cast_to,
)
from fedkube.server.dp import CentralDP, load_privacy, privacy_meta
from fedkube.server.influence import Bounded, Influence, SiteInfluence
from fedkube.server.model import Model, ModelSpec
from fedkube.server.pool import ArrayPool
from fedkube.server.prepass import ClipHints, NormPrepass
from fedkube.server.robust import ROBUST_STRATEGIES, build_robust
from fedkube.server.strategy_api import JSONValue, RoundAggregator, Strategy, StrategyState

log = logging.getLogger(__name__)


class _MeanAggregator(NormPrepass):
    """RoundAggregator whose finish() hands the per-tensor means to a callback; bounds each result's influence."""

    def __init__(
        self, spec: ModelSpec, staged: bool, finish_fn: Any, pool: ArrayPool | None = None,
        influence: Influence | None = None, reference: Mapping[str, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        self.influence = influence or Influence()
        measure = reference if self.influence.measures_norm else None
        self.engine = WeightedMean(spec, staged=staged, pool=pool, reference=measure)
        self._finish_fn = finish_fn
        self._claims: dict[str, float] = {}  # client -> num_examples as claimed
        self._norms: dict[str, float] = {}  # client -> its update norm, measured by bound()
        self.adapt: Callable[[list[float]], None] = lambda norms: None  # the strategy's, for the next round
        self.noise: Callable[[dict[str, np.ndarray], int], None] | None = None  # central DP (fedkube.server.dp)

    def _weight(self, client: str, claimed: float) -> float:
        self._claims[client] = float(claimed)
        return self.influence.weight(float(claimed))

    def add(self, client: str, name: str, array: np.ndarray, weight: float) -> bool:
        return self.engine.add(client, name, array, self._weight(client, weight))

    def bound(self, client: str) -> Bounded:
        """Measure ``client``'s finished result and clip its update (see ``BoundsInfluence``)."""
        claimed = self._claims.get(client)
        weight = self.influence.weight(claimed) if claimed is not None else 0.0
        norm = self.engine.update_norm(client)
        scale = self.influence.scale(norm) if norm is not None else 1.0
        rebuild = self.engine.rescale(client, scale) if scale < 1.0 and not self.engine.prescaled(client) else {}
        if norm is not None:
            self._norms[client] = norm
        self.settle(client, norm, scale)
        capped = claimed is not None and self.influence.capped(claimed)
        site = SiteInfluence(client, claimed if claimed is not None else 0.0, weight, norm, scale, capped)
        return Bounded(site, rebuild)

    def commit(self, client: str) -> None:
        self.engine.commit(client)

    def discard(self, client: str, *, rebuild: bool = True) -> DiscardOutcome:
        return self.engine.discard(client, rebuild=rebuild)

    def refold(self, client: str, name: str, array: np.ndarray, *, abort: threading.Event | None = None) -> bool:
        return self.engine.refold(client, name, array, abort=abort)

    def owed(self) -> dict[str, tuple[str, ...]]:
        return self.engine.owed()

    def reopen(self, client: str, new_key: str | None = None) -> tuple[str, ...]:
        if new_key is not None and client in self._claims:  # the same result: its claim, should nothing be re-added
            self._claims.setdefault(new_key, self._claims[client])
        return self.engine.reopen(client, new_key)

    def finish(self) -> Model:
        means = self.engine.means()
        if self.noise is not None:
            self.noise(means, len(self.engine.committed))
        result: Model = self._finish_fn(means)
        self.adapt(self.norms())  # the next round's bound (fedkube.server.influence, "Adaptive bound")
        return result

    def norms(self) -> list[float]:
        """Update norms of the committed results (after ``finish``: the round's accepted results)."""
        return [self._norms[c] for c in self.engine.committed if c in self._norms]

    @property
    def committed(self) -> tuple[str, ...]:
        return self.engine.committed


class _StreamingMeanAggregator(_MeanAggregator):
    """The streaming (not staged) mean: a StreamingAggregator, receiving into its accumulators."""

    def __init__(
        self, spec: ModelSpec, finish_fn: Any, pool: ArrayPool | None = None, influence: Influence | None = None,
        reference: Mapping[str, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(spec, False, finish_fn, pool, influence, reference)

    def intake(
        self, client: str, name: str, dtype: str, shape: tuple[int, ...], weight: float, *,
        abort: threading.Event | None = None,
    ) -> Intake:  # fmt: skip
        return self.engine.intake(client, name, dtype, shape, self._weight(client, weight), abort=abort)


def _mean_aggregator(
    spec: ModelSpec, staged: bool, finish_fn: Any, pool: ArrayPool, influence: Influence,
    reference: Mapping[str, np.ndarray], adapt: Callable[[list[float]], None], privacy: CentralDP | None = None,
    hints: ClipHints | None = None,
) -> RoundAggregator:  # fmt: skip
    agg = (_MeanAggregator(spec, True, finish_fn, pool, influence, reference) if staged
           else _StreamingMeanAggregator(spec, finish_fn, pool, influence, reference))  # fmt: skip
    agg.adapt = adapt
    agg.hints = hints.begin_round() if hints is not None else None
    if privacy is not None:
        privacy.check_budget()  # before the round starts: a refused round sends no task
        agg.noise = lambda means, results: privacy.add_noise(spec, means, reference, results)
    return agg


class _Recycler:
    """Hands each superseded global model to an ArrayPool, so the next round accumulates into its memory.

    ``begin_round(model)`` means the model of the round before is no longer
    the global model. It is retired, not reused at once: the pool hands an
    array out only when nothing else (a checkpoint write, a transfer, the
    caller) still refers to it.
    """

    def __init__(self) -> None:
        self.pool = ArrayPool()
        self._current: list[np.ndarray] = []

    def supersede(self, global_model: Mapping[str, np.ndarray]) -> None:
        pool = self.pool
        if self._current:
            log.info("accumulators of the round before: %d recycled, %d newly allocated, %d recyclable ones "
                     "still referenced elsewhere", pool.reused, pool.allocated, pool.busy)
        pool.reused = pool.allocated = pool.busy = 0
        previous, self._current = self._current, list(global_model.values())
        live = {id(a) for a in self._current}
        pool.retire(a for a in previous if id(a) not in live)


def _spec_of(global_model: Mapping[str, np.ndarray]) -> ModelSpec:
    if not global_model:
        raise AggregationError("the global model has no tensors; nothing to aggregate")
    return ModelSpec.of(global_model)


class FedAvg:
    """Federated averaging weighted by num_examples (McMahan et al. 2017)."""

    name = "fedavg"
    task_settings: dict[str, str]  # ConfiguresTasks: FedProx's mu (build_strategy), else empty

    def __init__(
        self, *, staged: bool = False, influence: Influence | None = None, privacy: CentralDP | None = None
    ) -> None:
        self.staged = staged
        self.influence = influence or Influence()
        self.privacy = privacy
        self.task_settings = {}
        self._recycler = _Recycler()
        self.hints = ClipHints()  # which sites' results are pre-passed (fedkube.server.prepass)

    @property
    def pool(self) -> ArrayPool:
        """Where superseded global models wait to become accumulators."""
        return self._recycler.pool

    def begin_round(self, global_model: Mapping[str, np.ndarray]) -> RoundAggregator:
        spec = _spec_of(global_model)
        self._recycler.supersede(global_model)
        return _mean_aggregator(
            spec, self.staged, lambda means: {t.name: cast_to(t, means[t.name]) for t in spec}, self.pool,
            self.influence, global_model, self._adapt, self.privacy, self.hints,
        )  # fmt: skip

    def _adapt(self, norms: list[float]) -> None:
        self.influence = _adapted(self.influence, norms)

    def state(self) -> StrategyState:
        return StrategyState(self.name, {"staged": self.staged, **_clip_state(self.influence),
                                         **privacy_meta(self.privacy), **self.hints.meta()})  # fmt: skip

    def load_state(self, state: StrategyState) -> None:
        _check_name(self.name, state)
        self.influence = _load_clip(self.influence, state)
        load_privacy(self.privacy, state.meta)
        self.hints.load(state.meta)


def _adapted(influence: Influence, norms: list[float]) -> Influence:
    after = influence.adapted(norms)
    if after.clip_norm != influence.clip_norm:
        log.info("clipNorm adapted from %.6g to %.6g: %d of %d update norms were within it (clipQuantile %g)",
                 influence.clip_norm, after.clip_norm, sum(1 for n in norms if n <= (influence.clip_norm or 0)),
                 len(norms), influence.clip_quantile)  # fmt: skip
    return after


def _clip_state(influence: Influence) -> dict[str, JSONValue]:
    """The adapted clipNorm, for the checkpoint (nothing when the bound is fixed: the spec has it)."""
    return {"clipNorm": influence.clip_norm} if influence.clip_quantile is not None else {}


def _load_clip(influence: Influence, state: StrategyState) -> Influence:
    """The bounds to resume with: the checkpoint's adapted clipNorm when the spec still adapts it."""
    value = state.meta.get("clipNorm")
    if influence.clip_quantile is None or value is None:
        return influence
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"the checkpoint's adapted clipNorm {value!r} is not a positive number; start from a "
                          "fresh checkpoint directory or remove spec.strategy.clipQuantile")
    return dataclasses.replace(influence, clip_norm=float(value))


def _check_name(expected: str, state: StrategyState) -> None:
    if state.name != expected:
        raise ConfigError(
            f"the checkpoint holds state of strategy {state.name!r}, but the job uses {expected!r}; "
            f"resume with spec.strategy.name={state.name!r} or start from a fresh checkpoint directory"
        )


class FedAdam:
    """Server-side Adam on the pseudo-gradient ``avg - global`` (Reddi et al. 2021)."""

    name = "fedadam"
    # The spec's parameters, camelCase -> keyword; FedAdagrad has no beta2.
    params = {"serverLr": "server_lr", "beta1": "beta1", "beta2": "beta2", "tau": "tau"}

    def __init__(
        self,
        *,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        staged: bool = False,
        influence: Influence | None = None,
        privacy: CentralDP | None = None,
    ) -> None:
        for field_name, value, lo, hi in (
            ("serverLr", server_lr, 0.0, math.inf),
            ("beta1", beta1, 0.0, 1.0),
            ("beta2", beta2, 0.0, 1.0),
            ("tau", tau, 0.0, math.inf),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value < hi):
                raise ConfigError(
                    f"spec.strategy.{field_name}={value!r} is out of range; it must be in [{lo}, {hi}) "
                    f"(and serverLr, tau > 0)"
                )
        if server_lr <= 0 or tau <= 0:
            raise ConfigError(f"spec.strategy serverLr={server_lr} and tau={tau} must both be > 0")
        self.server_lr = float(server_lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.staged = staged
        self.influence = influence or Influence()
        self.privacy = privacy
        self.task_settings: dict[str, str] = {}  # ConfiguresTasks: FedProx's mu (build_strategy)
        self._recycler = _Recycler()
        self.hints = ClipHints()  # which sites' results are pre-passed (fedkube.server.prepass)
        self.step = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @property
    def pool(self) -> ArrayPool:
        """Where superseded global models wait to become accumulators (never m or v)."""
        return self._recycler.pool

    def begin_round(self, global_model: Mapping[str, np.ndarray]) -> RoundAggregator:
        spec = _spec_of(global_model)
        self._recycler.supersede(global_model)
        model = dict(global_model)

        def finish(means: dict[str, np.ndarray]) -> Model:
            return self._apply(spec, model, means)

        return _mean_aggregator(spec, self.staged, finish, self.pool, self.influence, model, self._adapt,
                                self.privacy, self.hints)  # fmt: skip

    def _adapt(self, norms: list[float]) -> None:
        self.influence = _adapted(self.influence, norms)

    def _apply(self, spec: ModelSpec, model: Mapping[str, np.ndarray], means: dict[str, np.ndarray]) -> Model:
        out: Model = {}
        for t in spec:
            avg = means[t.name]
            if not t.is_float:
                out[t.name] = cast_to(t, avg)
                continue
            acc_dtype = accumulator_dtype(t)
            m = self.m.get(t.name)
            v = self.v.get(t.name)
            if m is None or v is None or m.shape != t.shape or m.dtype != acc_dtype:
                m = np.zeros(t.shape, acc_dtype)
                v = np.full(t.shape, self.tau * self.tau, acc_dtype)
            # In place, block by block, into reused scratch: avg's buffer becomes the new x, and no
            # temporary is allocated per block (fresh allocations cost page faults on every round).
            # Each line rounds exactly like the textbook expression in the docstring.
            fx, fa, fm, fv = (a.reshape(-1) for a in (model[t.name], avg, m, v))
            s_x, s_d, s_t = (np.empty(min(BLOCK, fa.size), acc_dtype) for _ in range(3))
            b1, lr, tau = self.beta1, self.server_lr, self.tau
            for start in range(0, fa.size, BLOCK):
                stop = min(start + BLOCK, fa.size)
                n = stop - start
                x, d, tmp = s_x[:n], s_d[:n], s_t[:n]
                bm, bv, ba = fm[start:stop], fv[start:stop], fa[start:stop]
                x[...] = fx[start:stop]
                np.subtract(ba, x, out=d)  # delta = avg - x
                bm *= b1  # m = b1*m + (1-b1)*delta
                np.multiply(d, 1.0 - b1, out=tmp)
                bm += tmp
                self._second_moment(bv, d, tmp)
                np.sqrt(bv, out=tmp)  # x = x + lr*m / (sqrt(v) + tau)
                tmp += tau
                np.multiply(bm, lr, out=d)
                d /= tmp
                np.add(x, d, out=ba)
            self.m[t.name] = m
            self.v[t.name] = v
            out[t.name] = cast_to(t, avg)
        self.step += 1
        return out

    def _second_moment(self, v: np.ndarray, delta: np.ndarray, tmp: np.ndarray) -> None:
        """v = b2*v + (1-b2)*delta^2, in place; ``tmp`` is scratch of v's size."""
        v *= self.beta2
        np.multiply(delta, delta, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp

    def state(self) -> StrategyState:
        """m and v as live arrays (no copy: they are 2xS): save them before the next round's finish() updates them."""
        tensors: dict[str, np.ndarray] = {}
        for name in self.m:
            tensors[f"m/{name}"] = self.m[name]
            tensors[f"v/{name}"] = self.v[name]
        meta = {
            "serverLr": self.server_lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "step": self.step,
            **_clip_state(self.influence),
            **privacy_meta(self.privacy),
            **self.hints.meta(),
        }
        return StrategyState(self.name, meta, tensors)

    def load_state(self, state: StrategyState) -> None:
        _check_name(self.name, state)
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        for key, arr in state.tensors.items():
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise ConfigError(
                    f"{self.name} state has an unexpected tensor {key!r}; expected 'm/<name>' or 'v/<name>'"
                )
            (m if kind == "m" else v)[name] = arr
        if m.keys() != v.keys():
            raise ConfigError(f"{self.name} state is inconsistent: m has {sorted(m)}, v has {sorted(v)}")
        # Hyper-parameters come from the spec (a user may change serverLr on resume); step comes from the state.
        self.step = int(state.meta.get("step", 0))
        self.influence = _load_clip(self.influence, state)
        load_privacy(self.privacy, state.meta)
        self.hints.load(state.meta)
        self.m = {k: np.array(a, copy=True) for k, a in m.items()}
        self.v = {k: np.array(a, copy=True) for k, a in v.items()}


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment (Reddi et al. 2021): v cannot grow by more than Δ² per round."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta: np.ndarray, tmp: np.ndarray) -> None:
        """v = v - (1-b2)*delta^2*sign(v - delta^2), in place, rounding like that expression."""
        d2 = np.multiply(delta, delta)
        np.subtract(v, d2, out=tmp)
        np.sign(tmp, out=tmp)
        d2 *= 1.0 - self.beta2
        d2 *= tmp
        v -= d2


class FedAdagrad(FedAdam):
    """FedAdam with Adagrad's second moment v = v + Δ² (Reddi et al. 2021); it takes no beta2."""

    name = "fedadagrad"
    params = {"serverLr": "server_lr", "beta1": "beta1", "tau": "tau"}

    def _second_moment(self, v: np.ndarray, delta: np.ndarray, tmp: np.ndarray) -> None:
        np.multiply(delta, delta, out=tmp)
        v += tmp


SERVER_OPTIMIZERS: dict[str, type[FedAdam]] = {c.name: c for c in (FedAdam, FedYogi, FedAdagrad)}
STRATEGIES = ("fedavg", *SERVER_OPTIMIZERS, *ROBUST_STRATEGIES, "scaffold")


def build_strategy(
    name: str, params: Mapping[str, Any] | None = None, influence: Influence | None = None, *,
    spill_dir: Path | None = None, rounds: int | None = None, sites: int | None = None,
) -> Strategy:
    """The strategy named in the spec, with its camelCase parameters (e.g. ``serverLr``) and influence bounds.

    ``spill_dir``: where the robust strategies (``fedkube.server.robust``, no ``influence`` bounds) stage results
    (None: a temp dir); ``rounds`` derives central DP's noise multiplier unless ``params["privacy"]`` sets one.
    """
    if name == "scaffold":  # built on this module's mean aggregator; sites is N, which its c update divides by
        from fedkube.server.scaffold import build_scaffold
        return build_scaffold(params or {}, influence, sites)
    params = dict(params or {})
    spec_privacy = params.pop("privacy", None)
    proximal_mu = params.pop("proximalMu", None)
    privacy = None
    if name in ROBUST_STRATEGIES and (spec_privacy is not None or proximal_mu is not None):
        raise ConfigError(f"spec.strategy: {name} takes no privacy or proximalMu; use fedavg or a server optimizer")
    if spec_privacy is not None:
        privacy = CentralDP.from_spec(spec_privacy, (influence or Influence()).clip_norm, rounds)
    if name in ROBUST_STRATEGIES:
        if influence is not None and influence != Influence():
            raise ConfigError(f"spec.strategy: {name} takes no weighting, maxExamplesPerSite or clipNorm")
        return build_robust(name, params, spill_dir)
    staged = bool(params.pop("staged", False))
    strategy: FedAvg | FedAdam
    if name == "fedavg":
        if params:
            raise ConfigError(f"spec.strategy: fedavg takes no parameters, got {sorted(params)}")
        strategy = FedAvg(staged=staged, influence=influence, privacy=privacy)
    elif name in SERVER_OPTIMIZERS:
        cls = SERVER_OPTIMIZERS[name]
        known = cls.params
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(f"spec.strategy: unknown {name} parameter(s) {unknown}; known: {sorted(known)}")
        strategy = cls(staged=staged, influence=influence, privacy=privacy,
                       **{known[k]: float(v) for k, v in params.items()})  # fmt: skip
    else:
        raise ConfigError(f"spec.strategy.name={name!r} is not a known strategy; use one of {', '.join(STRATEGIES)}")
    if proximal_mu is not None:
        strategy.task_settings = {PROXIMAL_MU_KEY: repr(float(proximal_mu))}
    return strategy


def check_initial_model(global_model: Mapping[str, np.ndarray]) -> None:
    """Raise ConfigError when an initial/checkpointed model cannot be aggregated."""
    for name, arr in global_model.items():
        if not isinstance(arr, np.ndarray):
            raise ConfigError(f"the initial model's tensor {name!r} is a {type(arr).__name__}, not a numpy array")
    try:
        _spec_of(global_model)
    except FedkubeError as exc:
        raise ConfigError(f"the initial model is unusable: {exc}") from exc
