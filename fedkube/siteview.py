"""A site's own view of its place in the job: what its sidecar serves on ``/status`` and leaves as its final word.

The sidecar keeps one :class:`SiteView` (where the site stands at the server as the control stream tells it:
registered, training round N, result uploaded, the server's Stop and its reason, or the site's own refusal or
withdrawal), serves it as JSON on its status port while it runs and writes it to its termination-message path when
it exits. The site operator reads it back into the FLSite's ``status.round`` and ``status.serverView`` and, for a
refusal, the phase Refused. It crosses a process boundary, so :meth:`SiteView.from_json` reads it as untrusted
input, as the server's status document is read (:mod:`fedkube.status`): a size limit before parsing, strict types,
bounded strings. It carries no secrets: states, a round number, reasons and messages the server or the policy
wrote.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from fedkube.clipping import clip
from fedkube.errors import FedkubeError

#: The most bytes a site view may have (well under the 4096 of a Kubernetes termination message).
SITE_VIEW_LIMIT = 2048
MESSAGE_CHARS = 512
REASON_CHARS = 64

SiteState = Literal["Connecting", "Registered", "Training", "Uploading", "Done", "Stopped", "Refused", "Withdrawn"]
SITE_STATES: tuple[str, ...] = get_args(SiteState)


class SiteViewError(FedkubeError):
    """A site view document that is not one (too long, not JSON, wrong fields or types)."""


@dataclass(frozen=True)
class SiteView:
    """Where the site stands. ``reason``/``message``: the server's Stop, or the site's refusal or withdrawal;
    ``term``: the refused term's reason (RoundsNotAccepted, StrategyNotAccepted) when ``state`` is Refused."""

    state: SiteState = "Connecting"
    round: int = 0
    reason: str = ""
    message: str = ""
    term: str = ""

    def to_json(self) -> str:
        doc = asdict(self)
        doc["reason"], doc["term"] = clip(self.reason, REASON_CHARS), clip(self.term, REASON_CHARS)
        doc["message"] = clip(self.message, MESSAGE_CHARS)
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes | str) -> SiteView:
        """Parse untrusted bytes; SiteViewError saying what is wrong."""
        raw_bytes = data.encode() if isinstance(data, str) else data
        if len(raw_bytes) > SITE_VIEW_LIMIT:
            raise SiteViewError(f"a site view is at most {SITE_VIEW_LIMIT} bytes, got {len(raw_bytes)}")
        try:
            raw: Any = json.loads(raw_bytes)
        except ValueError as exc:
            raise SiteViewError(f"a site view is JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SiteViewError("a site view is a JSON object")
        unknown = set(raw) - {"state", "round", "reason", "message", "term"}
        if unknown:
            raise SiteViewError(f"unknown site view fields {sorted(unknown)}")
        state, rnd = raw.get("state", "Connecting"), raw.get("round", 0)
        if state not in SITE_STATES:
            raise SiteViewError(f"site state {state!r} is not one of {list(SITE_STATES)}")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd <= 1_000_000:
            raise SiteViewError(f"round {rnd!r} is not a round number")
        texts = {k: raw.get(k, "") for k in ("reason", "message", "term")}
        for key, value in texts.items():
            if not isinstance(value, str):
                raise SiteViewError(f"{key} must be a string, got {type(value).__name__}")
        return cls(state, rnd, clip(texts["reason"], REASON_CHARS), clip(texts["message"], MESSAGE_CHARS),
                   clip(texts["term"], REASON_CHARS))
