"""The FLJob's ``spec.evaluation``: federated evaluation of the global model on the sites' held-out data.

With ``every: N`` the server sends an *evaluate* task after every N-th
training round and after the last one: the task carries the new global
model, the trainer evaluates it and answers with metrics only
(``num_examples`` and ``metrics``, no tensors). The server weights the
sites' metrics by ``num_examples`` (capped like a training result by
``spec.strategy.maxExamplesPerSite``) and shows the curve in the FLJob's
``status.evaluation``, its Prometheus metrics and ``fedkube run``'s console.

Absent (the default), no evaluate task is sent and a job runs exactly as
before: a script written before evaluation existed never meets one.

An evaluation never fails the job nor a site: a site whose evaluate result is
missing, late or invalid is left out of that evaluation's average (and
named in the log); only losing the site itself (its heartbeats, its trainer
failing) counts against the training quorum, as during a training round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field

from fedkube.spec.problems import Problem


class Evaluation(BaseModel):
    """When and where the global model is evaluated (``spec.evaluation``)."""

    # The same strictness as every spec model (fedkube.spec.model._Model).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, strict=True)

    every: int = Field(
        ge=1, le=1_000_000,
        description="Evaluate the global model after every N-th training round, and after the last round.",
    )  # fmt: skip
    sites: list[str] = Field(
        default_factory=list, max_length=1000,
        description="The client sites that evaluate (names from spec.clients); empty: every site.",
    )  # fmt: skip

    def due(self, round_: int, rounds: int) -> bool:
        """Whether training round ``round_`` of ``rounds`` is followed by an evaluation."""
        return round_ % self.every == 0 or round_ == rounds


def check_evaluation(evaluation: Evaluation | None, clients: Sequence[str]) -> Iterator[Problem]:
    """``spec.evaluation.sites`` names only listed client sites, each once."""
    if evaluation is None:
        return
    seen: set[str] = set()
    for i, site in enumerate(evaluation.sites):
        if site not in clients:
            yield Problem(f"spec.evaluation.sites[{i}]", f"{site!r} is not a site of spec.clients",
                          f"name one of {', '.join(clients)}, or leave sites empty to evaluate on every site")
        elif site in seen:
            yield Problem(f"spec.evaluation.sites[{i}]", f"{site!r} is listed twice", "list each site once")
        seen.add(site)
