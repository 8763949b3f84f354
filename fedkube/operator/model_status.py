"""Where the trained model is: ``status.model`` of a succeeded FLJob, or a warning that it has no durable home.

The server names the file it delivered and its sha256 in its termination
summary (fedkube.server.output); this module turns that into the FLJob's
``status.model`` (claim, path, sha256, round). A job that succeeded with
neither ``spec.output`` nor a checkpoint claim kept its model only in the
server pod's emptyDir, which goes with the pod: ``fedkube.operator.status``
sets the ``ModelNotPersisted`` condition (and a Warning Event) once, with the
message built here. Pure functions; no import of the status module, which
calls them.
"""

from __future__ import annotations

from typing import Any

from fedkube.spec.model import FLJob
from fedkube.spec.output import OUTPUT_DIR, output_claim_name
from fedkube.termination import TerminationSummary

COND_MODEL_NOT_PERSISTED = "ModelNotPersisted"
REASON_NO_OUTPUT = "NoOutputLocation"


def model_status(job: FLJob, summary: TerminationSummary | None) -> dict[str, Any] | None:
    """``status.model`` of a succeeded job whose server delivered its model to ``spec.output``, else None."""
    out = job.spec.output
    if out is None or summary is None or not summary.model_file:
        return None
    return {
        "claimName": out.claim_name or output_claim_name(job.name),
        "path": f"{OUTPUT_DIR}/{summary.model_file}",
        "sha256": summary.model_sha256,
        "round": summary.completed_rounds,
    }


def not_persisted(job: FLJob) -> str | None:
    """Why a succeeded job's model will be lost with the server pod, or None when it has a durable location."""
    if job.spec.output is not None or job.spec.server.checkpoint.enabled:
        return None
    return (
        f"job {job.namespace}/{job.name} succeeded, but it has neither spec.output nor a checkpoint claim: the model "
        "is only in the server pod's emptyDir and is lost with the pod; fix: set spec.output (a PersistentVolumeClaim) "
        "or spec.server.checkpoint.enabled for the next run"
    )
