"""A job's terms and a site's policy over them: the one place that compares the two.

The server announces its job's terms in ``Registered`` (control.proto ``JobTerms``), before any task; the
site's sidecar checks them against the policy its site admin set (an FLSite's ``spec.policy``, or ``fedkube join
--max-rounds/--allow-strategy``) and, on a refusal, leaves the job before its trainer gets anything. The site
operator's :func:`fedkube.operator.site.policy.check_task` is this same check. Pure: no I/O, nothing of the
server, sidecar or operator, so each of them may import it. It stands outside ``fedkube.spec``: importing any
module of that package loads the whole spec model and pydantic, which the sidecar does without.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedkube.errors import ConfigError

ROUNDS_NOT_ACCEPTED = "RoundsNotAccepted"
STRATEGY_NOT_ACCEPTED = "StrategyNotAccepted"
#: Where the site's policy comes from when nothing else is said: the FLSite's spec.
FLSITE_ORIGIN = "spec.policy"
#: A policy document is a few names and a number; anything longer is not one.
POLICY_CHARS = 4096


@dataclass(frozen=True)
class Refusal:
    """Why a site does not take part: ``reason`` a stable name (e.g. RoundsNotAccepted), ``message`` with the fix."""

    reason: str
    message: str


@dataclass(frozen=True)
class JobTerms:
    """What a job asks of a site that a site admin's policy may gate on (None: not announced)."""

    strategy: str | None = None
    total_rounds: int | None = None


@dataclass(frozen=True)
class TermsPolicy:
    """The terms part of a site's policy; ``origin`` names where it is set, for the fix in a refusal."""

    allowed_strategies: tuple[str, ...] | None = None
    max_rounds: int | None = None
    origin: str = FLSITE_ORIGIN

    @property
    def empty(self) -> bool:
        return self.allowed_strategies is None and self.max_rounds is None

    def to_json(self) -> str:
        return json.dumps({
            "allowedStrategies": list(self.allowed_strategies) if self.allowed_strategies is not None else None,
            "maxRounds": self.max_rounds, "origin": self.origin,
        }, separators=(",", ":"), sort_keys=True)  # fmt: skip

    @classmethod
    def from_json(cls, text: str, *, name: str) -> TermsPolicy:
        """Parse what :meth:`to_json` wrote; ConfigError naming ``name`` (the variable or file) otherwise."""
        if len(text) > POLICY_CHARS:
            raise ConfigError(f"{name}: the site policy is {len(text)} characters, more than {POLICY_CHARS}")
        try:
            raw: Any = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{name}: the site policy is not JSON ({exc}); fix: write e.g. "
                              '{"maxRounds": 10, "allowedStrategies": ["fedavg"]}') from None
        if not isinstance(raw, Mapping) or set(raw) - {"allowedStrategies", "maxRounds", "origin"}:
            raise ConfigError(f"{name}: the site policy must be an object with allowedStrategies, maxRounds and "
                              f"origin only, got {text[:200]!r}")
        strategies, rounds, origin = raw.get("allowedStrategies"), raw.get("maxRounds"), raw.get("origin")
        names_ok = isinstance(strategies, list) and all(isinstance(s, str) for s in strategies)
        if strategies is not None and not names_ok:
            raise ConfigError(f"{name}: allowedStrategies must be a list of strategy names, got {strategies!r}")
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
            raise ConfigError(f"{name}: maxRounds must be a whole number >= 1, got {rounds!r}")
        return cls(tuple(strategies) if strategies is not None else None, rounds,
                   origin if isinstance(origin, str) and origin else FLSITE_ORIGIN)

    @classmethod
    def of(cls, allowed_strategies: Sequence[str] | None, max_rounds: int | None,
           origin: str = FLSITE_ORIGIN) -> TermsPolicy:  # fmt: skip
        return cls(tuple(allowed_strategies) if allowed_strategies is not None else None, max_rounds, origin)


def check_terms(policy: TermsPolicy, terms: JobTerms) -> Refusal | None:
    """Refuse a job asking more rounds, or another strategy, than the site accepts; None: nothing refused.

    A term the server did not announce (None) is not refused: every server of this protocol version announces both
    (``Registered.terms``), so None only comes from a caller that does not know it yet.
    """
    if policy.max_rounds is not None and terms.total_rounds is not None and terms.total_rounds > policy.max_rounds:
        return Refusal(ROUNDS_NOT_ACCEPTED, f"the job asks {terms.total_rounds} rounds, the site's maxRounds "
                       f"({policy.origin}) is {policy.max_rounds}; fix: raise maxRounds or ask the job owner for "
                       "fewer rounds")
    if (policy.allowed_strategies is not None and terms.strategy is not None
            and terms.strategy not in policy.allowed_strategies):
        return Refusal(STRATEGY_NOT_ACCEPTED, f"the job aggregates with {terms.strategy!r}, the site's "
                       f"allowedStrategies ({policy.origin}) is {list(policy.allowed_strategies)}; fix: allow it "
                       "or leave the job")
    return None
