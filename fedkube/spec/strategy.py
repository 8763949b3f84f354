"""The FLJob's `spec.strategy`: how the server combines client results, and each strategy's parameters."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedkube.spec.privacy import Privacy

# Inclusive bounds (see fedkube.spec.model on why the CRD has no exclusive ones).
MIN_POSITIVE = 1e-12  # fedadam's serverLr and tau
MAX_BETA = 0.999999999  # fedadam's moment decays must stay below 1
MAX_TRIM_FRACTION = 0.499999999  # trimmedmean trims < half at each end, so something is always left
MAX_EXAMPLES = 2**63 - 1  # the CRD's int64; num_examples on the wire is uint64
CLIP_LEARNING_RATE = 0.2  # Andrew et al. 2021's eta_C


class _Model(BaseModel):
    # The same strictness as every spec model (fedkube.spec.model._Model).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)


StrategyName = Literal["fedavg", "fedadam", "fedyogi", "fedadagrad", "median", "trimmedmean", "krum", "scaffold"]
Weighting = Literal["examples", "equal"]

FEDADAM_DEFAULTS: dict[str, float] = {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
# The server-optimizer family (Reddi et al. 2021) and its parameters' defaults; fedadagrad has no beta2.
SERVER_OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": FEDADAM_DEFAULTS,
    "fedyogi": FEDADAM_DEFAULTS,
    "fedadagrad": {k: v for k, v in FEDADAM_DEFAULTS.items() if k != "beta2"},
}
# The robust strategies' parameters (fedkube.server.robust): field -> (owning strategy, default).
ROBUST_DEFAULTS: dict[str, tuple[str, float | int]] = {
    "trim_fraction": ("trimmedmean", 0.2),
    "byzantine": ("krum", 1),
    "krum_select": ("krum", 1),
}
ROBUST_STRATEGY_NAMES = ("median", "trimmedmean", "krum")
# SCAFFOLD (Karimireddy et al. 2020, fedkube.server.scaffold): its global step size eta_g, 1.0 in the paper.
SCAFFOLD_DEFAULTS: dict[str, float] = {"server_lr": 1.0}


class Strategy(_Model):
    """How the server combines client results.

    fedavg averages weighted by each client's num_examples. fedadam treats the
    averaged update as a pseudo-gradient for a server-side Adam step (Reddi et
    al., Adaptive Federated Optimization). median, trimmedmean and krum are
    robust to a minority of bad sites: they ignore num_examples, stage each
    round's results on the server's disk (checkpoint volume) and need a
    minimum number of results per round (see min_results). Each strategy's
    parameters are only valid for it.
    """

    name: StrategyName = Field(
        default="fedavg",
        description=(
            "fedavg (weighted mean), fedadam, fedyogi, fedadagrad (server-side Adam, Yogi, Adagrad), scaffold "
            "(control variates against client drift; trainers use fedkube.trainer_sdk.scaffold), median "
            "(coordinate-wise median; >= 3 results per round), trimmedmean (coordinate-wise mean without the "
            "trimFraction largest and smallest values) "
            "or krum (mean of the krumSelect results closest to the others; more than 2*byzantine+2 results). "
            "median, trimmedmean and krum ignore num_examples and stage each round's results on the server's "
            "checkpoint volume: size it for N results more than the checkpoints (N x the model's bytes)."
        ),
    )
    server_lr: float | None = Field(
        default=None, alias="serverLr", ge=MIN_POSITIVE,
        description="fedadam, fedyogi, fedadagrad: server learning rate; scaffold: the global step size "
        "(default 1.0).",
    )  # fmt: skip
    beta1: float | None = Field(
        default=None, ge=0, le=MAX_BETA, description="fedadam, fedyogi, fedadagrad: first-moment decay."
    )
    beta2: float | None = Field(default=None, ge=0, le=MAX_BETA, description="fedadam, fedyogi: second-moment decay.")
    tau: float | None = Field(
        default=None, ge=MIN_POSITIVE, description="fedadam, fedyogi, fedadagrad: adaptivity (epsilon)."
    )
    # The robust strategies' parameters (fedkube.server.robust).
    trim_fraction: float | None = Field(
        default=None, alias="trimFraction", ge=0, le=MAX_TRIM_FRACTION,
        description=(
            "trimmedmean: fraction of the results trimmed at each end per coordinate, 0 <= beta < 0.5 (default "
            "0.2); floor(beta*N) values are dropped at each end, so N must be at least 1/beta."
        ),
    )  # fmt: skip
    byzantine: int | None = Field(
        default=None, ge=0,
        description="krum: how many bad sites to tolerate, f (default 1); a round needs more than 2f+2 results.",
    )  # fmt: skip
    krum_select: int | None = Field(
        default=None, alias="krumSelect", ge=1,
        description=(
            "krum: how many of the best-scored results are averaged, m (default 1: Krum; more: multi-Krum); at "
            "most N - byzantine."
        ),
    )  # fmt: skip

    # Bounded influence (every strategy): how much one site's result can move the global model.
    # fedkube.server.influence applies them; its docstring says why there is no default cap.
    weighting: Weighting = Field(
        default="examples",
        description="examples: weight each site's result by its num_examples (capped by maxExamplesPerSite); "
        "equal: every site weighs 1, whatever it claims.",
    )
    max_examples_per_site: int | None = Field(
        default=None, alias="maxExamplesPerSite", ge=1, le=MAX_EXAMPLES,
        description="weighting=examples: a site claiming more examples counts as this many (unset: no cap).",
    )  # fmt: skip
    clip_norm: float | None = Field(
        default=None, alias="clipNorm", ge=MIN_POSITIVE, allow_inf_nan=False,
        description="Clip each site's update (its result minus the global model, L2 norm over every float "
        "tensor) to this norm before it counts (unset: no clipping). With clipQuantile: the first round's bound.",
    )  # fmt: skip
    clip_quantile: float | None = Field(
        default=None, alias="clipQuantile", ge=0, le=1,
        description="Adapt clipNorm after each round toward this quantile of the sites' update norms "
        "(Andrew et al. 2021, geometric update; unset: clipNorm stays fixed).",
    )  # fmt: skip
    clip_learning_rate: float | None = Field(
        default=None, alias="clipLearningRate", ge=MIN_POSITIVE, le=10,
        description="clipQuantile: step of the geometric update, clipNorm *= exp(-rate * (fraction of sites "
        f"within clipNorm - clipQuantile)) (default {CLIP_LEARNING_RATE}).",
    )  # fmt: skip

    proximal_mu: float | None = Field(
        default=None, alias="proximalMu", ge=0, le=1e6, allow_inf_nan=False,
        description="FedProx (Li et al. 2020): the proximal term's mu, sent to every trainer in its task; the "
        "trainer adds mu/2 * ||w - w_global||^2 to its loss (fedkube.trainer_sdk.fedprox). fedavg, fedadam, "
        "fedyogi, fedadagrad.",
    )  # fmt: skip
    privacy: Privacy | None = Field(
        default=None,
        description="Central differential privacy: Gaussian noise on the clipped mean update, with a budget "
        "(needs a fixed clipNorm and weighting=equal; fedavg, fedadam, fedyogi, fedadagrad).",
    )

    @model_validator(mode="after")
    def _fill_fedadam_defaults(self) -> Strategy:
        # Filled here rather than as field defaults so fedavg carries no parameters it would ignore.
        for field, value in SERVER_OPTIMIZER_DEFAULTS.get(self.name, {}).items():
            if getattr(self, field) is None:
                setattr(self, field, value)
        for field, (owner, default) in ROBUST_DEFAULTS.items():
            if self.name == owner and getattr(self, field) is None:
                setattr(self, field, default)
        for field, value in SCAFFOLD_DEFAULTS.items():
            if self.name == "scaffold" and getattr(self, field) is None:
                setattr(self, field, value)
        return self

    @model_validator(mode="after")
    def _check_influence(self) -> Strategy:
        if self.weighting == "equal" and self.max_examples_per_site is not None:
            raise ValueError(
                "maxExamplesPerSite caps num_examples, which weighting=equal ignores; remove maxExamplesPerSite "
                "or set weighting to examples"
            )
        if self.clip_quantile is None:
            if self.clip_learning_rate is not None:
                raise ValueError("clipLearningRate is the step of clipQuantile's adaptation; set clipQuantile too "
                                 "or remove clipLearningRate")
        elif self.clip_norm is None:
            raise ValueError("clipQuantile adapts clipNorm from its first value; set clipNorm too (e.g. 1.0)")
        elif self.clip_learning_rate is None:
            self.clip_learning_rate = CLIP_LEARNING_RATE
        if self.name == "scaffold" and self.clip_norm is not None:
            # Clipping the model update but not the control variate's would make c stop tracking the mean of
            # the clients' variates, which is what the correction relies on (fedkube.server.scaffold).
            raise ValueError("scaffold does not clip: its control variates assume every accepted update counts "
                             "whole; remove clipNorm (and clipQuantile), or use fedavg/fedadam with clipping")
        bounded = self.weighting != "examples" or self.max_examples_per_site is not None or self.clip_norm is not None
        if self.name in ROBUST_STRATEGY_NAMES and bounded:
            # The robust rules weigh every result once and do not clip (fedkube.server.robust): a bound set here
            # would look like protection it is not.
            raise ValueError(
                f"{self.name} ignores num_examples and does not clip, so weighting, maxExamplesPerSite and clipNorm "
                "do not apply to it; remove them, or use fedavg/fedadam with these bounds"
            )
        return self

    @model_validator(mode="after")
    def _check_privacy(self) -> Strategy:
        if self.privacy is None:
            return self
        # The noise is calibrated to one site's largest possible effect on the mean: clipNorm, fixed, and equal
        # weights. An adaptive bound would need its own noised quantile and budget share (Andrew et al. 2021).
        if self.name in (*ROBUST_STRATEGY_NAMES, "scaffold"):
            raise ValueError(f"privacy needs clipped, equally weighted updates, which {self.name} does not make; use "
                             "fedavg, fedadam, fedyogi or fedadagrad with clipNorm and weighting=equal")
        if self.clip_norm is None or self.clip_quantile is not None:
            raise ValueError("privacy calibrates its noise to a fixed clipNorm; set clipNorm (e.g. 1.0) and remove "
                             "clipQuantile")
        if self.weighting != "equal":
            raise ValueError("privacy needs weighting=equal: a weight by claimed num_examples lets one site move the "
                             "mean by more than clipNorm / (results), which the noise is calibrated to")
        return self


def parameter_owners() -> dict[str, tuple[str, ...]]:
    """Each strategy parameter (field name) -> the strategies it is valid for (``fedkube validate`` says so)."""
    owners: dict[str, tuple[str, ...]] = {}
    for strategy, defaults in SERVER_OPTIMIZER_DEFAULTS.items():
        for field in defaults:
            owners[field] = (*owners.get(field, ()), strategy)
    for field, (owner, _) in ROBUST_DEFAULTS.items():
        owners[field] = (*owners.get(field, ()), owner)
    for field in SCAFFOLD_DEFAULTS:
        owners[field] = (*owners.get(field, ()), "scaffold")
    owners["proximal_mu"] = ("fedavg", *SERVER_OPTIMIZER_DEFAULTS)
    return owners


def trim_count(beta: float, n: int) -> int:
    """Values trimmedmean drops at each end of n: floor(beta*n); the epsilon keeps 0.29*100 at 29, not 28.99…"""
    return math.floor(beta * n + 1e-9)


def min_results(strategy: Strategy) -> int:
    """The fewest results per round with which the strategy does what it promises (1 for fedavg and fedadam).

    median: 3 (with 2 it is their mean); trimmedmean: the smallest N that trims at least one value at each end
    (1 when trimFraction is 0); krum: 2*byzantine + 3, and byzantine + krumSelect so that krumSelect ≤ N - f.
    """
    if strategy.name == "median":
        return 3
    if strategy.name == "trimmedmean":
        beta = strategy.trim_fraction or 0.0
        if beta <= 0:
            return 1
        n = 1
        while trim_count(beta, n) < 1:
            n += 1
        return n
    if strategy.name == "krum":
        f, m = strategy.byzantine or 0, strategy.krum_select or 1
        return max(2 * f + 3, f + m)
    return 1


__all__ = [
    "CLIP_LEARNING_RATE", "FEDADAM_DEFAULTS", "MAX_BETA", "MAX_EXAMPLES", "MAX_TRIM_FRACTION", "MIN_POSITIVE",
    "ROBUST_DEFAULTS", "SCAFFOLD_DEFAULTS", "SERVER_OPTIMIZER_DEFAULTS", "Strategy", "StrategyName", "Weighting",
    "min_results", "parameter_owners", "trim_count",
]  # fmt: skip
