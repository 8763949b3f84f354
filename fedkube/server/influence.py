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
  last tensor of the result arrived, so with clipNorm set the server pulls
  a result that may need clipping twice (``fedkube.server.prepass``, which
  weighs the alternatives): once through a per-piece check that sums
  ``‖x - g‖²`` and rejects NaN/Inf while each piece is hot, keeping nothing,
  then again to fold it, each tensor clipped as it is folded; memory stays
  streaming's (global + accumulator + one tensor per download). The cost is
  the network: S more per such result (bench/README.md, "Clipping without
  refolding"). A site whose last norm was far below the bound
  (``prepass.ClipHints``) is folded in one pull; should it need clipping
  after all, the exact clip is the old way: after the last tensor
  ``WeightedMean.rescale`` empties every tensor the site contributed to and
  owes all their contributors a refold (``Bounded.rebuild``), O(N) pulls,
  and the site is pre-passed from then on.

* **Adaptive bound.** With ``clipQuantile`` (q), ``clipNorm`` is only the first
  round's bound C; after each round it moves toward the q-quantile of the
  sites' update norms by the geometric update of Andrew et al. 2021
  ("Differentially Private Learning with Adaptive Clipping"), without the
  noise on the count, which only private training needs:
  ``C ← C·exp(-η·(b̄ - q))``, with ``b̄`` the fraction of the round's
  accepted results whose norm was within C and η ``clipLearningRate``
  (0.2, the paper's). The current C is strategy state, kept in every
  checkpoint, so a resumed job goes on with it. One site's norm changes the
  round's factor by at most ``exp(η/N)`` with N accepted results, so a
  poisoner cannot pull the bound up alone.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from fedkube.server.accumulator import squared_distance, toward
from fedkube.spec.strategy import CLIP_LEARNING_RATE, MIN_POSITIVE, Weighting

MAX_CLIP_NORM = 1e300


@dataclass(frozen=True)
class Influence:
    """The bounds of one job (``spec.strategy.weighting``, ``maxExamplesPerSite``, ``clipNorm``)."""

    weighting: Weighting = "examples"
    max_examples: int | None = None
    clip_norm: float | None = None
    clip_quantile: float | None = None
    """Adapt clip_norm toward this quantile of the update norms after each round (None: fixed)."""
    clip_learning_rate: float = CLIP_LEARNING_RATE

    def __post_init__(self) -> None:
        if self.weighting not in ("examples", "equal"):
            raise ValueError(f"weighting must be 'examples' or 'equal', not {self.weighting!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"maxExamplesPerSite must be >= 1, not {self.max_examples}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clipNorm must be a finite number > 0, not {self.clip_norm}")
        if self.clip_quantile is not None and (self.clip_norm is None or not 0 <= self.clip_quantile <= 1):
            raise ValueError(f"clipQuantile={self.clip_quantile} needs clipNorm and must be in [0, 1]")

    def adapted(self, norms: Sequence[float]) -> Influence:
        """The bounds for the next round after a round whose accepted results had these update ``norms``."""
        if self.clip_quantile is None or self.clip_norm is None or not norms:
            return self
        within = sum(1 for n in norms if n <= self.clip_norm) / len(norms)
        bound = self.clip_norm * math.exp(-self.clip_learning_rate * (within - self.clip_quantile))
        # Kept a finite positive float whatever the rounds do (ever-zero updates shrink it geometrically).
        return replace(self, clip_norm=min(max(bound, MIN_POSITIVE), MAX_CLIP_NORM))

    @property
    def measures_norm(self) -> bool:
        """Whether each result's update norm is computed (summed as it is received; see the module docstring)."""
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

    @property
    def unchanged(self) -> bool:
        """The site sent the global model back unchanged (a measured update norm of exactly 0).

        It still counts with its weight: a site may legitimately not move (frozen layers, no data left this
        round), and its influence is bounded like any other's; it only slows the step by its weight's share. The
        status and the metric (reason "unchanged") make a site that does it every round visible.
        """
        return self.norm == 0.0

    def note(self) -> str:
        """A short phrase for the status ("" when nothing was bounded)."""
        parts = []
        if self.capped:
            parts.append(f"num_examples {self.claimed:g} capped to {self.weight:g}")
        if self.clipped and self.norm is not None:
            parts.append(f"update norm {self.norm:.4g} clipped to {self.norm * self.scale:.4g}")
        if self.unchanged:
            parts.append("update is zero: the global model came back unchanged")
        return "; ".join(parts)


@dataclass(frozen=True)
class Bounded:
    """What bounding one result's influence found, and what it takes to correct the streamed fold."""

    influence: SiteInfluence
    rebuild: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Tensor -> aggregator keys whose contribution must be pulled again and refolded (``WeightedMean.rescale``)."""


__all__ = ["Bounded", "Influence", "SiteInfluence", "Weighting", "squared_distance", "toward"]
