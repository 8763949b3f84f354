"""The trained model delivered: safetensors files with a metadata header, written after the last round.

Layout under the output directory (``FEDKUBE_OUTPUT_DIR``: the ``spec.output``
volume in a pod, ``runs/<job>/model/`` under ``fedkube run``)::

    <dir>/<job>.safetensors                the final global model
    <dir>/<job>-round-000003.safetensors   each round's, with spec.output.everyRound
    <dir>/<job>.json                       {"file", "round", "sha256", "bytes"} of the final model

(one claim may serve several jobs, so every name starts with the job's).

The header's ``__metadata__`` holds job, round, strategy and the round's
metrics as strings (safetensors metadata is str -> str), so a file that left
the cluster still says what produced it. The sha256 is computed from the bytes
as they are written (no second read); the status names it so a consumer can
check a copy.

:class:`ModelOutput` wraps the job's checkpoint store (or stands alone), so the
workflow's background writer writes the output too: the checkpoint is saved
first, so when the output volume is full or read-only the last good
checkpoint is kept and the write's error (naming the directory) fails the job
(``Checkpointing.finish``), instead of a job reported Succeeded whose model
is nowhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkube.errors import FedkubeError
from fedkube.formats import atomic_file, safetensors
from fedkube.server.jobs import CheckpointStore, Resumed
from fedkube.server.strategy_api import StrategyState
from fedkube.status import EvaluationPoint
from fedkube.transfer.refs import as_bytes

log = logging.getLogger(__name__)


def final_file(job: str) -> str:
    """The final model's file name in the output directory."""
    return f"{job}.safetensors"


def index_file(job: str) -> str:
    """The name of the JSON file that names the final model's round and sha256."""
    return f"{job}.json"


class OutputError(FedkubeError):
    """The trained model could not be written to the output location; the message names it and the fix."""


@dataclass(frozen=True)
class WrittenModel:
    """Where a model file went and its digest."""

    path: Path
    round: int
    sha256: str
    nbytes: int


def metadata_for(job: str, round_: int, strategy: str, metrics: Mapping[str, float]) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a delivered model (all values strings, as the format requires)."""
    meta = {"format": "fedkube", "job": job, "round": str(round_), "strategy": strategy}
    meta.update({f"metric.{k}": repr(float(v)) for k, v in sorted(metrics.items())})
    return meta


def write_model(path: Path, model: Mapping[str, np.ndarray], metadata: Mapping[str, str], round_: int) -> WrittenModel:
    """Write ``model`` to ``path`` atomically as safetensors and return its sha256, hashed while writing."""
    digest = hashlib.sha256()
    nbytes = 0
    with atomic_file(path) as f:
        for chunk in (memoryview(safetensors.header_for(model, metadata)), *(as_bytes(a) for a in model.values())):
            f.write(chunk)
            digest.update(chunk)
            nbytes += len(chunk)
    return WrittenModel(path, round_, digest.hexdigest(), nbytes)


def _why(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the volume is full; fix: give spec.output a larger size (or free space on the claim)"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the volume is read-only or not writable by the server; fix: mount spec.output's claim read-write"
    return "fix: check the output volume"


class ModelOutput:
    """A CheckpointStore that also writes the delivered model (the final round's, or every round's)."""

    def __init__(
        self, directory: Path, job: str, rounds: int, strategy: str, *,
        every_round: bool = False, inner: CheckpointStore | None = None,
    ) -> None:  # fmt: skip
        self.directory = directory
        self._job = job
        self._rounds = rounds
        self._strategy = strategy
        self._every_round = every_round
        self._inner = inner
        self.final: WrittenModel | None = None

    def load(self) -> Resumed | None:
        return self._inner.load() if self._inner is not None else None

    def save(
        self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None, evaluation: Sequence[EvaluationPoint] = (),
    ) -> None:
        if self._inner is not None:  # first: a failed output write must leave this round's checkpoint
            self._inner.save(round_, model, state, metrics, checksums, evaluation)
        self.deliver(round_, model, metrics)

    def deliver(self, round_: int, model: Mapping[str, np.ndarray], metrics: Mapping[str, float]) -> None:
        """Write round ``round_``'s output files only: what :meth:`save` writes besides the checkpoint.

        A server resuming after the last round's checkpoint delivers that model with it
        (fedkube.server.resumed_end); the same model and metrics give the same bytes.
        """
        final = round_ >= self._rounds
        if not (final or self._every_round):
            return
        meta = metadata_for(self._job, round_, self._strategy, metrics)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self._every_round:
                write_model(self.directory / f"{self._job}-round-{round_:06d}.safetensors", model, meta, round_)
            if final:
                name = final_file(self._job)
                self.final = write_model(self.directory / name, model, meta, round_)
                index = {"file": name, "round": round_, "sha256": self.final.sha256, "bytes": self.final.nbytes}
                (self.directory / index_file(self._job)).write_text(json.dumps(index, indent=1) + "\n", "utf-8")
        except OSError as exc:
            raise OutputError(
                f"job {self._job}: the model of round {round_} could not be written to {self.directory}: "
                f"{exc.strerror or exc}; {_why(exc)}"
            ) from exc
        if final:
            log.info("job %s: final model of round %s written to %s (sha256 %s)",
                     self._job, round_, self.final.path if self.final else "?",
                     self.final.sha256 if self.final else "?")  # fmt: skip
