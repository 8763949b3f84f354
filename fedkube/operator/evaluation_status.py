"""The evaluation curve of an FLJob: ``status.evaluation`` (spec.evaluation).

The server's live status document lists its most recent federated
evaluations (fedkube.server.evaluation); the FLJob shows the newest
:data:`EVALUATION_HISTORY` of them, oldest first, each with the training
round it followed, its metrics weighted by num_examples, and how many sites
and examples they came from. Kept separate from the training rounds'
metrics. A pure function; ``fedkube.operator.status`` calls it.
"""

from __future__ import annotations

from typing import Any

from fedkube.status import JobStatus

#: Evaluations the FLJob's status keeps: a curve to read with kubectl, small enough for every poll's patch.
EVALUATION_HISTORY = 10


def evaluation_status(live: JobStatus | None) -> list[dict[str, Any]] | None:
    """``status.evaluation`` from the server's live status; None leaves the last one written in place
    (the server no longer answers once it ended)."""
    if live is None or not live.evaluation:
        return None
    return [p.to_dict() for p in live.evaluation[-EVALUATION_HISTORY:]]
