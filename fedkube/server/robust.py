"""Robust aggregation: coordinate-wise median, trimmed mean, Krum / multi-Krum.

FedAvg lets one site move the global model anywhere (a x1e6 update, or a
claim of 10⁶ examples). These strategies bound what a minority of sites can
do, at a price FedAvg does not pay: they need all N results of a round at
once, so they cannot fold each tensor as it arrives.

* ``median``: each coordinate of the new model is the median of the N
  results' values (``np.median``: the mean of the two middle values for even
  N). Breakdown point: fewer than N/2 arbitrary results move it at most within
  the range of the honest ones. Needs N ≥ 3 (with two results the median is
  their mean and protects against nothing).
* ``trimmedmean`` (β = ``trimFraction``): per coordinate, the ``k = ⌊β·N⌋``
  smallest and ``k`` largest values are dropped and the rest averaged (Yin et
  al. 2018). With β > 0 a round whose N trims nothing (``k = 0``) fails
  rather than silently become a plain mean.
* ``krum`` (f = ``byzantine``, m = ``krumSelect``; Blanchard et al. 2017):
  each result scores the sum of squared distances to its ``N - f - 2``
  nearest other results (over all float tensors); the m best-scored results
  are averaged (m = 1 is Krum, m > 1 multi-Krum). Needs N > 2f + 2 and
  m ≤ N - f. Ties in score go to the smaller attempt key (deterministic).

All three ignore ``num_examples``: it is self-reported and unbounded, the very
lever a poisoned site would pull; every delivered result counts once.
Integer and bool tensors cannot be averaged: they take the coordinate-wise
*lower* median (``sorted[(n-1)//2]``) of the results the strategy keeps (all N
for median and trimmed mean, the m selected for Krum), a value some client
produced, the majority for bools. (FedAvg gives them the value of the client
with the largest weight; here weights are ignored, see above.) Float tensors
are computed in float32 (float64 for float64 tensors), so float16 and
bfloat16 are widened once and cast back once, and checked for NaN/Inf
before they are staged, like FedAvg's.

Memory and disk (the staging is ``fedkube.server.robust_staging``). Each
committed result is *staged on disk*, not in memory:
one file per result attempt under a directory the server owns (the
checkpoint volume's ``.robust-staging/`` when the server has one, else a
temp dir), every tensor written as it arrives with positional writes. At
``finish`` the rule runs per tensor in column blocks: it reads the same
element range of that tensor from every result (N reads of one block) into an
``N x block`` buffer, computes those coordinates of the new model and moves
on. Reads and writes go through ``pread``/``pwrite``, not ``np.memmap``: a
mapped file's pages count in the process's RSS while mapped, positional I/O
leaves them in the page cache, which the kernel reclaims (it does count
towards a pod's cgroup limit until written back, which the kernel throttles).

* server memory: global model S + new model S + ``block_bytes`` (32 MiB by
  default) x ~3 of block buffers, whatever N, plus the one tensor per
  download in flight that every strategy has; not N x S and not even N x one
  tensor.
* disk: N x S (the results in their wire dtypes) during the round, removed
  when the round finishes or fails (and a crashed server's at the next start).
* passes: median and trimmed mean read the staged results once (N x S bytes);
  Krum twice: once for the NxN distances (over float tensors only), once to
  average the m selected (m x S bytes read). Writes: N x S once.

Exact exclusion: nothing is folded before ``finish``, so ``discard`` deletes
the attempt's file and forgets it; nothing is ever rebuilt (``owed()`` is
always empty and ``refold`` never has work).
"""

from __future__ import annotations

import logging
import tempfile
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.errors import ConfigError
from fedkube.server.aggregate import AggregationError
from fedkube.server.model import Model, ModelSpec
from fedkube.server.robust_staging import (
    BLOCK_BYTES,
    STAGING_DIR,
    RobustAggregator,
    Rule,
    StagedResults,
    TooFewResultsError,
    remove_tree,
)
from fedkube.server.strategy_api import StrategyState
from fedkube.spec.strategy import Strategy as StrategySpec
from fedkube.spec.strategy import min_results, trim_count

__all__ = [
    "BLOCK_BYTES", "ROBUST_STRATEGIES", "STAGING_DIR", "Krum", "Median", "RobustAggregator", "TooFewResultsError",
    "TrimmedMean", "build_robust", "krum_select",
]  # fmt: skip

log = logging.getLogger(__name__)


# -- the rules (fedkube.server.robust_staging.Rule): what each strategy computes from the staged results ---


class _Median:
    name = "median"

    def too_few(self, n: int) -> str:
        if n < 3:
            return (f"median needs at least 3 results to outvote one bad site, {n} delivered; fix: raise "
                    "spec.minClients to at least 3 (with that many clients)")
        return ""

    def combine(self, stack: StagedResults) -> Model:
        def block(values: np.ndarray) -> np.ndarray:
            return np.median(values, axis=0, overwrite_input=True)

        return stack.coordinatewise(block)

    def meta(self) -> dict[str, Any]:
        return {}


class _TrimmedMean:
    name = "trimmedmean"

    def __init__(self, beta: float) -> None:
        if not (isinstance(beta, (int, float)) and 0 <= beta < 0.5):
            raise ConfigError(f"spec.strategy.trimFraction={beta!r} is out of range; it must be in [0, 0.5)")
        self.beta = float(beta)

    def too_few(self, n: int) -> str:
        if self.beta > 0 and trim_count(self.beta, n) == 0:
            need = min_results(StrategySpec(name="trimmedmean", trimFraction=self.beta))
            return (f"trimmedmean with trimFraction={self.beta:g} trims ⌊{self.beta:g}·{n}⌋ = 0 of {n} results at "
                    f"each end, which would be a plain mean; fix: raise spec.minClients to at least {need} "
                    "(with that many clients) or raise trimFraction")
        return ""

    def combine(self, stack: StagedResults) -> Model:
        k = trim_count(self.beta, stack.n)

        def block(values: np.ndarray) -> np.ndarray:
            values.sort(axis=0)
            return np.mean(values[k : values.shape[0] - k], axis=0)

        return stack.coordinatewise(block)

    def meta(self) -> dict[str, Any]:
        return {"trimFraction": self.beta}


class _Krum:
    name = "krum"

    def __init__(self, byzantine: int, select: int) -> None:
        for field_name, value, lo in (("byzantine", byzantine, 0), ("krumSelect", select, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"spec.strategy.{field_name}={value!r} must be an integer ≥ {lo}")
        self.f = byzantine
        self.m = select
        self.selected: tuple[str, ...] = ()  # the keys of the last round's selected results

    def too_few(self, n: int) -> str:
        if n <= 2 * self.f + 2:
            return (f"krum with byzantine={self.f} needs more than 2·{self.f}+2 = {2 * self.f + 2} results, {n} "
                    f"delivered; fix: raise spec.minClients to at least {2 * self.f + 3} or lower byzantine")
        if self.m > n - self.f:
            return (f"krum selects krumSelect={self.m} results but only N - byzantine = {n - self.f} of {n} may be "
                    f"selected; fix: lower krumSelect to at most {n - self.f} or raise spec.minClients")
        return ""

    def combine(self, stack: StagedResults) -> Model:
        chosen = krum_select(stack.distances(), self.f, self.m)
        self.selected = tuple(stack.keys[i] for i in chosen)
        log.info("krum selected %s of %s", list(self.selected), list(stack.keys))
        return stack.subset(chosen).coordinatewise(lambda values: np.mean(values, axis=0))

    def meta(self) -> dict[str, Any]:
        return {"byzantine": self.f, "krumSelect": self.m}


def krum_select(distances: np.ndarray, f: int, m: int) -> list[int]:
    """Indices of the ``m`` best Krum scores (ties: the lower index) from squared pairwise distances."""
    n = distances.shape[0]
    nearest = n - f - 2
    scores = []
    for i in range(n):
        others = np.delete(distances[i], i)
        scores.append(float(np.sort(others)[:nearest].sum()))
    return sorted(range(n), key=lambda i: (scores[i], i))[:m]


# -- the strategies -------------------------------------------------------------------------------------


class _RobustStrategy:
    """A Strategy whose rounds are RobustAggregators staging under ``spill_dir``."""

    name = ""

    def __init__(self, rule: Rule, spill_dir: Path | None, block_bytes: int) -> None:
        self.rule = rule
        self.spill_dir = spill_dir
        self.block_bytes = block_bytes
        self._root: Path | None = None

    def _staging_root(self) -> Path:
        if self._root is None:
            if self.spill_dir is None:
                self._root = Path(tempfile.mkdtemp(prefix="fedkube-robust-"))
                weakref.finalize(self, remove_tree, self._root)
            else:
                # One server owns the checkpoint volume: what is here before its first round is a crashed
                # server's. Later rounds remove their own directory (finish, or the aggregator's finalizer).
                self._root = self.spill_dir / STAGING_DIR
                remove_tree(self._root)
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def begin_round(self, global_model: Mapping[str, np.ndarray]) -> RobustAggregator:
        if not global_model:
            raise AggregationError("the global model has no tensors; nothing to aggregate")
        spec = ModelSpec.of(global_model)
        directory = self._staging_root() / f"round-{uuid.uuid4().hex[:12]}"
        return RobustAggregator(spec, self.rule, directory, block_bytes=self.block_bytes)

    def state(self) -> StrategyState:
        """The parameters, for the record: a robust strategy carries nothing from round to round."""
        return StrategyState(self.name, self.rule.meta())

    def load_state(self, state: StrategyState) -> None:
        if state.name != self.name:
            raise ConfigError(
                f"the checkpoint holds state of strategy {state.name!r}, but the job uses {self.name!r}; "
                f"resume with spec.strategy.name={state.name!r} or start from a fresh checkpoint directory"
            )


class Median(_RobustStrategy):
    """Coordinate-wise median of the round's results."""

    name = "median"

    def __init__(self, *, spill_dir: Path | None = None, block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__(_Median(), spill_dir, block_bytes)


class TrimmedMean(_RobustStrategy):
    """Coordinate-wise mean after dropping the ⌊β·N⌋ smallest and largest values."""

    name = "trimmedmean"

    def __init__(self, *, trim_fraction: float = 0.2, spill_dir: Path | None = None,
                 block_bytes: int = BLOCK_BYTES) -> None:  # fmt: skip
        super().__init__(_TrimmedMean(trim_fraction), spill_dir, block_bytes)


class Krum(_RobustStrategy):
    """Krum / multi-Krum: the mean of the m results closest to their N - f - 2 nearest others."""

    name = "krum"

    def __init__(self, *, byzantine: int = 1, krum_select: int = 1, spill_dir: Path | None = None,
                 block_bytes: int = BLOCK_BYTES) -> None:  # fmt: skip
        super().__init__(_Krum(byzantine, krum_select), spill_dir, block_bytes)

    def selected(self) -> tuple[str, ...]:
        """The result keys the last finished round averaged (``fedkube.server.strategy_report`` counts them)."""
        rule = self.rule
        return rule.selected if isinstance(rule, _Krum) else ()


ROBUST_STRATEGIES = ("median", "trimmedmean", "krum")
_PARAMS: dict[str, dict[str, str]] = {
    "median": {},
    "trimmedmean": {"trimFraction": "trim_fraction"},
    "krum": {"byzantine": "byzantine", "krumSelect": "krum_select"},
}


def build_robust(name: str, params: Mapping[str, Any], spill_dir: Path | None) -> _RobustStrategy:
    """A robust strategy from its spec parameters (camelCase); ConfigError for unknown ones."""
    known = _PARAMS[name]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"spec.strategy: unknown {name} parameter(s) {unknown}; known: {sorted(known)}")
    kwargs = {known[k]: v for k, v in params.items()}
    if name == "median":
        return Median(spill_dir=spill_dir)
    if name == "trimmedmean":
        return TrimmedMean(spill_dir=spill_dir, **kwargs)
    return Krum(spill_dir=spill_dir, **kwargs)
