"""The FLJob spec model: validation, defaults, and the source of the CRD schema.

from fedkube.spec import load_job
job = load_job("examples/quickstart-numpy/fljob.yaml")   # raises SpecError naming each bad field
"""

from __future__ import annotations

from fedkube.spec.checks import check_job, merge_env, merge_resources
from fedkube.spec.load import job_from_json, lint, load_job, parse_job, read_document, validate_job
from fedkube.spec.model import (
    API_GROUP,
    API_VERSION,
    DEFAULT_IMAGE,
    KIND,
    PLURAL,
    SHORT_NAME,
    Checkpoint,
    ClientSite,
    EnvVar,
    FLJob,
    FLJobSpec,
    ModelSource,
    Resources,
    ServerTemplate,
    Sidecar,
    Strategy,
    Timeouts,
    Toleration,
    TrainerTemplate,
    Transfer,
)
from fedkube.spec.problems import Problem, SpecError

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "DEFAULT_IMAGE",
    "KIND",
    "PLURAL",
    "SHORT_NAME",
    "Checkpoint",
    "ClientSite",
    "EnvVar",
    "FLJob",
    "FLJobSpec",
    "ModelSource",
    "Problem",
    "Resources",
    "ServerTemplate",
    "Sidecar",
    "SpecError",
    "Strategy",
    "Timeouts",
    "Toleration",
    "TrainerTemplate",
    "Transfer",
    "check_job",
    "job_from_json",
    "lint",
    "load_job",
    "merge_env",
    "merge_resources",
    "parse_job",
    "read_document",
    "validate_job",
]
