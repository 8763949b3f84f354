"""Per-round metrics in the FLJob status: the server's aggregated metrics of the last few rounds, bounded.

The server's /status carries the metrics of its last completed round (and its
termination summary those of the final one); the operator keeps what it saw,
one entry per completed round, the newest :data:`ROUND_METRICS_KEPT` of them.
A round that began and ended between two looks (rounds shorter than the
operator's interval) has no entry: the round numbers show such gaps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedkube.operator.views import ServerWord
from fedkube.spec.status import ROUND_METRICS_KEPT

STATUS_KEY = "roundMetrics"


def _stored(previous: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = previous.get(STATUS_KEY)
    # A hand-edited or foreign entry is dropped rather than trusted.
    return [dict(e) for e in raw or [] if isinstance(e, Mapping) and isinstance(e.get("round"), int)] if isinstance(
        raw, list) else []


def round_metrics(previous: Mapping[str, Any], word: ServerWord) -> list[dict[str, Any]]:
    """The status' ``roundMetrics`` after this look: the stored entries, plus the server's newest completed round."""
    kept = _stored(previous)
    summary = word.outcome.summary if word.outcome is not None else None
    if summary is not None:
        done, metrics, seconds = summary.completed_rounds, summary.metrics, None
    elif word.live is not None:
        done, metrics, seconds = word.live.completed_rounds, word.live.metrics, word.live.last_round_seconds
    else:
        return kept
    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    if done < 1 or not finite or any(e["round"] >= done for e in kept):
        return kept
    entry: dict[str, Any] = {"round": done, "metrics": finite}
    if seconds is not None and math.isfinite(seconds):
        entry["seconds"] = round(seconds, 3)
    return [*kept, entry][-ROUND_METRICS_KEPT:]
