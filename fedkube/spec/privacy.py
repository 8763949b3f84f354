"""The FLJob's `spec.strategy.privacy`: central differential privacy's budget (fedkube.server.dp does the work)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_EPSILON = 1000.0  # beyond this the guarantee is meaningless; a typo, not a budget
MAX_DELTA = 0.1  # delta must be well below 1/(number of sites) to mean anything
MIN_NOISE_MULTIPLIER = 0.01


class Privacy(BaseModel):
    """Central differential privacy at the site level (docs/privacy.md has the threat model).

    Each round the server adds Gaussian noise of standard deviation noiseMultiplier x clipNorm / (results in the
    round) to every float coordinate of the mean of the sites' clipped updates, and an RDP accountant
    (Google's dp-accounting) adds the round to the spent epsilon. Needs a fixed spec.strategy.clipNorm (the
    sensitivity) and weighting=equal (a weight by claimed num_examples would make one site's influence unbounded).
    Every listed site trains in every round (no sampling), so the accounting claims no amplification by sampling.
    """

    # The same strictness as every spec model (fedkube.spec.model._Model).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)

    target_epsilon: float = Field(
        alias="targetEpsilon", ge=1e-3, le=MAX_EPSILON, allow_inf_nan=False,
        description="The privacy budget: the job stops (PrivacyBudgetExhausted) before a round that would spend more.",
    )  # fmt: skip
    target_delta: float = Field(
        alias="targetDelta", ge=1e-15, le=MAX_DELTA, allow_inf_nan=False,
        description="The delta of (epsilon, delta)-DP; choose it well below 1 / the number of sites (e.g. 1e-5).",
    )  # fmt: skip
    noise_multiplier: float | None = Field(
        default=None, alias="noiseMultiplier", ge=MIN_NOISE_MULTIPLIER, le=1e4, allow_inf_nan=False,
        description="Noise standard deviation / clipNorm, sigma. Unset: the smallest sigma with which spec.rounds "
        "rounds stay within targetEpsilon.",
    )  # fmt: skip


def affordable_rounds(privacy: Privacy, rounds: int) -> int | None:
    """How many of ``rounds`` rounds an explicit noiseMultiplier keeps within targetEpsilon (None: all of them,
    no explicit multiplier, or dp-accounting missing here: the server checks again at its start)."""
    if privacy.noise_multiplier is None:
        return None
    try:
        from dp_accounting import GaussianDpEvent, rdp
    except ImportError:
        return None

    def epsilon(k: int) -> float:
        accountant = rdp.RdpAccountant()
        accountant.compose(GaussianDpEvent(privacy.noise_multiplier), k)
        return float(accountant.get_epsilon(privacy.target_delta))

    if epsilon(rounds) <= privacy.target_epsilon:
        return None
    lo, hi = 0, rounds  # epsilon(lo) within the budget, epsilon(hi) above it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon(mid) <= privacy.target_epsilon else (lo, mid)
    return lo


__all__ = ["MAX_DELTA", "MAX_EPSILON", "MIN_NOISE_MULTIPLIER", "Privacy", "affordable_rounds"]
