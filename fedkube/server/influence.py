"""Bounded influence: how much one site's result may move the global model (``spec.strategy``).

A site's result reaches the aggregate with two numbers the site controls: the
``num_examples`` it claims (the FedAvg weight) and the values themselves. One
site claiming 10⁶ examples, or scaling its update by 10⁶, replaces the global
model. :class:`Influence` bounds both, for every strategy that averages:

* **Weight.** ``weighting: examples`` (the default) weights a result by its
  claimed ``num_examples``, capped at ``maxExamplesPerSite`` when set: a
  larger claim counts as the cap (it is capped, not trusted, and not
  refused: the site's data may really be that large). ``weighting: equal``
  gives every result weight 1. A claim of 0 or less never gets here: the
  round refuses it when the result is announced (InvalidResult).

  There is no default cap, and no cap relative to the median of the round's
  claims: the server folds each result into the aggregate as it streams in,
  so the first result is weighted before the other claims are known. A
  median cap would need every announcement before the first fold (a round
  as slow as its slowest announcer) or re-weighting every folded result once
  the median moved (a re-pull of every result). An absolute cap is known up
  front, costs nothing, and is what a job owner can state about their sites.
  Leaving it unset keeps FedAvg as published (McMahan et al. 2017).

* **Update norm.** With ``clipNorm`` set, a site's update ``Δ = result -
  global`` (the L2 norm over every float tensor of the model, computed in
  float32, float64 for float64 tensors) counts as ``Δ·min(1, clipNorm/‖Δ‖)``:
  the result folded in is ``global + s·Δ``. The norm is known only after the
  last tensor of the result arrived, and the streaming aggregate has already
  folded the unclipped tensors by then. The fold is corrected exactly with
  the machinery that takes an excluded result out (``WeightedMean.rescale``,
  built on ``discard``'s): every tensor the site contributed to is emptied
  and rebuilt from its contributors, pulled again, the clipped site's own
  tensors folded as ``global + s·Δ``. Costs: with clipping on, every result's
  tensors are read once more against the global model to measure the norm
  (one pass over S per result, in the download thread); a clipped result
  costs a second download of every result folded into the same tensors so
  far, the round waiting for it, and it fails (RebuildFailed) if a site
  stops serving its result meanwhile. Memory stays streaming's (global +
  accumulator + one tensor per download). An honest round clips nobody and
  pays only the norm pass. Adaptive quantile clipping (Andrew et al. 2021)
  is not implemented: the bound is fixed.

* **Zero update.** A site that sends the global model unchanged has norm 0;
  it is not clipped and counts with its weight, pulling the average toward
  the current model, as the weighted mean says it should. It is visible (norm
  0 in status and metrics), not refused: a site with nothing new to learn
  from legitimately returns the model it got.

Every site's claimed and effective weight, its update norm and whether it was
capped or clipped is a :class:`SiteInfluence`: the round's status shows it per
client, the metrics export it per site, and a capped or clipped site is logged
once per round with the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedkube.server.accumulator import BLOCK

Weighting = Literal["examples", "equal"]


@dataclass(frozen=True)
class Influence:
    """The bounds of one job (``spec.strategy.weighting``, ``maxExamplesPerSite``, ``clipNorm``)."""

    weighting: Weighting = "examples"
    max_examples: int | None = None
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.weighting not in ("examples", "equal"):
            raise ValueError(f"weighting must be 'examples' or 'equal', not {self.weighting!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"maxExamplesPerSite must be >= 1, not {self.max_examples}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clipNorm must be a finite number > 0, not {self.clip_norm}")

    @property
    def measures_norm(self) -> bool:
        """Whether each result's update norm is computed (it costs a pass over the result and the global model)."""
        return self.clip_norm is not None

    def weight(self, claimed: float) -> float:
        """The weight a result claiming ``claimed`` examples counts with (claims ≤ 0 are refused earlier)."""
        if self.weighting == "equal":
            return 1.0
        if self.max_examples is not None and claimed > self.max_examples:
            return float(self.max_examples)
        return float(claimed)

    def capped(self, claimed: float) -> bool:
        """Whether a claim of ``claimed`` examples is cut down to maxExamplesPerSite."""
        return self.weighting == "examples" and self.max_examples is not None and claimed > self.max_examples

    def scale(self, norm: float) -> float:
        """The factor the update is multiplied by: 1, or clipNorm/norm when the norm exceeds the bound."""
        if self.clip_norm is None or norm <= self.clip_norm:
            return 1.0
        return self.clip_norm / norm


@dataclass(frozen=True)
class SiteInfluence:
    """How much one site's result counted in a round."""

    site: str
    claimed: float
    """num_examples as the site claimed it."""
    weight: float
    """The weight the result was averaged with (after weighting and the cap)."""
    norm: float | None = None
    """L2 norm of the site's update before clipping (None when not measured: clipNorm unset)."""
    scale: float = 1.0
    """1, or the factor its update was clipped by."""
    capped: bool = False
    """The claim was above maxExamplesPerSite and counted as the cap."""

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0

    def note(self) -> str:
        """A short phrase for the status ("" when nothing was bounded)."""
        parts = []
        if self.capped:
            parts.append(f"num_examples {self.claimed:g} capped to {self.weight:g}")
        if self.clipped and self.norm is not None:
            parts.append(f"update norm {self.norm:.4g} clipped to {self.norm * self.scale:.4g}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Bounded:
    """What bounding one result's influence found, and what it takes to correct the streamed fold."""

    influence: SiteInfluence
    rebuild: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Tensor -> aggregator keys whose contribution must be pulled again and refolded (``WeightedMean.rescale``)."""


def squared_distance(x: np.ndarray, g: np.ndarray, scratch: np.ndarray) -> float:
    """``‖x - g‖²`` blockwise in ``scratch`` (BLOCK float32; float64 tensors use their own); no array-sized temporary.

    A block whose float32 square sum overflows (differences above ~1e19) is
    summed again in float64, so a huge update gets its true norm, not Inf.
    """
    fx = np.ascontiguousarray(x).reshape(-1)
    fg = np.ascontiguousarray(g).reshape(-1)
    if fg.dtype == np.float64 and scratch.dtype != np.float64:
        scratch = np.empty(min(BLOCK, fg.size), np.float64)
    total = 0.0
    for start in range(0, fx.size, BLOCK):
        stop = min(start + BLOCK, fx.size)
        d = scratch[: stop - start]
        d[...] = fx[start:stop]
        d -= fg[start:stop]
        with np.errstate(over="ignore"):
            part = float(np.dot(d, d))
        if not math.isfinite(part):
            d64 = d.astype(np.float64)
            part = float(np.dot(d64, d64))
        total += part
    return total


def toward(g: np.ndarray, x: np.ndarray, scale: float, dtype: np.dtype) -> np.ndarray:
    """``g + scale·(x - g)`` in ``dtype`` (the accumulator's): the clipped result, one tensor-sized array."""
    out = np.empty(g.shape, dtype)
    fo, fx, fg = out.reshape(-1), np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(g).reshape(-1)
    for start in range(0, fo.size, BLOCK):
        stop = min(start + BLOCK, fo.size)
        o = fo[start:stop]
        o[...] = fx[start:stop]
        o -= fg[start:stop]
        o *= scale
        o += fg[start:stop]
    return out


__all__ = ["Bounded", "Influence", "SiteInfluence", "Weighting", "squared_distance", "toward"]
