"""The evaluation curve of an FLJob: ``status.evaluation`` (spec.evaluation).

The server's live status document lists its most recent federated
evaluations (fedkube.server.evaluation); the FLJob shows the newest
:data:`EVALUATION_HISTORY` of them, oldest first, each with the training
round it followed, its metrics weighted by num_examples, and how many sites
and examples they came from. Kept separate from the training rounds'
metrics. A pure function; ``fedkube.operator.status`` calls it.

Once the server has exited it answers no poll, and the evaluation after the
last round usually ends after the operator's last look: the newest points of
its termination summary are merged into the curve already shown (by round),
so a finished job's curve ends with its final evaluation.
"""

from __future__ import annotations

from typing import Any

from fedkube.status import JobStatus
from fedkube.termination import TerminationSummary

#: Evaluations the FLJob's status keeps: a curve to read with kubectl, small enough for every poll's patch.
EVALUATION_HISTORY = 10


def evaluation_status(live: JobStatus | None, summary: TerminationSummary | None = None,
                      shown: Any = None) -> list[dict[str, Any]] | None:
    """``status.evaluation`` from the server's live status, else from its termination ``summary`` added to the
    curve ``shown`` so far; None leaves the last one written in place (nothing new to show)."""
    if live is not None and live.evaluation:
        return [p.to_dict() for p in live.evaluation[-EVALUATION_HISTORY:]]
    if summary is None or not summary.evaluation:
        return None
    points = {p["round"]: p for p in (shown if isinstance(shown, list) else [])
              if isinstance(p, dict) and isinstance(p.get("round"), int)}
    points.update((p.round, p.to_dict()) for p in summary.evaluation)
    return [points[r] for r in sorted(points)][-EVALUATION_HISTORY:]
