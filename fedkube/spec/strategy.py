"""The FLJob's `spec.strategy`: how the server combines client results, and each strategy's parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Inclusive bounds (see fedkube.spec.model on why the CRD has no exclusive ones).
MIN_POSITIVE = 1e-12  # fedadam's serverLr and tau
MAX_BETA = 0.999999999  # fedadam's moment decays must stay below 1
MAX_EXAMPLES = 2**63 - 1  # the CRD's int64; num_examples on the wire is uint64
CLIP_LEARNING_RATE = 0.2  # Andrew et al. 2021's eta_C


class _Model(BaseModel):
    # The same strictness as every spec model (fedkube.spec.model._Model).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)


StrategyName = Literal["fedavg", "fedadam"]
Weighting = Literal["examples", "equal"]

FEDADAM_DEFAULTS: dict[str, float] = {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


class Strategy(_Model):
    """How the server combines client results.

    fedavg averages weighted by each client's num_examples. fedadam treats the
    averaged update as a pseudo-gradient for a server-side Adam step (Reddi et
    al., Adaptive Federated Optimization); its parameters are only valid for it.
    """

    name: StrategyName = Field(default="fedavg", description="fedavg or fedadam.")
    server_lr: float | None = Field(
        default=None, alias="serverLr", ge=MIN_POSITIVE, description="fedadam: server learning rate."
    )
    beta1: float | None = Field(default=None, ge=0, le=MAX_BETA, description="fedadam: first-moment decay.")
    beta2: float | None = Field(default=None, ge=0, le=MAX_BETA, description="fedadam: second-moment decay.")
    tau: float | None = Field(default=None, ge=MIN_POSITIVE, description="fedadam: adaptivity (epsilon).")

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

    @model_validator(mode="after")
    def _fill_fedadam_defaults(self) -> Strategy:
        # Filled here rather than as field defaults so fedavg carries no parameters it would ignore.
        if self.name == "fedadam":
            for field, value in FEDADAM_DEFAULTS.items():
                if getattr(self, field) is None:
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
        return self


__all__ = [
    "CLIP_LEARNING_RATE", "FEDADAM_DEFAULTS", "MAX_BETA", "MAX_EXAMPLES", "MIN_POSITIVE", "Strategy", "StrategyName",
    "Weighting",
]  # fmt: skip
