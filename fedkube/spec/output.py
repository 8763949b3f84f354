"""The FLJob's ``spec.output``: where the trained model is delivered.

The server writes the final global model (and with ``everyRound`` each
round's) as safetensors with a metadata header to a PersistentVolumeClaim
mounted at :data:`OUTPUT_DIR` in the server pod: an existing claim
(``claimName``) or one the operator creates (``size``, ``storageClassName``),
named ``{job}-output`` and owned by the FLJob. A job without ``spec.output``
keeps its model only in the server pod, which the FLJob's status warns about
when it succeeds (condition ``ModelNotPersisted``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from fedkube.spec.quantity import parse_quantity

OUTPUT_DIR = "/var/lib/fedkube/output"
OUTPUT_VOLUME = "fedkube-output"
# A Kubernetes object name (DNS-1123 subdomain), as a claimName must be.
CLAIM_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


class _Model(BaseModel):
    # The same strictness as every spec model (fedkube.spec.model._Model).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)


def _size(value: str) -> str:
    if parse_quantity(value) <= 0:
        raise ValueError(f"size {value!r} must be positive; fix: give a Kubernetes quantity such as 2Gi")
    return value


Size = Annotated[
    str,
    AfterValidator(_size),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "description": "A Kubernetes quantity, e.g. 2Gi."}),
]


def output_claim_name(job: str) -> str:
    """The claim the operator creates for a job's output when ``spec.output.claimName`` is not given."""
    return f"{job}-output"


class Output(_Model):
    """Where the trained model goes: a PersistentVolumeClaim, created (``size``) or existing (``claimName``)."""

    claim_name: str | None = Field(
        default=None, alias="claimName", pattern=CLAIM_NAME, max_length=253,
        description="An existing PersistentVolumeClaim to write the model to (ReadWriteOnce is enough).",
    )  # fmt: skip
    size: Size | None = Field(
        default=None, description="Size of the claim the operator creates ({job}-output) when claimName is not given."
    )
    storage_class_name: str | None = Field(
        default=None, alias="storageClassName", description="StorageClass of the created claim; empty uses the default."
    )
    every_round: bool = Field(
        default=False, alias="everyRound",
        description="Also write each round's model (round-NNNNNN.safetensors), not only the final one.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_claim(self) -> Output:
        if (self.claim_name is None) == (self.size is None):
            raise ValueError(
                "spec.output needs exactly one of claimName (an existing PersistentVolumeClaim) and size "
                "(the operator creates {job}-output); fix: set one of them"
            )
        if self.claim_name is not None and self.storage_class_name is not None:
            raise ValueError("spec.output.storageClassName applies only to a created claim (size), not to claimName")
        return self
