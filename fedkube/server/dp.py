"""Central differential privacy: Gaussian noise on the clipped mean update, and its budget.

The mechanism (DP-FedAvg, McMahan et al. 2018; Flower's server-side fixed
clipping does the same): every site's update ``result - global`` is clipped
to ``clipNorm`` C over all float tensors (``fedkube.server.influence``), the
n accepted updates are averaged with equal weights, and the server adds
``N(0, (sigma·C/n)²)`` to every float coordinate of that mean. Adding or
removing one site moves the sum of updates by at most C, so each round is a
Gaussian mechanism with noise multiplier sigma; n (how many sites delivered) is
treated as public, as the job's status shows it anyway. Integer and bool
tensors have no noise to hide them: under DP they keep the global model's
value, so no site's integers reach the model. The server optimizers
(FedAdam, FedYogi, FedAdagrad) step on the noised mean, which is
post-processing and costs no budget.

The accountant is dp-accounting's RDP accountant (Google; the optional
``dp`` extra), composing one Gaussian event per round. Every listed site
trains every round (no sampling), so no amplification is claimed. Before a
round the accountant checks that one more round stays within
``targetEpsilon``; if not, the round does not start and the job fails with
``PrivacyBudgetExhausted``. The rounds spent (with their sigma) are in the
checkpoint, so a resumed job continues the same account, and one whose
budget is spent stops before its first round.

Noise comes from a numpy Generator (PCG64) seeded from ``os.urandom``: the
seed is unpredictable, and tests inject their own. docs/privacy.md has the
threat model: central DP protects the sites' data from whoever uses the
final model, not from the server, which sees every update in the clear.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedkube.errors import ConfigError
from fedkube.metrics.server import ServerMetrics
from fedkube.server.aggregate import BLOCK
from fedkube.server.jobs import JobFailed
from fedkube.server.model import ModelSpec

log = logging.getLogger(__name__)

PRIVACY_BUDGET_EXHAUSTED = "PrivacyBudgetExhausted"
STATE_KEY = "privacy"  # the strategy state's meta key


class PrivacyBudgetExhausted(JobFailed):
    """One more round would spend more than ``targetEpsilon``."""

    def __init__(self, message: str) -> None:
        super().__init__(PRIVACY_BUDGET_EXHAUSTED, message)


def _accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:  # the server image without the extra
        raise ConfigError("spec.strategy.privacy needs Google's dp-accounting in the server image; install "
                          "fedkube[dp] (pip install 'fedkube[dp]') or remove spec.strategy.privacy") from exc
    return dp_accounting


def spent_epsilon(history: Sequence[tuple[float, int]], delta: float) -> float:
    """The ε of ``history`` ((noise multiplier, rounds) pairs) at ``delta``, by the RDP accountant; 0 when empty."""
    if not any(count for _, count in history):
        return 0.0
    dpa = _accounting()
    accountant = dpa.rdp.RdpAccountant()
    for sigma, count in history:
        if count:
            accountant.compose(dpa.GaussianDpEvent(sigma), count)
    return float(accountant.get_epsilon(delta))


def noise_for(target_epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier with which ``rounds`` rounds spend at most ``target_epsilon``."""
    dpa = _accounting()
    sigma = float(dpa.calibrate_dp_mechanism(
        dpa.rdp.RdpAccountant, lambda s: dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), rounds),
        target_epsilon, delta, dpa.ExplicitBracketInterval(1e-3, 1e5),
    ))  # fmt: skip
    return sigma


@dataclass
class CentralDP:
    """Central DP of one job: the noise it adds to each round's mean and the budget it has spent."""

    clip_norm: float
    target_epsilon: float
    delta: float
    noise_multiplier: float
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(int.from_bytes(os.urandom(32))))
    history: list[tuple[float, int]] = field(default_factory=list)
    """(noise multiplier, rounds) of the rounds already noised, this run's and the checkpoint's."""
    epsilon: float = 0.0
    """ε spent so far."""

    @classmethod
    def from_spec(cls, privacy: Mapping[str, Any], clip_norm: float | None, rounds: int | None,
                  seed: int | None = None) -> CentralDP:  # fmt: skip
        """From ``spec.strategy.privacy`` (camelCase keys); ``seed`` only in tests."""
        if clip_norm is None:
            raise ConfigError("spec.strategy.privacy needs a fixed spec.strategy.clipNorm; set it (e.g. 1.0)")
        eps, delta = float(privacy["targetEpsilon"]), float(privacy["targetDelta"])
        sigma = privacy.get("noiseMultiplier")
        if sigma is None:
            if rounds is None:
                raise ConfigError("spec.strategy.privacy without noiseMultiplier derives it from spec.rounds, "
                                  "which the server was not given")
            sigma = noise_for(eps, delta, rounds)
            log.info("central DP: noise multiplier %.4f keeps %d rounds within epsilon %g (delta %g)", sigma, rounds,
                     eps, delta)  # fmt: skip
        else:
            _accounting()  # fail at start, not before round 1, when the accountant is missing
        rng = np.random.default_rng(seed) if seed is not None else np.random.default_rng(int.from_bytes(os.urandom(32)))
        return cls(float(clip_norm), eps, delta, float(sigma), rng)

    def check_budget(self) -> None:
        """Raise PrivacyBudgetExhausted when one more round would spend more than the target."""
        after = spent_epsilon([*self.history, (self.noise_multiplier, 1)], self.delta)
        if after > self.target_epsilon:
            raise PrivacyBudgetExhausted(
                f"{self.rounds} round(s) spent epsilon {self.epsilon:.4g} of the budget {self.target_epsilon:g} "
                f"(delta {self.delta:g}); one more round with noiseMultiplier {self.noise_multiplier:.4g} would "
                f"spend {after:.4g}. The model of the last round is the final one; to train more, raise "
                "spec.strategy.privacy.targetEpsilon or noiseMultiplier knowing the guarantee weakens or the model "
                "gets noisier"
            )

    @property
    def rounds(self) -> int:
        return sum(count for _, count in self.history)

    def add_noise(self, spec: ModelSpec, means: dict[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  results: int) -> None:  # fmt: skip
        """Noise the round's mean of ``results`` clipped updates in place, and spend the round."""
        if results < 1:
            return
        std = self.noise_multiplier * self.clip_norm / results
        for t in spec:
            mean = means[t.name]
            if not t.is_float:
                mean[...] = reference[t.name]
                continue
            flat = mean.reshape(-1)
            scratch = np.empty(min(BLOCK, flat.size), flat.dtype)
            for start in range(0, flat.size, BLOCK):  # blockwise: no array-sized temporary
                n = min(BLOCK, flat.size - start)
                self.rng.standard_normal(dtype=scratch.dtype, out=scratch[:n])
                scratch[:n] *= std
                flat[start:start + n] += scratch[:n]
        if self.history and self.history[-1][0] == self.noise_multiplier:
            self.history[-1] = (self.noise_multiplier, self.history[-1][1] + 1)
        else:
            self.history.append((self.noise_multiplier, 1))
        self.epsilon = spent_epsilon(self.history, self.delta)
        log.info("central DP: round noised (sigma %.4g, std %.4g on the mean of %d); epsilon spent %.4g of %g",
                 self.noise_multiplier, std, results, self.epsilon, self.target_epsilon)  # fmt: skip

    def meta(self) -> dict[str, Any]:
        """The account, for the strategy's checkpoint state."""
        return {STATE_KEY: {"history": [[s, c] for s, c in self.history], "epsilon": self.epsilon,
                            "delta": self.delta}}  # fmt: skip

    def load(self, meta: Mapping[str, Any]) -> None:
        """Continue the checkpoint's account; ConfigError when the checkpoint's rounds were not all accounted."""
        saved = meta.get(STATE_KEY)
        if saved is None:
            raise ConfigError("the checkpoint's rounds were trained without central DP, so no "
                              "privacy guarantee covers them; start from a fresh checkpoint directory to train "
                              "privately, or remove spec.strategy.privacy")
        try:
            history = [(float(s), int(c)) for s, c in saved["history"]]
            delta = float(saved["delta"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's privacy account {saved!r} is malformed ({exc}); start from a fresh "
                              "checkpoint directory") from exc
        if not all(math.isfinite(s) and s > 0 and c >= 0 for s, c in history):
            raise ConfigError(f"the checkpoint's privacy account {history!r} has a bad noise multiplier or count; "
                              "start from a fresh checkpoint directory")
        if delta != self.delta:
            raise ConfigError(f"the checkpoint's rounds were accounted at delta {delta:g}, the spec says "
                              f"{self.delta:g}; set spec.strategy.privacy.targetDelta back to {delta:g}")
        self.history = history
        self.epsilon = spent_epsilon(history, self.delta)


def privacy_meta(privacy: CentralDP | None) -> dict[str, Any]:
    """The strategy state's privacy entries (none without DP)."""
    return privacy.meta() if privacy is not None else {}


def load_privacy(privacy: CentralDP | None, meta: Mapping[str, Any]) -> None:
    """Continue the checkpoint's account; refuse one the job cannot continue (e.g. privacy dropped on resume)."""
    if privacy is not None:
        privacy.load(meta)
    elif STATE_KEY in meta:  # its rounds' epsilon would vanish from the record
        raise ConfigError("the checkpoint's rounds were trained with central DP (spec.strategy.privacy), the job "
                          "now has none; set spec.strategy.privacy as before, or start from a fresh checkpoint "
                          "directory")


@runtime_checkable
class AccountsPrivacy(Protocol):
    """A strategy that spends a privacy budget (the workflow reports the spent ε)."""

    privacy: CentralDP | None


def report_privacy(strategy: object, telemetry: ServerMetrics) -> float | None:
    """The ε ``strategy`` has spent (None without DP), also set on ``telemetry``'s gauge."""
    if not isinstance(strategy, AccountsPrivacy) or strategy.privacy is None:
        return None
    telemetry.privacy_spent(strategy.privacy.epsilon)
    return strategy.privacy.epsilon
