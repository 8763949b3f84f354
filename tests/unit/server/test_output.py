"""ModelOutput: the checkpoint is written before the delivered model, and a failed delivery names the volume's fault."""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedkube.server import output
from fedkube.server.output import ModelOutput, OutputError
from fedkube.server.strategy_api import StrategyState
from fedkube.status import EvaluationPoint


class Recording:
    """A CheckpointStore that records the rounds it saved."""

    def __init__(self) -> None:
        self.saved: list[int] = []

    def load(self) -> None:
        return None

    def save(self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState,
             metrics: Mapping[str, float], checksums: Mapping[str, str] | None = None,
             evaluation: Sequence[EvaluationPoint] = ()) -> None:  # fmt: skip
        self.saved.append(round_)


@pytest.mark.parametrize(
    ("err", "why"),
    [
        (errno.ENOSPC, "the volume is full; fix: give spec.output a larger size"),
        (errno.EROFS, "the volume is read-only or not writable by the server; fix: mount spec.output's claim"),
        (errno.EACCES, "the volume is read-only or not writable by the server"),
    ],
)
def test_a_failed_delivery_names_the_fault_after_the_checkpoint_was_kept(
    err: int, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> None:  # EROFS cannot be produced for real without a read-only mount (root ignores modes)
        raise OSError(err, "refused")

    monkeypatch.setattr(output, "write_model", refuse)
    inner = Recording()
    out = ModelOutput(tmp_path, "mnist", 2, "fedavg", inner=inner)
    out.save(1, {"w": np.ones(2, np.float32)}, StrategyState("fedavg"), {})  # not the last round: nothing delivered
    with pytest.raises(OutputError, match=rf"job mnist: the model of round 2 could not be written to {tmp_path}: "
                                          rf"refused; {why}"):
        out.save(2, {"w": np.ones(2, np.float32)}, StrategyState("fedavg"), {})
    assert inner.saved == [1, 2] and out.final is None


def test_metadata_values_are_strings() -> None:
    meta = output.metadata_for("mnist", 3, "fedavg", {"loss": 0.25, "acc": 1.0})
    assert meta == {"format": "fedkube", "job": "mnist", "round": "3", "strategy": "fedavg",
                    "metric.acc": "1.0", "metric.loss": "0.25"}
